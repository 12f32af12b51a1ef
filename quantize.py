"""
Scoring in int8, by hand
========================

A trained encoder spends most of its scoring time in the matrix products of its Linear layers
(query, key, value, out, and the two of the MLP): y = x W^T + b, with x (N, in) the tokens of a
batch and W (out, in). A CPU with AVX512-VNNI or AMX multiplies 8-bit integers at about twice its
bf16 rate, so after training we may store W in int8, round x to int8 as it arrives, multiply in
integers, and scale the int32 sums back to floats. Nothing about training changes.

Symmetric rounding to int8. A real number v in [-m, m] becomes the integer q = round(v / s) with
the scale s = m / 127, so q is in [-127, 127] and v ~ s q. The error of one value is at most s / 2
(half a step), so the smaller the range m, the finer the steps:

    weights, per output channel   s_w[o] = max_i |W[o, i]| / 127     W[o, i] ~ s_w[o] W_q[o, i]
    activations, per row (token)  s_x[n] = max_i |x[n, i]| / 127     x[n, i] ~ s_x[n] x_q[n, i]

Then, because the scales factor out of the sum over i,

    y[n, o] = sum_i x[n, i] W[o, i] + b[o]  ~  s_x[n] s_w[o] (sum_i x_q[n, i] W_q[o, i]) + b[o]

and the sum in brackets is an int8 x int8 -> int32 matrix product (exact: in = 1536 products of at
most 127^2 sum to under 2^25, far inside int32). torch has two: torch._int_mm, which on this
project's AMX Xeon does not reach the int8 units, and oneDNN's quantized linear
(torch.ops.onednn.qlinear_pointwise, what torch's x86 int8 compiler path calls), which does. The
latter takes one activation scale per call, not one per row, so it is called with scale 1 and the
row scales multiply its output: the same maths, the integer product on AMX-INT8. Only there: on
an AMD EPYC with AVX512-VNNI and no AMX it took 13 s for a product _int_mm does in 3 ms, so it is
the default on CPUs with AMX-INT8 only (default_product).

Why per channel and per row: one scale for a whole matrix is set by its largest entry, and every
row whose values are smaller gets coarse steps. Rows of W differ in size by a factor of several in
a trained BERT, and tokens differ more ([CLS] and punctuation carry large activations); one scale
per row of each costs one float per row and keeps every row's steps as fine as its own range
allows. The weights are rounded once, after training; the activations at every call, from their
own range (dynamic quantization), so no calibration set is needed. (torch's own dynamic int8 uses
one scale per batch: on the bench's rows, its head made confident, it changes fp32's class on
11% of them, ours on 2%.)

Rounding costs memory, not arithmetic. Each step of it in eager torch (abs, max, multiply, round,
cast) is a pass over the whole activation, and at scoring sizes those passes took longer than the
int8 product itself. Compiled (torch.compile, `fused` below) they become two loops: 4-6x faster,
the same numbers. The products' output is also kept in the dtype the float layer would give
(bf16 under autocast), as writing float32 is twice the memory.

What stays in float: embeddings, LayerNorm, softmax, GELU, the attention products of q and k (two
activations, both changing with every text) and the head. That is nearly half of bf16's scoring
time, and int8 cannot touch it: the ceiling of this lesson's speed-up.

This file reads in order: rounding (quantize_per_row), the reference (the same maths in float on
the rounded values: fake quantization), the int8 layer, and quantize_encoder, which swaps the
encoder's Linear layers for it. Tests: tests/test_quantize.py (the int8 layer equals the
reference; a wrong scale is caught; a model's verdicts barely move). Benchmark and the peer,
torch's own dynamic quantization: bench/bench_quantize.py (--breakdown: where the time goes).
Measured (RESULTS.md, this project's 2-core AMX Xeon, 512 test rows, one run): bf16 366 rows/s;
ours with oneDNN's product 312 (0.85x), with torch._int_mm 189 (0.52x); torch's dynamic int8 191
(0.52x). The products themselves run faster than bf16's (and skip autocast's casts), but the
rounding and the float half stay: on this CPU, whose AMX-BF16 units already multiply fast, int8
does not beat bf16. On a 2-core AMD EPYC (AVX512-VNNI, no AMX), with torch._int_mm: 1.18-1.28x
bf16 in three runs, torch's dynamic int8 1.21-1.47x. Accuracy held (bench/int8_accuracy.py,
RESULTS.md: -0.03 points of test accuracy, inside the noise), so --int8 stays off by default.

Lesson 21 of README's reading path, the last: read after learning_curves.py.
"""
import threading

import torch
import torch.nn as nn

import bert
import common

QMAX = 127  # symmetric int8: -127..127 (leaving -128 unused keeps the range symmetric)


