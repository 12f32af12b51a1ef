"""How a score moves with data and with training length: the learning curve and the epochs curve.

Two questions a single table cannot answer:
  1. Does a conclusion hold with more data? `python analyze.py --learning-curve runs/study-quick
     runs/study-medium`: every experiment of the study at each size (2,000 and 24,175 rows), test
     macro F1 against training rows, and beside it each experiment minus the baseline: a verdict
     that changes with data is a line that crosses 0 (LoRA r 8 does: best at 2,000 rows, last of
     the BERTs at 24,175).
  2. How long to train? `python analyze.py --epochs-curve runs/acc/pooler_e1 runs/acc/pooler_e3
     ...`: macro F1 against epochs, validation (where the length is CHOSEN) beside test (where the
     chosen length is REPORTED, once). Choosing the length on the test curve would be a leak.
Each point is an experiment of compare.py (its seeds pooled): mean ± std over seeds.
tests/test_compare.py checks both on made-up runs whose answer is known.
"""
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np

import common
import compare
import runfolders


def training_rows(run):
    """How many training rows a finished run learned from; a vote, those of its first member."""
    metrics = common.load_json(Path(run) / "metrics.json")
    if "train" in metrics.get("rows", {}):
        return metrics["rows"]["train"]
    config = common.load_json(Path(run) / "config.json")
    if config.get("script") == "vote" and metrics.get("weights"):
        [(_, first, _), *_] = runfolders.vote_members(run)
        return training_rows(first)
    raise common.UserError(f"{run}/metrics.json: no training row count")


def learning_curve(paths):
    """{experiment name: {study folder: (training rows, [test macro F1 of each seed])}} over the
    given study folders (e.g. runs/study-quick and runs/study-medium), each gathered as --compare
    gathers one; an experiment keeps its name across folders. With --eda or --unlabeled the rows
    count the copies or the unlabelled rows too."""
    curves = {}
    for path in paths:
        for experiment in compare.gather_experiments([path]):
            rows = {training_rows(run) for run in experiment.runs}
            if len(rows) != 1:
                raise common.UserError(f"{path}: the seeds of {experiment.name} trained on "
                                       f"different numbers of rows ({sorted(rows)})")
            f1 = [m["test"]["macro_f1"] for m in experiment.metrics]
            curves.setdefault(experiment.name, {})[str(path)] = (rows.pop(), f1)
    return curves


def plot_learning_curve(curves, path, baseline="bert_pooler"):
    """Test macro F1 against training rows (log scale), one line per experiment: the mean over
    seeds, a bar of ±1 std; experiments measured at one size only are dots. Where the baseline was
    measured, a second panel draws each experiment's mean minus the baseline's at each size: a
    conclusion that changes with data is a line that crosses 0. Lines more than 5 points from the
    baseline (the from-scratch LSTMs at 2,000 rows) are left out of that panel, which would
    otherwise be all scale."""
    base = {study: np.mean(f1) for study, (_, f1) in curves.get(baseline, {}).items()}
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=(compare.COMPARE_WIDTH, 6), squeeze=False)
    ax = axes[0, 0]
    sizes = sorted({r for by_study in curves.values() for r, _ in by_study.values()})
    for k, (name, by_study) in enumerate(sorted(curves.items())):
        style, color = ("-" if name.startswith(("bert", "lora")) else "--"), plt.cm.tab20(k % 20)
        points = sorted(by_study.values())
        means, stds = zip(*(compare.mean_std(f1) for _, f1 in points))
        ax.errorbar([r for r, _ in points], means, yerr=stds, fmt="o" + style, capsize=3,
                    label=name, color=color)
        gaps = sorted((rows, np.mean(f1) - base[study])
                      for study, (rows, f1) in by_study.items() if study in base)
        if base and name != baseline and gaps and max(abs(g) for _, g in gaps) < 0.05:
            axes[0, 1].plot([r for r, _ in gaps], [100 * g for _, g in gaps], "o" + style,
                            color=color, label=name)
    ax.set_ylabel("test macro F1 (mean ± std over seeds)")
    ax.set_title("The study's experiments at each size")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    if base:
        right = axes[0, 1]
        right.axhline(0, color="black", lw=1, ls=":", label=f"{baseline} (0)")
        right.set_ylabel(f"mean macro F1 minus {baseline}'s (points)")
        right.set_title(f"Against {baseline}: crossing 0 = a changed conclusion")
        right.legend(fontsize=8, loc="best")
    for axis in axes[0]:
        axis.set_xscale("log")
        axis.set_xticks(sizes, [f"{s:,}" for s in sizes])
        axis.minorticks_off()
        axis.set_xlabel("training rows (log scale)")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    return common.save_figure(fig, path)


