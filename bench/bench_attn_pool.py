"""
Benchmark: fused Triton attention pooling against eager PyTorch and torch.compile
==================================================================================

For each shape (B rows, T tokens, D features) and input dtype, times the forward pass and the
forward + backward pass of three implementations of fused_kernels/attn_pool.py's operation:

    eager    attn_pool_reference, plain torch
    compile  torch.compile(attn_pool_reference), compiled once per shape (dynamic=False)
    triton   attn_pool(..., use_triton=True), the fused kernels

and prints milliseconds, the speedup of triton over eager and over compile, and the bandwidth
triton achieves. The operation is memory-bound, so its ceiling is the card's copy bandwidth,
measured in the same run by a large device-to-device copy. Achieved GB/s counts only the bytes a
pass must move at minimum:

    forward    read H, mask, penalty, w;  write pooled, weights
    backward   read H, mask, penalty, dpooled;  write dH, dw

Before timing a shape, triton is checked against eager (every output and gradient, both outputs
used in the loss); a mismatch prints FAIL on that shape's rows. The backward pass is timed the way
training uses it: the loss uses pooled only.

    python bench/bench_attn_pool.py              # needs CUDA; about 2 minutes on an H100
    python bench/bench_attn_pool.py --cpu-smoke  # one tiny shape under TRITON_INTERPRET=1, to test
                                                 # this script on a machine without a GPU
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

GPU_SHAPES = [(B, T, D) for B in (32, 256) for T in (128, 512) for D in (384, 768, 1024)]
CPU_SMOKE_SHAPES = [(2, 7, 48)]
DTYPES = [torch.float32, torch.bfloat16]
LARGEST = (256, 512, 1024)

# Goals of the fused kernel, checked on the largest shapes, where launch overheads no longer count.
GOAL_X_EAGER = 3.0
GOAL_X_COMPILE = 1.2
GOAL_COPY_FRACTION = 0.70

# Relative error allowed between triton and eager (norm of difference / norm of eager). Both compute
# in fp32; in bf16, pooled and dH are rounded to bf16 at the end (about 2**-9 relative).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run one tiny shape on CPU under the Triton interpreter "
                             "(tests the script)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_inputs(B, T, D, dtype, device):
    """Random inputs like a padded batch: each row has between T/2 and T real tokens, and about one
    token in ten is a penalised word."""
    hidden = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)     # (B, T, D)
    lengths = torch.randint(max(1, T // 2), T + 1, (B, 1), device=device)
    mask = torch.arange(T, device=device) < lengths                                   # (B, T)
    penalty = 2.0 * (torch.rand(B, T, device=device) < 0.1).float()                   # (B, T)
    w = (torch.randn(D, device=device) / math.sqrt(D)).requires_grad_()              # (D,) fp32
    bias = torch.randn(1, device=device).requires_grad_()
    return hidden, mask, penalty, w, bias


def bytes_moved(B, T, D, dtype):
    """Minimum bytes (forward, backward) each pass must read plus write."""
    e = torch.finfo(dtype).bits // 8
    per_token = 1 + 4                                  # mask (bool) + penalty (fp32)
    forward = B * T * D * e + B * T * per_token + D * 4 + B * D * e + B * T * 4
    backward = 2 * B * T * D * e + B * T * per_token + D * 4 + B * D * e + D * 4
    return forward, backward


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(fn, ref_fn, inputs, dtype):
    """Compare fn with ref_fn on outputs and on gradients of a loss that uses both outputs.
    Returns the worst relative error and whether it is within tolerance."""
    hidden, mask, penalty, w, bias = inputs
    grads = None
    results = []
    for f in (fn, ref_fn):
        pooled, weights = f(hidden, mask, penalty, w, bias)
        if grads is None:
            grads = (torch.randn_like(pooled), torch.randn_like(weights))
        dh, dw, dbias = torch.autograd.grad((pooled, weights), (hidden, w, bias), grads)
        results.append((pooled, weights, dh, dw, dbias))
    got, ref = results
    worst = max(rel_err(x, r) for x, r in zip(got[:4], ref[:4]))
    # dbias is 0 in exact arithmetic (a shift of every score leaves a softmax unchanged), so both
    # sides are rounding noise around 0: compare it in absolute terms.
    bias_ok = (got[4] - ref[4]).abs().item() < 1e-3
    return worst, worst <= TOLERANCE[dtype] and bias_ok


def make_timer(device):
    """Milliseconds per call: CUDA events through triton.testing.do_bench (median, with warm-up and
    an L2 flush between calls), or a host clock on CPU."""
    if device.type == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def host_timer(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)
    return host_timer


def copy_bandwidth_gbs(timer, device):
    """The card's practical memory ceiling: a 1 GiB device-to-device copy, bytes read + written."""
    src = torch.rand(2**28, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_shape(B, T, D, dtype, device, timer, implementations):
    """Check then time one shape. Returns one dict per pass ('fwd', 'fwd+bwd') with each
    implementation's ms, and the check result."""
    inputs = make_inputs(B, T, D, dtype, device)
    hidden, mask, penalty, w, bias = inputs
    worst, ok = check(implementations["triton"], implementations["eager"], inputs, dtype)
    grad_pooled = torch.randn(B, D, device=device, dtype=dtype)

    def forward(fn):
        return lambda: fn(hidden, mask, penalty, w, bias)

    def forward_backward(fn):
        def run():
            pooled, _ = fn(hidden, mask, penalty, w, bias)
            torch.autograd.grad(pooled, (hidden, w, bias), grad_pooled)
        return run

    rows = []
    for name, make in (("fwd", forward), ("fwd+bwd", forward_backward)):
        ms = {impl: timer(make(fn)) for impl, fn in implementations.items()}
        rows.append(dict(B=B, T=T, D=D, dtype=dtype, pass_=name, ms=ms, err=worst, ok=ok))
    return rows


def compiled_reference(attn_pool_reference, device):
    """torch.compile of the reference, fresh for each shape (dynamic=False specialises on the shape,
    as a training run with fixed-size batches would). None on CPU, where the smoke test skips it."""
    if device.type != "cuda":
        return None
    torch._dynamo.reset()  # forget the previous shape's graphs, so no recompile limit is reached
    return torch.compile(attn_pool_reference, dynamic=False)


def main():
    args = parse_args()
    if args.cpu_smoke:
        # Must be set before fused_kernels.attn_pool decorates its kernels with triton.jit.
        os.environ["TRITON_INTERPRET"] = "1"
        device, shapes = torch.device("cpu"), CPU_SMOKE_SHAPES
    elif torch.cuda.is_available():
        device, shapes = torch.device("cuda"), GPU_SHAPES
    else:
        print("bench_attn_pool: no CUDA device, nothing to time "
              "(--cpu-smoke runs one tiny shape on CPU)")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fused_kernels.attn_pool import attn_pool, attn_pool_reference

    torch.manual_seed(args.seed)
    timer = make_timer(device)
    copy_gbs = copy_bandwidth_gbs(timer, device) if device.type == "cuda" else None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else "CPU (Triton interpreter)")
    print(f"device: {name}" + (f"; copy bandwidth {copy_gbs:.0f} GB/s" if copy_gbs else ""))

    header = (f"{'dtype':>8} {'B':>4} {'T':>4} {'D':>5} {'pass':>8} | "
              f"{'eager ms':>9} {'compile ms':>10} {'triton ms':>9} | "
              f"{'x eager':>7} {'x compile':>9} | {'GB/s':>6} {'% copy':>6} | check")
    print(header)
    print("-" * len(header))
    rows = []
    for B, T, D in shapes:
        for dtype in DTYPES:
            implementations = {"eager": attn_pool_reference,
                               "compile": compiled_reference(attn_pool_reference, device),
                               "triton": lambda *x: attn_pool(*x, use_triton=True)}
            implementations = {k: v for k, v in implementations.items() if v is not None}
            fwd_bytes, bwd_bytes = bytes_moved(B, T, D, dtype)
            for row in bench_shape(B, T, D, dtype, device, timer, implementations):
                ms = row["ms"]
                nbytes = fwd_bytes if row["pass_"] == "fwd" else fwd_bytes + bwd_bytes
                row["gbs"] = nbytes / ms["triton"] / 1e6
                row["x_eager"] = ms["eager"] / ms["triton"]
                row["x_compile"] = ms["compile"] / ms["triton"] if "compile" in ms else None
                row["copy_frac"] = row["gbs"] / copy_gbs if copy_gbs else None
                rows.append(row)
                print(format_row(row), flush=True)

    failed = [r for r in rows if not r["ok"]]
    print("correctness: "
          f"{'FAIL on ' + str(len(failed) // 2) + ' shape(s)' if failed else 'all shapes match'}")
    if device.type == "cuda":
        print_summary(rows)
    return 1 if failed else 0


