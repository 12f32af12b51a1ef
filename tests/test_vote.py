"""vote.py: weights fitted on validation reach the known optimum, an ensemble of a model with
itself is that model, runs scored on other rows are refused, and the texts table is stable and adds
up."""
import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import distill
import vote
from plumbing import agnews, runfolders
from conftest import AGNEWS_DIR, needs_rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest.single_thread


def probs_with_true_class_prob(labels, p_true):
    """(N, 4): probability p_true[i] on the true class of row i, the rest spread evenly."""
    p_true = np.asarray(p_true, dtype=np.float64)
    probs = np.repeat(((1 - p_true) / 3)[:, None], 4, axis=1)
    probs[np.arange(len(labels)), labels] = p_true
    return probs


def log_loss(probs, labels):
    return -np.log(probs[np.arange(len(labels)), labels]).mean()


# --------------------------------------------------------------------------------------------------
# fit_weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [0.5, 0.4, 0.7])
def test_fit_weights_reaches_the_analytic_optimum(q):
    """A is right on the first q of the rows (p = 0.9 there, 0.2 elsewhere), B on the rest (0.2,
    0.8). With w on A the mixture gives the true class b + w (a - b) on each part, and the log-loss
    -q log(b1 + w d1) - (1-q) log(b2 + w d2) is least at w* = -(q d1 b2 + (1-q) d2 b1) /
    (d1 d2)."""
    rng = np.random.default_rng(0)
    n = 1000
    labels = rng.integers(0, 4, n)
    first = np.arange(n) < q * n
    a1, a2, b1, b2 = 0.9, 0.2, 0.2, 0.8
    member_a = probs_with_true_class_prob(labels, np.where(first, a1, a2))
    member_b = probs_with_true_class_prob(labels, np.where(first, b1, b2))
    assert ((member_a.argmax(1) == labels)[first].all()
            and not (member_a.argmax(1) == labels)[~first].any())
    assert ((member_b.argmax(1) == labels)[~first].all()
            and not (member_b.argmax(1) == labels)[first].any())

    d1, d2 = a1 - b1, a2 - b2
    best = -(q * d1 * b2 + (1 - q) * d2 * b1) / (d1 * d2)
    weights = vote.fit_weights([member_a, member_b], labels)
    assert weights == pytest.approx([best, 1 - best], abs=1e-4)


def test_fit_weights_matches_a_grid_search_over_the_simplex():
    """Three noisy members of different quality (the best weights lie inside the simplex): no point
    of a fine grid on the simplex has a lower validation log-loss than the fitted weights."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 500)
    members = []
    for sharpness in (1.0, 1.5, 2.0):
        logits = 1.5 * rng.normal(size=(500, 4)) + sharpness * np.eye(4)[labels]
        members.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    weights = vote.fit_weights(members, labels)
    assert weights.min() > 0.05 and weights.sum() == pytest.approx(1, abs=1e-12)

    step = 0.005
    w0, w1 = np.meshgrid(np.arange(0, 1 + step / 2, step), np.arange(0, 1 + step / 2, step))
    grid = np.stack([w0.ravel(), w1.ravel(), 1 - w0.ravel() - w1.ravel()])
    grid = grid[:, grid[2] >= -1e-12].clip(0, None)  # (3, G) points of the simplex
    true_class = np.stack([m[np.arange(500), labels] for m in members], axis=1)  # (N, 3)
    grid_losses = -np.log(true_class @ grid).mean(0)
    fitted_loss = log_loss(vote.ensemble_probs(members, weights), labels)
    assert fitted_loss <= grid_losses.min() + 1e-9
    assert weights == pytest.approx(grid[:, grid_losses.argmin()], abs=2 * step)


def test_ensemble_of_a_model_with_itself_is_that_model():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), size=300)
    weights = vote.fit_weights([probs, probs], labels)
    np.testing.assert_allclose(vote.ensemble_probs([probs, probs], weights), probs,
                               atol=1e-12, rtol=0)
    np.testing.assert_allclose(vote.ensemble_probs([probs, probs], [0.9, 0.1]), probs,
                               atol=1e-12, rtol=0)


def test_hand_weights_are_checked_and_normalised():
    assert vote.parse_weights("3,1", 2) == pytest.approx([0.75, 0.25])
    for bad in ("0.5", "a,b", "-1,2", "0,0"):
        with pytest.raises(common.UserError, match="--weights"):
            vote.parse_weights(bad, 2)


# --------------------------------------------------------------------------------------------------
# Saved runs
# --------------------------------------------------------------------------------------------------
def copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


def table_rows(output):
    """{row name: (val loss, test acc, test macro F1)} of vote.py's table."""
    rows = {}
    for line in output.splitlines():
        parts = line.rsplit(None, 3)
        if len(parts) == 4 and re.fullmatch(r"[\d.]+", parts[-1]):
            name = re.sub(r"\s+\d\.\d{3}$", "", parts[0]).strip()  # drop the weight column
            rows[name] = tuple(float(x) for x in parts[1:])
    return rows


