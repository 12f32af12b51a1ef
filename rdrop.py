"""R-Drop (Liang et al. 2021): ask two dropout passes of the same batch to agree.

Dropout makes every forward pass a different sub-network; at test time the whole network answers,
which is none of them. R-Drop runs each batch twice, with two independent dropout masks, and adds
to the loss how far the two predictive distributions p1 and p2 are apart:

    loss = ( CE(z1, y) + CE(z2, y)  +  alpha * (KL(p1 || p2) + KL(p2 || p1)) / 2 ) / 2

(the paper's loss, halved so that it is on the scale of one pass's cross-entropy and the learning
rate means what it means without R-Drop; alpha is the paper's). So the sub-networks are pushed to
agree with each other, and with the whole network, the one that answers at test time. The cost:
a second forward and backward per batch (about 2x a step). With distillation (distill.py), each
pass's cross-entropy is the distillation loss instead.

`--rdrop ALPHA` switches it on (the paper uses 0.1 to 5 for classification; 0 = off);
loop.forward_loss calls `symmetric_kl`. tests/test_rdrop.py checks the loss on a hand-computed case.

Lesson 8 of README's reading path: read after fewsample.py; next: distill.py.
"""
import torch.nn.functional as F

from plumbing import flags


def add_rdrop_args(parser):
    parser.add_argument("--rdrop", type=flags.nonnegative_float, default=0.0,
                        help="R-Drop: weight of the symmetric KL between two dropout passes of "
                             "each batch (0 = off; a second forward+backward, ~2x a step)")


def symmetric_kl(logits_a, logits_b):
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2, summed over classes, averaged over rows; in fp32.
    logits (B, C)."""
    log_a = F.log_softmax(logits_a.float(), -1)
    log_b = F.log_softmax(logits_b.float(), -1)
    # F.kl_div(input=log q, target=log p, log_target=True) is KL(p || q), summed, per row
    a_from_b = F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)  # KL(p_a||p_b)
    b_from_a = F.kl_div(log_a, log_b, reduction="none", log_target=True).sum(-1)  # KL(p_b||p_a)
    return 0.5 * (a_from_b + b_from_a).mean()