def format_row(r):
    dtype = str(r["dtype"]).removeprefix("torch.")
    ms = r["ms"]
    compile_ms = f"{ms['compile']:10.3f}" if "compile" in ms else f"{'-':>10}"
    x_compile = f"{r['x_compile']:8.2f}x" if r["x_compile"] else f"{'-':>9}"
    copy = f"{100 * r['copy_frac']:5.0f}%" if r["copy_frac"] else f"{'-':>6}"
    check = f"ok ({r['err']:.1e})" if r["ok"] else f"FAIL ({r['err']:.1e})"
    return (f"{dtype:>8} {r['B']:>4} {r['T']:>4} {r['D']:>5} {r['pass_']:>8} | "
            f"{ms['eager']:9.3f} {compile_ms} {ms['triton']:9.3f} | "
            f"{r['x_eager']:6.2f}x {x_compile} | {r['gbs']:6.0f} {copy} | {check}")


def print_summary(rows):
    """One line per goal, judged on the largest shapes, with the weakest shape overall for
    context."""
    fwd_bwd = [r for r in rows if r["pass_"] == "fwd+bwd"]
    largest = [r for r in rows if (r["B"], r["T"], r["D"]) == LARGEST]

    def where(r):
        return f"B={r['B']} T={r['T']} D={r['D']} {str(r['dtype']).removeprefix('torch.')}"

    def goal(label, key, target, fmt, pool):
        at_largest = [r for r in largest if r in pool]
        worst_large = min(at_largest, key=lambda r: r[key])
        worst_all = min(pool, key=lambda r: r[key])
        verdict = "PASS" if worst_large[key] >= target else "MISS"
        print(f"goal {label}: {verdict}: largest shapes >= {fmt(worst_large[key])} "
              f"(weakest {where(worst_large)} {worst_large['pass_']}); "
              f"all shapes >= {fmt(worst_all[key])} ({where(worst_all)} {worst_all['pass_']})")

    print()
    goal(f"fwd+bwd >= {GOAL_X_EAGER}x eager", "x_eager", GOAL_X_EAGER, lambda x: f"{x:.2f}x",
         fwd_bwd)
    goal(f"fwd+bwd >= {GOAL_X_COMPILE}x compile", "x_compile", GOAL_X_COMPILE,
         lambda x: f"{x:.2f}x", fwd_bwd)
    goal(f">= {GOAL_COPY_FRACTION:.0%} of copy bandwidth", "copy_frac", GOAL_COPY_FRACTION,
         lambda x: f"{x:.0%}", rows)


if __name__ == "__main__":
    sys.exit(main())
