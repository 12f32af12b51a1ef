"""Where a training step goes on this machine: a profile of N steps of the default setting (MiniLM,
pooler head, batches of 32 real AG News rows padded to the longest in the batch, bf16 autocast where
the CPU has bf16, dropout 0.1, AdamW), grouped into matmul, attention, dropout masks, optimizer
(and clipping), casts, norms and activations, and the rest. One bar per setting, each adding one
change to the one before: the step as the project took it before issue 20 (SDPA with torch's
dropout masks, foreach AdamW), AdamW fused, attention written out on the CPU (still torch's masks),
dropout.py's cheap masks (today's default). Also: the CPU model and whether it has AMX, and the
matmul work of a step as a fraction of a bf16 matmul peak measured here on the model's own shapes.

    python bench/step_breakdown.py                       # 6 profiled steps, table + PNG
    python bench/step_breakdown.py --steps 10 --out figures/step_breakdown.png

Self CPU time of each op is summed by group (an op's own time, not its children's), so the shares
add up to the profiled time; the profiler costs a little, so samples/s comes from an unprofiled
timing of the same steps. Ratios are within this run: same rows, same weights, same seed.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bert  # noqa: E402
import common  # noqa: E402
from plumbing import agnews  # noqa: E402
import dropout as cheap_dropout  # noqa: E402
from plumbing import flags  # noqa: E402
from bench.models import set_attention  # noqa: E402
from bench.speed_ablation import training_flops  # noqa: E402

# Op name (a regular expression, first match wins) -> group. Backward ops carry their forward's
# name with "Backward" added, so a matmul's gradient counts as matmul. Every op run inside the
# "optimizer" range (clipping and AdamW, whatever small ops they are made of) counts as optimizer.
OPTIMIZER = "optimizer + clipping"
GROUPS = [
    (OPTIMIZER, r"^optimizer$"),
    ("attention (SDPA)", r"scaled_dot_product|_flash_attention|_efficient_attention"),
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$|MmBackward|AddmmBackward|BmmBackward"),
    ("dropout masks", r"bernoulli|native_dropout|dropout"),
    ("casts", r"aten::(copy_|_to_copy|to)$"),
    ("norms, activations", r"layer_norm|gelu|softmax|tanh|GeluBackward|LayerNorm"),
]
OTHER = "the rest"
# Named ranges (torch.profiler.record_function) whose every op counts as one group: the optimizer
# step here, and the forward ops of dropout.py's masks (their backward, a masked_fill and a scale,
# counts as the rest; torch's own dropout has a backward op of its own name, counted as dropout).
RANGES = {"optimizer": OPTIMIZER, cheap_dropout.PROFILE_NAME: "dropout masks"}
# (name, fused AdamW, dropout.WrittenOutAttention.impl, dropout.py's cheap masks): each adds one
# change.
SETTINGS = [("before: SDPA, torch masks, AdamW foreach", False, "sdpa", False),
            ("+ AdamW fused", True, "sdpa", False),
            ("+ attention written out", True, "auto", False),
            ("+ cheap dropout masks (default)", True, "auto", True)]


def group_of(name):
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), OTHER)


def cpu_description():
    """(model name, has AMX)."""
    return common.cpu_name(), "amx_bf16" in common.cpu_flags()


def matmul_peak(tokens, cfg, seconds=1.0):
    """bf16 matmul FLOP/s of the encoder's own shapes (tokens x D by D x D, D x I, I x D), each run
    for about `seconds`: what the step's matmuls could reach on this machine."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    rates = []
    for k, n in ((D, D), (D, I), (I, D)):
        a = torch.randn(tokens, k, dtype=torch.bfloat16)
        b = torch.randn(k, n, dtype=torch.bfloat16)
        a @ b  # warm up
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
        rates.append(2 * tokens * k * n * count / (time.perf_counter() - t0))
    return float(np.mean(rates))


