"""From one run to many: which experiment is better, by how much, and is it more than noise?

Run as `python analyze.py --compare [RUN ...] [--baseline NAME]`. It teaches:
  1. what an experiment is: one configuration. Its seeds are sibling run folders whose config.json
     differs only in the seed and in bookkeeping (where to write, which device); they are pooled,
     and the table gives each number as mean ± std over seeds.
  2. the paired bootstrap: resample the test rows with replacement, the SAME rows for both
     experiments (the pairing takes out the luck of which texts are in the test set, which both
     share), and resample the seeds too (seed k with the baseline's seed k when both ran the same
     seeds), so the 95% interval of the difference in macro F1 holds both kinds of noise.
  3. the exact McNemar test: on the rows where exactly one of the two is right (each experiment's
     majority of seeds), is each side's share 1/2? A binomial test, no chi-square approximation.
  4. the verdict: a difference whose interval excludes 0 is marked *, every other one is said to be
     "inside the noise", in those words. README's results table is this table, not typed by hand.
tests/test_compare.py checks the intervals and p-values on predictions whose answer is known.

Lesson 19 of README's reading path: read after explain.py; next: learning_curves.py.
"""
import csv
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from scipy.special import gammaln, logsumexp
from scipy.stats import binomtest
from sklearn.metrics import f1_score

import common
from plumbing import agnews, runfolders

# --------------------------------------------------------------------------------------------------
# Experiments: runs grouped by configuration, one run per seed
# --------------------------------------------------------------------------------------------------
# One experiment = one configuration; its seeds are runs whose config.json differs only in the seed
# and bookkeeping (runfolders.experiment_key).
BOOTSTRAP_SAMPLES = 2000
COMPARE_WIDTH = 10           # inches; the height grows with the number of experiments


@dataclass
class Experiment:
    name: str
    runs: list                      # run folders, one per seed, in the order of `seeds`
    config: dict
    seeds: list                     # the seed of each run

    @cached_property
    def metrics(self):
        return [common.load_json(run / "metrics.json") for run in self.runs]

    def probs(self, rows, split="test"):
        return [runfolders.load_probs(run, split, rows) for run in self.runs]

    def cases_probs(self, cases):
        """Each seed's probabilities on today's news, or None if a seed was not scored on them."""
        probs = [runfolders.load_cases_probs(run, cases) for run in self.runs]
        return None if any(p is None for p in probs) else probs

    @property
    def is_pooler_baseline(self):
        args = self.config.get("args", {})
        return (self.config.get("script") == "train_bert" and self.config.get("head") == "pooler"
                and not self.config.get("penalty_words") and not args.get("eda")
                and not args.get("awp"))


def gather_experiments(paths):
    """Finished runs under the given folders (default runs/), scored on the same rows, grouped into
    experiments by config-minus-seed and named after their folder."""
    runs = sorted({run for path in paths for run in runfolders.find_runs(path)},
                  key=lambda run: (run / "metrics.json").stat().st_mtime)
    if not runs:
        raise common.UserError(f"--compare: no finished runs under {', '.join(map(str, paths))}")
    runs = runfolders.largest_group_on_same_rows(runs, "compared")
    runfolders.note_mixed_data(runs, "compared")
    groups, seen = {}, {}
    # Newest first: of two runs of one experiment with one seed, the newer counts.
    for run in reversed(runs):
        config = common.load_json(run / "config.json")
        key, seed = runfolders.experiment_key(config), runfolders.run_seed(config)
        if (key, seed) in seen:
            print(f"left out: {run} (seed {seed} of the experiment of {seen[key, seed]}, "
                  f"which is newer)")
            continue
        seen[key, seed] = run
        groups.setdefault(key, (config, []))[1].append((seed, run))
    experiments, names = [], set()
    for config, members in groups.values():
        name = runfolders.experiment_folder(members[0][1]).name
        while name in names:  # two configurations under one folder name: tell them apart
            name += "'"
        names.add(name)
        members.sort(key=lambda seed_run: (seed_run[0] is None, seed_run[0] or 0))
        experiments.append(Experiment(name, [run for _, run in members], config,
                                      [seed for seed, _ in members]))
    trained = {run: i for i, run in enumerate(runs)}
    # in the order they were trained
    return sorted(experiments, key=lambda e: min(trained[run] for run in e.runs))


