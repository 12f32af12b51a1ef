"""Run folders: where a run is written, and how any finished run is read back.

Not a lesson: plumbing the scripts share (read the lessons first: README, "Read the code").
A run folder holds config.json, the weights (model.safetensors or adapter.safetensors),
metrics.json and the probabilities it gave (val/test/cases_probs.npy, row order = dataset order);
resume.safetensors while it is unfinished, and .claim, its owner. The seeds of one experiment are
sibling folders runs/<name>/seed<k>/.
  - prepare_run_dir     --out, else runs/<name>, -2, -3, ...; never overwrites a run; of two
                        commands started on one folder, one gets it (claim_run_dir)
  - load_run            rebuild any finished run through the script that trained it (imported by
                        the name config.json gives, at run time: the one import of a script here)
  - load_scored_split   the rows a run was scored on, checked against its fingerprints
  - training_rows       how many rows a run (a vote: its first member) learned from
  - experiment_key      which runs are seeds of one experiment
  - folder_written_atomically  a folder that appears whole or not at all (an export, a vote)
"""
import functools
import importlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import bert
import common
from plumbing import agnews

RESUME_FILE = "resume.safetensors"  # in a run folder while a run is unfinished


def no_half_made_run_left(run_dir):
    """common.no_empty_folders_left for a run folder: on an error, the folder is taken back,
    whatever it holds (a tokenizer.json, a penalty list), when the block created it, this process
    claimed it (claim_run_dir) and nothing was trained in it yet (no resume point, no
    metrics.json). A run stopped by bad input leaves no folder to be mistaken for a run."""
    return common.no_empty_folders_left(run_dir, take_back=claimed_and_untrained)


def claimed_and_untrained(folder):
    return (claim_owner(folder).get("pid") == os.getpid()
            and not (folder / RESUME_FILE).exists() and not (folder / "metrics.json").exists())


def numbered_run_dirs(name, root="runs"):
    """runs/<name>, runs/<name>-2, runs/<name>-3, ... that exist, in the order they were
    numbered."""
    root = Path(root)
    numbered = [(int(p.name[len(name) + 1:]), p) for p in root.glob(f"{name}-*")
                if p.name[len(name) + 1:].isdigit()]
    return [p for p in [root / name] if p.exists()] + [p for _, p in sorted(numbered)]


def default_run_dir(name, resume=False, root="runs"):
    """Where a run goes without --out: runs/<name>, or, when that already holds a run, the next free
    runs/<name>-2, -3, ... (as other training tools number their runs), so the same command can be
    typed twice. With --resume: the newest of them, the one an interrupted command was writing."""
    existing = numbered_run_dirs(name, root)
    if resume:
        if not existing:
            raise common.UserError(f"--resume: no {Path(root) / name} to resume "
                                   f"(pass --out with the run folder)")
        return existing[-1]
    for k in range(1, len(existing) + 2):
        run_dir = Path(root) / (name if k == 1 else f"{name}-{k}")
        if not run_dir.exists() or not any(run_dir.iterdir()):
            return run_dir


def prepare_run_dir(args, name, claim=True):
    """--out, else default_run_dir. A finished or half-finished run is never overwritten by
    accident, and of two runs started at once on one folder only one gets it (claim_run_dir).
    claim=False: check nothing and create nothing (DDP's other ranks, after rank 0 claimed)."""
    run_dir = Path(args.out) if args.out else default_run_dir(name, args.resume)
    if not claim:
        return run_dir
    if args.resume:
        if is_finished(run_dir):
            raise common.UserError(f"{run_dir} is finished: nothing to resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise common.UserError(f"{run_dir} already holds a run: pass --resume to continue it, "
                               f"or --out to choose another folder")
    claim_run_dir(run_dir)
    return run_dir


# Written first in a new run folder, exclusively: the folder's owner (pid, host, command, time).
CLAIM_FILE = ".claim"


