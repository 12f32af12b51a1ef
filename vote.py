"""Weighted soft voting of saved runs, and the models' verdicts on texts of your own.

    python vote.py                                         # every finished run under runs/
    python vote.py --runs runs/bert_pooler runs/bilstm_attn --weights 0.7,0.3
    python vote.py --text "Oil climbs as OPEC cuts output" --text "Nadal wins in Paris"
    python vote.py --file cases.txt                        # one text a line, or label,text rows
    python vote.py --file cases/news_2020s.csv             # today's news, 400 labelled cases
    python vote.py --runs runs/bilstm_attn runs/lora_r8_pooler --out runs/vote_bilstm_lora
                   # folders of --seeds runs: seed k votes with seed k,
                   # into runs/vote_bilstm_lora/seed<k>/

Soft voting averages the members' probabilities, p(y|x) = sum_k w_k p_k(y|x), and predicts the
most probable class. The weights are fitted on the validation split only: fitted on test, they
would flatter the ensemble's test score. They are the mixture weights under which the validation
labels are most likely (lowest validation log-loss), found by EM (see fit_weights).

Members must have been scored on the same rows: vote.py reads each run's val_probs.npy and
test_probs.npy row by row, and refuses runs whose metrics.json names other rows (fingerprints).
With --out the vote is saved as a run-like folder (config.json naming members and weights,
val/test probabilities, those of today's news where every member has them, metrics.json), so
`analyze.py --compare` tables it beside its members.

Lesson 15 of README's reading path: read after train_lstm.py; next: mixup_words.py.
"""
import argparse
import os
from pathlib import Path

import numpy as np

import common
from plumbing import agnews, flags, runfolders

COLUMN = 16  # least width of one model's column in the texts table: "Business 0.973*"


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
def fit_weights(val_probs_list, val_labels, tol=1e-12, max_iter=20_000):
    """Weights w (K,), w >= 0, sum 1, that minimise the validation log-loss of sum_k w_k p_k.

    This is the maximum-likelihood fit of the weights of a mixture whose components are fixed, and
    EM solves it in two lines: each row credits member k with its share of the mixture's probability
    of the true label, w_k p_k(y_i) / sum_j w_j p_j(y_i); the new w_k is member k's average share.
    The log-loss is convex in w and every step lowers it; the weights stay on the simplex."""
    rows = np.arange(len(val_labels))
    # (N, K): each member's probability of the true label, clipped like common.evaluate's log-loss
    likelihoods = np.clip(np.stack([p[rows, val_labels] for p in val_probs_list],
                                   axis=1).astype(np.float64),
                          1e-12, None)
    weights = np.full(likelihoods.shape[1], 1.0 / likelihoods.shape[1])
    for _ in range(max_iter):
        # (N, K), rows sum to 1
        shares = likelihoods * weights / (likelihoods @ weights)[:, None]
        new = shares.mean(axis=0)
        converged = np.abs(new - weights).max() < tol
        weights = new
        if converged:
            break
    return weights