# --------------------------------------------------------------------------------------------------
# The paired bootstrap: test rows and seeds resampled, the same rows for both experiments
# --------------------------------------------------------------------------------------------------
def macro_f1_from_counts(counts):
    """counts (..., 4, 4) confusion counts, rows true -> macro F1 (...,) over all four classes, as
    sklearn's f1_score(average="macro", labels=range(4)): a class with no true and no predicted row
    scores 0."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    fp, fn = counts.sum(-2) - tp, counts.sum(-1) - tp
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0).mean(-1)


def bootstrap_f1(preds, labels, weights):
    """Macro F1 of each prediction vector on each bootstrap resample of the rows.
    preds (R, N) class ids of R runs, labels (N,), weights (B, N) how often each row is drawn in
    each of B resamples -> (B, R). One matrix product per run: the resample's confusion counts are
    the draw counts summed per (true, predicted) cell."""
    k = common.NUM_CLASSES
    cells = np.eye(k ** 2)[labels * k + preds]                                    # (R, N, 16)
    counts = np.einsum("bn,rnc->brc", weights, cells)                             # (B, R, 16)
    return macro_f1_from_counts(counts.reshape(*counts.shape[:2], k, k))


def seeds_paired(seeds_a, seeds_b):
    """Whether two experiments' seeds pair up (paired_bootstrap's paired_seeds): both ran the same
    seeds, more than one."""
    return len(seeds_a) > 1 and seeds_a == seeds_b


def paired_bootstrap(preds_a, preds_b, labels, samples=BOOTSTRAP_SAMPLES, seed=0,
                     paired_seeds=False):
    """95% interval of mean macro F1 of A minus that of B. preds_a (Ra, N), preds_b (Rb, N): the
    test predictions of each experiment's seeds.

    How seeds enter: each resample draws the test rows with replacement (the same rows for both:
    the pairing, which removes the variation the two share, that of which texts happen to be in the
    test set), and the seeds with replacement; the statistic is the mean macro F1 over the drawn
    seeds. So the interval holds both the test set's sampling noise and the seed-to-seed noise of
    training. With paired_seeds (both ran the same seeds, row k of each trained with seed k: the
    same batch order, the same random head at the start) seed k of A is drawn with seed k of B,
    which removes the part of the seed noise the two share, as drawing the same test rows does for
    the rows; else each experiment's seeds are drawn on their own. With 3 seeds the seed noise is
    estimated crudely (resampling n values understates their variance by (n-1)/n): more seeds, a
    truer interval.
    Returns (observed difference, low, high)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)   # (B, N)
    f1_a, f1_b = bootstrap_f1(preds_a, labels, weights), bootstrap_f1(preds_b, labels, weights)
    pick_a = rng.integers(0, len(preds_a), size=(samples, len(preds_a)))
    pick_b = pick_a if paired_seeds else rng.integers(0, len(preds_b), size=(samples, len(preds_b)))
    diffs = (np.take_along_axis(f1_a, pick_a, 1).mean(1)
             - np.take_along_axis(f1_b, pick_b, 1).mean(1))
    observed = (np.mean([macro_f1(labels, p) for p in preds_a])
                - np.mean([macro_f1(labels, p) for p in preds_b]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(observed), float(low), float(high)


def drop_bootstrap(test_preds, test_labels, cases_preds, cases_labels, samples=BOOTSTRAP_SAMPLES,
                   seed=0):
    """95% interval of one experiment's loss from the 2004 test set to today's news: mean over
    seeds of (macro F1 on test - macro F1 on the cases). test_preds (R, Nt), cases_preds (R, Nc),
    row k of both from seed k. The two row sets are different texts, so each is resampled on its
    own; the seeds are drawn once for both (a seed's test and cases scores come from one model).
    Returns (observed drop, low, high)."""
    rng = np.random.default_rng(seed)
    f1 = []
    for preds, labels in ((test_preds, test_labels), (cases_preds, cases_labels)):
        n = len(labels)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)
        f1.append(bootstrap_f1(preds, labels, weights))                            # (B, R)
    pick = rng.integers(0, len(test_preds), size=(samples, len(test_preds)))
    drops = np.take_along_axis(f1[0] - f1[1], pick, 1).mean(1)
    observed = np.mean([macro_f1(test_labels, t) - macro_f1(cases_labels, c)
                        for t, c in zip(test_preds, cases_preds)])
    low, high = np.percentile(drops, [2.5, 97.5])
    return float(observed), float(low), float(high)


def macro_f1(labels, preds):
    """Macro F1 over all four classes, also where a small test sample lacks one."""
    return f1_score(labels, preds, average="macro", labels=range(common.NUM_CLASSES),
                    zero_division=0)  # a class never predicted scores 0, without a warning


# --------------------------------------------------------------------------------------------------
# Exact McNemar: one right/wrong per row and experiment
# --------------------------------------------------------------------------------------------------
def mcnemar_exact(right_a, right_b):
    """Exact McNemar test: of the rows where exactly one of A and B is right, is A's share 1/2?
    b = A right, B wrong; c = the reverse; under H0 b ~ Binomial(b + c, 1/2). Two-sided p."""
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    if b + c == 0:
        return 1.0
    return float(binomtest(min(b, c), b + c, 0.5).pvalue)


def mcnemar_log10_p(right_a, right_b):
    """log10 of mcnemar_exact's p, its binomial tail 2 P(X <= min(b, c)) summed in logs: two models
    a thousand rows apart have a p below the smallest float (about 1e-308), where mcnemar_exact
    says 0.0."""
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    n, k = b + c, np.arange(min(b, c) + 1)
    log_terms = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1) - n * np.log(2)
    return min(0.0, float((np.log(2) + logsumexp(log_terms)) / np.log(10)))


