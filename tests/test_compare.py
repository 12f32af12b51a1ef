"""compare.py (analyze.py --compare): seeds pooled into experiments, paired bootstrap intervals and
exact McNemar p-values checked on predictions whose answer is known, and the table written as md,
csv and png (on copies of a tiny trained run: needs AG News rows)."""
import csv
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binom
from sklearn.metrics import f1_score

import analyze
import common
import compare
import learning_curves
from plumbing import agnews, runfolders
from conftest import needs_rows


def test_macro_f1_from_counts_matches_sklearn():
    rng = np.random.default_rng(1)
    labels, preds = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    preds[:200] = labels[:200]
    weights = np.ones((1, 500))
    assert compare.bootstrap_f1(preds[None], labels, weights)[0, 0] == pytest.approx(
        f1_score(labels, preds, average="macro"), abs=1e-12)
    # A resample is the rows repeated as often as drawn: same as sklearn on the repeated rows.
    draw = rng.integers(0, 3, 500)
    repeated = np.repeat(np.arange(500), draw)
    resampled = compare.bootstrap_f1(preds[None], labels, draw[None].astype(float))[0, 0]
    assert resampled == pytest.approx(
        f1_score(labels[repeated], preds[repeated], average="macro"), abs=1e-12)


def test_identical_predictions_differ_by_zero_with_p_one():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 400)
    preds = np.where(rng.random(400) < 0.8, labels, rng.integers(0, 4, 400))[None]   # (1, N)
    diff, low, high = compare.paired_bootstrap(preds, preds.copy(), labels, samples=300)
    assert diff == 0 and low == 0 and high == 0
    right = preds[0] == labels
    assert compare.mcnemar_exact(right, right.copy()) == 1.0


@pytest.mark.parametrize("k", [1, 5, 9])
def test_a_model_fixing_k_errors_and_breaking_none(k):
    """B = A with k of A's errors fixed: McNemar's discordant rows are k, all one way, so the exact
    two-sided p is 2 * P(X <= 0), X ~ Binomial(k, 1/2) = 2 / 2^k (capped at 1)."""
    rng = np.random.default_rng(k)
    labels = rng.integers(0, 4, 1000)
    a = labels.copy()
    wrong = rng.choice(1000, 60, replace=False)
    a[wrong] = (labels[wrong] + 1) % 4
    b = a.copy()
    b[wrong[:k]] = labels[wrong[:k]]
    p = compare.mcnemar_exact(b == labels, a == labels)
    assert p == pytest.approx(min(1.0, 2 * binom.cdf(0, k, 0.5)), rel=1e-12)
    assert p == pytest.approx(min(1.0, 2 / 2 ** k), rel=1e-12)
    diff, low, high = compare.paired_bootstrap(b[None], a[None], labels, samples=500)
    assert diff == pytest.approx(f1_score(labels, b, average="macro")
                                 - f1_score(labels, a, average="macro"))
    # Fixing without breaking can only help on any resample: the interval never goes below 0.
    assert 0 <= low <= diff <= high