@needs_rows
def test_vote_scores_members_and_ensemble_on_the_saved_rows(tiny_lstm_run, tmp_path, capsys):
    """A second member that knows the labels (probabilities mixed with one-hot truth): the table's
    figures are those of the saved probabilities, scored against the right rows."""
    splits = agnews.load_ag_news(AGNEWS_DIR, train_size=1000, test_size=200, val_size=200)
    lstm = copy_run(tiny_lstm_run, tmp_path / "lstm")
    knows = copy_run(tiny_lstm_run, tmp_path / "knows")
    for split in ("val", "test"):
        saved = np.load(lstm / f"{split}_probs.npy")
        mixed = 0.5 * saved + 0.5 * np.eye(4)[splits[split].labels]
        common.save_npy(knows / f"{split}_probs.npy", mixed.astype(np.float32))

    vote.main(["--runs", str(lstm), str(knows), "--out", str(tmp_path / "vote")])
    rows = table_rows(capsys.readouterr().out)
    members = [np.load(r / "test_probs.npy") for r in (lstm, knows)]
    weights = vote.fit_weights([np.load(r / "val_probs.npy") for r in (lstm, knows)],
                               splits["val"].labels)
    expected = {"lstm": members[0], "knows": members[1],
                "ensemble, weights fitted on val": vote.ensemble_probs(members, weights)}
    for name, probs in expected.items():
        scores = common.evaluate(probs, splits["test"].labels)
        assert rows[name][1:] == pytest.approx((scores["accuracy"], scores["macro_f1"]),
                                               abs=5e-5), name
    assert rows["knows"][1] == 1.0 and rows["lstm"][1] < 0.9
    assert weights[1] > 0.9  # validation prefers the member that knows

    config = json.loads((tmp_path / "vote" / "config.json").read_text())
    saved = json.loads((tmp_path / "vote" / "metrics.json").read_text())
    assert config["script"] == "vote" and config["members"] == [str(lstm), str(knows)]
    assert list(saved["weights"].values()) == pytest.approx(weights.tolist())
    assert (saved["fingerprints"]
            == {k: json.loads((lstm / "metrics.json").read_text())["fingerprints"][k]
                for k in ("val", "test", "cases")})
    assert (saved["test"]
            == pytest.approx(common.evaluate(expected["ensemble, weights fitted on val"],
                                             splits["test"].labels)))
    # A saved vote is a run for analyze.py, never a member of the next bare vote.
    members = vote.find_members(argparse.Namespace(runs=None, root=str(tmp_path)))
    assert list(members) == [None] and set(members[None]) == {lstm, knows}
    np.testing.assert_allclose(np.load(tmp_path / "vote" / "test_probs.npy"),
                               expected["ensemble, weights fitted on val"], atol=1e-6)
    # Today's news: the vote of the members' own cases probabilities, with the same weights.
    cases = agnews.load_cases()
    members_cases = [runfolders.load_cases_probs(r, cases) for r in (lstm, knows)]
    voted = runfolders.load_cases_probs(tmp_path / "vote", cases)
    np.testing.assert_allclose(voted, vote.ensemble_probs(members_cases, weights), atol=1e-6)
    assert saved["cases"] == pytest.approx(common.evaluate(voted, cases.labels))