def p_text(p, log10_p):
    """'0.031', '4.2e-12'; below 1e-300, where floats lose digits and then reach 0, the same
    written from log10 p: '1.7e-602'."""
    if p >= 1e-300:
        return f"{p:.2g}"
    exponent = math.floor(log10_p)
    mantissa = round(10 ** (log10_p - exponent), 1)
    if mantissa >= 10:  # 9.96 rounds up to the next power of ten
        mantissa, exponent = 1.0, exponent + 1
    return f"{mantissa:.2g}e{exponent}"


def majority_right(preds, labels):
    """(N,) bool: the row is right for an experiment when more than half of its seeds get it right
    (a tie, with an even number of seeds, counts as wrong). McNemar needs one right/wrong per row
    and experiment. The majority of seeds is itself a little more accurate than a typical seed, so
    the p describes that majority; the interval describes the mean over seeds (with one seed they
    agree)."""
    return (preds == labels).mean(0) > 0.5


# --------------------------------------------------------------------------------------------------
# The table: one row per experiment, each against the baseline, and the verdict
# --------------------------------------------------------------------------------------------------
def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def summarise(experiment, labels, cases, split="test"):
    """One row of the table, before the comparison with the baseline. cases None: no
    today's-news columns (a table on the validation split)."""
    business, scitech = common.BUSINESS, common.SCITECH
    probs = experiment.probs(len(labels), split)
    preds = np.stack([p.argmax(1) for p in probs])                                # (R, N)
    per_class = np.stack([f1_score(labels, p, average=None, labels=range(common.NUM_CLASSES),
                                   zero_division=0)
                          for p in preds])
    mixed = [int(np.sum((labels == business) & (p == scitech))
                 + np.sum((labels == scitech) & (p == business)))
             for p in preds]
    metrics = experiment.metrics
    memory = [m.get("memory", {}) for m in metrics]
    peak = [mem.get("cuda_max_allocated_gb", mem.get("cpu_max_rss_gb")) for mem in memory]
    trainable = {m.get("parameters", {}).get("trainable") for m in metrics}
    try:
        trained = {runfolders.training_rows(run) for run in experiment.runs}
    except common.UserError:
        trained = set()   # runs from before the count was recorded: the cell says "-"
    cases_probs = experiment.cases_probs(cases) if cases is not None else None
    cases_preds = None if cases_probs is None else np.stack([p.argmax(1) for p in cases_probs])
    return {"cases_preds": cases_preds,
            "cases_macro_f1": (mean_std([macro_f1(cases.labels, p) for p in cases_preds])
                               if cases_preds is not None else (np.nan, np.nan)),
            "experiment": experiment.name, "seeds": len(preds), "preds": preds,
            "training_rows": trained.pop() if len(trained) == 1 else None,
            "accuracy": mean_std((preds == labels).mean(1)),
            "macro_f1": mean_std([macro_f1(labels, p) for p in preds]),
            "f1_runs": [macro_f1(labels, p) for p in preds],
            "f1_business": mean_std(per_class[:, business]),
            "f1_scitech": mean_std(per_class[:, scitech]),
            "business_scitech_errors": mean_std(mixed),
            "train_time_s": mean_std([m.get("train_time_s", np.nan) for m in metrics]),
            "samples_per_s": mean_std([m.get("train_samples_per_s", np.nan) for m in metrics]),
            "trainable": trainable.pop() if len(trainable) == 1 else None,
            "peak_memory_gb": mean_std([np.nan if p is None else p for p in peak]),
            "memory_kind": ("CUDA allocated" if any("cuda_max_allocated_gb" in m for m in memory)
                            else "CPU max RSS")}