def test_seeds_widen_the_interval():
    """Two experiments whose seeds disagree a lot: the seed-resampling interval is wider than the
    one from a single seed each."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 800)
    def seed_preds(accuracy):
        return np.where(rng.random(800) < accuracy, labels, (labels + 1) % 4)
    a = np.stack([seed_preds(acc) for acc in (0.70, 0.80, 0.90)])
    b = np.stack([seed_preds(acc) for acc in (0.72, 0.82, 0.88)])
    _, low3, high3 = compare.paired_bootstrap(a, b, labels, samples=600)
    _, low1, high1 = compare.paired_bootstrap(a[1:2], b[1:2], labels, samples=600)
    assert high3 - low3 > 1.5 * (high1 - low1)
    assert low3 < 0 < high3  # spread over seeds this large: inside the noise


# -- the command on run folders -------------------------------------------------------------------
def fake_seed(tiny_lstm_run, dest, seed, flip, **config_changes):
    """A copy of the tiny run as if trained with another seed (its predictions perturbed on `flip`
    rows), or as another experiment (config_changes in its args)."""
    shutil.copytree(tiny_lstm_run, dest)
    config = json.loads((dest / "config.json").read_text())
    config["args"].update(seed=seed, out=str(dest), **config_changes)
    common.save_json(dest / "config.json", config)
    probs = np.load(dest / "test_probs.npy")
    rows = np.random.default_rng(seed).choice(len(probs), flip, replace=False)
    probs[rows] = np.roll(probs[rows], 1, axis=1)
    common.save_npy(dest / "test_probs.npy", probs)
    return dest


@needs_rows
def test_compare_groups_seeds_marks_differences_and_writes_files(tiny_lstm_run, tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        fake_seed(tiny_lstm_run, root / "steady" / f"seed{seed}", seed, flip=2)
        fake_seed(tiny_lstm_run, root / "broken" / f"seed{seed}", seed, flip=60, lr=0.5)
    fake_seed(tiny_lstm_run, root / "single", 0, flip=3, lr=0.25)
    other = fake_seed(tiny_lstm_run, root / "other_rows", 0, flip=0, lr=0.125)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["fingerprints"]["test"] = "0" * 16
    common.save_json(other / "metrics.json", metrics)

    analyze.main(["--compare", str(root), "--baseline", "steady", "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert ("left out (scored on other test rows than the 7 runs compared, which read 200; train "
            "them on the same data with the same --test-size to bring them in): "
            f"{other} (200 test rows, other ones)") in out
    rows = {r[0]: r for r in (line.split(",") for line
                              in (tmp_path / "cmp" / "compare.csv").read_text().splitlines())}
    assert set(rows) == {"experiment", "steady", "broken", "single"}
    assert rows["steady"][1] == "3" and rows["broken"][1] == "3" and rows["single"][1] == "1"
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    broken_line = next(line for line in markdown.splitlines() if line.startswith("| broken |"))
    assert broken_line.count("±") >= 4 and " *" in broken_line  # 60 of 200 rows flipped: real
    steady_line = next(line for line in markdown.splitlines() if line.startswith("| steady |"))
    assert "baseline" in steady_line
    with Image.open(tmp_path / "cmp" / "compare.png") as image:
        assert image.size == (compare.COMPARE_WIDTH * common.DPI,
                              int((2 + 0.45 * 3) * common.DPI))

    with pytest.raises(common.UserError, match="--baseline nope: no such experiment"):
        analyze.main(["--compare", str(root), "--baseline", "nope", "--out", str(tmp_path / "cmp")])


def test_experiment_key_ignores_only_the_seed_and_bookkeeping():
    config = {"script": "train_bert", "head": "pooler",
              "args": {"seed": 0, "seeds": [0, 1], "out": "a", "device": "cpu", "lr": 5e-5,
                       "resume": False}}
    same = json.loads(json.dumps(config))
    same["args"].update(seed=1, out="b", device="cuda", resume=True)
    other = json.loads(json.dumps(config))
    other["args"]["lr"] = 1e-4
    assert runfolders.experiment_key(config) == runfolders.experiment_key(same)
    assert runfolders.experiment_key(config) != runfolders.experiment_key(other)


def test_a_seed_saved_before_a_flag_existed_joins_its_experiment():
    """A config.json written before --llrd, --rdrop, ... existed lacks them; it ran with the values
    runfolders.ADDED_FLAGS records, so it is one experiment with a newer seed that has them at those
    values, and another experiment than one that set them otherwise."""
    old = {"script": "train_lstm", "args": {"seed": 0, "lr": 2e-3, "epochs": 5}}
    new = {"script": "train_lstm", "args": {"seed": 1, "lr": 2e-3, "epochs": 5, "llrd": 1.0,
                                            "reinit_top": 0, "rdrop": 0.0, "unlabeled": 0}}
    assert runfolders.experiment_key(old) == runfolders.experiment_key(new)
    new["args"]["rdrop"] = 1.0
    assert runfolders.experiment_key(old) != runfolders.experiment_key(new)


@needs_rows
def test_one_seed_of_one_experiment_counts_once(tiny_lstm_run, tmp_path, capsys):
    """runs/x and runs/x-2 (the same command typed twice, same seed) are one seed, not two: the
    newer counts and the other is named."""
    root = tmp_path / "runs"
    older = fake_seed(tiny_lstm_run, root / "x", 0, flip=2)
    newer = fake_seed(tiny_lstm_run, root / "x-2", 0, flip=4)
    os.utime(older / "metrics.json", (1, 1))  # older by its metrics.json's time, as find_runs sorts
    fake_seed(tiny_lstm_run, root / "y", 0, flip=5, lr=0.5)
    [x] = [e for e in compare.gather_experiments([root]) if e.name.startswith("x")]
    assert x.runs == [newer]
    assert (f"left out: {older} (seed 0 of the experiment of {newer}, which is newer)"
            in capsys.readouterr().out)


def test_paired_seeds_take_out_the_noise_the_seeds_share():
    """B is A with the same 4 errors fixed in every seed, while the seeds themselves differ a lot:
    drawn seed by seed (paired), the difference is a constant and the interval excludes 0; drawn on
    their own, the seed spread swamps it."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 800)
    a = np.stack([np.where(rng.random(800) < acc, labels, (labels + 1) % 4)
                  for acc in (0.70, 0.80, 0.90)])
    b = a.copy()
    for k in range(3):
        wrong = np.flatnonzero(a[k] != labels)[:12]
        b[k, wrong] = labels[wrong]
    _, low, high = compare.paired_bootstrap(b, a, labels, samples=500, paired_seeds=True)
    assert 0 < low <= high
    _, low, high = compare.paired_bootstrap(b, a, labels, samples=500, paired_seeds=False)
    assert low < 0 < high


# -- how the table reads: one seed, tiny p-values, singular and plural -----------------------------
def synthetic_experiment(root, name, seeds, preds):
    """An experiment of run folders holding only what the table reads: test_probs.npy (one-hot of
    preds) and an empty metrics.json."""
    runs = []
    for seed in seeds:
        run = root / name / f"seed{seed}"
        common.save_npy(run / "test_probs.npy",
                        np.eye(common.NUM_CLASSES, dtype=np.float32)[preds])
        common.save_json(run / "metrics.json", {})
        runs.append(run)
    return compare.Experiment(name, runs, {}, list(seeds))


