"""Distillation and unlabelled rows: one model learns what an ensemble (or any teacher) knows.

A vote of several seeds is usually better than each of them, and costs several models at
inference. Distillation (Hinton et al. 2015) trains ONE student to match the teacher's
probabilities q as well as the labels y:

    loss(row) = (1 - alpha) * CE(z, y)  +  alpha * T^2 * KL(q_T || p_T)
    p_T = softmax(z / T),   q_T = softmax(log q / T)

The temperature T > 1 softens both distributions, so the student also learns which wrong classes
the teacher finds plausible ("dark knowledge": Business is closer to Sci/Tech than to Sports). The
soft term's gradient shrinks like 1/T^2 as T grows (for T large against the logits' spread), so T^2
keeps its size about the same whatever T (Hinton et al. 2015); at T near 1 the factor is only a
scale. The lesson: how much of the ensemble's gain one model
keeps.

Unlabelled rows (`--unlabeled N`) are other training rows whose labels we pretend not to have: for
them only the teacher speaks. Two ways:
  - soft targets (default): loss(row) = T^2 * KL(q_T || p_T), the distillation term alone;
  - self-training (`--pseudo-threshold P`): rows the teacher gives a probability >= P become
    labelled rows with the teacher's class as their label (a pseudo-label); the others are left out.
Their labels are dropped where the rows are drawn (`unlabeled_rows`: UNLABELED, -1, for every row)
and never read again; a pseudo-label is the teacher's argmax, never the file's.

A noisy student (Xie et al. 2020, "Self-training with Noisy Student"): with `--eda` too, the
student learns from EDA copies of every row (labelled and not) while the teacher read the clean
text; each copy inherits its original's label (or UNLABELED) and teacher's probabilities. The
student must then give the clean row's answer to a perturbed row, a harder task than copying the
teacher on the rows it saw, which is where Xie et al. found the student's gain over its teacher.

The teacher (`--teacher DIR`) is a finished run or a vote saved by `vote.py --out` (its members and
fitted weights). It must have learned from exactly the student's labelled rows (same fingerprint):
a teacher trained on more labels would smuggle them in. Its probabilities are computed once, at the
start, on the labelled and unlabelled training rows (each member through its own tokenizer), and
travel with the rows (Split.soft) into every batch.

tests/test_distill.py checks the loss by hand, that a student trained with alpha 1 and T 1
reproduces its teacher, and that unlabelled rows carry no label.

Lesson 9 of README's reading path: read after rdrop.py; next: loop.py, which calls lessons 4-9.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from plumbing import agnews, flags, runfolders

UNLABELED = -1  # the label of a row whose label the run may not use


def add_distill_args(parser):
    parser.add_argument("--teacher",
                        help="a finished run or a vote folder (vote.py --out) trained on the same "
                             "labelled rows: its probabilities become soft targets")
    parser.add_argument("--distill-alpha", type=flags.fraction, default=0.5,
                        help="--teacher: weight of the distillation term on labelled rows "
                             "(1 - alpha goes to the labels' cross-entropy)")
    parser.add_argument("--distill-t", type=flags.positive_float, default=2.0,
                        help="--teacher: temperature T of both distributions in the KL term")
    parser.add_argument("--unlabeled", type=flags.nonnegative_int, default=0,
                        help="--teacher: also train on N other training rows, without their "
                             "labels (training accuracy counts them as wrong)")
    parser.add_argument("--pseudo-threshold", type=flags.fraction_above_0,
                        help="--unlabeled: self-training: keep the rows the teacher gives at "
                             "least this probability, labelled with its class (default: all rows, "
                             "the teacher's probabilities as soft targets)")


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def distill_loss(logits, labels, soft=None, alpha=0.0, temperature=1.0):
    """Mean over the batch. logits (B, C); labels (B,) with UNLABELED for rows without one; soft
    (B, C) the teacher's probabilities, or None (then plain cross-entropy, every row labelled)."""
    logits = logits.float()
    if soft is None:
        return F.cross_entropy(logits, labels)
    T = temperature
    log_p = F.log_softmax(logits / T, -1)                                     # (B, C)
    log_q = F.log_softmax(torch.log(soft.float().clamp_min(1e-12)) / T, -1)   # (B, C)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1) * T * T                      # (B,)
    labelled = labels != UNLABELED
    # the unlabelled rows' cross-entropy is computed on a stand-in class and thrown away by where
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")       # (B,)
    return torch.where(labelled, (1 - alpha) * ce + alpha * kl, kl).mean()


# --------------------------------------------------------------------------------------------------
# The teacher and the rows it speaks for
# --------------------------------------------------------------------------------------------------
def teacher_members(teacher):
    """[(name, run folder, weight)] of a teacher: a vote folder's members and fitted weights
    (runfolders.vote_members), or one run with weight 1."""
    teacher = Path(teacher)
    if not (teacher / "config.json").exists() or not runfolders.is_finished(teacher):
        raise common.UserError(f"--teacher {teacher}: not a finished run or vote (config.json and "
                               f"metrics.json); for a --seeds run name one seed<k>/ folder, or "
                               f"vote its seeds with vote.py --out")
    config = common.load_json(teacher / "config.json")
    if config.get("script") == "vote":
        return runfolders.vote_members(teacher)
    return [(str(teacher), teacher, 1.0)]


