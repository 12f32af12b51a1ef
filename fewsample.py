"""Two fixes for fine-tuning on few rows (Zhang et al. 2021, "Revisiting few-sample BERT
fine-tuning"): a learning rate that decays with depth, and fresh top layers.

Layer-wise learning-rate decay (`--llrd 0.9`). The layers of a pretrained encoder are not equally
ready for a new task: the lower ones hold general features of language (useful as they are), the
upper ones the features of the pre-training task (next-sentence prediction, masked words). So the
head and the pooler learn at the full rate and each layer below at `factor` times the rate of the
one above it:

    lr(head, pooler, classifier) = lr
    lr(layer i of L)             = lr * factor^(L - i)          i = 0 (bottom) .. L-1 (top)
    lr(embeddings)               = lr * factor^(L + 1)

MiniLM has L = 6: with 0.9 the top layer learns at 0.9 lr, the bottom one at 0.53 lr, the
embeddings at 0.48 lr. (`--llrd 1`, the default, is one rate for all: plain fine-tuning.)

Re-initialising the top layers (`--reinit-top N`). The top layers were shaped by pre-training's
objective and may carry more of it than use; starting them, and the pooler above them, afresh from
BERT's own initialisation (normal weights of std 0.02, zero biases, LayerNorm 1 and 0) can help on
small data. The drawn weights come from the run's seed.

loop.make_optimizer calls `lr_groups`; train_bert.py calls `reinit_top_layers` after loading the
pretrained weights (LoRA keeps its base frozen, so only --llrd applies to train_lora.py).
tests/test_fewsample.py reads each layer's rate off the optimizer's groups and checks that re-init
changes only the named layers.

Lesson 7 of README's reading path: read after awp.py; next: rdrop.py.
"""
import re

import torch
import torch.nn as nn

import bert
import common
from plumbing import flags

INIT_STD = 0.02  # BERT's initializer_range


def add_fewsample_args(parser, reinit=True):
    parser.add_argument("--llrd", type=flags.fraction_above_0, default=1.0,
                        help="layer-wise learning-rate decay: each encoder layer learns at this "
                             "times the rate of the one above it (head and pooler: --lr); 1 = off")
    if reinit:
        parser.add_argument("--reinit-top", type=flags.nonnegative_int, default=0,
                            help="re-initialise the top N encoder layers and the pooler from "
                                 "BERT's initialisation before training (0 = off)")


def depth(name, num_layers):
    """How many steps of decay a parameter sits below the head: 0 for everything outside the
    encoder's layers and embeddings (pooler, head, classifier), L - i for layer i, L + 1 for the
    embeddings. Works on BertClassifier names, LoRA's included
    ("bert.layers.3.attn.query.lora_A")."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match:
        return num_layers - int(match.group(1))
    if re.search(r"(?:^|\.)embeddings\.", name):
        return num_layers + 1
    return 0


def lr_groups(model, lr, weight_decay, factor=1.0):
    """AdamW parameter groups: weight decay on matrices only, and, with factor < 1, one group per
    depth at lr * factor^depth. Each group keeps its rate in "lr" (the schedule scales it)."""
    encoders = [m for m in model.modules() if isinstance(m, bert.BertModel)]
    num_layers = encoders[0].config.num_hidden_layers if encoders else 0
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        d = depth(name, num_layers) if factor != 1.0 else 0
        decay = param.dim() >= 2  # decaying biases and LayerNorm gains pulls them to 0: it hurts
        group = groups.setdefault((d, decay), {"params": [], "lr": lr * factor ** d,
                                               "weight_decay": weight_decay if decay else 0.0,
                                               "depth": d})
        group["params"].append(param)
    # by depth, and in each depth the decayed matrices first (the order of the groups without
    # --llrd since the project began: a resume point's AdamW state is stored in this order)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


@torch.no_grad()
def bert_init_(module):
    """BERT's own initialisation of one module: Linear and Embedding weights ~ N(0, 0.02), biases
    0, LayerNorm weight 1 and bias 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


def reinit_top_layers(model, count):
    """Re-initialise the top `count` layers of the model's encoder and its pooler in place (from the
    current torch seed). Returns the names of the re-initialised layers."""
    if count == 0:
        return []
    encoder = model.bert
    num_layers = encoder.config.num_hidden_layers
    if count > num_layers:
        raise common.UserError(f"--reinit-top {count}: the encoder has {num_layers} layers")
    names = []
    for i in range(num_layers - count, num_layers):
        encoder.layers[i].apply(bert_init_)
        names.append(f"bert.layers.{i}")
    encoder.pooler.apply(bert_init_)
    return names + ["bert.pooler"]
