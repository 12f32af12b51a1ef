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
  - experiment_key      which runs are seeds of one experiment
"""
import importlib
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import agnews
import common

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
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        owner = claim_owner(run_dir)
        raise common.UserError(f"{run_dir} was taken by another run started at the same time "
                               f"(pid {owner.get('pid', '?')}: {owner.get('command', '?')}); "
                               f"pass --out to choose another folder") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": os.uname().nodename, "command": shlex.join(sys.argv),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)


def claim_owner(run_dir):
    """What run_dir/.claim says of its owner; {} while its owner is still writing it."""
    try:
        return json.loads((Path(run_dir) / CLAIM_FILE).read_text())
    except (OSError, ValueError):
        return {}


def is_finished(run_dir):
    return (Path(run_dir) / "metrics.json").exists() and not (Path(run_dir) / RESUME_FILE).exists()


SEED_FOLDER = re.compile(r"seed(\d+)")  # runs/<experiment>/seed<k>/: one seed of an experiment


def seed_folder(base, seed):
    return Path(base) / f"seed{seed}"


def experiment_folder(run):
    """runs/<name>/seed<k> -> runs/<name>; a run trained without --seeds is its own folder."""
    run = Path(run)
    return run.parent if SEED_FOLDER.fullmatch(run.name) else run


def load_run(run_dir, device="cpu"):
    """Rebuild any saved run: config.json names the script that trained it, and that script's
    `load_model(config, run_dir)` returns (model, tokenizer) with the trained weights in place."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise common.UserError(f"{run_dir}: no config.json (not a finished run folder)")
    config = common.load_json(run_dir / "config.json")
    script = config.get("script")
    if script not in ("train_bert", "train_lora", "train_lstm"):
        raise common.UserError(f"{run_dir}/config.json: unknown key script={script!r}")
    model, tokenizer = importlib.import_module(script).load_model(config, run_dir)
    return model.to(device).eval(), tokenizer, config


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


def experiment_key(config):
    """config.json without the seed and the flags that do not change what is trained; a flag it
    lacks counts with the value it ran with (ADDED_FLAGS)."""
    args = {k: v for k, v in {**ADDED_FLAGS, **config.get("args", {})}.items()
            if k not in NOT_THE_EXPERIMENT}
    rest = {k: v for k, v in config.items() if k not in ("args", "seed")}
    return json.dumps({**rest, "args": args}, sort_keys=True, default=str)


def run_seed(config):
    return config.get("seed", config.get("args", {}).get("seed"))


def find_runs(root="runs"):
    """Finished runs under root, oldest first: runs/<name>/ and the seeds of
    runs/<name>/seed<k>/."""
    runs = [p.parent for p in Path(root).rglob("metrics.json")]
    return sorted(runs, key=lambda p: (p / "metrics.json").stat().st_mtime)
