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

and the sum in brackets is an int8 x int8 -> int32 matrix product (exact: in = 1536 products of at
most 127^2 sum to under 2^25, far inside int32). torch has two: torch._int_mm, which on this
project's AMX Xeon does not reach the int8 units (slower than bf16), and oneDNN's quantized linear
(torch.ops.onednn.qlinear_pointwise, what torch's x86 int8 compiler path calls), which does. The
latter takes one activation scale per call, not one per row, so it is called with scale 1 and the
row scales multiply its output: the same maths, the integer product on AMX-INT8 or VNNI.

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
torch's own dynamic quantization: bench/bench_quantize.py. Measured so far (RESULTS.md, on this
project's 2-core AMX Xeon, 512 test rows): bf16 394 rows/s; ours with oneDNN's product 151
(0.38x), with torch._int_mm 112 (0.28x); torch's dynamic int8 226 (0.57x). Neither int8 product
beats bf16 here: one (2048 x 384) x (384 x 1536) product, idle, takes 1.9-2.9 ms with oneDNN's,
1.9 ms with _int_mm, 1.25 ms in bf16 (the AMX-BF16 units), and rounding each row and rescaling
the output are passes over memory on top. Accuracy holds (bench/int8_accuracy.py, RESULTS.md:
-0.03 points of test accuracy, inside the noise), so --int8 stays off by default.

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
def onednn_available():
    """Whether this torch has oneDNN's quantized linear for CPU tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class Int8Linear(nn.Module):
    """An nn.Linear for scoring: its weight kept as int8 with one scale per output channel, its
    input rounded per row at every call, one int8 matrix product, the int32 sums scaled back to
    float32. For scoring only: rounding has no gradient (autograd would follow the row scales
    alone, a wrong one), so an input that asks for a gradient is refused.

    product "onednn" (the default where torch has it): oneDNN's quantized linear, on the CPU's
    int8 units; "int_mm": torch._int_mm, the plain int32 product (any device)."""

    def __init__(self, linear, product=None):
        super().__init__()
        on_cpu = linear.weight.device.type == "cpu"
        self.product = product or ("onednn" if on_cpu and onednn_available() else "int_mm")
        w_q, w_scale = quantize_per_row(linear.weight.detach())
        self.register_buffer("weight_q", w_q)                          # (out, in) int8
        self.register_buffer("weight_scale", w_scale)                  # (out,)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.product == "onednn":
            # oneDNN's own blocked layout, packed once; not a buffer: it is rebuilt, never saved
            self.weight_packed = torch.ops.onednn.qlinear_prepack(w_q, None)
            self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        else:
            # (in, out), contiguous: _int_mm multiplies (N, in) by (in, out)
            self.weight_t = w_q.T.contiguous()

    def forward(self, x):                                              # x (..., in)
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("Int8Linear is for scoring: its rounding has no gradient")
        shape = x.shape
        x_q, x_scale = quantize_per_row(x.reshape(-1, self.in_features))   # (N, in), (N,)
        if self.product == "onednn":
            # activation scale 1, weight scales per channel: sum_i x_q W_q times s_w[o], in fp32
            y = torch.ops.onednn.qlinear_pointwise(
                x_q, 1.0, 0, self.weight_packed, self.weight_scale, self.zero_points, None,
                1.0, 0, torch.float32, "none", [], "") * x_scale[:, None]
        else:
            acc = torch._int_mm(x_q, self.weight_t)                    # (N, out) int32, exact
            y = acc.float() * x_scale[:, None] * self.weight_scale[None, :]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, int8 per-channel, "
                f"{self.product}")


# --------------------------------------------------------------------------------------------------
# The encoder in int8
# --------------------------------------------------------------------------------------------------
def quantize_encoder(model, product=None):
    """Swap every nn.Linear inside the encoder's layers (attention query, key, value, out; the
    MLP's two) for an Int8Linear, in place; the embeddings, LayerNorms, the pooler and the head
    stay float. For a trained model in eval mode. Returns the model and the number swapped."""
    encoder = model.bert if isinstance(model, bert.BertClassifier) else model
    swapped = 0
    for layer in encoder.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child, product))
                    swapped += 1
    return model, swapped