SPLITS = ("val", "test")  # the epochs curve: where the length is chosen, where it is reported


def epochs_curve(paths):
    """{training rows: {epochs: {"val": [macro F1 of each seed], "test": [...]}}} of the
    experiments among the given folders, e.g. runs/acc/pooler_e1 ... pooler_e10: the caller names
    experiments that differ only in --epochs (and the training rows, one line each)."""
    curve = {}
    for path in paths:
        for experiment in compare.gather_experiments([path]):
            config = common.load_json(experiment.runs[0] / "config.json")
            epochs = config["args"]["epochs"]
            rows = training_rows(experiment.runs[0])
            curve.setdefault(rows, {})[epochs] = {
                split: [m[split]["macro_f1"] for m in experiment.metrics] for split in SPLITS}
    return curve


def show_epochs_curve(paths, out_dir):
    """Print macro F1 against epochs as a table, validation (where the length is chosen) beside
    test; write epochs_curve.png into out_dir: a line per training size, validation solid, test
    dashed, ±1 std over seeds as bars."""
    curve = epochs_curve(paths)
    print("\n| training rows | epochs | seeds | validation macro F1 | test macro F1 |")
    print("| ---: | ---: | ---: | --- | --- |")
    fig, ax = plt.subplots(figsize=(compare.COMPARE_WIDTH, 5))
    for k, (rows, by_epochs) in enumerate(sorted(curve.items())):
        epochs = sorted(by_epochs)
        # {split: [(mean, std) at each length]}
        stats = {split: [compare.mean_std(by_epochs[e][split]) for e in epochs] for split in SPLITS}
        for split, style in zip(SPLITS, ("-", "--")):
            means, stds = zip(*stats[split])
            ax.errorbar(epochs, means, yerr=stds, fmt="o" + style, capsize=3,
                        color=plt.cm.tab10(k), label=f"{rows:,} rows, {split}")
        for i, e in enumerate(epochs):
            cells = [f"{stats[split][i][0]:.4f} ± {stats[split][i][1]:.4f}" for split in SPLITS]
            print(f"| {rows:,} | {e} | {len(by_epochs[e]['val'])} | {cells[0]} | {cells[1]} |")
    every = sorted({e for by_epochs in curve.values() for e in by_epochs})
    ax.set_xscale("log")
    ax.set_xticks(every, [str(e) for e in every])
    ax.minorticks_off()
    ax.set_xlabel("epochs (log scale; the run keeps its best validation epoch)")
    ax.set_ylabel("macro F1 (mean ± std over seeds)")
    ax.set_title("How long to train: choose on validation (solid), report test (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, Path(out_dir) / "epochs_curve.png")


def show_learning_curve(paths, out_dir):
    """Print the curve as a table, a column per study folder in the order given ("-" where the
    experiment is not in it); write learning_curve.png into out_dir."""
    curves = learning_curve(paths)
    print("\n| experiment | " + " | ".join(str(p) for p in paths) + " |")
    print("| --- |" + " ---: |" * len(paths))
    for name, by_study in sorted(curves.items()):
        cells = []
        for study in map(str, paths):
            if study not in by_study:
                cells.append("-")
                continue
            rows, f1 = by_study[study]
            mean, std = compare.mean_std(f1)
            cells.append(f"{mean:.4f} ± {std:.4f} ({rows:,} rows, {len(f1)} seeds)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return plot_learning_curve(curves, Path(out_dir) / "learning_curve.png")
