"""What int8 scoring costs in accuracy: each run's test set and today's news scored with its BERT
encoder in int8 (quantize.py, as --int8 scores), against the run's own saved scores (what
finish_run computed: bf16 autocast on a CPU with bf16), on the same rows.

    python bench/int8_accuracy.py runs/study-large/bert_pooler    # its seed folders
    python bench/int8_accuracy.py runs/lora_r8_pooler runs/bert_pooler/seed0

Per run: accuracy and macro F1 both ways and the share of rows given the same class. Over the
runs (seeds of one experiment, paired: each run with itself): mean ± std of each, and the 95%
paired-bootstrap interval of int8 minus saved, over test rows and runs (compare.paired_bootstrap
for macro F1; the same resampling for accuracy). Prints the CPU; writes nothing into the runs.
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import compare  # noqa: E402
from bench.bench_quantize import cpu_description  # noqa: E402
from plumbing import agnews, runfolders  # noqa: E402


def accuracy_interval(preds_a, preds_b, labels, samples=compare.BOOTSTRAP_SAMPLES, seed=0):
    """95% interval of mean accuracy of A minus B; preds (R, N), row r of A paired with row r of B:
    test rows drawn with replacement (the same for both), runs drawn with replacement (paired)."""
    rng = np.random.default_rng(seed)
    n, runs = len(labels), len(preds_a)
    gain = (preds_a == labels).astype(np.float64) - (preds_b == labels)          # (R, N)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=samples) / n          # (B, N)
    per_run = weights @ gain.T                                                   # (B, R)
    pick = rng.integers(0, runs, size=(samples, runs))
    diffs = np.take_along_axis(per_run, pick, 1).mean(1)
    return gain.mean(), *np.percentile(diffs, [2.5, 97.5])


def score(run, runtime, cases):
    """(saved, int8) probabilities of the run on its test rows and on today's news, and labels."""
    split = runfolders.load_scored_split(run, "test")
    saved_test = runfolders.load_probs(run, "test", len(split))
    saved_cases = runfolders.load_cases_probs(run, cases)
    model, tokenizer, config = runfolders.load_run(run, runtime.device, int8=True)
    max_len = config["args"]["max_len"]
    int8_test = common.predict_texts(model, tokenizer, max_len, list(split.texts), runtime,
                                     desc=f"test in int8, {run}")
    int8_cases = common.predict_texts(model, tokenizer, max_len, list(cases.texts), runtime,
                                      desc=f"today's news in int8, {run}")
    return {"test": (saved_test, int8_test, split.labels),
            "today's news": (saved_cases, int8_cases, cases.labels)}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or folders of seed runs")
    args = parser.parse_args()
    runs = sorted({run for path in args.runs for run in runfolders.find_runs(path)})
    runtime = common.setup_runtime("cpu")
    cases = agnews.load_cases()
    print(f"CPU: {cpu_description()}; saved scores in {runtime.precision}, int8 as --int8 scores")
    results = [score(run, runtime, cases) for run in runs]
    for name in ("test", "today's news"):
        print(f"\n{name}:")
        print("| run | accuracy saved | int8 | macro F1 saved | int8 | same class |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        table = []
        for run, result in zip(runs, results):
            saved, int8, labels = result[name]
            if saved is None:
                print(f"| {run} | (no saved scores on today's news) | | | | |")
                continue
            a, b = common.evaluate(saved, labels), common.evaluate(int8, labels)
            same = float(np.mean(saved.argmax(1) == int8.argmax(1)))
            table.append((saved.argmax(1), int8.argmax(1), labels, a, b))
            print(f"| {run} | {a['accuracy']:.4f} | {b['accuracy']:.4f} | {a['macro_f1']:.4f} "
                  f"| {b['macro_f1']:.4f} | {same:.4f} |")
        if len(table) < 1 or any(not np.array_equal(t[2], table[0][2]) for t in table):
            continue
        saved_preds = np.stack([t[0] for t in table])
        int8_preds = np.stack([t[1] for t in table])
        labels = table[0][2]
        for metric in ("accuracy", "macro_f1"):
            values = {way: [t[3 + i][metric] for t in table] for i, way in enumerate(("s", "8"))}
            spread = {way: statistics.stdev(v) if len(v) > 1 else 0.0
                      for way, v in values.items()}
            print(f"{metric}: saved {np.mean(values['s']):.4f} ± {spread['s']:.4f}, int8 "
                  f"{np.mean(values['8']):.4f} ± {spread['8']:.4f} over {len(table)} runs")
        acc = accuracy_interval(int8_preds, saved_preds, labels)
        f1 = compare.paired_bootstrap(int8_preds, saved_preds, labels, paired_seeds=True)
        for metric, (diff, low, high) in (("accuracy", acc), ("macro F1", f1)):
            noise = "inside the noise" if low <= 0 <= high else "outside the noise"
            print(f"int8 - saved, {metric}: {100 * diff:+.2f} points, 95% interval "
                  f"[{100 * low:+.2f}, {100 * high:+.2f}] ({noise})")


if __name__ == "__main__":
    common.run_main(main)