def test_one_seed_says_so_and_a_p_below_floats_is_still_written(tmp_path):
    """A one-seed experiment has no std: "(1 seed)" in the table, the mean alone in the csv (not
    "± 0.0000"). 2000 rows right against 2000 wrong: McNemar's p is 2 / 2^2000 = 1.7e-602, below
    the smallest float, where the table used to say 0."""
    labels = np.arange(2000) % common.NUM_CLASSES
    worse = synthetic_experiment(tmp_path, "worse", [0, 1, 2], (labels + 1) % common.NUM_CLASSES)
    better = synthetic_experiment(tmp_path, "better", [0], labels)
    base, row = compare.compare_experiments([worse, better], labels, "worse")
    cells = dict(zip(compare.COMPARE_COLUMNS, compare.table_cells(row)))
    assert cells["test accuracy"] == cells["macro F1"] == "1.0000 (1 seed)"
    assert not any("±" in cell for cell in cells.values())
    assert row["p"] == 0.0 and cells["McNemar p"] == "1.7e-602"
    csv_cells = dict(zip(compare.COMPARE_COLUMNS, compare.table_cells(row, for_csv=True)))
    assert csv_cells["test accuracy"] == "1.0000" and float(csv_cells["F1 Business"]) == 1.0
    assert dict(zip(compare.COMPARE_COLUMNS, compare.table_cells(base)))["test accuracy"] == \
        "0.0000 ± 0.0000"  # three seeds that agree: a std of 0
    # Where floats still hold it, the p is written as before.
    assert compare.p_text(0.0123, np.log10(0.0123)) == "0.012"
    right = np.arange(100) < 60
    assert compare.mcnemar_log10_p(right, ~right) == pytest.approx(
        np.log10(compare.mcnemar_exact(right, ~right)), abs=1e-9)


def test_left_out_runs_are_counted_in_the_singular_and_the_plural(tmp_path, capsys):
    def run(name, fingerprint):
        folder = tmp_path / name
        common.save_json(folder / "metrics.json",
                         {"rows": {"val": 4, "test": 4},
                          "fingerprints": {"val": "v", "test": fingerprint}})
        return folder
    runfolders.largest_group_on_same_rows([run("a", "x"), run("b", "y")], "compared")
    out = capsys.readouterr().out
    assert "than the 1 run compared" in out and str(tmp_path / "a") in out
    runfolders.largest_group_on_same_rows([run("c", "x"), run("d", "y"), run("e", "y")], "compared")
    assert "than the 2 runs compared" in capsys.readouterr().out


def test_small_runs_raise_no_undefined_metric_warning(capsys):
    """A class never predicted (common in a quick run): precision and F1 of it are 0, quietly; no
    UndefinedMetricWarning on stderr."""
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    preds = np.array([0, 1, 1, 1, 0, 1, 0, 1])   # Business and Sci/Tech never predicted
    probs = np.eye(common.NUM_CLASSES)[preds] * 0.9 + 0.025
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = common.evaluate(probs, labels)
        common.print_report(labels, probs)
        f1 = compare.macro_f1(labels, preds)
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro",
                                                        zero_division=0))
    assert f1 == pytest.approx(scores["macro_f1"])
    assert "Business" in capsys.readouterr().out


