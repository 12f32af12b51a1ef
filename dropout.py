"""Dropout from 16 random bits an element: the same layer, a fifth of the cost on a CPU.

Dropout zeroes each element with probability p and scales the rest by 1/(1-p), so a layer's output
keeps its expected value. torch draws that mask with `bernoulli_`: one random float per element,
made from 32 fresh random bits and a comparison, element by element. On a 2-core CPU training
MiniLM that was 22% of the whole step (bench/step_breakdown.py), nearly half of what the matmuls
took: BERT drops three activations a layer (the attention probabilities and the two residual
branches) and the embeddings' output once; the attention probabilities alone are
(B, heads, T, T) = 1.3M elements a layer at batch 32 and ~58 tokens.

A drop/keep decision needs far fewer bits than a float. Here one 64-bit random word is cut into
four 16-bit numbers u, each uniform on {0, ..., 65535}, and

    drop where u < k,   k = round(p * 65536)          P(drop) = k / 65536, within 2^-17 of p
    y = x * keep / (1 - k / 65536)                    E[y] = x exactly (scaled by the true keep)

so a mask costs a quarter of a random word and a compare. Measured on this project's 2-core AMD
EPYC, bf16 activations: a hidden-state mask of 712,704 elements 3.4 ms with F.dropout, 0.6 ms
here; the attention probabilities (1.3M) 6.8 ms vs 1.2 ms.

Where each path runs:
  - CPU: the mask above. torch's fused SDPA cannot take it (SDPA on a CPU draws its own mask with
    bernoulli_, and with dropout it falls back to plain ops anyway), so WrittenOutAttention below
    writes bert.py's attention out when it trains on a CPU and calls `dropout` on the
    probabilities.
  - CUDA (and any other device): F.dropout. On a GPU the mask is drawn inside the kernel (Philox
    counters, no memory traffic for random numbers), which this cannot beat; SDPA's flash kernel
    drops attention in-kernel too.
bert.py itself stays plain torch (nn.Dropout, SDPA): `use_cheap_dropout(model)` swaps both in
place, and the plumbing (plumbing/classifiers.py) does so for every BERT a run trains or scores.

The masks come from torch's default generator, like F.dropout's: seeded by the run's seed,
saved and restored by the resume point (resume.py), so a resumed run draws the very masks it would
have.

tests/test_dropout.py checks the rate, the scaling, the gradient, the determinism and the swap;
bench/step_breakdown.py and bench/speed_ablation.py measure what it saves.

Lesson 4 of README's reading path: read after plain_loop.py; next: resume.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import bert

BITS = 16                      # random bits per decision: 4 decisions per 64-bit word
LEVELS = 1 << BITS             # 65536 equally likely values of u
PROFILE_NAME = "cheap_dropout"


def drop_threshold(p):
    """k such that dropping where u < k drops with probability k / 65536, the nearest to p."""
    return round(p * LEVELS)


def drop_mask(shape, p, device="cpu", generator=None):
    """A boolean tensor of `shape`, True (drop) with probability round(p * 65536) / 65536.

    random_(-2^63, 2^63 - 1) fills every bit of each int64 (plain random_() leaves the sign bit 0,
    which would bias every fourth 16-bit lane); viewed as int16 each word is four numbers in
    [-32768, 32767], i.e. u - 32768, so `u < k` reads `lane < k - 32768`."""
    if drop_threshold(p) >= LEVELS:  # the threshold 32768 would not fit in an int16
        return torch.ones(shape, dtype=torch.bool, device=device)
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=generator)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes < drop_threshold(p) - LEVELS // 2


def dropout(x, p, training=True, cheap_masks=True):
    """F.dropout(x, p, training), with the mask from 16 random bits an element on a CPU.
    cheap_masks=False: torch's own (bench/speed_ablation.py measures the difference)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not cheap_masks:
        return F.dropout(x, p, training=True)
    if drop_threshold(p) >= LEVELS:  # p within 2^-17 of 1: every element dropped
        return x * 0.0
    keep_probability = 1.0 - drop_threshold(p) / LEVELS
    # A named range, so that a profile (bench/step_breakdown.py) can count these ops as dropout;
    # it costs about a microsecond when no profiler listens.
    with torch.profiler.record_function(PROFILE_NAME):
        # masked_fill saves only the boolean mask for its backward (1 byte an element); the scale
        # is a Python number, so its backward needs nothing saved.
        return x.masked_fill(drop_mask(x.shape, p, x.device), 0.0) * (1.0 / keep_probability)


class Dropout(nn.Module):
    """nn.Dropout with the cheap mask on a CPU. `cheap_masks` is per module so that
    bench/speed_ablation.py can hold models with and without it side by side."""

    def __init__(self, p=0.1):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.cheap_masks = True

    def forward(self, x):
        return dropout(x, self.p, self.training, self.cheap_masks)

    def extra_repr(self):
        return f"p={self.p}"


class WrittenOutAttention(bert.SelfAttention):
    """bert.SelfAttention with softmax(Q K^T / sqrt(d)) V written out op by op where that is
    faster, so that the probabilities' dropout can be the mask above. Same weights, same maths.

    `impl` "auto": written out in training on a CPU, SDPA elsewhere. In training on a CPU SDPA with
    dropout falls back to plain ops anyway and draws its mask with bernoulli_; without dropout its
    CPU kernel's bf16 backward measured 4x slower than the plain ops at ~58 tokens (24.9 vs 5.6 ms
    a layer at batch 32 on this project's 2-core EPYC; RESULTS.md, Speed). "sdpa" / "written":
    always one of them, for bench/speed_ablation.py and the tests (the results are equal,
    tests/test_bench.py)."""

    impl = "auto"
    cheap_masks = True  # False: torch's masks, for the ablation

    def forward(self, x, attn_mask):
        written = self.impl == "written" or (
            self.impl == "auto" and self.training and x.device.type == "cpu")
        if not written:
            return super().forward(x, attn_mask)
        q, k, v = self.split_heads(x)       # each (B, n_head, T, head_dim)
        # Every intermediate is a (B, n_head, T, T) tensor written to memory and read back.
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if attn_mask is not None:            # no query attends to padding
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = dropout(scores.softmax(-1), self.attn_dropout, self.training, self.cheap_masks)
        return self.join_heads(probs @ v)    # (B, T, D)


def use_cheap_dropout(model):
    """In place: every nn.Dropout of `model` becomes Dropout (same p), every bert.SelfAttention a
    WrittenOutAttention. The latter adds no parameters or buffers, so changing a module's class
    keeps its weights, and any LoRA layer already inside it. Returns the model."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout):
                setattr(parent, name, Dropout(child.p).train(child.training))
            elif type(child) is bert.SelfAttention:
                child.__class__ = WrittenOutAttention
    return model
