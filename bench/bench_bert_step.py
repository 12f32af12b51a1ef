"""Training-step speed of our BERT + pooler head against transformers.BertForSequenceClassification,
on the same weights, batch and device, measured in one run (alternating, so a noisy neighbour hurts
both alike); then one epoch over real AG News rows with length bucketing vs padding every row
to 128.

    python bench/bench_bert_step.py                         # CPU, fp32, MiniLM, batch 32, seq 128
    python bench/bench_bert_step.py --device cuda --amp     # GPU, bf16 autocast
    python bench/bench_bert_step.py --random-init bert-base # no weights needed (GPU machine)
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bert  # noqa: E402
import common  # noqa: E402
import dropout as cheap_dropout  # noqa: E402
from plumbing import agnews  # noqa: E402
from bench.models import GEOMETRIES, model_folder  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_timer(model, forward, device, amp):
    """A function that runs one forward+backward+AdamW step on a batch and returns its seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step(batch, labels):
        synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(*batch)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - t0
    return step


def compare_steps(args, folder, device):
    import transformers
    # dropout.py's swap, as every run's model has it (plumbing/classifiers.py)
    ours = cheap_dropout.use_cheap_dropout(
        bert.BertClassifier(bert.BertModel.from_pretrained(folder), head="pooler"))
    ours = ours.to(device).train()
    theirs = (transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=4)
              .to(device).train())
    ours.classifier.load_state_dict(theirs.classifier.state_dict())
    torch.manual_seed(0)
    input_ids = torch.randint(1000, 30000, (args.batch, args.seq), device=device)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    labels = torch.randint(0, 4, (args.batch,), device=device)
    timers = {"ours": step_timer(ours, ours, device, args.amp),
              "transformers": step_timer(theirs,
                                         lambda i, m: theirs(input_ids=i,
                                                             attention_mask=m.long()).logits,
                                         device, args.amp)}
    times = {name: [] for name in timers}
    for i in range(args.warmup + args.steps):
        for name, step in timers.items():
            t = step((input_ids, mask), labels)
            if i >= args.warmup:
                times[name].append(t)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"\ntraining step, batch {args.batch} x seq {args.seq}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, "
          f"{device}, median of {args.steps}:")
    for name, t in median.items():
        print(f"  {name:13s} {t * 1000:9.1f} ms   {args.batch / t:8.1f} samples/s")
    print(f"  speed-up of ours over transformers: {median['transformers'] / median['ours']:.2f}x")
    return median


def compare_bucketing(args, folder, device):
    """One epoch's forward+backward over real rows: padded per batch (bucketed) vs padded to 128."""
    splits = agnews.load_ag_news(args.data, train_size=args.rows)
    tokenizer = common.load_tokenizer(folder)
    ids = common.encode(tokenizer, splits["train"].texts, 128)
    lengths = torch.tensor([len(r) for r in ids]).numpy()
    labels = torch.from_numpy(splits["train"].labels)
    model = cheap_dropout.use_cheap_dropout(
        bert.BertClassifier(bert.BertModel.from_pretrained(folder), head="pooler"))
    model = model.to(device).train()
    results = {}
    step = step_timer(model, model, device, args.amp)
    # Two passes, the first a warm-up: on a GPU, each new sequence length costs a one-time kernel
    # selection, which would be charged to the bucketed epoch alone.
    for _ in range(2):
        for name, bucket, pad_to in (("bucketed", True, 0), ("padded to 128", False, 128)):
            total = 0.0
            for idx in common.make_batches(lengths, args.batch, shuffle=True, seed=0,
                                           bucket=bucket):
                batch = common.to_device([ids[i] for i in idx], pad_to, device)
                total += step(batch, labels[idx].to(device))
            results[name] = total
    print(f"\none epoch over {args.rows} real AG News rows (batch {args.batch}, max_len 128, "
          f"mean length {lengths.mean():.0f} tokens):")
    for name, t in results.items():
        print(f"  {name:14s} {t:8.1f} s   {args.rows / t:8.1f} samples/s")
    print(f"  speed-up of bucketing: {results['padded to 128'] / results['bucketed']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--random-init", choices=list(GEOMETRIES),
                        help="random weights of this geometry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=320,
                        help="rows for the bucketing epoch (0: skip)")
    parser.add_argument("--data", help="AG News folder (default $AGNEWS_DIR)")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, GEOMETRIES.get(args.random_init), tmp)
        compare_steps(args, folder, device)
        if args.rows:
            compare_bucketing(args, folder, device)


if __name__ == "__main__":
    common.run_main(main)