def claim_run_dir(run_dir):
    """Create run_dir/.claim with O_EXCL, which the file system grants to exactly one process: the
    emptiness check before it is a check-then-act race (two runs started at the same moment both
    see an empty folder), the exclusive create is not."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        owner = claim_owner(run_dir)
        raise common.UserError(f"{run_dir} was taken by another run started at the same time "
                               f"(pid {owner.get('pid', '?')}: {owner.get('command', '?')}); "
                               f"pass --out to choose another folder") from None
    except OSError as err:  # a read-only or full disk
        raise common.cannot_write(run_dir / CLAIM_FILE, err) from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": os.uname().nodename,
                       "command": shlex.join(sys.argv),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    except OSError as err:  # a full disk: an empty claim would read as nobody's and stay
        (run_dir / CLAIM_FILE).unlink(missing_ok=True)
        raise common.cannot_write(run_dir / CLAIM_FILE, err) from None


def claim_owner(run_dir):
    """What run_dir/.claim says of its owner; {} while its owner is still writing it."""
    try:
        return json.loads((Path(run_dir) / CLAIM_FILE).read_text())
    except (OSError, ValueError):
        return {}


def is_finished(run_dir):
    """The one rule every reader follows (vote, analyze, compare, serve, export, --teacher): a run
    is finished when metrics.json is written and the resume point is gone. finish_run writes
    metrics.json, then deletes resume.safetensors; a run killed between the two is resumed (and
    scored again), never read."""
    return (Path(run_dir) / "metrics.json").exists() and not (Path(run_dir) / RESUME_FILE).exists()


def check_finished(run_dir):
    """Stop with one line unless run_dir is a finished run (is_finished) whose saved probabilities
    are all finite (a diverged run saved by an older version holds nan)."""
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json"):
        if not (run_dir / name).exists():
            raise common.UserError(f"{run_dir}: no {name}, so not a finished run folder")
    if not is_finished(run_dir):
        raise common.UserError(f"{run_dir}: holds a resume point ({RESUME_FILE}), so the run is "
                               f"unfinished: finish it with --resume --out {run_dir}")
    for name in ("val", "test"):
        path = run_dir / f"{name}_probs.npy"
        if path.exists() and not np.isfinite(np.load(path, allow_pickle=False)).all():
            raise common.UserError(f"{path}: holds nan or inf (a diverged run); leave this run "
                                   f"out")


SEED_FOLDER = re.compile(r"seed(\d+)")  # runs/<experiment>/seed<k>/: one seed of an experiment


def seed_folder(base, seed):
    return Path(base) / f"seed{seed}"


def experiment_folder(run):
    """runs/<name>/seed<k> -> runs/<name>; a run trained without --seeds is its own folder."""
    run = Path(run)
    return run.parent if SEED_FOLDER.fullmatch(run.name) else run


def load_run(run_dir, device="cpu", int8=False):
    """Rebuild any saved run: config.json names the script that trained it, and that script's
    `load_model(config, run_dir)` returns (model, tokenizer) with the trained weights in place.
    int8 (--int8): a BERT run's encoder scores with int8 Linear layers (quantize.py)."""
    run_dir = Path(run_dir)
    check_finished(run_dir)
    config = common.load_json(run_dir / "config.json")
    model, tokenizer = rebuild_model(config, run_dir)
    model = model.to(device).eval()
    if int8:
        model = in_int8(model, run_dir)
    return model, tokenizer, config


def in_int8(model, run_dir):
    """The model with its BERT encoder's Linear layers in int8 (quantize.quantize_encoder, lesson
    21); a run without a BERT encoder (an LSTM) stays in float, and one line says so. CPU only:
    the int8 products here are oneDNN's and torch._int_mm's CPU kernels."""
    import quantize  # here, not above: the lessons that read run folders do not need lesson 21
    if next(model.parameters()).device.type != "cpu":
        raise common.UserError("--int8 scores on a CPU (its int8 units); on a GPU, score in bf16 "
                               "(leave out --int8) or pass --device cpu")
    if not isinstance(model, bert.BertClassifier):
        print(f"--int8: {run_dir} has no BERT encoder; it scores in float")
        return model
    return quantize.quantize_encoder(model)[0]


def rebuild_model(config, run_dir):
    """(model, tokenizer) of the run in run_dir as `config` describes it, through the script that
    trained it. finish_run scores this model too, so a run's saved probabilities are the ones any
    reader computes again for the same texts (a LoRA run merged, as it is read back)."""
    script = config.get("script")
    if script not in ("train_bert", "train_lora", "train_lstm"):
        raise common.UserError(f"{run_dir}/config.json: unknown key script={script!r}")
    return importlib.import_module(script).load_model(config, run_dir)


