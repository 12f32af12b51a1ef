"""What --eda costs: one training epoch on the same rows without and with their EDA copies, for
BiLSTM+attention (train_lstm.py) and the BERT pooler head (train_bert.py's MiniLM, cut to its first
--bert-layers layers so a CPU finishes), measured in one run, alternating, so a noisy neighbour
hurts both alike; then the one-off costs: the synonym table (built cold, then read from its cache)
and making the copies.

    python bench/bench_eda.py                                    # 300 rows -> 1,500 with --eda-n 4
    python bench/bench_eda.py --device cuda --rows 2000 --bert-layers 6

The rows grow n+1 times, so an epoch should take about n+1 times as long while samples/s stays put:
a copy is about as long as its original (RI adds alpha of its tokens, RD takes as many away). Each
epoch is loop.train itself, on a fresh model with the script's own flags, so what is timed is what a
run does; its train_time_s and train_samples_per_s are reported (the fastest of --repeats).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import eda  # noqa: E402
import loop  # noqa: E402
import train_bert  # noqa: E402
import train_lstm  # noqa: E402
from plumbing import agnews, classifiers, flags  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    parser.add_argument("--data", help="AG News folder (default $AGNEWS_DIR or data/ag_news)")
    parser.add_argument("--rows", type=flags.positive_int, default=300,
                        help="training rows before EDA")
    parser.add_argument("--eda-n", type=flags.positive_int, default=4, help="EDA copies per row")
    parser.add_argument("--eda-alpha", type=float, default=0.1)
    parser.add_argument("--max-len", type=flags.positive_int, default=64)
    parser.add_argument("--bert-layers", type=flags.positive_int, default=2,
                        help="MiniLM cut to its first layers (6 = whole)")
    parser.add_argument("--repeats", type=flags.positive_int, default=2,
                        help="epochs timed per setting, alternating plain and EDA; the fastest "
                             "counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args()


def one_off_costs(args, train):
    """Seconds to build the synonym table in an empty cache, to read it back from the cache, and to
    make the copies; returns (seconds by name, the augmented split)."""
    model_dir = common.resolve_model("minilm")
    cache_dir = common.CACHE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        common.CACHE_DIR = Path(tmp)  # a cold cache: the table is computed
        try:
            t0 = time.perf_counter()
            table = eda.synonym_table(model_dir, verbose=False)
            t1 = time.perf_counter()
            eda.synonym_table(model_dir, verbose=False)
            t2 = time.perf_counter()
        finally:
            common.CACHE_DIR = cache_dir
    augmented = eda.augment_split(train, table, args.eda_n, args.eda_alpha, args.seed)
    t3 = time.perf_counter()
    return {"table_build_s": t1 - t0, "table_cached_s": t2 - t1, "augment_s": t3 - t2}, augmented


def lstm_setup(args, splits):
    """train_lstm.py's model and data: a word vocabulary of these training rows, bilstm_attn."""
    flags = train_lstm.build_parser().parse_args(["--max-len", str(args.max_len), "--epochs", "1",
                                                  "--seed", str(args.seed)])
    tokenizer = train_lstm.build_tokenizer(flags, splits["train"].texts)
    config = {"vocab_size": tokenizer.get_vocab_size(), "arch": "bilstm_attn",
              "embed_dim": flags.embed_dim,
              "hidden_size": flags.hidden_size, "dropout": flags.dropout}
    return (train_lstm.build_model(config), common.encode_splits(tokenizer, splits, args.max_len),
            flags)


def bert_setup(args, splits):
    """train_bert.py's pooler head on MiniLM, cut to its first --bert-layers layers."""
    flags = train_bert.build_parser().parse_args(["--max-len", str(args.max_len), "--epochs", "1",
                                                  "--seed", str(args.seed)])
    model, tokenizer = classifiers.build_bert_classifier({"model": "minilm", "head": "pooler",
                                                   "dropout": 0.1})
    model.bert.layers = model.bert.layers[:args.bert_layers]
    return model, common.encode_splits(tokenizer, splits, args.max_len), flags


def time_epoch(setup, args, splits, runtime):
    """One epoch of loop.train on a fresh model: (seconds, samples/s) of its training part, and the
    mean tokens per training row (after --max-len)."""
    torch.manual_seed(args.seed)
    model, data, flags = setup(args, splits)
    with tempfile.TemporaryDirectory() as run_dir:
        [record] = loop.train(model, data, flags, runtime, run_dir)
    return (record["train_time_s"], record["train_samples_per_s"],
            float(data["train"].lengths.mean()))


def main():
    args = parse_args()
    runtime = common.setup_runtime(args.device)
    splits = agnews.load_ag_news(args.data, args.rows, test_size=8, val_size=32)
    costs, augmented = one_off_costs(args, splits["train"])
    settings = {"plain": splits, "EDA": {**splits, "train": augmented}}

    results = {}
    for name, setup in (("bilstm_attn", lstm_setup),
                        (f"MiniLM {args.bert_layers}L pooler", bert_setup)):
        times = {setting: [] for setting in settings}
        for _ in range(args.repeats):
            for setting, rows in settings.items():
                times[setting].append(time_epoch(setup, args, rows, runtime))
        results[name] = {setting: min(runs) for setting, runs in times.items()}  # fastest epoch

    n = args.eda_n
    print(f"\n{args.rows} training rows, EDA n={n} alpha={args.eda_alpha} "
          f"-> {len(augmented)} rows | "
          f"max_len {args.max_len} | {runtime.device} | {torch.get_num_threads()} threads | "
          f"fastest of {args.repeats} epochs each, alternating")
    print(f"{'model':<22}{'setting':>8}{'rows':>8}{'tokens/row':>12}"
          f"{'epoch s':>10}{'samples/s':>11}")
    for name, by_setting in results.items():
        for setting, (seconds, rate, tokens) in by_setting.items():
            print(f"{name:<22}{setting:>8}{len(settings[setting]['train']):>8}{tokens:>12.1f}"
                  f"{seconds:>10.2f}{rate:>11.1f}")
    print(f"{'EDA / plain':<22}{'epoch time':>12}{'samples/s':>11}   (rows x{n + 1})")
    for name, by_setting in results.items():
        (plain_s, plain_rate, _), (eda_s, eda_rate, _) = by_setting["plain"], by_setting["EDA"]
        print(f"{name:<22}{eda_s / plain_s:>11.2f}x{eda_rate / plain_rate:>10.2f}x")
    print(f"one-off: synonym table {costs['table_build_s']:.1f} s to build (cold cache), "
          f"{costs['table_cached_s']:.2f} s from the cache; "
          f"{len(augmented) - args.rows:,} copies made in {costs['augment_s']:.2f} s "
          f"({(len(augmented) - args.rows) / costs['augment_s']:,.0f} copies/s)")


if __name__ == "__main__":
    common.run_main(main)