def compare_experiments(experiments, labels, baseline_name=None, seed=0, cases=None,
                        split="test"):
    """Rows of the comparison table, the baseline's first, each against the baseline; on the test
    set, and on today's news (cases, default agnews.load_cases()) where the runs were scored on
    them: each experiment's drop from one to the other, and its difference from the baseline.
    split "val": the same table on the validation split, where settings are chosen (no cases)."""
    if split == "test":
        cases = cases if cases is not None else agnews.load_cases()
    else:
        cases = None
    if baseline_name is not None:
        chosen = [e for e in experiments if e.name == baseline_name]
        if not chosen:
            raise common.UserError(f"--baseline {baseline_name}: no such experiment; there are "
                                   f"{', '.join(e.name for e in experiments)}")
        baseline = chosen[0]
    else:
        baseline = next((e for e in experiments if e.is_pooler_baseline), experiments[0])
    others = [e for e in experiments if e is not baseline]
    rows = [summarise(e, labels, cases, split) for e in [baseline] + others]
    experiment_of = {e.name: e for e in experiments}
    base = rows[0]
    for row in rows:
        row["baseline"] = base["experiment"]
        has_cases = row["cases_preds"] is not None
        row["cases_drop"] = (drop_bootstrap(row["preds"], labels, row["cases_preds"],
                                            cases.labels, seed=seed) if has_cases else None)
        if row is base:
            row["diff"], row["p"], row["cases_diff"] = None, None, None
            continue
        seeds = experiment_of[row["experiment"]].seeds
        paired = seeds_paired(seeds, baseline.seeds)
        row["seeds_paired"] = paired
        row["diff"] = paired_bootstrap(row["preds"], base["preds"], labels, seed=seed,
                                       paired_seeds=paired)
        row["cases_diff"] = (paired_bootstrap(row["cases_preds"], base["cases_preds"],
                                              cases.labels, seed=seed, paired_seeds=paired)
                             if has_cases and base["cases_preds"] is not None else None)
        right = majority_right(row["preds"], labels), majority_right(base["preds"], labels)
        row["p"], row["log10_p"] = mcnemar_exact(*right), mcnemar_log10_p(*right)
    return rows


def verdict(row, key="diff"):
    """'+0.0123 [+0.0040, +0.0210] *' where the interval excludes 0, else the plain 'inside the
    noise'. key: "diff" (test, against the baseline), "cases_diff" (today's news, against the
    baseline) or "cases_drop" (test minus today's news, the experiment alone)."""
    if row[key] is None:
        if key == "cases_drop":
            return "-"
        return "baseline" if row["diff"] is None else "-"
    diff, low, high = row[key]
    real = low > 0 or high < 0
    paired = " (seeds paired)" if row.get("seeds_paired") and key != "cases_drop" else ""
    return (f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]" + (" *" if real else " (inside the noise)")
            + paired)


COMPARE_COLUMNS = ["experiment", "seeds", "training rows", "test accuracy", "macro F1",
                   "F1 Business", "F1 Sci/Tech", "Business<->Sci/Tech errors", "training time (s)",
                   "samples/s", "trainable parameters", "peak memory (GB)",
                   "macro F1 - baseline [95% CI]", "McNemar p", "today's news macro F1",
                   "test - today's news [95% CI]", "today's news - baseline [95% CI]"]


def table_cells(row, for_csv=False):
    """The row as text. One seed has no std: the table says "(1 seed)" in its place, and the csv
    (for_csv) gives the mean alone, so that its cell stays a plain number."""
    def pm(pair, digits):
        mean, std = pair
        if np.isnan(mean):
            return "-"
        if row["seeds"] == 1:
            return f"{mean:.{digits}f}" + ("" if for_csv else " (1 seed)")
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    rows = "-" if row["training_rows"] is None else f"{row['training_rows']:,}"
    return [row["experiment"], str(row["seeds"]), rows, pm(row["accuracy"], 4),
            pm(row["macro_f1"], 4), pm(row["f1_business"], 4), pm(row["f1_scitech"], 4),
            pm(row["business_scitech_errors"], 1),
            pm(row["train_time_s"], 0), pm(row["samples_per_s"], 1),
            "-" if row["trainable"] is None else f"{row['trainable']:,}",
            pm(row["peak_memory_gb"], 2),
            verdict(row), "-" if row["p"] is None else p_text(row["p"], row["log10_p"]),
            pm(row["cases_macro_f1"], 4), verdict(row, "cases_drop"), verdict(row, "cases_diff")]


