"""
Attention pooling with a penalty on confusing tokens, fused in Triton
======================================================================

A classifier head that turns token states into one vector per text. For each row b of a batch:

    s_t = H_t . w + bias - P_t        score of token t; P_t = lambda if token t is a
                                      "confusing word"
    s_t = -inf where M_t is False     padding never gets weight
    a   = softmax_t(s)                (B, T)  attention weights, returned for analysis
    out = sum_t a_t H_t               (B, D)  the pooled feature

with H (B, T, D) the encoder's hidden states, w (D,) and bias the learned scoring layer, M (B, T)
the padding mask (True = real token) and P (B, T) the penalty. The penalty pushes the pooling away
from words that analyze.py found in the confused class pairs, so the head has to lean on others.

Why fuse it? In eager PyTorch this is a matrix-vector product, a mask, a softmax and a weighted sum:
H is read twice, (B, T) temporaries go back and forth through memory, and under mixed precision
the fp32 upcast of H is written out in full. The work is a handful of flops per element of H, so
the time is all memory traffic; the floor is reading H once in the forward pass and reading H and
writing dH once in the backward pass. The kernels below move exactly those bytes (plus O(B * T)).

This file reads in the order of the Triton tutorials: the torch reference (also the CPU training
path), the forward kernels, the backward kernel, the autograd.Function that wires them, the single
entry point `attn_pool`, the loader of the penalised word list, and the head that bert.py's
BertClassifier takes (`--head attnpool`). Tests: tests/test_attn_pool.py; benchmark:
bench/bench_attn_pool.py.

Lesson 13 of README's reading path: read after train_lora.py; next: train_lstm.py.
"""
import functools
import json

import torch
import torch.nn as nn
import triton
import triton.language as tl

# %%
# Reference
# ---------
# Plain torch, differentiable by autograd. It computes in fp32 (fp64 when given fp64, so that
# gradcheck can run on it) and returns `pooled` in the dtype of `hidden`, like any layer would, and
# the weights in the compute dtype. Under torch.autocast the matrix products would silently drop
# to bf16, so autocast is switched off inside: the point of the reference is to be the exact one.


def attn_pool_reference(hidden, mask, penalty, w, bias):
    compute_dtype = torch.promote_types(torch.promote_types(hidden.dtype, w.dtype), torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(compute_dtype)                                             # (B, T, D)
        scores = h @ w.to(compute_dtype) + bias.to(compute_dtype).reshape(())    # (B, T)
        scores = (scores - penalty.to(compute_dtype)).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)                                  # (B, T)
        pooled = torch.einsum("bt,btd->bd", weights, h)                          # (B, D)
    return pooled.to(hidden.dtype), weights


# %%
# Forward kernels
# ---------------
# One program per (row, chunk of T). Each program walks its chunk in tiles of BLOCK_T tokens,
# holding the whole hidden vector of each token (BLOCK_D >= D lanes) in registers: the score of a
# token needs the full dot product H_t . w before its weight is known, and keeping the tile in
# registers lets the same loaded values feed both the score and the weighted sum, so H is read
# from memory exactly once.
#
# Online softmax (as in FlashAttention): over the tiles seen so far keep
#     m   = max_t s_t,   l = sum_t exp(s_t - m),   acc = sum_t exp(s_t - m) H_t          (D,)
# and when a tile raises the maximum to m', rescale the old l and acc by exp(m - m').
#
# Why split T into chunks at all? One program per row gives only B programs: a batch of 32 would
# leave most of an H100's 132 multiprocessors idle, and this kernel lives on memory bandwidth,
# which needs many loads in flight on every multiprocessor. So rows are cut into NUM_SPLITS
# chunks (flash-decoding), each chunk writes its partial (m_j, l_j, acc_j), and a second, small
# kernel merges them:
#     m = max_j m_j,   l = sum_j exp(m_j - m) l_j,   out = sum_j exp(m_j - m) acc_j / l
# The partials cost B * NUM_SPLITS * D * 4 bytes, small next to the B * T * D elements of H.
#
# The first kernel also writes the raw scores s_t into the weights buffer; once the merge knows
# the row's log-sum-exp, lse = m + log(l), it turns them in place into a_t = exp(s_t - lse).
# lse is the per-row softmax statistic the backward pass recomputes the weights from.
#
# A row must hold at least one real token (a [CLS] always is): with none, the softmax of all -inf
# is NaN here as in torch.