# --------------------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------------------
def quantize_per_row(x):
    """x (R, C) float -> (q (R, C) int8, scale (R,) float32) with x ~ scale[:, None] * q: each row
    rounded on its own range. One division per row, then a multiplication per value (x times 1/s,
    not x / s: the same up to one float rounding, and what the compiled loop below does fastest).
    A row of zeros gets the smallest scale: it rounds to zeros whatever the scale."""
    x = x.float()
    scale = (x.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)   # (R,)
    q = (x * (1 / scale)[:, None]).round().clamp(-QMAX, QMAX).to(torch.int8)
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


def default_product(device):
    """The integer product Int8Linear uses unless told: oneDNN's on a CPU with AMX-INT8, where it
    was measured fastest, torch._int_mm everywhere else. oneDNN's quantized linear is not fast on
    every x86 CPU that has it: on a 2-core AMD EPYC with AVX512-VNNI and no AMX, one (2048 x 384)
    x (384 x 1536) product took 13 s in it against 3.4 ms in torch._int_mm (RESULTS.md)."""
    fast_onednn = device == "cpu" and onednn_available() and "amx_int8" in common.cpu_flags()
    return "onednn" if fast_onednn else "int_mm"


def fused(function):
    """function compiled by torch.compile, its elementwise passes fused into one loop each.

    Rounding a batch is cheap arithmetic on a lot of memory: eager torch makes one pass over the
    whole activation per step (float, abs, max, multiply, round, clamp, cast) and, at scoring
    sizes, each pass costs about what the int8 product itself does; compiled, it is two loops (the
    row maxima, then the rounding): 4-6x faster here, the same rounding to the bit
    (tests/test_quantize.py). torch.compile's tracer is not safe to enter from several threads at
    once, and serve.py scores in several: one call at a time, under a lock (each is a short loop
    on cores the threads share anyway). Where this machine cannot compile (no C++ compiler), it
    says so in one line and runs eager; an error of the input itself is raised as it is."""
    compiled = torch.compile(function, dynamic=True)
    lock = threading.Lock()

    def run(*args):
        nonlocal compiled
        with lock:
            try:
                return compiled(*args)
            except Exception as error:  # the compiler's own errors have no common class
                if compiled is function:
                    raise
                result = function(*args)  # fails too if the input is at fault: raised from here
                print(f"quantize.py: torch.compile failed here "
                      f"({str(error).splitlines()[0][:100]}); int8 rounding runs eager: the same "
                      "numbers, slower")
                compiled = function
                return result

    run.is_compiled = lambda: compiled is not function
    return run


rows_to_int8 = fused(quantize_per_row)  # what Int8Linear calls: the same rounding, compiled


@fused
def rescale(acc, x_scale, w_scale, bias, dtype):
    """The product's sums (N, out) back to the layer's output: times each row's scale, times each
    channel's (w_scale None: oneDNN has already applied it), plus the bias, in dtype."""
    y = acc.float() * x_scale[:, None]
    if w_scale is not None:
        y = y * w_scale[None, :]
    return (y if bias is None else y + bias).to(dtype)


class Int8Linear(nn.Module):
    """An nn.Linear for scoring: its weight kept as int8 with one scale per output channel, its
    input rounded per row at every call, one int8 matrix product, the int32 sums scaled back to
    float. Its output has the dtype nn.Linear's would: the input's, or under autocast the autocast
    dtype (bf16), so what follows runs as it does in the float model. For scoring only: rounding
    has no gradient (autograd would follow the row scales alone, a wrong one), so an input that
    asks for a gradient is refused.

    product "onednn": oneDNN's quantized linear, on the CPU's int8 units; "int_mm": torch._int_mm,
    the plain int32 product (any device); by default the one default_product picks."""

    def __init__(self, linear, product=None):
        super().__init__()
        self.product = product or default_product(linear.weight.device.type)
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
        device = x.device.type
        out_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else x.dtype)
        x_q, x_scale = rows_to_int8(x.reshape(-1, self.in_features))  # (N, in) int8, (N,)
        if self.product == "onednn":
            # activation scale 1, zero point 0; the weight scales per channel: oneDNN gives the
            # sums times s_w[o], in bf16 where the layer answers in bf16 (half the memory to
            # write, one more bf16 rounding before rescale's), else in fp32
            acc_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
            acc = torch.ops.onednn.qlinear_pointwise(
                x_q, 1.0, 0, self.weight_packed, self.weight_scale, self.zero_points, None,
                1.0, 0, acc_dtype, "none", [], "")                     # (N, out)
            y = rescale(acc, x_scale, None, self.bias, out_dtype)
        else:
            acc = torch._int_mm(x_q, self.weight_t)                    # (N, out) int32, exact
            y = rescale(acc, x_scale, self.weight_scale, self.bias, out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

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
