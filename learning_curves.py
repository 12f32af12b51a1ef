"""How a score moves with data and with training length: the learning curve and the epochs curve.

Two questions a single table cannot answer:
  1. Does a conclusion hold with more data? `python analyze.py --learning-curve runs/study-quick
     runs/study-medium runs/study-large`: every experiment of the study at each size (2,000,
     24,175 and 60,566 rows), test macro F1 against training rows, and beside it each one minus
     the baseline with the 95% interval of --compare's table (compare.paired_bootstrap: test rows
     and seeds resampled). At each size the interval gives the verdict: above 0 (better), below
     (worse), holding 0 (inside the noise). A conclusion changed with data where the verdict did
     (better at 2,000 rows, worse or inside the noise at 24,175), not where two means inside the
     noise cross 0. Printed too. A study is its run folder or its finished table, the compare.csv
     --compare wrote (results/ keeps ours: `--learning-curve results/study-*.csv`).
  2. How long to train? `python analyze.py --epochs-curve runs/acc/pooler_e1 runs/acc/pooler_e3
     ...`: macro F1 against epochs, validation (where the length is CHOSEN) beside test (where the
     chosen length is REPORTED, once). Choosing the length on the test curve would be a leak. Its
     table is written too (epochs_curve.csv) and read back in place of folders
     (`--epochs-curve results/epochs-curve.csv`).
Each score is an experiment of compare.py (its seeds pooled): mean ± std over seeds.
tests/test_compare.py checks both on made-up runs whose answer is known.

Lesson 20 of README's reading path: read after compare.py; next: quantize.py.
"""
import csv
import re
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np

import common
import compare
from plumbing import runfolders

# The right panel's scale fits the intervals of the points within 5 points of 0 (all, if none is);
# a point further off (an LSTM at 2,000 rows) is still drawn, past the edge: a triangle marks it
# there and its value is written.
OFF_SCALE = 5.0   # points of macro F1


BASELINE = "bert_pooler"  # the pooler head: what AutoModelForSequenceClassification trains


def scores(experiments):
    """{experiment name: (training rows, mean, std, seeds)} of a study's test macro F1 over its
    seeds. With --eda or --unlabeled the rows count the copies or the unlabelled rows too."""
    out = {}
    for experiment in experiments:
        rows = {runfolders.training_rows(run) for run in experiment.runs}
        if len(rows) != 1:
            raise common.UserError(f"the seeds of {experiment.name} trained on different numbers "
                                   f"of rows ({sorted(rows)})")
        f1 = [m["test"]["macro_f1"] for m in experiment.metrics]
        out[experiment.name] = (rows.pop(), *compare.mean_std(f1), len(f1))
    return out


def gaps_to_baseline(experiments, baseline=BASELINE, data_dir=None, seed=0):
    """{experiment name: (difference, low, high)}: each experiment's test macro F1 minus the
    baseline's with its 95% interval, by compare.paired_bootstrap with the seed and the seed
    pairing of --compare's table (seed k with the baseline's seed k where both ran the same
    seeds), so that figure and table agree. None where the baseline is not among them."""
    base = next((e for e in experiments if e.name == baseline), None)
    if base is None:
        return None
    labels = runfolders.load_scored_split(base.runs[0], "test", data_dir).labels    # (N,)
    base_preds = np.stack([p.argmax(1) for p in base.probs(len(labels))])          # (R, N)
    gaps = {}
    for experiment in experiments:
        if experiment is not base:
            preds = np.stack([p.argmax(1) for p in experiment.probs(len(labels))])     # (R', N)
            paired = compare.seeds_paired(experiment.seeds, base.seeds)  # as --compare
            gaps[experiment.name] = compare.paired_bootstrap(preds, base_preds, labels, seed=seed,
                                                             paired_seeds=paired)
    return gaps


# A study's finished table. The run folders of a long study need not outlive the machine that
# trained them (ours did not); its table does: results/ keeps each study's compare.csv, and the
# curve is drawn from those exactly as from the runs (tests/test_compare.py checks it).
TABLE_COLUMNS = ("experiment", "seeds", "training rows", "macro F1",
                 "macro F1 - baseline [95% CI]")
