"""
Scoring in int8, by hand
========================

A trained encoder spends its scoring time in the matrix products of its Linear layers (query, key,
value, out, and the two of the MLP): y = x W^T + b, with x (N, in) the tokens of a batch and W
(out, in). A CPU with AVX512-VNNI or AMX multiplies 8-bit integers at about twice its bf16 rate,
so after training we may store W in int8, round x to int8 as it arrives, multiply in integers,
and scale the int32 sums back to floats. Nothing about training changes.

Symmetric rounding to int8. A real number v in [-m, m] becomes the integer q = round(v / s) with
the scale s = m / 127, so q is in [-127, 127] and v ~ s q. The error of one value is at most s / 2
(half a step), so the smaller the range m, the finer the steps:

    weights, per output channel   s_w[o] = max_i |W[o, i]| / 127     W[o, i] ~ s_w[o] W_q[o, i]
    activations, per row (token)  s_x[n] = max_i |x[n, i]| / 127     x[n, i] ~ s_x[n] x_q[n, i]

Then, because the scales factor out of the sum over i,

    y[n, o] = sum_i x[n, i] W[o, i] + b[o]  ~  s_x[n] s_w[o] (sum_i x_q[n, i] W_q[o, i]) + b[o]

and the sum in brackets is an int8 x int8 -> int32 matrix product (torch._int_mm, exact: in = 1536
products of at most 127^2 sum to under 2^25, far inside int32).

Why per channel and per row: one scale for a whole matrix is set by its largest entry, and every
row whose values are smaller gets coarse steps. Rows of W differ in size by a factor of several in
a trained BERT, and tokens differ more ([CLS] and punctuation carry large activations); one scale
per row of each costs one float per row and keeps every row's steps as fine as its own range
allows. The weights are rounded once, after training; the activations at every call, from their
own range (dynamic quantization), so no calibration set is needed.

What stays in float: embeddings, LayerNorm, softmax, GELU, the attention products of q and k (two
activations, both changing with every text) and the head. Those are a small part of the time.

This file reads in order: rounding (quantize_per_row), the reference (the same maths in float on
the rounded values: fake quantization), the int8 layer, and quantize_encoder, which swaps the
encoder's Linear layers for it. Tests: tests/test_quantize.py (the int8 layer equals the
reference; a wrong scale is caught; a model's verdicts barely move). Benchmark and the peer,
torch's own dynamic quantization: bench/bench_quantize.py. Measured so far (RESULTS.md): on this
project's AMX Xeon torch._int_mm does not reach the int8 units, so this path is correct but slower
than bf16 (0.26x); a faster int8 product is the next step.

Lesson 21 of README's reading path, the last: read after learning_curves.py.
"""
import torch
import torch.nn as nn

import bert

QMAX = 127  # symmetric int8: -127..127 (leaving -128 unused keeps the range symmetric)


# --------------------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------------------
def quantize_per_row(x):
    """x (R, C) float -> (q (R, C) int8, scale (R,) float32) with x ~ scale[:, None] * q: each row
    rounded on its own range. A row of zeros gets scale 1 (any scale rounds it to zeros)."""
    x = x.float()
    scale = x.abs().amax(dim=1) / QMAX                                 # (R,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


# --------------------------------------------------------------------------------------------------
# Reference: the same rounding, the product in float (fake quantization)
# --------------------------------------------------------------------------------------------------
def linear_fake_quant(x, w_q, w_scale, bias):
    """What Int8Linear computes, with the rounded values turned back into float64 and multiplied
    there: x (N, in) float, w_q (out, in) int8, w_scale (out,). Differs from the int8 path only in
    the order of float roundings after the exact integer sum."""
    x_q, x_scale = quantize_per_row(x)
    x_hat = x_q.double() * x_scale.double()[:, None]                   # (N, in) back to reals
    w_hat = w_q.double() * w_scale.double()[:, None]                   # (out, in)
    y = x_hat @ w_hat.T                                                # (N, out)
    return y if bias is None else y + bias.double()


# --------------------------------------------------------------------------------------------------
# The int8 layer
# --------------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """An nn.Linear for scoring: its weight kept as int8 with one scale per output channel, its
    input rounded per row at every call, one int8 matrix product, the int32 sums scaled back to
    float32. No gradient flows: it is for inference only."""

    def __init__(self, linear):
        super().__init__()
        w_q, w_scale = quantize_per_row(linear.weight.detach())
        # (in, out), contiguous: _int_mm multiplies (N, in) by (in, out)
        self.register_buffer("weight_t", w_q.T.contiguous())
        self.register_buffer("weight_scale", w_scale)                  # (out,)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):                                              # x (..., in)
        shape = x.shape
        x_q, x_scale = quantize_per_row(x.reshape(-1, self.in_features))   # (N, in), (N,)
        acc = torch._int_mm(x_q, self.weight_t)                        # (N, out) int32, exact
        y = acc.float() * x_scale[:, None] * self.weight_scale[None, :]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


# --------------------------------------------------------------------------------------------------
# The encoder in int8
# --------------------------------------------------------------------------------------------------
def quantize_encoder(model):
    """Swap every nn.Linear inside the encoder's layers (attention query, key, value, out; the
    MLP's two) for an Int8Linear, in place; the embeddings, LayerNorms, the pooler and the head
    stay float. For a trained model in eval mode. Returns the model and the number swapped."""
    encoder = model.bert if isinstance(model, bert.BertClassifier) else model
    swapped = 0
    for layer in encoder.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
                    swapped += 1
    return model, swapped