def make_step(model, runtime, fused):
    """One training step as loop.train takes it: forward under autocast, cross-entropy, backward,
    clip, AdamW (foreach, or fused), zero the gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused, foreach=None if fused else True)

    def step(input_ids, mask, labels):
        with torch.autocast("cpu", dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None):
            logits = model(input_ids, mask)
        F.cross_entropy(logits.float(), labels).backward()
        with torch.profiler.record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def profile(step, batches, steps):
    """{group: seconds per step} from the profiler, and the unprofiled seconds per step."""
    for batch in batches[:2]:
        step(*batch)  # warm up: first-call allocations, oneDNN kernel choices
    t0 = time.perf_counter()
    for batch in batches[2:2 + steps]:
        step(*batch)
    seconds = (time.perf_counter() - t0) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for batch in batches[2:2 + steps]:
            step(*batch)
    shares = {}
    for event in prof.events():
        group, parent = group_of(event.name), event.cpu_parent
        while parent is not None and group not in RANGES.values():
            group = RANGES.get(parent.name, group)
            parent = parent.cpu_parent
        shares[group] = shares.get(group, 0.0) + event.self_cpu_time_total / 1e6 / steps
    # aten::all: SDPA's check of a boolean mask on its math path, once per layer and step
    all_calls = sum(event.name == "aten::all" for event in prof.events()) / steps
    return shares, seconds, all_calls


def plot(results, path, batch_size=32):
    """One stacked bar per setting, top to bottom in the order they were added: each group's
    share of the profile, scaled to the unprofiled step's milliseconds; samples/s at its end."""
    names = [group for group, _ in GROUPS] + [OTHER]
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.55 * len(results)))
    for row, (setting, shares, seconds) in enumerate(results):
        total, left = sum(shares.values()), 0.0
        for k, name in enumerate(names):
            width = shares.get(name, 0.0) / total * seconds * 1e3  # ms of the unprofiled step
            ax.barh(row, width, left=left, color=plt.cm.tab10(k), label=name if row == 0 else None)
            left += width
        ax.text(left + 4, row, f"{batch_size / seconds:.0f} samples/s", va="center", fontsize=8)
    ax.set_yticks(range(len(results)), [setting for setting, _, _ in results])
    ax.invert_yaxis()
    ax.set_xlim(0, max(seconds for _, _, seconds in results) * 1e3 * 1.15)
    ax.set_xlabel(f"milliseconds per training step (batch of {batch_size})")
    fig.tight_layout()
    fig.subplots_adjust(right=0.80)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    common.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=flags.positive_int, default=6)
    parser.add_argument("--batch-size", type=flags.positive_int, default=32)
    parser.add_argument("--data", help="AG News folder (default: $AGNEWS_DIR or data/ag_news)")
    parser.add_argument("--out", default="step_breakdown.png", help="the PNG to write")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    runtime = common.setup_runtime("cpu")
    model_dir = common.resolve_model("minilm")
    tokenizer = common.load_tokenizer(model_dir)
    size = (args.steps + 2) * args.batch_size * 2
    rows = agnews.load_ag_news(args.data, train_size=size)["train"]
    data = common.encode_splits(tokenizer, {"train": rows}, 128)["train"]
    order = common.make_batches(data.lengths, args.batch_size, shuffle=True, seed=0)
    batches = [(*common.to_device([data.ids[j] for j in idx], 0, runtime.device),
                torch.from_numpy(data.labels[idx])) for idx in order[:args.steps + 2]]
    tokens = np.mean([b[0].numel() for b in batches])
    cfg = bert.BertConfig.from_json(model_dir / "config.json")
    step_flops = np.mean([training_flops(cfg, b[0].shape[0], b[0].shape[1]) for b in batches])

    cpu, amx = cpu_description()
    peak = matmul_peak(int(tokens), cfg)
    print(f"{cpu}; AMX: {'yes' if amx else 'no'}; {torch.get_num_threads()} threads; "
          f"precision {runtime.precision}; bf16 matmul peak on the model's shapes "
          f"{peak / 1e12:.2f} TFLOP/s; {tokens:.0f} tokens per batch on average")
    results = []
    for setting, fused, impl, cheap_masks in SETTINGS:
        model = bert.BertClassifier(bert.BertModel.from_pretrained(model_dir), head="pooler")
        set_attention(model, impl, cheap_masks)
        shares, seconds, all_calls = profile(make_step(model.train(), runtime, fused), batches,
                                             args.steps)
        results.append((setting, shares, seconds))
        total = sum(shares.values())
        previous = f", {results[-2][2] / seconds:.2f}x the previous" if len(results) > 1 else ""
        print(f"\n{setting}: {args.batch_size / seconds:.1f} samples/s, {seconds * 1e3:.0f} ms a "
              f"step{previous}; matmul work {step_flops / seconds / 1e12:.3f} TFLOP/s = "
              f"{step_flops / seconds / peak:.0%} of the measured bf16 peak; "
              f"{all_calls:.0f} aten::all calls a step")
        for group in [g for g, _ in GROUPS] + [OTHER]:
            print(f"  {group:22} {shares.get(group, 0.0) / total:6.1%}")
    print(f"\nlast / first: {results[0][2] / results[-1][2]:.2f}x the samples/s")
    plot(results, args.out, args.batch_size)


if __name__ == "__main__":
    common.run_main(main)