def vote_members(vote_dir):
    """[(name, run folder, weight)] of a vote saved by vote.py --out: each member as the vote
    names it (the path vote.py was given, relative to the folder it ran in), where it lies, and its
    weight. A relative name that does not lie below the current folder is looked for below the
    vote's own folder's parents (runs/acc/ensemble_e3 names runs/acc/pooler_e3/seed0: found from
    the project root, whichever folder reads the vote), or one line says which member is missing."""
    vote_dir = Path(vote_dir)
    members = []
    for name, weight in common.load_json(vote_dir / "metrics.json")["weights"].items():
        run = Path(name)
        if not run.is_absolute() and not run.exists():
            found = [base / run for base in vote_dir.resolve().parents if (base / run).exists()]
            if not found:
                raise common.UserError(f"{vote_dir}: its member {name} is neither below the "
                                       f"current folder nor below a parent of the vote's")
            run = found[0]
        members.append((name, run, weight))
    return members


def load_checked(model, path, trainable_only=False):
    """Load a run's saved weights into `model`, or stop with one line listing every missing,
    unexpected and mis-shaped key. trainable_only: the file holds only the trained parameters
    (a LoRA adapter and head); the frozen rest of the model comes from elsewhere."""
    state = common.load_weights(path)
    wanted = common.trainable_state(model) if trainable_only else model.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(wanted[k].shape)}"
                 for k in state if k in wanted and state[k].shape != wanted[k].shape]
    if missing or unexpected or misshaped:
        raise common.UserError(f"{path} does not fit the model its config.json describes: "
                               f"missing {missing}, unexpected {unexpected}, "
                               f"mis-shaped {misshaped}")
    model.load_state_dict(state, strict=not trainable_only)


def load_scored_split(run_dir, name, data_dir=None):
    """The val or test rows a finished run was scored on: loaded with the data flags it was trained
    with (config["args"]) and checked against the fingerprint in its metrics.json, so its saved
    probabilities and these labels line up row by row."""
    run_dir = Path(run_dir)
    args = common.load_json(run_dir / "config.json").get("args", {})
    metrics = common.load_json(run_dir / "metrics.json")
    recorded = args.get("data_dir")  # where the run found its data (runs since it is recorded)
    if not data_dir and not args.get("data") and recorded and Path(recorded).is_dir():
        data_dir = recorded
    splits = agnews.load_ag_news(data_dir or args.get("data"), args.get("train_size"),
                                 args.get("test_size"), args.get("val_size"),
                                 metrics.get("val_sampling", "sklearn"))
    expected = metrics.get("fingerprints", {}).get(name)
    if expected is None:
        raise common.UserError(f"{run_dir}/metrics.json: no fingerprints.{name}, so its {name} "
                               f"rows cannot be checked")
    if splits[name].fingerprint() != expected:
        raise common.UserError(f"{run_dir}: the {name} split loaded now "
                               f"(fingerprint {splits[name].fingerprint()}, "
                               f"{len(splits[name])} rows) "
                               f"is not the one the run was scored on ({expected}); "
                               f"pass --data with the AG News folder it was trained on")
    return splits[name]


def load_probs(run_dir, name, rows):
    """A run's saved val or test probabilities, (rows, 4) float32, checked for shape."""
    path = Path(run_dir) / f"{name}_probs.npy"
    try:
        probs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise common.UserError(f"{path}: cannot read ({err})") from None
    if probs.shape != (rows, common.NUM_CLASSES):
        raise common.UserError(f"{path}: shape {probs.shape}, "
                               f"expected ({rows}, {common.NUM_CLASSES})")
    if not np.isfinite(probs).all():  # a diverged run: its vote weight, its teacher's targets, nan
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        raise common.UserError(f"{path}: {bad} of {rows} rows are nan or inf (a diverged run); "
                               f"leave this run out")
    return probs


def load_cases_probs(run_dir, cases):
    """A finished run's probabilities on today's news (cases_probs.npy), or None for a run scored
    before cases/ existed or on another version of the file (its fingerprint differs)."""
    metrics = common.load_json(Path(run_dir) / "metrics.json")
    if metrics.get("fingerprints", {}).get("cases") != cases.fingerprint():
        return None
    return load_probs(run_dir, "cases", len(cases))


def scored_rows(run, splits=("val", "test")):
    """(split, row count, fingerprint) of the rows a finished run was scored on."""
    metrics = common.load_json(Path(run) / "metrics.json")
    try:
        return tuple((split, metrics["rows"][split], metrics["fingerprints"][split])
                     for split in splits)
    except KeyError as err:
        raise common.UserError(f"{run}/metrics.json: no rows or fingerprints for {err}") from None