def ensemble_probs(probs_list, weights):
    """sum_k w_k p_k: (N, 4) from K arrays of (N, 4)."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.stack(probs_list), axes=1)


def parse_weights(text, n_runs):
    try:
        weights = np.array([float(w) for w in text.split(",")])
    except ValueError:
        raise common.UserError(f"--weights {text!r}: expected numbers separated by commas, "
                               "like 0.6,0.4") from None
    if len(weights) != n_runs:
        raise common.UserError(f"--weights {text!r}: {len(weights)} weights for {n_runs} runs")
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise common.UserError(f"--weights {text!r}: weights must be finite, non-negative "
                               "and not all 0")
    return weights / weights.sum()


# --------------------------------------------------------------------------------------------------
# Runs and their saved probabilities
# --------------------------------------------------------------------------------------------------
def display_names(runs):
    """Folder names (a seed<k>/ run by its experiment's folder), or whole paths where two share a
    name."""
    names = [runfolders.experiment_folder(run).name for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def check_same_test_rows(runs):
    """All members must have been scored on the same test rows, in the same order: their test
    probabilities are averaged row by row. (Validation rows may differ; see load_saved.)"""
    seen = {run: runfolders.scored_rows(run, ("test",))[0] for run in runs}
    if len(set(seen.values())) > 1:
        described = "; ".join(f"{run} ({n:,} test rows, {fp})" for run, (_, n, fp) in seen.items())
        raise common.UserError(f"runs were scored on different test rows, so their probabilities "
                               f"cannot be averaged row by row: {described}. Train them with "
                               f"the same --test-size (none: the whole official test set)")


def is_vote(run):
    return common.load_json(run / "config.json").get("script") == "vote"


def seed_runs(folder):
    """{seed: run folder} of a --seeds folder (finished seed<k>/ runs inside), or None for a run
    folder."""
    folder = Path(folder)
    if (folder / "metrics.json").exists():
        runfolders.check_finished(folder)
        return None
    seeds = {int(match[1]): run for run in folder.glob("seed*")
             if (match := runfolders.SEED_FOLDER.fullmatch(run.name))
             and runfolders.is_finished(run)}
    if not seeds:
        raise common.UserError(f"{folder}: no metrics.json and no finished seed<k>/ runs "
                               f"(not a finished run folder)")
    return seeds


def member_groups(paths):
    """--runs as given -> {seed: [runs]}: {None: runs} for plain run folders; for folders of --seeds
    runs, one group per seed that every member has, so seed k votes with seed k."""
    seeded = [seed_runs(p) for p in paths]
    if all(s is None for s in seeded):
        return {None: [Path(p) for p in paths]}
    if any(s is None for s in seeded):
        raise common.UserError("--runs: give either run folders or folders of --seeds runs "
                               "(seed<k>/ inside), not both")
    shared = sorted(set.intersection(*(set(s) for s in seeded)))
    if not shared:
        raise common.UserError(f"--runs: no seed is finished in every folder "
                               f"({', '.join(map(str, paths))})")
    return {seed: [s[seed] for s in seeded] for seed in shared}


def find_members(args):
    """--runs as given (a folder of --seeds runs stands for each of its seeds); else the finished
    runs under runs/ that were scored on the same rows, saved votes left out. Where runs of
    different data settings lie side by side (a --quick run beside full ones), the largest such
    group votes, the newest on a tie, and the others are named. Returns {seed or None: [runs]}."""
    if args.runs:
        return member_groups(args.runs)
    runs = [run for run in runfolders.find_runs(args.root) if not is_vote(run)]
    if not runs:
        raise common.UserError(f"no finished runs under {args.root}/ "
                               f"(train one first, or pass --runs)")
    return {None: runfolders.largest_group_on_same_rows(runs, "voting")}


def note_copies(runs):
    """Members that are one configuration trained with one seed are one model several times (the
    main command typed twice): the vote is that model, weighed more. Say so."""
    copies = {}
    for run in runs:
        config = common.load_json(run / "config.json")
        key = (runfolders.experiment_key(config), runfolders.run_seed(config))
        copies.setdefault(key, []).append(run)
    for (_, seed), same in copies.items():
        if len(same) > 1:
            print(f"note: {', '.join(map(str, same))} are copies of one configuration and seed "
                  f"(seed {seed}): one model {len(same)} times, not {len(same)} models")


def need_two(runs):
    """A vote of one run is that run: say so, and what to train next."""
    if len(runs) < 2:
        raise common.UserError(
            f"voting needs two or more runs scored on the same rows; found one ({runs[0]}). "
            f"Train another model with the same --train-size/--val-size/--test-size, e.g. "
            f"`python train_lstm.py --arch bilstm_attn` beside `python train_lora.py --r 8`, "
            f"then run vote.py again")


def load_saved(runs, data_dir):
    """The members' saved probabilities on val and test, and the labels of those rows. Test rows
    are the same for all (check_same_test_rows). Validation rows may differ (--quick validates on
    1,000 rows, train_lstm.py on the whole slice): the weights are fitted on the rows that every
    member was scored on, matched by their row numbers in train.csv."""
    check_same_test_rows(runs)
    test = runfolders.load_scored_split(runs[0], "test", data_dir)
    test_probs = [runfolders.load_probs(run, "test", len(test)) for run in runs]
    vals = [runfolders.load_scored_split(run, "val", data_dir) for run in runs]
    shared = vals[0].ids
    for val in vals[1:]:
        shared = np.intersect1d(shared, val.ids)
    if len(shared) == 0:
        sizes = ", ".join(f"{run}: {len(val):,} rows" for run, val in zip(runs, vals))
        raise common.UserError(f"the runs share no validation row to fit the weights on "
                               f"({sizes}); pass --weights, or train them with the same "
                               f"--val-size")
    val_probs = []
    for run, val in zip(runs, vals):
        at = np.searchsorted(val.ids, shared)  # ids are in file order, so sorted
        val_probs.append(runfolders.load_probs(run, "val", len(val))[at])
    val_rows = vals[0].subset(np.searchsorted(vals[0].ids, shared))
    if any(len(val) != len(shared) for val in vals):
        sizes = ", ".join(f"{len(val):,}" for val in vals)
        print(f"validation: the weights are fitted on the {len(shared):,} rows all "
              f"{len(runs)} members were scored on (theirs: {sizes})")
    return val_probs, test_probs, val_rows, test


def choose_weights(args, runs, saved=None):
    """--weights as given, else fitted on the validation split. Returns (weights, where from)."""
    if args.weights:
        return parse_weights(args.weights, len(runs)), "--weights"
    val_probs, _, val_rows, _ = saved or load_saved(runs, args.data)
    return fit_weights(val_probs, val_rows.labels), "fitted on val"


# --------------------------------------------------------------------------------------------------
# Scoring the saved probabilities
# --------------------------------------------------------------------------------------------------
def vote_on_test(args, runs, out=None, seed=None):
    need_two(runs)
    saved = load_saved(runs, args.data)
    val_probs, test_probs, val_rows, test_rows = saved
    val_labels, test_labels = val_rows.labels, test_rows.labels
    weights, how = choose_weights(args, runs, saved)

    equal = np.full(len(runs), 1.0 / len(runs))
    ensemble_val, ensemble_test = (ensemble_probs(val_probs, weights),
                                   ensemble_probs(test_probs, weights))
    entries = [(name, w, v, t)
               for name, w, v, t in zip(display_names(runs), weights, val_probs, test_probs)]
    entries.append(("ensemble, equal weights", None, ensemble_probs(val_probs, equal),
                    ensemble_probs(test_probs, equal)))
    entries.append((f"ensemble, weights {how}", None, ensemble_val, ensemble_test))

    name_width = max(len(e[0]) for e in entries)
    print(f"\n{'' if seed is None else f'seed {seed}':{name_width}}  weight  val loss  "
          f"test acc  test macro F1   "
          f"(test: {len(test_labels)} rows of the official test set)")
    for name, weight, val, test in entries:
        scores = common.evaluate(test, test_labels)
        weight_text = f"{weight:6.3f}" if weight is not None else ""
        print(f"{name:{name_width}}  {weight_text:>6}  "
              f"{common.evaluate(val, val_labels)['loss']:8.4f}  "
              f"{scores['accuracy']:8.4f}  {scores['macro_f1']:13.4f}")
    if out:
        save_vote_run(out, args.force, runs, weights, how, seed, ensemble_val, ensemble_test,
                      val_rows, test_rows)


def vote_on_cases(runs, weights):
    """The weighted vote on today's news, (probs, cases), when every member was scored on the
    current cases file; else None (members trained before it existed)."""
    cases = agnews.load_cases()
    probs = [runfolders.load_cases_probs(run, cases) for run in runs]
    if any(p is None for p in probs):
        return None
    return ensemble_probs(probs, weights), cases


def save_vote_run(out, force, runs, weights, how, seed, val_probs, test_probs, val_rows,
                  test_rows):
    """The vote as a run-like folder: config.json (script "vote", its members, how the weights were
    chosen; per seed only the seed differs, so analyze.py --compare groups the seeds as one
    experiment), val/test probabilities, and metrics.json with the rows it was scored on (val: the
    rows its members share) and their summed training time and parameters. vote.py itself never
    takes a vote for a member."""
    out = Path(out)
    members = [common.load_json(run / "metrics.json") for run in runs]
    # The data flags of the member validated on the fewest rows: with nested --val-size those are
    # the shared rows, so analyze.py reloads the vote's rows as it reloads a run's.
    fewest = min(range(len(runs)), key=lambda k: members[k]["rows"]["val"])
    member_args = common.load_json(runs[fewest] / "config.json").get("args", {})
    member_names = [str(run.parent if seed is not None else run) for run in runs]
    config = {"script": "vote", "members": member_names, "weights_from": how, "seed": seed,
              "hand_weights": weights.tolist() if how == "--weights" else None,
              "args": {k: member_args.get(k)
                       for k in ("data", "data_dir", "train_size", "val_size", "test_size")}}
    metrics = {"test": common.evaluate(test_probs, test_rows.labels),
               "val": common.evaluate(val_probs, val_rows.labels),
               "weights": dict(zip(map(str, runs), weights.tolist())),
               "rows": {"val": len(val_rows), "test": len(test_rows)},
               "fingerprints": {"val": val_rows.fingerprint(), "test": test_rows.fingerprint()},
               "val_sampling": members[fewest].get("val_sampling", "sklearn"),
               "train_time_s": sum(m.get("train_time_s", 0.0) for m in members)}
    if all("parameters" in m for m in members):
        metrics["parameters"] = {k: sum(m["parameters"][k] for m in members)
                                 for k in ("total", "trainable")}
    # Whole or not at all: a vote killed while it replaced an old one must not leave the old one's
    # metrics beside the new one's probabilities.
    with runfolders.folder_written_atomically(out, force, is_vote_folder, "a vote") as tmp:
        common.save_npy(tmp / "val_probs.npy", val_probs.astype(np.float32))
        common.save_npy(tmp / "test_probs.npy", test_probs.astype(np.float32))
        today = vote_on_cases(runs, weights)
        if today is not None:
            cases_probs, cases = today
            metrics["cases"] = common.evaluate(cases_probs, cases.labels)
            metrics["rows"]["cases"] = len(cases)
            metrics["fingerprints"]["cases"] = cases.fingerprint()
            common.save_npy(tmp / "cases_probs.npy", cases_probs.astype(np.float32))
        common.save_json(tmp / "config.json", config)
        common.save_json(tmp / "metrics.json", metrics)
    print(f"saved {out}/")


def is_vote_folder(folder):
    """A vote saved by vote.py --out (script "vote"), or a folder of such votes per seed."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return common.load_json(folder / "config.json").get("script") == "vote"
    seeds = [run for run in folder.iterdir() if runfolders.SEED_FOLDER.fullmatch(run.name)]
    return bool(seeds) and all(is_vote_folder(run) for run in seeds)


def score_todays_news(paths, device="auto", int8=False):
    """Score today's news (cases/news_2020s.csv) for every finished run under `paths` that has not
    been scored on this version of it: runs made before cases/ existed, or on an earlier version.
    Trained runs are loaded and scored; votes are voted again from their members' new scores with
    their own weights. metrics.json keeps its time, so --compare's order of runs is unchanged.
    With int8, every trained run is scored with its encoder in int8 beside its saved float scores,
    and nothing is written: a run's saved scores stay those of the model it trained."""
    cases = agnews.load_cases()
    runtime = common.setup_runtime(device)
    runs = sorted({run for path in paths for run in runfolders.find_runs(path)})
    if int8:
        todays_news_in_int8([run for run in runs if not is_vote_folder(run)], cases, runtime)
        return
    todo = [run for run in runs if runfolders.load_cases_probs(run, cases) is None]
    votes = [run for run in todo if common.load_json(run / "config.json").get("script") == "vote"]
    for run in [run for run in todo if run not in votes] + votes:  # members before their votes
        if run in votes:
            members = runfolders.vote_members(run)
            today = vote_on_cases([m for _, m, _ in members], [w for _, _, w in members])
            if today is None:
                print(f"{run}: a member has no scores on today's news; left as it was")
                continue
            probs = today[0]
        else:
            model, tokenizer, config = runfolders.load_run(run, runtime.device)
            probs = common.predict_texts(model, tokenizer, config["args"]["max_len"],
                                         cases.texts, runtime, desc=f"today's news, {run}")
        metrics_path = run / "metrics.json"
        metrics, mtime = common.load_json(metrics_path), metrics_path.stat().st_mtime
        metrics["cases"] = common.evaluate(probs, cases.labels)
        metrics.setdefault("rows", {})["cases"] = len(cases)
        metrics.setdefault("fingerprints", {})["cases"] = cases.fingerprint()
        common.save_npy(run / "cases_probs.npy", probs.astype(np.float32))
        common.save_json(metrics_path, metrics)
        os.utime(metrics_path, (mtime, mtime))
        print(f"{run}: today's news macro F1 {metrics['cases']['macro_f1']:.4f}")
    print(f"today's news: {len(todo)} of {len(runs)} runs scored now, the others had it")


def todays_news_in_int8(runs, cases, runtime):
    """Each run's today's-news scores with its encoder in int8 (--int8), beside its saved float
    ones where it has them; printed, never written."""
    for run in runs:
        model, tokenizer, config = runfolders.load_run(run, runtime.device, int8=True)
        probs = common.predict_texts(model, tokenizer, config["args"]["max_len"], cases.texts,
                                     runtime, desc=f"today's news in int8, {run}")
        scores = common.evaluate(probs, cases.labels)
        line = (f"{run}: today's news in int8: macro F1 {scores['macro_f1']:.4f}, accuracy "
                f"{scores['accuracy']:.4f}")
        saved = runfolders.load_cases_probs(run, cases)
        if saved is not None:
            float_scores = common.evaluate(saved, cases.labels)
            same = float(np.mean(saved.argmax(1) == probs.argmax(1)))
            line += (f"; saved (float): {float_scores['macro_f1']:.4f}, "
                     f"{float_scores['accuracy']:.4f}; the same class on {same:.1%}")
        print(line)
    print("--int8: nothing written; each run's saved scores stay its float ones")


# --------------------------------------------------------------------------------------------------
# Your own texts
# --------------------------------------------------------------------------------------------------
def load_members(runs, device, int8=False):
    """Each run's (run, model, tokenizer, max_len), loaded once (serve.py keeps them loaded);
    int8: each BERT encoder in int8 (quantize.py)."""
    members = []
    for run in runs:
        model, tokenizer, config = runfolders.load_run(run, device, int8)
        members.append((run, model, tokenizer, config["args"]["max_len"]))
    return members


def classify(members, texts, runtime):
    """Each member's probabilities (N, 4) for the texts, through the member's own tokenizer."""
    probs = []
    for run, model, tokenizer, max_len in members:
        ids = common.encode(tokenizer, texts, max_len)
        common.note_long_texts(tokenizer, texts, max_len, reader=str(run))
        for i, row in enumerate(ids):
            if len(row) == 0:
                raise common.UserError(f"text {i + 1} ({texts[i][:40]!r}) has no tokens in the "
                                       f"vocabulary of {run}")
        probs.append(common.predict_ids(model, ids, runtime, desc="classifying"))
    return probs


def verdict(probs, label):
    """'Sports 0.973', with a trailing * where it differs from the given label."""
    top = int(probs.argmax())
    miss = "*" if label is not None and top != label else ""
    return f"{common.CLASS_NAMES[top]} {probs[top]:.3f}{miss}"


def vote_on_texts(args, runs):
    cases = [(None, agnews.clean_text(t)) for t in args.text or []]
    if any(not text for _, text in cases):
        raise common.UserError("--text: empty text")
    if args.file:
        cases += agnews.read_cases(args.file)
    labels = [label for label, _ in cases]
    texts = [text for _, text in cases]

    weights, how = choose_weights(args, runs)
    if len(runs) == 1:
        print(f"one run ({runs[0]}): its verdicts alone; a vote needs two or more")
    runtime = common.setup_runtime(args.device)
    member_probs = classify(load_members(runs, runtime.device, args.int8), texts, runtime)
    ensemble = ensemble_probs(member_probs, weights)

    names = display_names(runs) + ["ensemble"]
    width = max(COLUMN, *(len(n) for n in names))
    print("weights (" + how + "): "
          + ", ".join(f"{name} {w:.3f}" for name, w in zip(names, weights)))
    print(f"\n{'#':>3}  {'text':40}  {'label':8}  "
          + "  ".join(f"{n:{width}}" for n in names).rstrip())
    for i, (label, text) in enumerate(cases):
        shown = text if len(text) <= 40 else text[:37] + "..."
        gold = common.CLASS_NAMES[label] if label is not None else ""
        cells = [verdict(p[i], label) for p in member_probs] + [verdict(ensemble[i], label)]
        print(f"{i + 1:>3}  {shown:40}  {gold:8}  "
              + "  ".join(f"{c:{width}}" for c in cells).rstrip())
    labelled = [i for i, label in enumerate(labels) if label is not None]
    if labelled:
        gold = np.array([labels[i] for i in labelled])
        hits = [int((p[labelled].argmax(1) == gold).sum()) for p in member_probs + [ensemble]]
        counts = [f"{h}/{len(labelled)}" for h in hits]
        print(f"\n{'hits':>3}  {'':40}  {'':8}  "
              + "  ".join(f"{c:{width}}" for c in counts).rstrip())
        print("* = differs from the given label")


def add_member_args(parser):
    """The flags that choose a vote's members and weights (find_members, choose_weights); serve.py
    takes the same."""
    parser.add_argument("--runs", nargs="+",
                        help="run folders (default: every finished run under --root)")
    parser.add_argument("--root", default="runs",
                        help="where to look for runs when --runs is not given")
    parser.add_argument("--weights", help="weights by hand, one per run in order, e.g. 0.6,0.4 "
                                          "(normalised to sum 1; default: fitted on validation)")
    parser.add_argument("--data", help="AG News folder for the labels (default: the one the first "
                                       "run used)")
    parser.add_argument("--int8", action="store_true",
                        help="score texts with each BERT encoder's Linear layers in int8 "
                             "(quantize.py; a CPU only; not yet faster than bf16: RESULTS.md)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    add_member_args(parser)
    parser.add_argument("--text", action="append", help="classify this text (repeatable)")
    parser.add_argument("--file", help="classify the texts in this file: one a line; or, in a "
                                       ".csv file or under a label,text header, label,text rows "
                                       "whose hits are counted")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="for --text/--file: auto = cuda when a GPU is visible")
    parser.add_argument("--out", help="with the test vote: save the vote as a run-like folder "
                                      "here (per seed: <out>/seed<k>/), for analyze.py --compare")
    parser.add_argument("--force", action="store_true",
                        help="with --out: replace an earlier vote there (never a trained run)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    if args.out:  # before any work: an existing vote is replaced only with --force
        runfolders.check_replaceable(Path(args.out), args.force, is_vote_folder, "a vote")
    if args.int8 and not (args.text or args.file):
        raise common.UserError("--int8 scores texts (--text, --file); the test vote combines the "
                               "runs' saved probabilities and scores nothing")
    groups = find_members(args)
    for runs in groups.values():
        note_copies(runs)
        runfolders.note_mixed_data(runs, "voting")
    if args.text or args.file:
        seed, runs = next(iter(groups.items()))
        if seed is not None:
            print(f"members: the seed {seed} runs of each folder")
        vote_on_texts(args, runs)
        return
    for seed, runs in groups.items():
        out = args.out and (Path(args.out) / f"seed{seed}" if seed is not None else Path(args.out))
        vote_on_test(args, runs, out, seed)


if __name__ == "__main__":
    common.run_main(main)
