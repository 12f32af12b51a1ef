"""Our training loop against transformers' Trainer: the same rows, model, batch size, epochs and
precision, timed in one run.

The peer a reader would otherwise use: AutoModelForSequenceClassification on the same MiniLM
folder, trained by transformers.Trainer with bf16=True on the CPU (use_cpu), batch 32, lr 5e-5,
warm-up 10%, weight decay 0.01, one epoch, the rows padded per batch by DataCollatorWithPadding
(its default: no length grouping; --group-by-length turns Trainer's length-grouped sampler on, the
nearest it has to our buckets). Written for transformers 5 (warmup_steps takes a ratio below 1,
train_sampling_strategy names the sampler). Ours: `train_bert.py --head pooler` with the same
settings, run as a user runs it. Each side's training time is its optimizer steps only: ours from
metrics.json (train_time_s, without the validation pass or scoring), the Trainer's its
train_runtime; the samples/s of both are rows x epochs over that time. Ours is timed first and the
peer second, on an otherwise idle machine; --rounds alternates them.

    python bench/trainer_peer.py --rows 4000          # the issue's peer at 4,000 rows, ~3 min
    python bench/trainer_peer.py --rows 2000 --rounds 2
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import train_bert  # noqa: E402
from plumbing import agnews, flags  # noqa: E402
from bench.step_breakdown import cpu_description  # noqa: E402

LR, WARMUP, WEIGHT_DECAY, BATCH = 5e-5, 0.1, 0.01, 32


def ours(args, out):
    """train_bert.py end to end on args.rows rows; (training seconds, test accuracy)."""
    train_bert.main(["--head", "pooler", "--train-size", str(args.rows), "--val-size", "200",
                     "--test-size", "1000", "--epochs", "1", "--batch-size", str(BATCH),
                     "--lr", str(LR), "--warmup", str(WARMUP), "--weight-decay",
                     str(WEIGHT_DECAY), "--device", "cpu", "--out", str(out)]
                    + (["--data", args.data] if args.data else []))
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    return metrics["train_time_s"], metrics["test"]["accuracy"]


def theirs(args, out):
    """transformers.Trainer on the same rows; (training seconds, test accuracy)."""
    import transformers
    transformers.logging.set_verbosity_error()
    folder = common.resolve_model("minilm")
    splits = agnews.load_ag_news(args.data, train_size=args.rows, val_size=200, test_size=1000)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=common.NUM_CLASSES)

    def rows(split):
        encoded = tokenizer(split.texts, truncation=True, max_length=128)
        return [{"input_ids": ids, "attention_mask": mask, "labels": int(label)}
                for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"],
                                            split.labels)]

    training_args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=128,
        num_train_epochs=1, learning_rate=LR, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY,
        bf16=True, use_cpu=True, save_strategy="no", eval_strategy="no", report_to=[],
        logging_strategy="no", disable_tqdm=True, seed=0,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random")
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=rows(splits["train"]),
        data_collator=transformers.DataCollatorWithPadding(tokenizer))
    seconds = trainer.train().metrics["train_runtime"]
    logits = trainer.predict(rows(splits["test"])).predictions
    return seconds, float((np.argmax(logits, 1) == splits["test"].labels).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=flags.positive_int, default=4000,
                        help="training rows (one epoch)")
    parser.add_argument("--rounds", type=flags.positive_int, default=1,
                        help="timed rounds, ours then theirs in each; medians reported")
    parser.add_argument("--group-by-length", action="store_true",
                        help="Trainer's length-grouped sampler (default off, as in transformers)")
    parser.add_argument("--data", help="AG News folder (default $AGNEWS_DIR or data/ag_news)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    times = {"ours": [], "transformers Trainer": []}
    accuracy = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for name, side in (("ours", ours), ("transformers Trainer", theirs)):
                t0 = time.perf_counter()
                seconds, accuracy[name] = side(args, Path(tmp) / f"{name.split()[0]}{k}")
                times[name].append(seconds)
                print(f"round {k + 1}, {name}: {seconds:.1f} s of training "
                      f"({time.perf_counter() - t0:.0f} s with loading and scoring)", flush=True)
    cpu, amx = cpu_description()
    print(f"\n{cpu}, AMX {'yes' if amx else 'no'}; {torch.get_num_threads()} threads; "
          f"{args.rows:,} rows, 1 epoch, batch {BATCH}, bf16; medians of {args.rounds} round(s)")
    print("| trainer | training s | samples/s | test accuracy (1,000 rows) |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.1f} | {args.rows / median:.1f} | {accuracy[name]:.4f} |")
    ratio = statistics.median(times["transformers Trainer"]) / statistics.median(times["ours"])
    print(f"\nours / Trainer: {ratio:.2f}x the training samples/s")


if __name__ == "__main__":
    common.run_main(main)