NUMBER = r"[+-]?\d*\.?\d+"


def cell_numbers(where, row, column, pattern):
    """The numbers that pattern's groups capture in one cell of a table row ("60,566" -> 60566.0;
    a group left out, such as the std of a single run, is 0.0); one line naming where (file and
    line) and the column if the cell does not match."""
    cell = row[column]
    found = re.fullmatch(pattern, cell.strip())
    if found is None:
        raise common.UserError(f"{where}, {column}: cannot read {cell!r}")
    return [float(x.replace(",", "")) if x is not None else 0.0 for x in found.groups()]


def read_csv_table(path, columns, written_by):
    """The rows of a csv table, as dicts; one line naming the file where it is missing or lacks
    one of the columns (written_by: what writes such a table)."""
    if not Path(path).is_file():
        raise common.UserError(f"{path}: no such table")
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    missing = [c for c in columns if not table or c not in table[0]]
    if missing:
        raise common.UserError(f"{path}: no column {missing[0]!r} ({written_by} has "
                               f"{', '.join(columns)})")
    return table


def read_table(path, baseline=BASELINE):
    """(scores, gaps) as scores() and gaps_to_baseline() give them, read from a compare.csv that
    analyze.py --compare wrote (or any csv with TABLE_COLUMNS): "0.9264 ± 0.0020" is a mean and
    std, "+0.0029 [+0.0007, +0.0054] *" a difference and its interval. Its differences must be
    against the baseline asked for: the table cannot be re-measured against another."""
    table = read_csv_table(path, TABLE_COLUMNS, "a compare.csv of analyze.py --compare")
    out, gaps, base = {}, {}, None
    for line, row in enumerate(table, start=2):       # line 1 is the header
        where = f"{path} line {line}"
        name = row["experiment"]
        rows, = cell_numbers(where, row, "training rows", r"(\d[\d,]*)")
        seeds, = cell_numbers(where, row, "seeds", r"(\d+)")
        mean, std = cell_numbers(where, row, "macro F1", rf"({NUMBER})(?: ± ({NUMBER}))?.*")
        out[name] = (int(rows), mean, std, int(seeds))
        if row["macro F1 - baseline [95% CI]"].strip() == "baseline":
            base = name
        else:
            gaps[name] = tuple(cell_numbers(where, row, "macro F1 - baseline [95% CI]",
                                            rf"({NUMBER}) \[({NUMBER}), ({NUMBER})\].*"))
    if base != baseline:
        raise common.UserError(f"{path}: its differences are against {base}, not {baseline} "
                               f"(--baseline): run analyze.py --compare --baseline {baseline} on "
                               f"its runs")
    return out, gaps


def read_study(path, baseline=BASELINE, data_dir=None, seed=0):
    """(scores, gaps) of one study: from its run folders, as --compare gathers them, or from its
    finished table where path is a .csv."""
    if Path(path).suffix == ".csv":
        return read_table(path, baseline)
    experiments = compare.gather_experiments([path])
    gaps = gaps_to_baseline(experiments, baseline, data_dir, seed)
    if gaps is None:
        print(f"{path}: no {baseline} there, so no differences from it at this size")
    return scores(experiments), gaps or {}


def learning_curve(studies):
    """{study: (scores, gaps)} -> (curves, gaps) with every experiment's points joined across
    studies, {experiment name: {study: (rows, mean, std, seeds)}} and {experiment name: {study:
    (difference, low, high)}}; an experiment keeps its name across folders."""
    curves, gaps = {}, {}
    for study, (study_scores, study_gaps) in studies.items():
        for name, score in study_scores.items():
            curves.setdefault(name, {})[study] = score
        for name, gap in study_gaps.items():
            gaps.setdefault(name, {})[study] = gap
    return curves, gaps


def verdict(low, high):
    """Where a difference's interval lies: above 0, below 0, or holding 0."""
    return "better" if low > 0 else "worse" if high < 0 else "inside the noise"