def test_a_run_voting_with_itself_scores_as_itself(tiny_lstm_run, tmp_path, capsys):
    vote.main(["--runs", str(tiny_lstm_run), str(copy_run(tiny_lstm_run, tmp_path / "twin"))])
    rows = table_rows(capsys.readouterr().out)
    assert rows["ensemble, weights fitted on val"] == pytest.approx(rows["bilstm_attn"], abs=1e-4)
    assert rows["ensemble, equal weights"] == pytest.approx(rows["twin"], abs=1e-4)


@pytest.mark.parametrize("change", ["fingerprint", "rows"])
def test_runs_scored_on_other_test_rows_are_refused(tiny_lstm_run, tmp_path, change):
    other = copy_run(tiny_lstm_run, tmp_path / "other")
    metrics = json.loads((other / "metrics.json").read_text())
    if change == "fingerprint":
        metrics["fingerprints"]["test"] = "0" * 16
    else:
        metrics["rows"]["test"] = 199
    common.save_json(other / "metrics.json", metrics)
    with pytest.raises(common.UserError, match="scored on different test rows") as err:
        vote.main(["--runs", str(tiny_lstm_run), str(other)])
    assert str(tiny_lstm_run) in str(err.value) and str(other) in str(err.value)
    assert "the same --test-size" in str(err.value)


def validated_on_fewer_rows(run, dest, rows):
    """A copy of `run` as if trained with --val-size `rows`: with nested samples its validation
    rows are the first `rows` of the same stratified order, a part of the run's own."""
    copy_run(run, dest)
    config = json.loads((dest / "config.json").read_text())
    config["args"]["val_size"] = rows
    common.save_json(dest / "config.json", config)
    full = runfolders.load_scored_split(run, "val")
    args = config["args"]
    part = agnews.load_ag_news(AGNEWS_DIR, args["train_size"], args["test_size"], rows)["val"]
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["rows"]["val"] = len(part)
    metrics["fingerprints"]["val"] = part.fingerprint()
    common.save_json(dest / "metrics.json", metrics)
    probs = np.load(run / "val_probs.npy")[np.searchsorted(full.ids, part.ids)]
    common.save_npy(dest / "val_probs.npy", probs)
    return dest, full, part


@needs_rows
def test_members_validated_on_nested_sizes_vote_on_the_rows_they_share(tiny_lstm_run, tmp_path,
                                                                       capsys):
    """One member validated on 200 rows, the other on 100 of them: the weights are fitted on the
    100 both were scored on (and the table says so), exactly as fit_weights on those rows."""
    fewer, full, part = validated_on_fewer_rows(tiny_lstm_run, tmp_path / "fewer", 100)
    assert set(part.ids) < set(full.ids)
    runs = [tiny_lstm_run, fewer]
    val_probs, _, val_rows, _ = vote.load_saved(runs, None)
    assert "fitted on the 100 rows all 2 members were scored on (theirs: 200, 100)" in (
        capsys.readouterr().out)
    assert list(val_rows.ids) == list(part.ids)
    at = np.searchsorted(full.ids, part.ids)
    expected = np.load(tiny_lstm_run / "val_probs.npy")[at]
    np.testing.assert_array_equal(val_probs[0], expected)
    np.testing.assert_array_equal(val_rows.labels, full.labels[at])
    vote.main(["--runs", *map(str, runs), "--out", str(tmp_path / "vote")])
    saved = common.load_json(tmp_path / "vote" / "metrics.json")
    assert saved["rows"]["val"] == 100
    # The vote's own rows reload as a run's do (analyze.py reads them so).
    reloaded = runfolders.load_scored_split(tmp_path / "vote", "val")
    assert reloaded.fingerprint() == part.fingerprint()


def test_bare_vote_takes_the_largest_group_scored_on_the_same_rows(tiny_lstm_run, tmp_path, capsys):
    root = tmp_path / "runs"
    same = [copy_run(tiny_lstm_run, root / name) for name in ("a", "b")]
    quick = copy_run(tiny_lstm_run, root / "quick")
    metrics = json.loads((quick / "metrics.json").read_text())
    metrics["fingerprints"]["test"] = "f" * 16
    metrics["rows"]["test"] = 100
    common.save_json(quick / "metrics.json", metrics)
    assert sorted(vote.find_members(argparse.Namespace(runs=None, root=str(root)))[None]) == same
    assert ("left out (scored on other test rows than the 2 runs voting, which read 200; train "
            "them on the same data with the same --test-size to bring them in): "
            f"{quick} (100 test rows)" in capsys.readouterr().out)