def check_same_rows(members, train):
    """Every member learned from exactly these labelled rows, or one line says which did not."""
    for _, run, _ in members:
        seen = common.load_json(run / "metrics.json").get("fingerprints", {}).get("train")
        if seen != train.fingerprint():
            raise common.UserError(
                f"--teacher: {run} was trained on other rows than this run's {len(train):,} "
                f"labelled ones (a teacher that saw more labels would leak them); train it with "
                f"the same --train-size and --data")


def teacher_probs(members, texts, runtime):
    """The teacher's probabilities (N, 4) for the texts: the weighted mean of its members', each
    member reading them through its own tokenizer, as vote.py does."""
    total = np.zeros((len(texts), common.NUM_CLASSES))
    for _, run, weight in members:
        model, tokenizer, config = runfolders.load_run(run, runtime.device)
        total += weight * common.predict_texts(model, tokenizer, config["args"]["max_len"], texts,
                                               runtime, desc=f"teacher {run}")
    return total


def teacher_fingerprint(members):
    """A short hash of who the teacher is: each member's name (as the vote names it, wherever the
    command runs from), weight and recorded test scores (a retrained or replaced member scores
    differently). Not of its probabilities, whose last bits may change with the number of threads
    of the machine that resumes."""
    record = [(str(Path(name)), round(weight, 6),
               common.load_json(run / "metrics.json").get("test"))
              for name, run, weight in members]
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def unlabeled_rows(data_dir, labelled, count):
    """`count` rows of the training slice that are not among the labelled rows, drawn with the
    data seed (the same rows for every seed of an experiment), their labels replaced by UNLABELED
    at once: nothing downstream can read them."""
    pool = agnews.load_ag_news(data_dir)["train"]
    free = np.flatnonzero(~np.isin(pool.ids, labelled.ids))
    if count > len(free):
        raise common.UserError(f"--unlabeled {count}: only {len(free):,} training rows are not "
                               f"labelled rows of this run")
    chosen = np.sort(np.random.default_rng(agnews.DATA_SEED).permutation(free)[:count])
    return agnews.Split([pool.texts[i] for i in chosen], np.full(count, UNLABELED),
                        pool.ids[chosen])


def concat(a, b):
    return agnews.Split(a.texts + b.texts, np.concatenate([a.labels, b.labels]),
                        np.concatenate([a.ids, b.ids]), np.concatenate([a.soft, b.soft]))


# The teacher's probabilities by (teacher, labelled rows, unlabelled rows): one process trains
# every seed of --seeds on the same rows, and scoring them once is enough (10,000 rows, 8,000
# of them unlabelled, and a 3-model teacher: 76 s on a 2-core CPU, per seed without this).
_TEACHER_PROBS = {}


def attach_teacher(args, splits, data_dir, runtime):
    """start_run's hook. With --teacher: the labelled training rows get the teacher's
    probabilities (Split.soft), and with --unlabeled N, N more rows join them, either all with
    UNLABELED and soft targets, or (--pseudo-threshold P) those the teacher is sure of, labelled
    with its class. Without --teacher, the splits as they are (and --unlabeled is refused)."""
    teacher = getattr(args, "teacher", None)
    if not teacher:
        if getattr(args, "unlabeled", 0) or getattr(args, "pseudo_threshold", None):
            raise common.UserError("--unlabeled and --pseudo-threshold need --teacher: without "
                                   "one, nothing speaks for the unlabelled rows")
        return splits
    if args.pseudo_threshold is not None and not args.unlabeled:
        raise common.UserError("--pseudo-threshold chooses among --unlabeled rows: give "
                               "--unlabeled N too")
    members = teacher_members(teacher)
    train = splits["train"]
    check_same_rows(members, train)
    extra = (unlabeled_rows(data_dir, train, args.unlabeled) if args.unlabeled else
             agnews.Split([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
    # Which teacher it is, recorded with the flags: a resumed run whose teacher folder now holds
    # another model (another vote, retrained members) is refused (resume.ResumePoint compares them).
    args.teacher_fingerprint = teacher_fingerprint(members)
    key = (args.teacher_fingerprint, train.fingerprint(), extra.fingerprint())
    if key not in _TEACHER_PROBS:
        # Loading the members draws random numbers (a model is built before its weights are
        # read): they must not move the run's own seeded stream, or seed k would start elsewhere
        # than the baseline's seed k.
        cuda = [runtime.device] if runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            _TEACHER_PROBS[key] = teacher_probs(members, train.texts + extra.texts,
                                                runtime).astype(np.float32)
    probs = _TEACHER_PROBS[key].copy()
    train.soft, extra.soft = probs[:len(train)], probs[len(train):]
    if args.pseudo_threshold is not None and len(extra):
        sure = extra.soft.max(1) >= args.pseudo_threshold
        extra = extra.subset(np.flatnonzero(sure))
        extra.labels = extra.soft.argmax(1)  # the teacher's class: a pseudo-label
    if runtime.is_main:
        kind = (f"pseudo-labelled at p >= {args.pseudo_threshold}" if args.pseudo_threshold
                is not None else "soft targets only")
        print(f"teacher {teacher} ({len(members)} model{'s' if len(members) > 1 else ''}): "
              f"soft targets for {len(train):,} labelled rows"
              + (f" and {len(extra):,} of {args.unlabeled:,} unlabelled rows ({kind})"
                 if args.unlabeled else "")
              + f"; alpha {args.distill_alpha}, T {args.distill_t}")
    return {**splits, "train": concat(train, extra) if len(extra) else train}