def changed_conclusions(curves, gaps):
    """{experiment name: ['better at 2,000 rows -> worse at 24,175 rows', ...]}: where the verdict
    of one size differs from that of the next larger; experiments whose verdict holds are absent."""
    changes = {}
    for name, by_study in gaps.items():
        points = sorted((curves[name][study][0], verdict(low, high))
                        for study, (_, low, high) in by_study.items())
        for (rows, was), (more_rows, now) in zip(points, points[1:]):
            if was != now:
                changes.setdefault(name, []).append(f"{was} at {rows:,} rows -> {now} at "
                                                    f"{more_rows:,} rows")
    return changes


def line_style(k, name):
    """The k-th experiment's line, alike on both panels: solid for BERTs, dashed for the rest."""
    return ("-" if name.startswith(("bert", "lora")) else "--"), plt.cm.tab20(k % 20)


def draw_gaps(right, curves, gaps, baseline):
    """On the right panel, each experiment's difference from the baseline (points) against its
    training rows, with the 95% interval as a bar. Returns what it drew: {"lines": {name: (x,
    difference, low, high), each (P,)}, "ylim", "texts"}, read back from the panel's artists, and
    "off_scale": ['lstm at 2,000 rows: -19.8 [-20.9, -18.7]', ...], the points past its edge."""
    points = {name: sorted((curves[name][study][0], *(100 * np.array(gap)))
                           for study, gap in by_study.items())
              for name, by_study in gaps.items()}           # name: [(rows, diff, low, high)]
    interval_ends = [(abs(diff) <= OFF_SCALE, end) for line in points.values()
                     for _, diff, *interval in line for end in interval]
    near = [end for is_near, end in interval_ends if is_near] or [e for _, e in interval_ends]
    bottom, top = min(near + [-1.0]), max(near + [1.0])
    bottom, top = bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom)
    names, off_scale, marked = sorted(curves), [], []
    largest = max(n for line in points.values() for n, *_ in line)   # its texts go leftwards
    for name, line in sorted(points.items()):
        k = names.index(name)
        style, color = line_style(k, name)
        rows, diff, low, high = np.array(line).T                                      # (P,) each
        dodged = rows * 1.012 ** (k - len(names) / 2)  # side by side, so the bars do not overlap
        right.errorbar(dodged, diff, yerr=[diff - low, high - diff], fmt="o" + style, capsize=3,
                       color=color, label=name)
        for x, (n, d, lo, hi) in zip(dodged, line):
            if bottom <= lo and hi <= top:
                continue
            up, value = d > 0, f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"   # up: it runs off the top
            edge, nth = (top if up else bottom), marked.count((n, up))  # nth: stacked texts
            marked.append((n, up))
            off_scale.append(f"{name} at {n:,} rows: {value}")
            right.plot(x, edge, "^" if up else "v", color=color, ms=9, clip_on=False)
            shift = (8 if n < largest else -8, (6 + 10 * nth) * (-1 if up else 1))  # inward
            right.annotate(f"{name} {value}", (x, edge), xytext=shift, fontsize=7, color=color,
                           textcoords="offset points", va="top" if up else "bottom",
                           ha="left" if n < largest else "right")
    right.set_ylim(bottom, top)
    right.axhline(0, color="black", lw=1, ls=":")
    right.set_ylabel(f"macro F1 minus {baseline}'s (points; colours as on the left)")
    right.set_title(f"Minus {baseline}, with 95% paired-bootstrap intervals\n"
                    f"verdict: above 0, below 0, or holding 0 (noise)", fontsize=10)
    lines = {}
    for container in right.containers:  # an errorbar: its line, its caps, its bars
        data_line, _, (bars,) = container.lines
        ends = np.array(bars.get_segments())                       # (P, 2, 2): (x, low), (x, high)
        lines[container.get_label()] = (*data_line.get_data(), ends[:, 0, 1], ends[:, 1, 1])
    return {"lines": lines, "ylim": right.get_ylim(), "off_scale": off_scale,
            "texts": [text.get_text() for text in right.texts]}


