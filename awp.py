"""AWP: adversarial weight perturbation (Wu et al. 2020), as Kaggle NLP solutions use it.

The idea: a minimum of the training loss whose neighbourhood is flat tends to generalise better than
a sharp one. So at every step, before the optimizer moves, push the weights a little way UP the
loss, take the gradient there too, and let the update follow both: it then favours weights whose
loss stays low when they are disturbed. The cost is a second forward and backward per batch.

loop.train() calls it between the backward pass and the optimizer step (`with awp.perturbed():`).
`--awp` switches it on; bench/bench_awp.py times it; README's RESULTS.md says what it gained here
(inside the noise at 2,000 rows).

Lesson 6 of README's reading path, with eda.py: read after eda.py; next: fewsample.py.
"""
import contextlib

import torch

from plumbing import flags


def add_awp_args(parser):
    parser.add_argument("--awp", action="store_true",
                        help="adversarial weight perturbation (Wu et al. 2020, as Kaggle NLP "
                             "solutions use it): a second forward+backward per batch, "
                             "about 2x the cost of a step")
    parser.add_argument("--awp-lr", type=flags.positive_float, default=1.0,
                        help="AWP: step up the gradient, as a multiple of each weight matrix's "
                             "own norm")
    parser.add_argument("--awp-eps", type=flags.positive_float, default=1e-3,
                        help="AWP: no weight moves more than eps * |w| "
                             "(Kaggle solutions use 1e-3 to 0.2)")
    parser.add_argument("--awp-start", type=flags.positive_int, default=1,
                        help="AWP: first epoch it acts in (1-based)")


class AWP:
    """Adversarial Weight Perturbation (Wu et al. 2020), in the form Kaggle NLP solutions use.
    After the ordinary backward pass, move each chosen weight up the loss along its gradient by
    awp_lr times its own norm,  w += awp_lr * g / |g| * |w|,  clipped elementwise to the box
    w0 +- eps * |w0|; forward and backward the same batch there, its gradient ADDING to the clean
    one; put every weight back bit for bit (a copy, not a subtraction, which would round); then the
    optimizer steps. The update thus favours weights whose loss stays low in a neighbourhood around
    them, a flatter minimum, which tends to generalise better.

    Which weights: the trainable matrices (dim >= 2: linear layers, embeddings, LoRA's A and B, the
    head), as in the paper's code, which leaves biases and norm gains alone. Kaggle's filter by name
    ("weight" in name) means the same but catches LayerNorm gains by accident and misses lora_A/B.
    The box is relative: a weight at exactly 0 stays there (LoRA's B before its first update).
    The direction is the gradient accumulated so far in this optimizer step (with --grad-accum, the
    earlier micro-batches' too), as in the Kaggle form; an fp16 gradient still carries the
    GradScaler's factor, which the direction does not see, and the second backward is scaled like
    the first.
    Under DDP the gradient is already averaged over processes, so every process moves alike.
    Costs: one more forward and backward per batch, and a copy of the moved weights while moved.
    AWP keeps nothing from one step to the next, so a resume point needs nothing more for it."""

    def __init__(self, model, lr, eps):
        self.lr, self.eps = lr, eps
        self.params = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        self.backup = []  # (parameter, its weights before the move)

    @torch.no_grad()
    def perturb(self):
        for p in self.params:
            if p.grad is None:
                continue
            w0 = p.detach().clone()
            self.backup.append((p, w0))
            # the Kaggle form's 1e-6
            step = self.lr * p.grad / (p.grad.norm() + 1e-6) * (w0.norm() + 1e-6)
            box = self.eps * w0.abs()
            p.add_(torch.minimum(torch.maximum(step, -box), box))

    @torch.no_grad()
    def restore(self):
        for p, w0 in self.backup:
            p.copy_(w0)
        self.backup = []

    @contextlib.contextmanager
    def perturbed(self):
        self.perturb()
        try:
            yield
        finally:
            self.restore()