def largest_group_on_same_rows(runs, what):
    """Of `runs` (oldest first), the largest group scored on the same test rows, the newest on a
    tie; the others are named, with the flag that would bring them in. Their validation rows may
    differ: a vote fits its weights on the validation rows its members share, and --compare reads
    test rows only."""
    groups = {}
    for run in runs:  # oldest first, so a group's last run is its newest
        groups.setdefault(scored_rows(run, ("test",)), []).append(run)
    chosen = max(groups.values(), key=lambda group: (len(group), runs.index(group[-1])))
    left_out = [run for run in runs if run not in chosen]
    if left_out:
        [(_, rows, _)] = scored_rows(chosen[0], ("test",))
        runs_word = "run" if len(chosen) == 1 else "runs"
        counts = [scored_rows(run, ("test",))[0][1] for run in left_out]
        others = ", ".join(f"{run} ({n:,} test rows{', other ones' if n == rows else ''})"
                           for run, n in zip(left_out, counts))
        print(f"left out (scored on other test rows than the {len(chosen)} {runs_word} {what}, "
              f"which read {rows:,}; train them on the same data with the same --test-size to "
              f"bring them in): {others}")
    return chosen


# One experiment = one configuration; its seeds are runs whose config.json differs only in these
# keys (where the run went, on which device, where its data lay, how often it logged or saved).
NOT_THE_EXPERIMENT = {"seed", "seeds", "out", "resume", "device", "data", "data_dir", "log_every",
                      "save_every"}


# Flags that came after runs were first saved, with the value a run saved before them ran with: a
# config.json or resume point that lacks one ran with this value (resume.changed_flags, and
# experiment_key, so that an old seed and a new one of one experiment are grouped together).
ADDED_FLAGS = {"llrd": 1.0, "reinit_top": 0, "rdrop": 0.0, "teacher": None, "distill_alpha": 0.5,
               "distill_t": 2.0, "unlabeled": 0, "pseudo_threshold": None,
               "teacher_fingerprint": None}


def training_rows(run):
    """How many training rows a finished run learned from; a vote, those of its first member."""
    metrics = common.load_json(Path(run) / "metrics.json")
    if "train" in metrics.get("rows", {}):
        return metrics["rows"]["train"]
    config = common.load_json(Path(run) / "config.json")
    if config.get("script") == "vote" and metrics.get("weights"):
        [(_, first, _), *_] = vote_members(run)
        return training_rows(first)
    raise common.UserError(f"{run}/metrics.json: no training row count")


def experiment_key(config):
    """config.json without the seed and the flags that do not change what is trained; a flag it
    lacks counts with the value it ran with (ADDED_FLAGS)."""
    args = {k: v for k, v in {**ADDED_FLAGS, **config.get("args", {})}.items()
            if k not in NOT_THE_EXPERIMENT}
    rest = {k: v for k, v in config.items() if k not in ("args", "seed")}
    return json.dumps({**rest, "args": args}, sort_keys=True, default=str)


def note_mixed_data(runs, what):
    """One line where `runs` were trained on different data folders (by train.csv's md5, which
    finish_run records): their validation rows differ, and a larger folder is another experiment.
    Runs from before the record are grouped by the folder their config names."""
    sources = {}
    for run in runs:
        metrics = common.load_json(Path(run) / "metrics.json")
        folder = common.load_json(Path(run) / "config.json").get("args", {}).get("data_dir")
        md5 = metrics.get("train_csv_md5")
        if md5 is None and folder and (Path(folder) / "train.csv").is_file():  # an older run
            md5 = train_csv_md5(folder)
        source = f"train.csv md5 {md5[:8]}" if md5 else f"folder {folder or '?'}"
        sources.setdefault(source, []).append(str(run))
    if len(sources) > 1:
        groups = "; ".join(f"{source}: {', '.join(names)}" for source, names in sources.items())
        print(f"note: the runs {what} were trained on {len(sources)} different data folders "
              f"({groups}); their validation rows differ")


@functools.cache
def train_csv_md5(folder):
    return agnews.md5_of(Path(folder) / "train.csv")


def run_seed(config):
    return config.get("seed", config.get("args", {}).get("seed"))


def find_runs(root="runs"):
    """Finished runs under root, oldest first: runs/<name>/ and the seeds of
    runs/<name>/seed<k>/. A run with metrics.json and a resume point is unfinished (is_finished)
    and left out."""
    runs = [p.parent for p in Path(root).rglob("metrics.json") if is_finished(p.parent)]
    return sorted(runs, key=lambda p: (p / "metrics.json").stat().st_mtime)