# --------------------------------------------------------------------------------------------------
# Your own texts
# --------------------------------------------------------------------------------------------------
TEXTS = ["Nadal beats Federer to win the French Open final in Paris",
         "Oil prices climb as OPEC agrees to cut output; stocks slide on Wall Street",
         "Microsoft releases a new version of Windows with better security"]


def test_texts_table_is_stable_and_adds_up(tiny_lstm_run, tmp_path):
    twin = copy_run(tiny_lstm_run, tmp_path / "twin")
    cmd = [sys.executable, str(ROOT / "vote.py"), "--runs", str(tiny_lstm_run), str(twin),
           "--device", "cpu"]
    for text in TEXTS:
        cmd += ["--text", text]
    outputs = [subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT) for _ in range(2)]
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert outputs[0].stdout == outputs[1].stdout

    members = vote.load_members([tiny_lstm_run], "cpu")
    [probs] = vote.classify(members, TEXTS, common.Runtime(torch.device("cpu")))
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    cell = r"(World|Sports|Business|Sci/Tech) (\d\.\d{3})"
    lines = [line for line in outputs[0].stdout.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(lines) == len(TEXTS)
    for line, p in zip(lines, probs):
        cells = re.findall(cell, line)
        assert len(cells) == 3                   # two members and the ensemble
        assert cells[0] == cells[1] == cells[2]  # a model with itself is that model
        assert cells[0] == (common.CLASS_NAMES[p.argmax()], f"{p.max():.3f}")


def test_labelled_file_counts_hits(tiny_lstm_run, tmp_path, capsys):
    cases = tmp_path / "cases.csv"
    cases.write_text("label,text\n"
                     f"2,{TEXTS[0]}\n"
                     "\n"
                     f'Business,"{TEXTS[1]}"\n'
                     f"sci/tech,{TEXTS[2]}\n")
    vote.main(["--runs", str(tiny_lstm_run), "--file", str(cases), "--weights", "1",
               "--device", "cpu"])
    out = capsys.readouterr().out
    members = vote.load_members([tiny_lstm_run], "cpu")
    [probs] = vote.classify(members, TEXTS, common.Runtime(torch.device("cpu")))
    hits = int((probs.argmax(1) == np.array([1, 2, 3])).sum())
    assert re.search(rf"^hits\s+{hits}/3\s+{hits}/3$", out, re.MULTILINE), out


def test_case_files_are_read_or_refused_with_file_and_line(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("1,000 jobs cut, again\n\n  Nadal wins  \n")
    assert agnews.read_cases(plain) == [(None, "1,000 jobs cut, again"), (None, "Nadal wins")]

    labelled = tmp_path / "labelled.csv"
    labelled.write_text('1,"Rebels, army clash"\nsports,Nadal wins, again\n')
    assert agnews.read_cases(labelled) == [(0, "Rebels, army clash"), (1, "Nadal wins, again")]

    for content, line in [("1,ok\n5,bad label\n", 2), ("label,text\n3,fine\n\nWorld,\n", 4),
                          ("2,ok\njust a text\n", 2)]:
        bad = tmp_path / "bad.csv"
        bad.write_text(content)
        with pytest.raises(common.UserError, match=rf"bad\.csv:{line}: "):
            agnews.read_cases(bad)
    bad.write_bytes(b"1,fine\n2,not \xff utf-8\n")
    with pytest.raises(common.UserError, match=r"bad\.csv:2: bytes that are not UTF-8"):
        agnews.read_cases(bad)


def test_a_case_file_may_open_with_a_comment(tmp_path):
    commented = tmp_path / "commented.csv"
    commented.write_text("# how this file was made\n#  by whom\nlabel,text\n2,Nadal wins\n")
    assert agnews.read_cases(commented) == [(1, "Nadal wins")]
    hashtag = tmp_path / "hashtag.txt"   # in a text file a # line is a text
    hashtag.write_text("#MeToo reaches Hollywood\nNadal wins\n")
    assert agnews.read_cases(hashtag) == [(None, "#MeToo reaches Hollywood"), (None, "Nadal wins")]
    only_comment = tmp_path / "only.csv"
    only_comment.write_text("# nothing below\n")
    with pytest.raises(common.UserError, match="only.csv: no texts"):
        agnews.read_cases(only_comment)


def test_todays_news_is_400_labelled_cases_100_a_class_and_says_how_it_was_made():
    cases = agnews.load_cases()
    assert len(cases) == 400 and np.bincount(cases.labels).tolist() == [100] * 4
    assert len(set(cases.texts)) == 400
    opening = agnews.CASES_FILE.read_text().split("\nlabel,text\n")[0]
    assert opening.startswith("#") and "2020-2025" in opening and "own words" in opening


@needs_rows
def test_a_finished_run_scores_todays_news(tiny_lstm_run):
    """finish_run writes cases_probs.npy and its accuracy and macro F1 into metrics.json."""
    cases = agnews.load_cases()
    probs = runfolders.load_cases_probs(tiny_lstm_run, cases)
    metrics = common.load_json(tiny_lstm_run / "metrics.json")
    assert probs.shape == (400, 4) and metrics["rows"]["cases"] == 400
    assert metrics["cases"] == pytest.approx(common.evaluate(probs, cases.labels))
    # a run scored on another version of the file is not read as scored on this one
    other = agnews.Split(cases.texts[:-1] + ["changed"], cases.labels)
    assert runfolders.load_cases_probs(tiny_lstm_run, other) is None


def test_one_run_is_not_a_vote(tiny_lstm_run, tmp_path):
    with pytest.raises(common.UserError, match="voting needs two or more runs") as err:
        vote.main(["--runs", str(tiny_lstm_run)])
    assert "train_lstm.py" in str(err.value)  # and says what to train next
    root = tmp_path / "runs"
    copy_run(tiny_lstm_run, root / "only")
    with pytest.raises(common.UserError, match="found one"):
        vote.main(["--root", str(root)])


def test_seed_k_votes_with_seed_k_into_a_run_like_folder(tiny_lstm_run, tmp_path, capsys):
    """Folders of --seeds runs: each seed present in every member votes on its own, and is saved as
    <out>/seed<k>/, a folder whose config differs from the other seeds' only in the seed."""
    for member in ("a", "b"):
        for seed in (0, 2):
            copy_run(tiny_lstm_run, tmp_path / member / f"seed{seed}")
    copy_run(tiny_lstm_run, tmp_path / "a" / "seed1")  # a seed only one member has does not vote
    vote.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "vote")])
    assert sorted(p.name for p in (tmp_path / "vote").iterdir()) == ["seed0", "seed2"]
    configs = [json.loads((tmp_path / "vote" / s / "config.json").read_text())
               for s in ("seed0", "seed2")]
    assert [c.pop("seed") for c in configs] == [0, 2] and configs[0] == configs[1]
    assert configs[0]["members"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    out = capsys.readouterr().out
    assert "seed 0" in out and "seed 2" in out and "seed 1" not in out
    with pytest.raises(common.UserError, match="not both"):
        vote.main(["--runs", str(tmp_path / "a"), str(tiny_lstm_run)])
    # never over a member, with --force or without
    for force in ([], ["--force"]):
        with pytest.raises(common.UserError, match="already exists: pass --force" if not force
                           else "not a vote written here before"):
            vote.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"),
                       "--out", str(tmp_path / "a"), *force])
    assert common.load_json(tmp_path / "a" / "seed0" / "config.json")["script"] == "train_lstm"


