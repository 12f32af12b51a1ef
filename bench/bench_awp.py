"""What --awp costs: one training epoch of the BERT pooler head (train_bert.py's MiniLM, cut to its
first --bert-layers layers so a CPU finishes) on the same rows, same seed, without and with AWP,
measured in one run, alternating, so a noisy neighbour hurts both alike.

    python bench/bench_awp.py                                   # 256 rows, 2 layers, CPU
    python bench/bench_awp.py --device cuda --rows 4096 --bert-layers 6

AWP adds a second forward and backward per batch at the moved weights, plus the copy that puts them
back: expect an epoch to take about 2x as long, i.e. about half the samples/s. Each epoch is
loop.train itself on a fresh model with train_bert.py's own flags, so what is timed is what a run
does; its train_time_s and train_samples_per_s are reported (the fastest of --repeats).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import loop  # noqa: E402
import train_bert  # noqa: E402
from plumbing import agnews, classifiers, flags  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    parser.add_argument("--data", help="AG News folder (default $AGNEWS_DIR or data/ag_news)")
    parser.add_argument("--rows", type=flags.positive_int, default=256, help="training rows")
    parser.add_argument("--batch-size", type=flags.positive_int, default=32)
    parser.add_argument("--max-len", type=flags.positive_int, default=64)
    parser.add_argument("--bert-layers", type=flags.positive_int, default=2,
                        help="MiniLM cut to its first layers (6 = whole)")
    parser.add_argument("--repeats", type=flags.positive_int, default=2,
                        help="epochs timed per setting, alternating plain and AWP; the fastest "
                             "counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=common.PRECISIONS)
    return parser.parse_args()


def time_epoch(args, data, runtime, awp):
    """One epoch of loop.train on a fresh model: (seconds, samples/s, train loss) of its training
    part."""
    flags = train_bert.build_parser().parse_args(
        ["--max-len", str(args.max_len), "--epochs", "1", "--batch-size", str(args.batch_size),
         "--seed", str(args.seed), "--precision", args.precision, "--log-every", "1000000",
         *(["--awp"] if awp else [])])
    torch.manual_seed(args.seed)
    model, _ = classifiers.build_bert_classifier({"model": "minilm", "head": "pooler",
                                                  "dropout": 0.1})
    model.bert.layers = model.bert.layers[:args.bert_layers]
    with tempfile.TemporaryDirectory() as run_dir:
        [record] = loop.train(model, data, flags, runtime, run_dir)
    return record["train_time_s"], record["train_samples_per_s"], record["train_loss"]


def main():
    args = parse_args()
    runtime = common.setup_runtime(args.device, args.precision)
    splits = agnews.load_ag_news(args.data, args.rows, test_size=8, val_size=32)
    tokenizer = common.load_tokenizer(common.resolve_model("minilm"))
    data = common.encode_splits(tokenizer, splits, args.max_len)
    times = {"plain": [], "AWP": []}
    for _ in range(args.repeats):
        for setting in times:
            times[setting].append(time_epoch(args, data, runtime, awp=setting == "AWP"))
    fastest = {setting: min(runs) for setting, runs in times.items()}

    print(f"\n{args.rows} training rows, batch {args.batch_size}, max_len {args.max_len}, MiniLM "
          f"{args.bert_layers} layers + pooler head | {runtime.device}, {runtime.precision} | "
          f"{torch.get_num_threads()} threads | fastest of {args.repeats} epochs each, alternating")
    print(f"{'setting':<8}{'epoch s':>10}{'samples/s':>11}{'train loss':>12}")
    for setting, (seconds, rate, loss) in fastest.items():
        print(f"{setting:<8}{seconds:>10.2f}{rate:>11.1f}{loss:>12.4f}")
    (plain_s, plain_rate, _), (awp_s, awp_rate, _) = fastest["plain"], fastest["AWP"]
    print(f"AWP / plain: epoch time {awp_s / plain_s:.2f}x, samples/s {awp_rate / plain_rate:.2f}x "
          f"(expected about 2x and 0.5x)")


if __name__ == "__main__":
    common.run_main(main)