@triton.jit
def _attn_pool_fwd_chunk(
    H, Mask, Penalty, W, Bias,                  # inputs: (B, T, D), (B, T), (B, T), (D,), (1,)
    Scores, PartMax, PartSum, PartAcc,          # outputs: (B, T), (B, S), (B, S), (B, S, D) fp32
    T, D, T_PER_SPLIT,                          # all tensors contiguous
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)         # int64: row * T * D can pass 2**31
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    w = tl.load(W + offs_d, mask=d_in, other=0.0).to(tl.float32)                 # (BLOCK_D,)
    bias = tl.load(Bias).to(tl.float32)

    # The weighted sum is kept per tile row, (BLOCK_T, BLOCK_D), and summed over rows once at the
    # end: summing every tile would cost a reduction across threads (through shared memory) per
    # tile, the one step of the loop that is not a plain multiply-add.
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    t_begin = split * T_PER_SPLIT
    t_end = tl.minimum(t_begin + T_PER_SPLIT, T)
    for t0 in tl.range(t_begin, t_end, BLOCK_T, num_stages=NUM_STAGES):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < t_end
        # (BLOCK_T, BLOCK_D)
        h = tl.load(H + (row * T + offs_t[:, None]) * D + offs_d[None, :],
                    mask=t_in[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        real = tl.load(Mask + row * T + offs_t, mask=t_in, other=0) != 0
        pen = tl.load(Penalty + row * T + offs_t, mask=t_in, other=0.0).to(tl.float32)
        s = tl.sum(h * w[None, :], axis=1) + bias - pen                          # (BLOCK_T,)
        s = tl.where(real, s, float("-inf"))
        tl.store(Scores + row * T + offs_t, s, mask=t_in)

        m_new = tl.maximum(m, tl.max(s, axis=0))
        # While every token so far is padding, m_new is -inf and exp(-inf - -inf) would be NaN;
        # subtracting 0 instead gives exp(-inf) = 0 for all of them, which is what they weigh.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_shift)
        p = tl.exp(s - m_shift)                                                  # (BLOCK_T,)
        l = l * rescale + tl.sum(p, axis=0)
        acc = acc * rescale + p[:, None] * h
        m = m_new

    part = row * num_splits + split
    tl.store(PartMax + part, m)
    tl.store(PartSum + part, l)
    tl.store(PartAcc + part * D + offs_d, tl.sum(acc, axis=0), mask=d_in)


@triton.jit
def _attn_pool_fwd_merge(
    PartMax, PartSum, PartAcc,                  # inputs: (B, S), (B, S), (B, S, D) fp32
    Weights,                                    # in: raw scores, out: softmax weights (B, T) fp32
    Out, Lse,                                   # outputs: (B, D) fp32, (B,) fp32
    T, D, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_in = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    part_max = tl.load(PartMax + row * NUM_SPLITS + offs_s, mask=s_in, other=float("-inf"))
    part_sum = tl.load(PartSum + row * NUM_SPLITS + offs_s, mask=s_in, other=0.0)
    part_acc = tl.load(PartAcc + (row * NUM_SPLITS + offs_s[:, None]) * D + offs_d[None, :],
                       mask=s_in[:, None] & d_in[None, :], other=0.0)           # (BLOCK_S, BLOCK_D)

    m = tl.max(part_max, axis=0)
    rescale = tl.exp(part_max - m)              # a chunk of padding only has m_j = -inf: weight 0
    l = tl.sum(rescale * part_sum, axis=0)
    out = tl.sum(rescale[:, None] * part_acc, axis=0) / l
    tl.store(Out + row * D + offs_d, out, mask=d_in)
    lse = m + tl.log(l)
    tl.store(Lse + row, lse)

    # a_t = exp(s_t - lse); padding has s_t = -inf, so its weight is exactly 0.
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < T
        s = tl.load(Weights + row * T + offs_t, mask=t_in)
        tl.store(Weights + row * T + offs_t, tl.exp(s - lse), mask=t_in)


# %%
# Tile sizes
# ----------
# A tile of BLOCK_T tokens x BLOCK_D features is one load, kept in registers together with an
# fp32 accumulator of the same shape. BLOCK_D is D rounded up to a power of two (tl.arange needs
# one); the extra lanes are masked. Measured on an H200 (B=256, T=512, D=768 and 1024): 8K
# elements per tile, with as many warps as give each thread 128 bytes of it (8 warps in fp32, 4
# in bf16), were as fast as or faster than the other tiles of 16-64 KB and 4-16 warps tried; the
# 64 KB tiles were 1.5-5x slower. Enough programs to cover every multiprocessor a few times over
# hides the memory latency.

TILE_ELEMENTS = 8192
BYTES_PER_THREAD = 128
# The T loops are software-pipelined: the loads of the next tiles are issued while this one is
# reduced. A plain range() loop was not, and waited on memory each tile (H200, bf16, B=256,
# T=512, D=1024: forward 125 us with range(), 97 us with 3 stages).
NUM_STAGES = 3
PROGRAMS_PER_SM = 4
MAX_D = 8192                      # beyond this a single token no longer fits a register tile
INTERPRETER_SMS = 2               # on CPU under TRITON_INTERPRET=1: small, but still > 1 chunk
                                  # per row


def _tile_sizes(T, D, element_size):
    block_d = triton.next_power_of_2(D)
    block_t = min(triton.next_power_of_2(T), max(1, TILE_ELEMENTS // block_d))
    tile_bytes = block_t * block_d * element_size
    num_warps = min(8, max(1, tile_bytes // (32 * BYTES_PER_THREAD)))
    return block_t, block_d, num_warps


@functools.cache
def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(B, T, block_t, device):
    """Chunks per row: enough programs for PROGRAMS_PER_SM per multiprocessor, at least one tile
    each. Returns (num_splits, tokens per chunk), the latter a multiple of block_t."""
    sms = _multiprocessors(device) if device.type == "cuda" else INTERPRETER_SMS
    tiles = triton.cdiv(T, block_t)
    tiles_per_split = triton.cdiv(tiles, min(tiles, triton.cdiv(PROGRAMS_PER_SM * sms, B)))
    t_per_split = tiles_per_split * block_t
    return triton.cdiv(T, t_per_split), t_per_split


def attn_pool_forward_triton(hidden, mask, penalty, w, bias):
    """Launch the forward kernels on contiguous inputs. Returns out (B, D) fp32, weights (B, T)
    fp32 and lse (B,) fp32."""
    B, T, D = hidden.shape
    block_t, block_d, num_warps = _tile_sizes(T, D, hidden.element_size())
    num_splits, t_per_split = _num_splits(B, T, block_t, hidden.device)
    fp32 = dict(device=hidden.device, dtype=torch.float32)
    weights = torch.empty((B, T), **fp32)
    part_max = torch.empty((B, num_splits), **fp32)
    part_sum = torch.empty((B, num_splits), **fp32)
    part_acc = torch.empty((B, num_splits, D), **fp32)
    out = torch.empty((B, D), **fp32)
    lse = torch.empty((B,), **fp32)
    _attn_pool_fwd_chunk[(B, num_splits)](
        hidden, mask, penalty, w, bias,
        weights, part_max, part_sum, part_acc,
        T, D, t_per_split,
        BLOCK_T=block_t, BLOCK_D=block_d, NUM_STAGES=NUM_STAGES, num_warps=num_warps,
    )
    _attn_pool_fwd_merge[(B,)](
        part_max, part_sum, part_acc, weights, out, lse,
        T, D, num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        BLOCK_T=min(triton.next_power_of_2(T), 1024), num_warps=4,
    )
    return out, weights, lse


# %%
# Backward kernel
# ---------------
# Let g = dL/dout (D,) for one row, and gamma_t = dL/da_t the gradient arriving through the weights
# output, when the loss uses it (0 otherwise). Then, by the chain rule:
#
#     da_t  = dL/da_t (total) = g . H_t + gamma_t                 out = sum_t a_t H_t
#     ds_t  = a_t (da_t - sum_u a_u da_u)                         Jacobian of the softmax
#     dH_t  = a_t g + ds_t w                                      H_t appears in out and in s_t
#     dw    = sum_{b,t} ds_t H_t,    dbias = sum_{b,t} ds_t       s_t = H_t . w + bias - P_t
#     P, M: no gradient (a lookup table and a mask)
#
# dbias is 0 in exact arithmetic: adding one number to every score of a row leaves its softmax
# unchanged. The kernel still sums ds (rounding noise around 0), because nn.Linear has a bias and
# autograd asks for its gradient.
#
# The term delta = sum_u a_u da_u looks like it needs a full pass over the row before any ds_t is
# known, but it does not:  sum_u a_u (g . H_u) = g . sum_u a_u H_u = g . out,  the saved output. So
#     delta = g . out + sum_u a_u gamma_u
# costs a dot product of length D (in the kernel) plus, only when the weights output has a
# gradient, one of length T (in torch, before the launch). With delta known, each tile of H gives
# its dH directly: one read of H, one write of dH, nothing else of size B * T * D.
#
# a_t is recomputed from the saved lse, exactly as the forward made it: exp(s_t - lse), with s_t
# from the same H tile that da_t needs anyway.
#
# dw and dbias sum over every token of every row, so all programs contribute to the same D + 1
# numbers. Atomic adds would make the programs queue on the same addresses and make the result
# depend on their order (fp32 addition is not associative). Instead each program writes its own
# partial sum to a (B * S, D) fp32 buffer, and torch adds the rows: deterministic, and the buffer
# is small next to H.


@triton.jit
def _attn_pool_bwd(
    H, Mask, Penalty, W, Bias,                  # inputs of the forward pass
    Out, Lse, DOut, DWeights, DeltaWeights,     # (B, D) fp32, (B,), (B, D), (B, T) fp32, (B,) fp32
    DH, DWPart, DBiasPart,                      # outputs: (B, T, D), (B * S, D) fp32, (B * S,) fp32
    T, D, T_PER_SPLIT,                          # all tensors contiguous
    HAS_DWEIGHTS: tl.constexpr,                 # does the loss use the weights output?
    COMPUTE_DH: tl.constexpr,                   # does hidden need a gradient?
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    w = tl.load(W + offs_d, mask=d_in, other=0.0).to(tl.float32)                 # (BLOCK_D,)
    bias = tl.load(Bias).to(tl.float32)
    g = tl.load(DOut + row * D + offs_d, mask=d_in, other=0.0).to(tl.float32)
    out = tl.load(Out + row * D + offs_d, mask=d_in, other=0.0)
    lse = tl.load(Lse + row)
    delta = tl.sum(g * out, axis=0)
    if HAS_DWEIGHTS:
        delta += tl.load(DeltaWeights + row)

    dw = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)   # per tile row, summed once at the end
                                                    # (see forward)
    dbias = tl.zeros([], tl.float32)
    t_begin = split * T_PER_SPLIT
    t_end = tl.minimum(t_begin + T_PER_SPLIT, T)
    for t0 in tl.range(t_begin, t_end, BLOCK_T, num_stages=NUM_STAGES):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < t_end
        tile = t_in[:, None] & d_in[None, :]
        offs_h = (row * T + offs_t[:, None]) * D + offs_d[None, :]
        h = tl.load(H + offs_h, mask=tile, other=0.0).to(tl.float32)            # (BLOCK_T, BLOCK_D)
        real = tl.load(Mask + row * T + offs_t, mask=t_in, other=0) != 0
        pen = tl.load(Penalty + row * T + offs_t, mask=t_in, other=0.0).to(tl.float32)
        s = tl.sum(h * w[None, :], axis=1) + bias - pen                          # (BLOCK_T,)
        a = tl.where(real, tl.exp(s - lse), 0.0)

        da = tl.sum(h * g[None, :], axis=1)                                      # (BLOCK_T,)
        if HAS_DWEIGHTS:
            da += tl.load(DWeights + row * T + offs_t, mask=t_in, other=0.0)
        ds = a * (da - delta)                                                    # (BLOCK_T,)

        if COMPUTE_DH:
            dh = a[:, None] * g[None, :] + ds[:, None] * w[None, :]
            tl.store(DH + offs_h, dh.to(DH.dtype.element_ty), mask=tile)
        dw += ds[:, None] * h
        dbias += tl.sum(ds, axis=0)

    part = row * num_splits + split
    tl.store(DWPart + part * D + offs_d, tl.sum(dw, axis=0), mask=d_in)
    tl.store(DBiasPart + part, dbias)


def attn_pool_backward_triton(hidden, mask, penalty, w, bias, out, lse, grad_out, delta_weights,
                              grad_weights, compute_dh):
    """Launch the backward kernel on contiguous inputs. grad_weights and delta_weights
    (sum_t a_t gamma_t) are None when the weights output has no gradient. Returns dH (B, T, D) in
    hidden's dtype, or None when not compute_dh, and the fp32 partials of dw (B * S, D) and
    dbias (B * S,)."""
    B, T, D = hidden.shape
    block_t, block_d, num_warps = _tile_sizes(T, D, hidden.element_size())
    num_splits, t_per_split = _num_splits(B, T, block_t, hidden.device)
    fp32 = dict(device=hidden.device, dtype=torch.float32)
    dh = torch.empty((B, T, D), device=hidden.device, dtype=hidden.dtype) if compute_dh else None
    dw_part = torch.empty((B * num_splits, D), **fp32)
    dbias_part = torch.empty((B * num_splits,), **fp32)
    _attn_pool_bwd[(B, num_splits)](
        hidden, mask, penalty, w, bias,
        out, lse, grad_out, grad_weights, delta_weights,
        dh, dw_part, dbias_part,
        T, D, t_per_split,
        HAS_DWEIGHTS=grad_weights is not None, COMPUTE_DH=compute_dh,
        BLOCK_T=block_t, BLOCK_D=block_d, NUM_STAGES=NUM_STAGES, num_warps=num_warps,
    )
    return dh, dw_part, dbias_part


# %%
# Autograd wiring
# ---------------
# The kernels index contiguous tensors (fewer arguments, and the cheapest launches); attn_pool
# makes its inputs contiguous, a no-op for an encoder's output. Gradients come back in the dtype
# of each input: with hidden in bf16 (the attnpool head casts to the autocast dtype) and w an fp32
# nn.Linear weight, dH is bf16 and dw fp32.


class AttnPoolFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, mask, penalty, w, bias):
        out, weights, lse = attn_pool_forward_triton(hidden, mask, penalty, w, bias)
        ctx.save_for_backward(hidden, mask, penalty, w, bias, out, weights, lse)
        # An output the loss does not use gets a None gradient instead of a tensor of zeros, so
        # the common case (only pooled is used) skips the gamma terms entirely.
        ctx.set_materialize_grads(False)
        return out.to(hidden.dtype), weights

    @staticmethod
    def backward(ctx, grad_pooled, grad_weights):
        hidden, mask, penalty, w, bias, out, weights, lse = ctx.saved_tensors
        needs_dh, _, _, needs_dw, needs_dbias = ctx.needs_input_grad
        # grad_pooled arrives as an expanded view when the loss is pooled.sum(): make it (B, D).
        grad_pooled = torch.zeros_like(out) if grad_pooled is None else grad_pooled.contiguous()
        delta_weights = None
        if grad_weights is not None:
            grad_weights = grad_weights.float().contiguous()
            delta_weights = (grad_weights * weights).sum(-1)                     # (B,)
        dh, dw_part, dbias_part = attn_pool_backward_triton(
            hidden, mask, penalty, w, bias, out, lse, grad_pooled, delta_weights, grad_weights,
            compute_dh=needs_dh)
        dw = dw_part.sum(0).to(w.dtype) if needs_dw else None
        dbias = dbias_part.sum().reshape(bias.shape).to(bias.dtype) if needs_dbias else None
        return dh, None, None, dw, dbias


# %%
# Entry point
# -----------


# Its Triton kernels sit inside a custom autograd.Function, which torch.compile is not trusted to
# trace: under --compile it runs as written, between the compiled graphs around it.
@torch.compiler.disable
def attn_pool(hidden, mask, penalty, w, bias, use_triton=None):
    """Attention pooling with a penalty: returns pooled (B, D) in hidden's dtype and the attention
    weights (B, T) fp32.

    hidden (B, T, D) fp32/bf16/fp16; mask (B, T) bool, True = real token, at least one per row;
    penalty (B, T) float, subtracted from the scores; w (D,); bias a 0-d or 1-element tensor.
    use_triton: None picks the fused kernels for CUDA tensors and the torch reference otherwise;
    True forces the kernels (on CPU tensors this needs TRITON_INTERPRET=1, as the tests do)."""
    B, T, D = hidden.shape
    if mask.shape != (B, T) or penalty.shape != (B, T) or w.shape != (D,) or bias.numel() != 1:
        raise ValueError(f"attn_pool: expected hidden (B, T, D), mask and penalty (B, T), w (D,) "
                         f"and a 1-element bias; got hidden {tuple(hidden.shape)}, "
                         f"mask {tuple(mask.shape)}, penalty {tuple(penalty.shape)}, "
                         f"w {tuple(w.shape)}, bias {tuple(bias.shape)}")
    mask = mask.to(torch.bool)
    if use_triton is None:
        use_triton = hidden.is_cuda
    if not use_triton:
        return attn_pool_reference(hidden, mask, penalty, w, bias)
    if D > MAX_D:
        raise ValueError(f"attn_pool: hidden size {D} is over the kernel's limit of {MAX_D}")
    return AttnPoolFunction.apply(hidden.contiguous(), mask.contiguous(), penalty.contiguous(),
                                  w.contiguous(), bias)


# %%
# The penalised words
# -------------------
# analyze.py lists, for each confused pair of classes, the words that pull texts the wrong way, as
# a JSON object:  {"Business->Sci/Tech": ["internet", "web"], "Sci/Tech->Business": ["shares"]}.
# Every word-piece of every listed word is penalised. A word-list is user input, so anything off
# stops with one line naming the file and the key, rather than silently penalising nothing (or
# everything: a word the tokenizer does not know would map to [UNK] and penalise every unknown
# word).

CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]   # as in common.py; kept here so the
                                                            # fused_kernels package stands alone


def load_penalty_table(path, tokenizer, vocab_size):
    """Read the JSON word list at `path`; return a bool table (vocab_size,), True = penalised id."""
    try:
        with open(path, encoding="utf-8") as f:
            confusions = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the penalty word list as JSON: {e}") from e
    if not isinstance(confusions, dict):
        raise ValueError(f"{path}: expected a JSON object {{\"TRUE->PREDICTED\": [words]}}, "
                         f"got {type(confusions).__name__}")
    unk_token = getattr(tokenizer.model, "unk_token", None)
    table = torch.zeros(vocab_size, dtype=torch.bool)
    for key, words in confusions.items():
        true_class, arrow, predicted = key.partition("->")
        if not arrow or true_class not in CLASS_NAMES or predicted not in CLASS_NAMES \
                or true_class == predicted:
            raise ValueError(f"{path}: key {key!r}: expected 'TRUE->PREDICTED', two different "
                             f"classes among {', '.join(CLASS_NAMES)}")
        if not isinstance(words, list) or not all(isinstance(x, str) and x.strip() for x in words):
            raise ValueError(f"{path}: key {key!r}: expected a list of non-empty strings")
        for word in words:
            encoding = tokenizer.encode(word, add_special_tokens=False)
            # A tokenizer.json may pad every encoding to a fixed length: padding is not the word.
            pieces = [(i, tok) for i, tok, real in zip(encoding.ids, encoding.tokens,
                                                       encoding.attention_mask) if real]
            if not pieces or any(tok == unk_token for _, tok in pieces):
                raise ValueError(f"{path}: key {key!r}: word {word!r} is unknown to the tokenizer")
            if any(i >= vocab_size for i, _ in pieces):
                raise ValueError(f"{path}: key {key!r}: word {word!r} has token ids beyond the "
                                 f"model's vocabulary of {vocab_size}")
            table[[i for i, _ in pieces]] = True
    return table


def penalty_for_ids(input_ids, table, penalty_weight):
    """Per-token penalty (B, T) fp32: penalty_weight where the token id is in the table, else 0."""
    return table.to(input_ids.device)[input_ids].float() * penalty_weight


# %%
# The head
# --------
# What `--head attnpool` puts between the encoder and the classifier: the scoring layer (w, bias),
# the penalty looked up per token, and attn_pool. analyze.py reads the last batch's weights.


class AttnPoolHead(nn.Module):
    """Token states (B, T, D) -> one vector per text (B, D) by attention pooling, penalising the
    listed words' tokens by `penalty` (penalty_table: bool over the vocabulary, as loaded above)."""

    name = "attnpool"

    def __init__(self, hidden_size, penalty_table=None, penalty=0.0):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        self.penalty = penalty
        # A buffer so it moves with .to(device), but not saved: it is rebuilt from the word list.
        self.register_buffer("penalty_table", penalty_table, persistent=False)
        self.out_dim = hidden_size
        self.last_weights = None  # (B, T) attention weights of the last batch, for analyze.py

    def forward(self, hidden, mask, input_ids):
        if self.penalty_table is not None and self.penalty:
            penalty = penalty_for_ids(input_ids, self.penalty_table, self.penalty)   # (B, T)
        else:
            penalty = torch.zeros(mask.shape, device=hidden.device)
        if torch.is_autocast_enabled(hidden.device.type):
            # The encoder's last LayerNorm hands over fp32 even under autocast; the pooling is
            # memory-bound, so reading bf16 halves its time (the kernel accumulates in fp32).
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        pooled, weights = attn_pool(hidden, mask, penalty, self.score.weight[0], self.score.bias)
        self.last_weights = weights.detach()
        return pooled