def test_a_text_longer_than_max_len_gets_a_note_of_what_is_dropped(tiny_lstm_run, capsys):
    """The tiny run reads 48 words: a 60-word text is cut without a word unless vote.py says so.
    The note's count is the truth: the long text scores as its first 48 words do."""
    max_len = common.load_json(tiny_lstm_run / "config.json")["args"]["max_len"]
    words = (TEXTS[1].replace(";", "") + " ") * 6
    long_text = " ".join(words.split()[: max_len + 12])
    runtime = common.Runtime(torch.device("cpu"))
    members = vote.load_members([tiny_lstm_run], "cpu")
    [probs] = vote.classify(members, [TEXTS[0], long_text], runtime)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: text 2 is {max_len + 12} tokens; {tiny_lstm_run} reads the first "
                     f"{max_len} (12 dropped)"]
    [cut] = vote.classify(members, [" ".join(long_text.split()[:max_len])], runtime)
    np.testing.assert_allclose(probs[1], cut[0], atol=1e-6)
    assert not [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("note:")]


def test_a_labelled_file_with_only_its_header_is_one_line(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("label,text\n\n")
    with pytest.raises(common.UserError,
                       match="cases.csv: only the header label,text; no texts below it"):
        agnews.read_cases(path)


@needs_rows
def test_copies_of_one_configuration_and_seed_are_named(tiny_lstm_run, tmp_path, capsys):
    """The main command typed twice makes two folders of one model: the vote says so. Another
    seed of the same configuration is another model, and is not named."""
    twin = copy_run(tiny_lstm_run, tmp_path / "twin")
    other_seed = copy_run(tiny_lstm_run, tmp_path / "seed1")
    config = json.loads((other_seed / "config.json").read_text())
    config["args"]["seed"] = 1
    common.save_json(other_seed / "config.json", config)
    vote.main(["--runs", str(tiny_lstm_run), str(twin), str(other_seed)])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {tiny_lstm_run}, {twin} are copies of one configuration and seed "
                     f"(seed 0): one model 2 times, not 2 models"]