@needs_rows
def test_a_one_seed_experiment_reads_1_seed_in_the_table_and_a_number_in_the_csv(
        tiny_lstm_run, tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake_seed(tiny_lstm_run, root / "steady" / f"seed{seed}", seed, flip=2)
    fake_seed(tiny_lstm_run, root / "single", 0, flip=3, lr=0.25)
    analyze.main(["--compare", str(root), "--baseline", "steady", "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    single_line = next(line for line in printed.splitlines() if line.startswith("| single |"))
    assert "(1 seed)" in single_line and "±" not in single_line
    assert single_line in (tmp_path / "cmp" / "compare.md").read_text()
    with open(tmp_path / "cmp" / "compare.csv", newline="") as f:
        rows = {r[0]: dict(zip(compare.COMPARE_COLUMNS, r)) for r in csv.reader(f)}
    assert float(rows["single"]["test accuracy"]) == pytest.approx(
        float(single_line.split(" | ")[compare.COMPARE_COLUMNS.index("test accuracy")].split()[0]))
    assert "±" in rows["steady"]["test accuracy"]


# -- today's news: the cases columns, and the learning curve ---------------------------------------
def test_the_cases_columns_are_each_runs_own_cases_probs(tmp_path):
    """The table's today's-news macro F1 is the mean over seeds of each run's own cases_probs.npy;
    the drop from test to today is test F1 minus cases F1, with an interval that excludes 0 when
    the drop is large and holds 0 when there is none; a run scored before the cases existed (no
    fingerprint) shows '-'."""
    rng = np.random.default_rng(7)
    labels = np.arange(800) % common.NUM_CLASSES
    cases = agnews.Split([f"case {i}" for i in range(200)], np.arange(200) % common.NUM_CLASSES)
    onehot = np.eye(common.NUM_CLASSES, dtype=np.float32)

    def experiment(name, test_acc, cases_acc, with_cases=True):
        runs = []
        for seed in (0, 1, 2):
            run = tmp_path / name / f"seed{seed}"
            test_preds = np.where(rng.random(800) < test_acc, labels, (labels + 1) % 4)
            cases_preds = np.where(rng.random(200) < cases_acc, cases.labels,
                                   (cases.labels + 2) % 4)
            common.save_npy(run / "test_probs.npy", onehot[test_preds])
            common.save_npy(run / "cases_probs.npy", onehot[cases_preds])
            fingerprints = {"cases": cases.fingerprint()} if with_cases else {}
            common.save_json(run / "metrics.json", {"fingerprints": fingerprints})
            runs.append(run)
        return compare.Experiment(name, runs, {}, [0, 1, 2])

    steady, fragile, old = (experiment("steady", 0.9, 0.9), experiment("fragile", 0.95, 0.6),
                            experiment("old", 0.9, 0.9, with_cases=False))
    rows = compare.compare_experiments([steady, fragile, old], labels, "steady", cases=cases)
    by_name = {row["experiment"]: row for row in rows}
    for name, exp in (("steady", steady), ("fragile", fragile)):
        own = [compare.macro_f1(cases.labels, np.load(run / "cases_probs.npy").argmax(1))
               for run in exp.runs]
        cells = dict(zip(compare.COMPARE_COLUMNS, compare.table_cells(by_name[name])))
        assert cells["today's news macro F1"] == f"{np.mean(own):.4f} ± {np.std(own, ddof=1):.4f}"
        test_f1 = [compare.macro_f1(labels, np.load(run / "test_probs.npy").argmax(1))
                   for run in exp.runs]
        assert by_name[name]["cases_drop"][0] == pytest.approx(np.mean(test_f1) - np.mean(own))
    drop, low, high = by_name["fragile"]["cases_drop"]
    assert 0.25 < drop and 0 < low < drop < high
    _, low, high = by_name["steady"]["cases_drop"]
    assert low < 0 < high
    _, low, high = by_name["fragile"]["cases_diff"]   # against the baseline, on the cases
    assert high < 0
    cells = dict(zip(compare.COMPARE_COLUMNS, compare.table_cells(by_name["old"])))
    assert (cells["today's news macro F1"], cells["test - today's news [95% CI]"],
            cells["today's news - baseline [95% CI]"]) == ("-", "-", "-")


CURVE_LABELS = np.arange(400) % common.NUM_CLASSES   # (N,) the test rows of every made-up study


@pytest.fixture
def curve_labels(monkeypatch):
    """The made-up studies' test labels, where the learning curve would load AG News rows."""
    monkeypatch.setattr(runfolders, "load_scored_split", lambda run, name, data_dir=None:
                        agnews.Split([""] * len(CURVE_LABELS), CURVE_LABELS))


def right_on(shares):
    """(R, N) predictions, seed k right on a share shares[k] of CURVE_LABELS (its own rows: each
    seed starts at another row) and one class off on the rest."""
    n = len(CURVE_LABELS)
    right = [np.roll(np.arange(n) < round(share * n), 37 * k) for k, share in enumerate(shares)]
    return np.where(right, CURVE_LABELS, (CURVE_LABELS + 1) % common.NUM_CLASSES)


def made_up_study(folder, rows, preds_of, seeds_of=None):
    """A study folder of finished runs trained on `rows` rows, {experiment: (R, N) test
    predictions}: per seed a config.json, a metrics.json (the macro F1 of those predictions) and
    test_probs.npy (their one-hot), all the learning curve reads. Seeds 0..R-1 unless seeds_of
    names them."""
    for k, (name, preds) in enumerate(preds_of.items()):
        for seed, p in zip((seeds_of or {}).get(name, range(len(preds))), preds):
            run = folder / name / f"seed{seed}"
            common.save_json(run / "config.json", {"script": "train_bert", "args": {
                "seed": seed, "train_size": rows, "lr": k}})   # lr: one experiment each
            common.save_json(run / "metrics.json", {
                "rows": {"train": rows, "val": 10, "test": len(CURVE_LABELS)},
                "fingerprints": {"val": "v", "test": "t"},
                "test": {"macro_f1": compare.macro_f1(CURVE_LABELS, p)}})
            common.save_npy(run / "test_probs.npy", np.eye(common.NUM_CLASSES, dtype=np.float32)[p])
    return folder


def test_the_learning_curve_joins_one_experiment_across_study_sizes(tmp_path, capsys,
                                                                     curve_labels):
    """Two study folders, the same two experiments at 2,000 and 24,175 rows: each experiment
    becomes one line with a point per size, mean and seeds as its runs' metrics say; the PNG is
    written."""
    f1 = {("small", "bert_pooler"): [0.88, 0.89, 0.87], ("small", "lstm"): [0.70, 0.72, 0.71],
          ("large", "bert_pooler"): [0.92, 0.93, 0.925], ("large", "lstm"): [0.89, 0.90, 0.90]}
    for (study, name), scores in f1.items():
        rows = 2000 if study == "small" else 24175
        for seed, score in enumerate(scores):
            run = tmp_path / study / name / f"seed{seed}"
            common.save_json(run / "config.json",
                             {"script": "train_bert" if name.startswith("bert") else "train_lstm",
                              "args": {"seed": seed, "train_size": rows}})
            common.save_json(run / "metrics.json",
                             {"rows": {"train": rows, "val": 10, "test": 20},
                              "fingerprints": {"val": "v", "test": "t"},
                              "test": {"macro_f1": score}})
            common.save_npy(run / "test_probs.npy", np.eye(common.NUM_CLASSES)[CURVE_LABELS])
    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    curves, _ = learning_curves.learning_curve(
        gather_studies([tmp_path / "small", tmp_path / "large"]))
    point = {key: (2000 if key[0] == "small" else 24175, *compare.mean_std(scores), 3)
             for key, scores in f1.items()}
    assert curves == {"bert_pooler": {small: point["small", "bert_pooler"],
                                      large: point["large", "bert_pooler"]},
                      "lstm": {small: point["small", "lstm"], large: point["large", "lstm"]}}
    # the table has a column per folder in the order given, "-" where an experiment is missing
    for run in (tmp_path / "large" / "lstm").iterdir():
        (run / "metrics.json").unlink()
    path, _ = learning_curves.show_learning_curve([tmp_path / "large", tmp_path / "small"],
                                                  tmp_path)
    assert Image.open(path).size[0] > 500
    table = capsys.readouterr().out
    lstm_row = next(line for line in table.splitlines() if line.startswith("| lstm |"))
    assert lstm_row.split(" | ")[1] == "-" and "2,000 rows" in lstm_row.split(" | ")[2]
    pooler_row = next(line for line in table.splitlines() if line.startswith("| bert_pooler |"))
    assert "24,175 rows" in pooler_row.split(" | ")[1]


def gather_studies(paths, baseline=learning_curves.BASELINE):
    """{study: (scores, gaps)}, as show_learning_curve reads them."""
    return {str(path): learning_curves.read_study(path, baseline) for path in paths}


def flipping_studies(root):
    """lora is 10 points better than bert_pooler at 2,000 rows and 10 points worse at 24,175, in
    all three seeds (paired); steady is 10 points better at both sizes."""
    low, high = right_on([0.80, 0.81, 0.79]), right_on([0.90, 0.91, 0.89])
    return [made_up_study(root / "small", 2000, {"bert_pooler": low, "lora": high,
                                                 "steady": high}),
            made_up_study(root / "large", 24175, {"bert_pooler": high, "lora": low,
                                                  "steady": right_on([1.0, 1.0, 1.0])})]


def test_a_verdict_that_flips_between_sizes_is_reported(tmp_path, capsys, curve_labels):
    """Clearly better at one size, clearly worse at the next: the printed table gives each size's
    interval and verdict and names the change; an experiment better at both sizes has none."""
    studies = flipping_studies(tmp_path)
    learning_curves.show_learning_curve(studies, tmp_path)
    printed = capsys.readouterr().out.splitlines()
    lora = next(line for line in printed if line.startswith("| lora |") and "[" in line)
    assert lora.endswith("| better at 2,000 rows -> worse at 24,175 rows |")
    assert " better | " in lora and " worse | " in lora
    steady = next(line for line in printed if line.startswith("| steady |") and "[" in line)
    assert steady.count(" better") == 2 and steady.endswith("| no |")
    curves, gaps = learning_curves.learning_curve(gather_studies(studies))
    assert learning_curves.changed_conclusions(curves, gaps) == {
        "lora": ["better at 2,000 rows -> worse at 24,175 rows"]}


def test_the_learning_curve_measures_against_the_baseline_named(tmp_path, capsys, curve_labels):
    """analyze.py --learning-curve --baseline steady: every gap is taken from steady, not from the
    pooler head (the default): lora predicts as steady at 2,000 rows (a gap of exactly 0), the
    pooler head is worse at both sizes."""
    studies = flipping_studies(tmp_path)
    analyze.main(["--learning-curve", *map(str, studies), "--baseline", "steady",
                  "--out", str(tmp_path / "figures")])
    printed = capsys.readouterr().out.splitlines()
    assert "Minus steady (points)" in "\n".join(printed)
    gap_rows = {line.split(" | ")[0]: line for line in printed
                if line.startswith("| ") and "[" in line}
    assert gap_rows.keys() == {"| bert_pooler", "| lora"}
    assert gap_rows["| lora"].startswith("| lora | +0.00 [+0.00, +0.00] inside the noise | -")
    assert gap_rows["| bert_pooler"].count(" worse | ") == 2
    assert (tmp_path / "figures" / "learning_curve.png").exists()


def test_means_that_cross_0_inside_the_noise_are_no_changed_conclusion(tmp_path, capsys,
                                                                        curve_labels):
    """noisy is bert_pooler's three (very different) seeds with 2 errors fixed at 2,000 rows and 2
    made at 24,175, trained on other seeds (so drawn unpaired): its mean crosses 0 (+0.5 -> -0.5
    points), but both intervals hold 0, so no conclusion changed."""
    base = right_on([0.70, 0.80, 0.90])
    better, worse = base.copy(), base.copy()
    for k in range(3):
        wrong = np.flatnonzero(base[k] != CURVE_LABELS)[:2]
        right = np.flatnonzero(base[k] == CURVE_LABELS)[:2]
        better[k, wrong] = CURVE_LABELS[wrong]
        worse[k, right] = (CURVE_LABELS[right] + 1) % common.NUM_CLASSES
    seeds = {"noisy": [3, 4, 5]}
    studies = [made_up_study(tmp_path / "small", 2000, {"bert_pooler": base, "noisy": better},
                             seeds),
               made_up_study(tmp_path / "large", 24175, {"bert_pooler": base, "noisy": worse},
                             seeds)]
    learning_curves.show_learning_curve(studies, tmp_path)
    noisy = next(line for line in capsys.readouterr().out.splitlines()
                 if line.startswith("| noisy |") and "[" in line)
    assert noisy.count("inside the noise") == 2 and noisy.endswith("| no |")
    curves, gaps = learning_curves.learning_curve(gather_studies(studies))
    (small, low_s, high_s), (large, low_l, high_l) = (gaps["noisy"][str(study)]
                                                      for study in studies)
    assert small > 0 > large                     # the means cross 0 ...
    assert low_s < 0 < high_s and low_l < 0 < high_l     # ... inside the noise at both sizes
    assert learning_curves.changed_conclusions(curves, gaps) == {}


def test_the_panel_draws_the_intervals_of_compare(tmp_path, curve_labels):
    """Each point of the right panel, read back from what matplotlib drew, is the difference and
    95% interval (in points) of compare.paired_bootstrap on the same predictions, and the one
    --compare's table gives for that study folder."""
    studies = flipping_studies(tmp_path)
    _, drawn = learning_curves.show_learning_curve(studies, tmp_path)
    for size, study in enumerate(studies):              # the points are in order of size
        experiments = compare.gather_experiments([study])
        table = {row["experiment"]: row["diff"] for row in
                 compare.compare_experiments(experiments, CURVE_LABELS, "bert_pooler",
                                             cases=agnews.Split([], np.zeros(0, int)))}
        preds = {e.name: np.stack([p.argmax(1) for p in e.probs(len(CURVE_LABELS))])
                 for e in experiments}                                           # name: (R, N)
        for name in ("lora", "steady"):
            bootstrap = compare.paired_bootstrap(preds[name], preds["bert_pooler"], CURVE_LABELS,
                                                 paired_seeds=True)
            _, diff, low, high = drawn["lines"][name]
            drawn_point = [diff[size], low[size], high[size]]
            assert drawn_point == pytest.approx([100 * end for end in bootstrap])
            assert table[name] == pytest.approx(bootstrap)
            assert low[size] < high[size]                   # an interval, not a bare mean


def test_a_study_read_from_its_compare_csv_draws_the_same_curve(tmp_path, capsys, curve_labels):
    """The run folders of a long study may be gone (a machine's disk); the compare.csv that
    --compare wrote is kept. The curve read from each study's table equals the one measured on its
    runs to the table's four digits: the same points, intervals and verdicts, the same printout."""
    studies = flipping_studies(tmp_path / "runs")
    tables = []
    for study in studies:
        analyze.main(["--compare", str(study), "--baseline", "bert_pooler", "--out", str(study)])
        tables.append(study.with_suffix(".csv"))
        tables[-1].write_bytes((study / "compare.csv").read_bytes())
    capsys.readouterr()
    _, from_runs = learning_curves.show_learning_curve(studies, tmp_path / "a")
    printed_runs = capsys.readouterr().out
    _, from_tables = learning_curves.show_learning_curve(tables, tmp_path / "b")
    printed_tables = capsys.readouterr().out
    for name, (x, diff, low, high) in from_runs["lines"].items():
        x_t, diff_t, low_t, high_t = from_tables["lines"][name]
        assert np.allclose(x, x_t)
        assert np.allclose([diff, low, high], [diff_t, low_t, high_t], atol=0.006)  # points
    assert printed_tables.replace(".csv", "").replace("/b/", "/a/") == printed_runs
    runs, _ = learning_curves.learning_curve(gather_studies(studies))
    read, _ = learning_curves.learning_curve(gather_studies(tables))
    for name, by_study in runs.items():
        for (rows, mean, std, seeds), study in zip(by_study.values(), tables):
            assert read[name][str(study)] == pytest.approx((rows, mean, std, seeds), abs=6e-5)


def test_a_table_that_cannot_give_the_curve_is_named_in_one_line(tmp_path):
    """A csv without a column the curve needs, with a cell it cannot read, or measured against
    another baseline than the one asked for: one line that names the file (and line, column)."""
    header = "experiment,seeds,training rows,macro F1,macro F1 - baseline [95% CI]\n"
    cases = {"no_rows.csv": ("experiment,seeds,macro F1\nbert_pooler,3,0.9\n",
                             "no column 'training rows'"),
             "bad_cell.csv": (header + "bert_pooler,3,2000,0.9 ± 0.01,baseline\n"
                              "lora,3,2000,0.91 ± 0.01,better\n",
                              "line 3, macro F1 - baseline [95% CI]: cannot read 'better'"),
             "other_base.csv": (header + "lora,3,\"2,000\",0.9 ± 0.01,baseline\n"
                                "bert_pooler,3,\"2,000\",0.88,\"-0.02 [-0.03, -0.01] *\"\n",
                                "its differences are against lora, not bert_pooler")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(common.UserError, match=re.escape(message)) as raised:
            learning_curves.read_table(tmp_path / name)
        assert str(raised.value).startswith(str(tmp_path / name))
    with pytest.raises(common.UserError, match="no such table"):
        learning_curves.read_study(tmp_path / "gone.csv")
    (tmp_path / "ok.csv").write_text(header + "bert_pooler,3,\"2,000\",0.9 ± 0.01,baseline\n"
                                     "lora,1,\"2,000\",0.88,\"-0.02 [-0.03, -0.01] *\"\n")
    assert learning_curves.read_table(tmp_path / "ok.csv") == (
        {"bert_pooler": (2000, 0.9, 0.01, 3), "lora": (2000, 0.88, 0.0, 1)},
        {"lora": (-0.02, -0.03, -0.01)})


def test_a_line_far_off_the_scale_is_drawn_and_said(tmp_path, capsys, curve_labels):
    """An LSTM 20 points below the baseline at 2,000 rows is not dropped: its line is drawn with
    its interval, beyond the panel's scale (which stays fitted to the near lines), where a text
    gives its value; a line is printed that says so."""
    studies = [made_up_study(tmp_path / "small", 2000, {
                   "bert_pooler": right_on([0.85] * 3), "bert_fc": right_on([0.87] * 3),
                   "lstm": right_on([0.65, 0.66, 0.64])}),
               made_up_study(tmp_path / "large", 24175, {
                   "bert_pooler": right_on([0.90] * 3), "bert_fc": right_on([0.91] * 3),
                   "lstm": right_on([0.88, 0.89, 0.87])})]
    _, drawn = learning_curves.show_learning_curve(studies, tmp_path)
    bottom, top = drawn["ylim"]
    _, diff, low, high = drawn["lines"]["lstm"]
    assert diff[0] < -15 and high[0] < bottom          # drawn, off the scale
    assert top - bottom < 10                           # the near lines keep their scale
    assert bottom < drawn["lines"]["bert_fc"][2].min()
    [off] = drawn["off_scale"]
    assert off.startswith(f"lstm at 2,000 rows: {diff[0]:+.1f} [")
    assert any(text.startswith(f"lstm {diff[0]:+.1f} [") for text in drawn["texts"])
    assert f"drawn at its edge with its value: {off}" in capsys.readouterr().out


def test_the_epochs_curve_has_a_point_per_length_and_both_splits(tmp_path, capsys):
    """Three experiments that differ only in --epochs (two at 2,000 rows, one at 24,175): a line
    per size, each point the seeds' validation and test macro F1 as their metrics say; the table
    and the PNG are written."""
    scores = {(2000, 1): ([0.80, 0.82], [0.79, 0.81]), (2000, 3): ([0.90, 0.91], [0.88, 0.89]),
              (24175, 1): ([0.92, 0.93], [0.91, 0.92])}
    folders = []
    for (rows, epochs), (val, test) in scores.items():
        folder = tmp_path / f"pooler_{rows}_e{epochs}"
        folders.append(folder)
        for seed in (0, 1):
            run = folder / f"seed{seed}"
            common.save_json(run / "config.json", {"script": "train_bert", "args": {
                "seed": seed, "epochs": epochs, "train_size": rows}})
            common.save_json(run / "metrics.json", {
                "rows": {"train": rows, "val": 10, "test": 20},
                "fingerprints": {"val": f"v{rows}", "test": "t"},
                "val": {"macro_f1": val[seed]}, "test": {"macro_f1": test[seed]}})
    curve = learning_curves.epochs_curve(folders)
    assert curve == {rows: {e: {"val": (*compare.mean_std(v), 2), "test": (*compare.mean_std(t), 2)}
                            for (r, e), (v, t) in scores.items() if r == rows}
                     for rows in (2000, 24175)}
    path = learning_curves.show_epochs_curve(folders, tmp_path)
    assert Image.open(path).size[0] > 500
    table = capsys.readouterr().out
    assert "| 2,000 | 3 | 2 | 0.9050 ± 0.0071 | 0.8850 ± 0.0071 |" in table
    # Its table, read back in place of the folders, is the same curve to the 4 decimals it keeps
    again = learning_curves.epochs_curve([tmp_path / "epochs_curve.csv"])
    assert again.keys() == curve.keys()
    for rows, by_epochs in curve.items():
        assert again[rows].keys() == by_epochs.keys()
        for epochs, splits in by_epochs.items():
            for split, (mean, std, seeds) in splits.items():
                assert again[rows][epochs][split] == (pytest.approx(mean, abs=5e-5),
                                                      pytest.approx(std, abs=5e-5), seeds)
    # and a length given twice (the table and a folder it came from) is refused in one line
    with pytest.raises(common.UserError, match="2,000 rows at 1 epochs is given twice"):
        learning_curves.epochs_curve([tmp_path / "epochs_curve.csv", folders[0]])


def test_the_epochs_curve_from_a_table_draws_the_recorded_splits_and_names_a_bad_cell(tmp_path,
                                                                                      capsys):
    """A table whose test cell is "-" (that length's test score was not recorded): the point is
    on the validation line only, and the table written again keeps the "-". A cell that is not a
    "mean ± std" is one line naming the file, line and column."""
    table = tmp_path / "recorded.csv"
    table.write_text("training rows,epochs,seeds,validation macro F1,test macro F1\n"
                     '"2,000",1,3,0.8813 ± 0.0079,-\n'
                     '"2,000",3,3,0.9172 ± 0.0066,0.8881 ± 0.0023\n', encoding="utf-8")
    curve = learning_curves.epochs_curve([table])
    assert curve == {2000: {1: {"val": (0.8813, 0.0079, 3), "test": None},
                            3: {"val": (0.9172, 0.0066, 3), "test": (0.8881, 0.0023, 3)}}}
    learning_curves.show_epochs_curve([table], tmp_path / "out")
    assert "| 2,000 | 1 | 3 | 0.8813 ± 0.0079 | - |" in capsys.readouterr().out
    assert learning_curves.epochs_curve([tmp_path / "out" / "epochs_curve.csv"]) == curve
    table.write_text(table.read_text(encoding="utf-8").replace("0.8881 ± 0.0023", "0.8881"),
                     encoding="utf-8")
    with pytest.raises(common.UserError, match=r"recorded.csv line 3, test macro F1: cannot read "
                                               r"'0.8881'"):
        learning_curves.epochs_curve([table])


@needs_rows
def test_compare_on_val_tables_the_validation_split_where_settings_are_chosen(tiny_lstm_run,
                                                                               tmp_path, capsys):
    """--compare-on val reads val_probs.npy against the validation labels (its macro F1 is each
    run's recorded val macro F1), writes compare_val.* beside, not over, compare.*; runs scored on
    other validation rows are refused in one line."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake_seed(tiny_lstm_run, root / "a" / f"seed{seed}", seed, flip=2)
    analyze.main(["--compare", str(root), "--compare-on", "val", "--out", str(tmp_path / "cmp")])
    with open(tmp_path / "cmp" / "compare_val.csv", newline="") as f:
        rows = {r[0]: dict(zip(compare.COMPARE_COLUMNS, r)) for r in csv.reader(f)}
    recorded = common.load_json(tiny_lstm_run / "metrics.json")["val"]["macro_f1"]
    assert float(rows["a"]["macro F1"].split()[0]) == pytest.approx(recorded, abs=1e-4)
    assert not (tmp_path / "cmp" / "compare.md").exists()
    assert "VALIDATION split" in (tmp_path / "cmp" / "compare_val.md").read_text()
    odd = root / "a" / "seed1" / "metrics.json"
    metrics = json.loads(odd.read_text())
    metrics["fingerprints"]["val"] = "0" * 16
    common.save_json(odd, metrics)
    with pytest.raises(common.UserError, match="scored on other val rows"):
        analyze.main(["--compare", str(root), "--compare-on", "val", "--out", str(tmp_path)])


def test_the_paired_interval_covers_a_known_difference_about_95_percent_of_the_time():
    """Lesson 14's promise, checked on simulated pairs: two fixed "models" on a population of
    100,000 rows have a true difference in macro F1 (computed on the whole population); 300 test
    sets of 800 rows are drawn from it and each gets compare.paired_bootstrap's 95% interval. The
    share of intervals that hold the true difference must lie in [0.90, 0.99]: 0.95 +- 3 binomial
    standard deviations of 300 trials (0.0126), a little room below for the percentile
    bootstrap's known undercoverage at this size. An interval half as wide is caught."""
    rng = np.random.default_rng(20261204)
    population = 100_000
    labels = rng.integers(0, 4, population)
    hard = rng.random(population)                     # shared difficulty: the pairing matters
    def model(accuracy_offset):
        right = rng.random(population) < np.clip(0.2 + hard + accuracy_offset, 0, 1)
        wrong = (labels + rng.integers(1, 4, population)) % 4
        return np.where(right, labels, wrong)
    preds_a, preds_b = model(0.05), model(0.0)
    truth = compare.macro_f1(labels, preds_a) - compare.macro_f1(labels, preds_b)
    assert truth > 0.02                                # a real difference to cover
    trials, covered, covered_by_half = 300, 0, 0
    for trial in range(trials):
        rows = rng.choice(population, 800, replace=False)
        _, low, high = compare.paired_bootstrap(preds_a[None, rows], preds_b[None, rows],
                                                labels[rows], samples=1000, seed=trial)
        covered += low <= truth <= high
        quarter = (high - low) / 4   # the middle half of the interval: a check that can fail
        covered_by_half += low + quarter <= truth <= high - quarter
    print(f"coverage {covered / trials:.3f}, of the middle half {covered_by_half / trials:.3f}")
    assert 0.90 <= covered / trials <= 0.99, covered / trials
    assert covered_by_half / trials < 0.90, covered_by_half / trials   # too narrow: caught
