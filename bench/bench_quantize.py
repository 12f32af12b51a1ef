"""Scoring rows/s of one MiniLM classifier in several ways on the same rows, in one run: fp32,
bf16 autocast (the default on a CPU with bf16), quantize.py's int8 encoder with each integer
product (torch._int_mm; oneDNN's quantized linear where it is the default, on CPUs with AMX-INT8),
the rest in bf16 autocast, and torch's own dynamic int8 (torch.ao.quantization.quantize_dynamic on
the same Linear layers, the rest in fp32: its layers take fp32 input). Also each one's agreement
with fp32 (the same predicted class) and the largest probability gap.

    python bench/bench_quantize.py                     # 1,024 test rows, pretrained MiniLM
    python bench/bench_quantize.py --rows 256 --rounds 1
    python bench/bench_quantize.py --rows 512 --breakdown    # where each way's time goes
    python bench/bench_quantize.py --rows 512 --breakdown --out figures/int8_scoring_epyc.png
    python bench/bench_quantize.py --products 2048 384 1536  # one product alone, each way

The rows are the official test set's first --rows, scored as finish_run scores them (batches of
128 by length); the head is random (the ratios depend on shapes, not on training). Each way scores
the rows once untimed (first allocations; torch.compile compiling our rounding), then rounds
alternate the order of the ways; the median of each is reported. Prints the CPU and whether it
has AVX512-VNNI and AMX-INT8, the instructions int8 products run on. --breakdown then scores the
rows once more under torch's profiler for bf16 and ours (its default product) and splits the
time into the matrix products, the copies (autocast's casts to bf16, most of them), our rounding
and rescaling, and the rest (attention, GELU, LayerNorm, adds): what int8 can speed up, and what
it cannot.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bert  # noqa: E402
import common  # noqa: E402
import quantize  # noqa: E402
from plumbing import agnews  # noqa: E402


def cpu_description():
    flags = common.cpu_flags()
    have = [name for name in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
            if name in flags]
    return f"{common.cpu_name()}, {torch.get_num_threads()} threads; int8/bf16 instructions: " + (
        ", ".join(have) or "none of VNNI, AMX")


def torch_dynamic_int8(model):
    """The peer: torch's dynamic quantization of the same layers (the encoder's Linear layers)."""
    from torch.ao.quantization import quantize_dynamic
    for i, layer in enumerate(model.bert.layers):
        model.bert.layers[i] = quantize_dynamic(layer, {nn.Linear}, dtype=torch.qint8)
    return model


def build(way, model_dir, head_state):
    model = bert.BertClassifier(bert.BertModel.from_pretrained(model_dir), "pooler").eval()
    model.classifier.load_state_dict(head_state)
    if way.startswith("ours int8"):
        quantize.quantize_encoder(model, product=way.split()[-1].strip("()"))
    elif way == "torch dynamic int8":
        torch_dynamic_int8(model)
    precision = "fp32" if way in ("fp32", "torch dynamic int8") else "bf16"
    return model, common.setup_runtime("cpu", precision)


# torch's profiler names, grouped: self CPU time of each group
PRODUCTS = ("aten::addmm", "aten::mm", "aten::_int_mm", "onednn::qlinear_pointwise")
COPIES = ("aten::copy_", "aten::_to_copy")  # autocast's casts, and attention's head reshapes


def breakdown(model, data, runtime):
    """Seconds of self CPU time per group (products, copies, our compiled rounding, the rest)."""
    from torch.profiler import profile
    with profile() as prof:
        common.predict(model, data, runtime, desc="profiled")
    groups = {"products": 0.0, "copies": 0.0, "rounding + rescaling": 0.0, "the rest": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in PRODUCTS:
            groups["products"] += seconds
        elif event.key in COPIES:
            groups["copies"] += seconds
        elif "Compiled" in event.key or event.key.startswith(("TorchDynamo", "AOTDispatcher")):
            groups["rounding + rescaling"] += seconds
        else:
            groups["the rest"] += seconds
    return groups


def product_times(n, k, o):
    """Milliseconds of one (n x k) x (k x o) product in each way, alone: fp32, bf16, and the two
    integer products Int8Linear can use (oneDNN's timed wherever torch has it, default or not:
    this is how a slow one shows). One untimed call first; a product over a second is timed
    once, a faster one over 5 calls."""
    x, w = torch.randn(n, k), torch.randn(o, k) / k ** 0.5
    x_q, _ = quantize.quantize_per_row(x)
    w_q, w_scale = quantize.quantize_per_row(w)
    x_bf16, w_bf16, w_t = x.bfloat16(), w.bfloat16(), w_q.T.contiguous()
    products = {"fp32": lambda: x @ w.T, "bf16": lambda: x_bf16 @ w_bf16.T,
                "torch._int_mm": lambda: torch._int_mm(x_q, w_t)}
    if quantize.onednn_available():
        packed = torch.ops.onednn.qlinear_prepack(w_q, None)
        zeros = torch.zeros(o, dtype=torch.long)
        products["oneDNN qlinear"] = lambda: torch.ops.onednn.qlinear_pointwise(
            x_q, 1.0, 0, packed, w_scale, zeros, None, 1.0, 0, torch.bfloat16, "none", [], "")
    times = {}
    for name, product in products.items():
        start = time.perf_counter()
        product()
        calls = 1 if time.perf_counter() - start > 1 else 5
        start = time.perf_counter()
        for _ in range(calls):
            product()
        times[name] = (time.perf_counter() - start) / calls * 1e3
    return times


def plot(rates, split, title, path):
    """The figure: rows/s of each way as a bar, its ratio to bf16 written on it; beside it, where
    --breakdown was asked, each profiled way's seconds split into the groups as stacked bars."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if split else 1, figsize=(common.WIDE, 1.5 + 0.5 * len(rates)),
                             squeeze=False)
    ax = axes[0, 0]
    ways = list(rates)[::-1]                                        # the first way on top
    ax.barh(ways, [rates[way] for way in ways], color="tab:blue")
    for row, way in enumerate(ways):
        ax.text(rates[way], row, f" {rates[way]:.0f} ({rates[way] / rates['bf16']:.2f}x bf16)",
                va="center", fontsize=8)
    ax.set_xlim(0, 1.35 * max(rates.values()))
    ax.set_xlabel("rows/s (median of the rounds)")
    if split:
        ax = axes[0, 1]
        profiled, left = list(split), np.zeros(len(split))
        for k, group in enumerate(split[profiled[0]]):
            seconds = np.array([split[way][group] for way in profiled])
            ax.barh(profiled, seconds, left=left, color=plt.cm.tab10(k), label=group)
            left += seconds
        ax.set_xlim(0, 1.6 * left.max())                             # room for the legend
        ax.set_xlabel("seconds of self CPU time, profiled (one pass over the rows)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", help="AG News folder (default $AGNEWS_DIR)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile bf16 and ours (the default product): where the "
                             "time goes")
    parser.add_argument("--out", help="also draw the table (and the breakdown) into this .png")
    parser.add_argument("--products", nargs=3, type=int, metavar=("N", "K", "O"),
                        help="only time one (N x K) x (K x O) product in each way (the "
                             "encoder's largest: 2048 384 1536)")
    args = parser.parse_args()
    if args.products:
        n, k, o = args.products
        print(f"CPU: {cpu_description()}\n\n| ({n} x {k}) x ({k} x {o}) | ms | x bf16 |\n"
              f"| --- | ---: | ---: |")
        times = product_times(n, k, o)
        for name, ms in times.items():
            print(f"| {name} | {ms:.2f} | {times['bf16'] / ms:.2f}x |")
        return

    torch.manual_seed(0)
    model_dir = common.resolve_model("minilm")
    tokenizer = common.load_tokenizer(model_dir)
    test = agnews.load_ag_news(agnews.find_data_dir(args.data))["test"]
    rows = test.subset(np.arange(min(args.rows, len(test))))
    texts = list(rows.texts)
    data = common.encode_splits(tokenizer, {"test": rows}, 128)["test"]
    head = nn.Linear(384, common.NUM_CLASSES)
    with torch.no_grad():
        head.weight.mul_(100)  # confident probabilities, as a trained head gives
    ours = f"ours int8 ({quantize.default_product('cpu')})"   # what --int8 scores with here
    ways = ["fp32", "bf16", "ours int8 (int_mm)",
            *(["ours int8 (onednn)"] if ours.endswith("(onednn)") else []), "torch dynamic int8"]
    built = {way: build(way, model_dir, head.state_dict()) for way in ways}
    print(f"CPU: {cpu_description()}")
    print(f"rows: {len(texts)} of the official test set, batches of 128 by length, max 128 tokens; "
          f"torch {torch.__version__}")
    if quantize.onednn_available() and ours.endswith("(int_mm)"):
        print("oneDNN's product left out: without AMX-INT8 it is not the default "
              "(quantize.default_product: seconds a product on an AVX512-VNNI EPYC)")

    for way, (model, runtime) in built.items():  # untimed: first allocations, and compiling
        common.predict(model, data, runtime, desc=f"{way} (warm-up)")
    times, probs = {way: [] for way in ways}, {}
    for round_ in range(args.rounds):
        for way in (ways if round_ % 2 == 0 else ways[::-1]):
            model, runtime = built[way]
            start = time.perf_counter()
            probs[way] = common.predict(model, data, runtime, desc=way)
            times[way].append(time.perf_counter() - start)

    reference = probs["fp32"]
    print("\n| way | rows/s | x bf16 | same class as fp32 | largest prob gap to fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rates = {way: len(texts) / statistics.median(times[way]) for way in ways}
    for way, rate in rates.items():
        same = (probs[way].argmax(1) == reference.argmax(1)).mean()
        gap = abs(probs[way] - reference).max()
        print(f"| {way} | {rate:.1f} | {rate / rates['bf16']:.2f}x | {same:.4f} | {gap:.4f} |")

    split = None
    if args.breakdown:
        profiled = ["bf16", ours]
        split = {way: breakdown(built[way][0], data, built[way][1]) for way in profiled}
        print("\n| seconds (self CPU, profiled) | " + " | ".join(profiled) + " |")
        print("| --- |" + " ---: |" * len(profiled))
        for group in split[profiled[0]]:
            print(f"| {group} | " + " | ".join(f"{split[way][group]:.2f}" for way in profiled)
                  + " |")
        print("| total | " + " | ".join(f"{sum(split[way].values()):.2f}" for way in profiled)
              + " |")
    if args.out:
        plot(rates, split, f"Scoring {len(texts)} test rows, MiniLM: {cpu_description()}",
             args.out)


if __name__ == "__main__":
    common.run_main(main)