# --------------------------------------------------------------------------------------------------
# A folder written whole or not at all (export.py's HF folder, vote.py --out)
# --------------------------------------------------------------------------------------------------
@contextmanager
def folder_written_atomically(out, force, replaceable, what):
    """Yield a temp folder beside `out`; when the block ends without error, it becomes `out` by a
    rename. On any error the temp folder (and any parent folder made for it) is removed, and an old
    `out` stays as it was. An existing `out` is replaced only with force, and only where
    replaceable(out) says it is an earlier one of the same kind (`what`: "an export", "a vote"):
    never a trained run, a file or a folder of anything else. The old one is renamed aside, the new
    one renamed in, then the old one deleted: the one moment without `out` is between two renames.
    Temp folders that a killed earlier writer of `out` left are deleted first."""
    out = Path(out)
    check_replaceable(out, force, replaceable, what)
    check_target(out)
    clean_up_after_killed_writers(out)
    with common.no_empty_folders_left(out.parent):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
            (tmp / WRITER_FILE).write_text(str(os.getpid()))  # whose it is, while it is written
        except OSError as err:  # e.g. a folder we may not write in
            raise common.cannot_write(out, err) from None
        old = None
        try:
            try:
                yield tmp
            except common.UserError as err:  # name the folder the user asked for, not the temp
                renamed = type(err)(str(err).replace(str(tmp), str(out)))
                renamed.errno = getattr(err, "errno", None)   # CannotWrite's, for its catchers
                raise renamed from None
            (tmp / WRITER_FILE).unlink()
            permissions_as_usual(tmp)
            if out.exists():
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
                os.replace(out, old / out.name)
            try:
                os.rename(tmp, out)
            except OSError:
                if old is not None:  # put the old one back
                    os.replace(old / out.name, out)
                raise
        finally:
            for leftover in (tmp, old):
                if leftover is not None and leftover.exists():
                    shutil.rmtree(leftover)


# In a folder being written by folder_written_atomically: the writer's pid.
WRITER_FILE = ".writer"


def clean_up_after_killed_writers(out):
    """What a writer of `out` killed mid-way left beside it: its temp folder .<out>.<random>.tmp
    (deleted, unless its writer still runs), or, killed between its two renames, the old `out` in
    .<out>.<random>.old with no `out` (put back, and said)."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    ours = re.compile(rf"\.{re.escape(out.name)}\.[A-Za-z0-9_]+\.(tmp|old)")  # mkdtemp's names
    for leftover in sorted(out.parent.iterdir()):
        kind = ours.fullmatch(leftover.name)
        if not kind or not leftover.is_dir():
            continue
        if kind[1] == "tmp":
            if not writer_alive(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        elif (leftover / out.name).is_dir() and not out.exists():
            os.replace(leftover / out.name, out)
            leftover.rmdir()
            print(f"{out}: put back from {leftover.name}, where a killed writer had moved it")
        else:
            shutil.rmtree(leftover, ignore_errors=True)  # the new one was renamed in: the old goes


def writer_alive(tmp):
    """Whether the process that writes the temp folder `tmp` still runs."""
    try:
        os.kill(int((Path(tmp) / WRITER_FILE).read_text()), 0)  # signal 0 asks, sends nothing
    except PermissionError:  # it exists, as another user's
        return True
    except (OSError, ValueError):  # no such process, or no pid written: nobody writes it now
        return False
    return True


def check_replaceable(out, force, replaceable, what):
    """One line, before any work, where `out` exists and may not be replaced (see
    folder_written_atomically)."""
    out = Path(out)
    if not out.exists():
        return
    if not force:
        raise common.UserError(f"{out} already exists: pass --force to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not replaceable(out)):  # empty: nothing lost
        raise common.UserError(f"{out}: not {what} written here before, so --force does not "
                               f"replace it; choose another folder")


def check_target(out):
    """One line, before anything is made, where `out` cannot become a folder: a file on its path
    (mkdir would stop with FileExistsError or NotADirectoryError)."""
    for above in Path(out).parents:  # innermost first
        if above.exists():  # False for a path that runs through a file
            if not above.is_dir():
                raise common.UserError(f"{out}: {above} is a file, so no folder can be made "
                                       f"under it; choose another folder")
            return


def permissions_as_usual(folder):
    """mkdtemp makes an owner-only folder (0700); a folder made to be shared gets what mkdir and
    open would have given it: 0777 and 0666, less the umask."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~common.UMASK)