@needs_rows
def test_score_cases_scores_old_runs_and_their_votes_as_a_new_run_would(tiny_lstm_run, tmp_path):
    """Runs (and a vote of them) made before today's news existed: analyze.py --score-cases gives
    them the very probabilities finish_run would have written, votes them again with the vote's own
    weights, and keeps metrics.json's time (the order --compare reads runs in)."""
    import analyze
    root = tmp_path / "old"
    runs = [copy_run(tiny_lstm_run, root / name) for name in ("a", "b")]
    vote.main(["--runs", *map(str, runs), "--out", str(root / "vote")])
    expected = {run: np.load(run / "cases_probs.npy") for run in runs + [root / "vote"]}
    times = {}
    for run in expected:  # as a run made before cases/ existed
        (run / "cases_probs.npy").unlink()
        metrics = common.load_json(run / "metrics.json")
        for key in ("rows", "fingerprints"):
            metrics[key].pop("cases")
        metrics.pop("cases")
        common.save_json(run / "metrics.json", metrics)
        times[run] = (run / "metrics.json").stat().st_mtime
    cases = agnews.load_cases()
    assert all(runfolders.load_cases_probs(run, cases) is None for run in expected)
    analyze.main(["--score-cases", str(root), "--device", "cpu"])
    for run, probs in expected.items():
        np.testing.assert_allclose(runfolders.load_cases_probs(run, cases), probs, atol=1e-6)
        assert (run / "metrics.json").stat().st_mtime == times[run]
        assert common.load_json(run / "metrics.json")["cases"] == pytest.approx(
            common.evaluate(probs, cases.labels), abs=1e-6)


@needs_rows
def test_a_votes_relative_members_are_found_from_another_folder(tiny_lstm_run, tmp_path,
                                                                 monkeypatch):
    """vote.py names its members as it was given them, relative to the folder it ran in. Read
    from elsewhere (a git worktree whose runs/ links to the project's, a shell in another folder),
    the vote still finds them below its own folder's parents, and a distillation teacher keeps
    the fingerprint it has from the project root; a member that is gone is named in one line."""
    project = tmp_path / "project"
    for name in ("a", "b"):
        copy_run(tiny_lstm_run, project / "runs" / name)
    monkeypatch.chdir(project)
    vote.main(["--runs", "runs/a", "runs/b", "--out", "runs/vote"])
    at_home = distill.teacher_fingerprint(distill.teacher_members("runs/vote"))

    monkeypatch.chdir(tmp_path)
    members = runfolders.vote_members(project / "runs" / "vote")
    assert [(name, run) for name, run, _ in members] == [
        ("runs/a", project / "runs" / "a"), ("runs/b", project / "runs" / "b")]
    assert sum(weight for _, _, weight in members) == pytest.approx(1.0)
    assert distill.teacher_fingerprint(distill.teacher_members(project / "runs" / "vote")) == \
        at_home

    shutil.rmtree(project / "runs" / "b")
    with pytest.raises(common.UserError, match="its member runs/b is neither below"):
        runfolders.vote_members(project / "runs" / "vote")