def plot_compare(rows, path):
    """Macro F1 per experiment: mean with a ±1 std bar, each seed a dot; the baseline's mean
    dashed."""
    fig, ax = plt.subplots(figsize=(COMPARE_WIDTH, 2 + 0.45 * len(rows)))
    for y, row in enumerate(rows):
        mean, std = row["macro_f1"]
        marked = row["diff"] is not None and (row["diff"][1] > 0 or row["diff"][2] < 0)
        ax.errorbar(mean, y, xerr=std, fmt="o", color="tab:red" if marked else "tab:blue",
                    capsize=4)
        ax.scatter(row["f1_runs"], [y] * len(row["f1_runs"]), s=14, color="black", alpha=0.6,
                   zorder=3)
    ax.axvline(rows[0]["macro_f1"][0], color="grey", linestyle="--")
    ax.set_title(f"dashed: the baseline's mean ({rows[0]['experiment']}); red: its 95% interval "
                 f"of the difference excludes 0", fontsize=10)
    ax.set_yticks(range(len(rows)), [f"{r['experiment']} ({r['seeds']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("test macro F1: mean ± std over seeds (black dots: the seeds)")
    fig.tight_layout()
    return common.save_figure(fig, path)


def show_compare(paths, out_dir, baseline_name=None, data_dir=None, seed=0, split="test"):
    """Print the table; write compare.md, compare.csv and compare.png into out_dir (split "val":
    compare_val.*, the table to choose settings on; every run must share the validation rows)."""
    experiments = gather_experiments(paths)
    first = experiments[0].runs[0]
    labels = runfolders.load_scored_split(first, split, data_dir).labels
    if split != "test":
        rows_of = {run: runfolders.scored_rows(run, (split,))
                   for e in experiments for run in e.runs}
        others = sorted({str(run) for run, rows in rows_of.items() if rows != rows_of[first]})
        if others:
            raise common.UserError(f"--compare-on {split}: these runs were scored on other "
                                   f"{split} rows than {first}: {', '.join(others)}")
    rows = compare_experiments(experiments, labels, baseline_name, seed, split=split)
    cells = [table_cells(row) for row in rows]
    markdown = "\n".join(["| " + " | ".join(COMPARE_COLUMNS) + " |",
                          "|" + " --- |" * len(COMPARE_COLUMNS)]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    where = ("Test set" if split == "test" else
             "VALIDATION split (choose settings here; the test columns' names mean val)")
    note = (f"{where}: {len(labels):,} rows. Mean ± std over seeds (one seed: its value alone, "
            f"marked (1 seed)); peak memory is {rows[0]['memory_kind']}. Differences in macro F1 "
            f"against {rows[0]['experiment']}: 95% paired bootstrap over {split} rows and seeds "
            f"({BOOTSTRAP_SAMPLES} resamples; seed k drawn with the baseline's seed k where both "
            f"ran the same seeds); * = the interval excludes 0. McNemar: exact, on the rows each "
            f"experiment's majority of seeds gets right (a tie counts as wrong). Today's news: "
            f"the {len(agnews.load_cases()):,} cases of {agnews.CASES_FILE.name} (2020-2025, "
            f"written for this project; '-' for runs scored before it); test - today's news: "
            f"each experiment's loss from the 2004 test set to today's news, both row sets and "
            f"the seeds resampled.")
    print("\n" + markdown + "\n\n" + note)
    out_dir = Path(out_dir)
    stem = "compare" if split == "test" else f"compare_{split}"
    common.atomic_write(out_dir / f"{stem}.md",
                        lambda tmp: Path(tmp).write_text(markdown + "\n\n" + note + "\n"))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COMPARE_COLUMNS)
            writer.writerows(table_cells(row, for_csv=True) for row in rows)
    common.atomic_write(out_dir / f"{stem}.csv", write_csv)
    print(f"wrote {out_dir / f'{stem}.md'}\nwrote {out_dir / f'{stem}.csv'}")
    plot_compare(rows, out_dir / f"{stem}.png")
    return rows