def plot_learning_curve(curves, gaps, path, baseline=BASELINE):
    """Test macro F1 against training rows (log scale), one line per experiment: the mean over
    seeds, a bar of ±1 std; experiments measured at one size only are dots. Where the baseline was
    measured, a second panel (draw_gaps) holds each experiment's difference from it with its 95%
    interval; no line is left out. Returns (path, what the second panel drew, or None)."""
    fig, axes = plt.subplots(1, 2 if gaps else 1, figsize=(compare.COMPARE_WIDTH, 6),
                             squeeze=False)
    ax = axes[0, 0]
    sizes = sorted({rows for by_study in curves.values() for rows, *_ in by_study.values()})
    for k, (name, by_study) in enumerate(sorted(curves.items())):
        style, color = line_style(k, name)
        rows, means, stds, _ = zip(*sorted(by_study.values()))
        ax.errorbar(rows, means, yerr=stds, fmt="o" + style, capsize=3, label=name, color=color)
    ax.set_ylabel("test macro F1 (mean ± std over seeds)")
    ax.set_title("The study's experiments at each size")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    drawn = draw_gaps(axes[0, 1], curves, gaps, baseline) if gaps else None
    for axis in axes[0]:
        axis.set_xscale("log")
        axis.set_xticks(sizes, [f"{s:,}" for s in sizes])
        axis.minorticks_off()
        axis.set_xlabel("training rows (log scale)")
        axis.grid(alpha=0.3)
    if drawn and drawn["off_scale"]:
        fig.text(0.01, 0.01, f"▲/▼: a point more than {OFF_SCALE:g} points from 0, off the right "
                 f"panel's scale; its line runs on past the edge, its value [95% interval] is "
                 f"written beside it", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return common.save_figure(fig, path), drawn


SPLITS = ("val", "test")  # the epochs curve: where the length is chosen, where it is reported
# The epochs curve's table, as show_epochs_curve prints it and writes it (epochs_curve.csv); a cell
# is "mean ± std" over the seeds, or "-" where that split was not recorded. results/ keeps ours,
# so the curve outlives the run folders, as the studies' tables do for the learning curve.
EPOCHS_COLUMNS = ("training rows", "epochs", "seeds", "validation macro F1", "test macro F1")


def epochs_points(path):
    """[(training rows, epochs, {split: (mean, std, seeds)})] of the experiments in a folder of
    runs: each experiment's seeds pooled, its length from its config."""
    points = []
    for experiment in compare.gather_experiments([path]):
        epochs = common.load_json(experiment.runs[0] / "config.json")["args"]["epochs"]
        rows = runfolders.training_rows(experiment.runs[0])
        seeds = len(experiment.metrics)
        points.append((rows, epochs, {split: (*compare.mean_std(
            [m[split]["macro_f1"] for m in experiment.metrics]), seeds) for split in SPLITS}))
    return points


def read_epochs_table(path):
    """epochs_points() read from an epochs_curve.csv (EPOCHS_COLUMNS); a split whose cell is "-"
    was not recorded: None."""
    table = read_csv_table(path, EPOCHS_COLUMNS, "an epochs_curve.csv of analyze.py "
                                                 "--epochs-curve")
    points = []
    for line, row in enumerate(table, start=2):       # line 1 is the header
        where = f"{path} line {line}"
        rows, = cell_numbers(where, row, "training rows", r"(\d[\d,]*)")
        epochs, = cell_numbers(where, row, "epochs", r"(\d+)")
        seeds, = cell_numbers(where, row, "seeds", r"(\d+)")
        splits = {}
        for split, column in zip(SPLITS, EPOCHS_COLUMNS[3:]):
            splits[split] = None if row[column].strip() == "-" else (
                *cell_numbers(where, row, column, rf"({NUMBER}) ± ({NUMBER})"), int(seeds))
        if not any(splits.values()):
            raise common.UserError(f"{where}: neither split has a score (both cells are '-')")
        points.append((int(rows), int(epochs), splits))
    return points


def epochs_curve(paths):
    """{training rows: {epochs: {"val": (mean, std, seeds) or None, "test": ...}}} of macro F1
    from the given folders, e.g. runs/acc/pooler_e1 ... pooler_e10, or epochs_curve.csv tables:
    the caller names experiments that differ only in --epochs (and the training rows, one line
    each). A length given twice for the same rows is refused: which one to draw?"""
    curve = {}
    for path in paths:
        points = read_epochs_table(path) if Path(path).suffix == ".csv" else epochs_points(path)
        for rows, epochs, splits in points:
            if epochs in curve.get(rows, {}):
                raise common.UserError(f"{path}: {rows:,} rows at {epochs} epochs is given twice "
                                       f"among {', '.join(map(str, paths))}")
            curve.setdefault(rows, {})[epochs] = splits
    return curve


def epochs_table(curve):
    """The rows of the epochs curve's table (EPOCHS_COLUMNS), by size, then length."""
    def cell(point):
        return "-" if point is None else f"{point[0]:.4f} ± {point[1]:.4f}"
    return [[f"{rows:,}", str(epochs), str(max(p[2] for p in splits.values() if p)),
             *(cell(splits[split]) for split in SPLITS)]
            for rows, by_epochs in sorted(curve.items())
            for epochs, splits in sorted(by_epochs.items())]


def show_epochs_curve(paths, out_dir):
    """Print macro F1 against epochs as a table, validation (where the length is chosen) beside
    test, and write it as epochs_curve.csv; write epochs_curve.png into out_dir: a line per
    training size, validation solid, test dashed, ±1 std over seeds as bars; a split that a
    table did not record is left out of its line."""
    curve = epochs_curve(paths)
    table = epochs_table(curve)
    print("\n| " + " | ".join(EPOCHS_COLUMNS) + " |\n| ---: | ---: | ---: | --- | --- |")
    for row in table:
        print("| " + " | ".join(row) + " |")

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([EPOCHS_COLUMNS, *table])
    common.atomic_write(Path(out_dir) / "epochs_curve.csv", write_csv)
    fig, ax = plt.subplots(figsize=(compare.COMPARE_WIDTH, 5))
    for k, (rows, by_epochs) in enumerate(sorted(curve.items())):
        for split, style in zip(SPLITS, ("-", "--")):
            points = [(e, *s[split][:2]) for e, s in sorted(by_epochs.items()) if s[split]]
            if points:
                epochs, means, stds = zip(*points)
                ax.errorbar(epochs, means, yerr=stds, fmt="o" + style, capsize=3,
                            color=plt.cm.tab10(k), label=f"{rows:,} rows, {split}")
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
    print(f"wrote {Path(out_dir) / 'epochs_curve.csv'}")
    return common.save_figure(fig, Path(out_dir) / "epochs_curve.png")


def score_text(rows, mean, std, seeds):
    return f"{mean:.4f} ± {std:.4f} ({rows:,} rows, {seeds} seeds)"


def gap_text(diff, low, high):   # '+2.50 [+1.90, +3.10] better': in points, with the verdict
    return f"{100 * diff:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] {verdict(low, high)}"


def show_learning_curve(paths, out_dir, data_dir=None, seed=0, baseline=BASELINE):
    """Print the curve as a table, a column per study (folder or table) in the order given ("-"
    where the experiment is not in it); then each experiment against the baseline with its
    interval and verdict at each size, and where that verdict changes; write learning_curve.png
    into out_dir. Returns plot_learning_curve's (path, what the right panel drew)."""
    studies = {str(path): read_study(path, baseline, data_dir, seed) for path in paths}
    curves, gaps = learning_curve(studies)
    header = "| experiment | " + " | ".join(studies) + " |"
    print("\n" + header + "\n| --- |" + " ---: |" * len(studies))
    for name, by_study in sorted(curves.items()):
        cells = [score_text(*by_study[study]) if study in by_study else "-" for study in studies]
        print(f"| {name} | " + " | ".join(cells) + " |")
    changes = changed_conclusions(curves, gaps)
    if gaps:
        print(f"\nMinus {baseline} (points), 95% paired bootstrap over test rows and seeds as in "
              f"--compare; better or worse: the interval excludes 0")
        print(header + " changed conclusion |\n| --- |" + " ---: |" * len(studies) + " --- |")
    for name, by_study in sorted(gaps.items()):
        cells = [gap_text(*by_study[study]) if study in by_study else "-" for study in studies]
        print(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(changes.get(name, ['no']))} |")
    path, drawn = plot_learning_curve(curves, gaps, Path(out_dir) / "learning_curve.png", baseline)
    for point in (drawn or {}).get("off_scale", []):
        print(f"off the right panel's scale, drawn at its edge with its value: {point}")
    return path, drawn
