"""The command line: --help that shows every default, and one argparse type per kind of number.

Plumbing, not a lesson. Every numeric flag of every script is read through one of these types, so a
value out of its range is argparse's one line naming the flag and the range, exit 2, before any
folder is made (tests/test_flags.py walks every flag). The types are named for what a flag means.
"""
import argparse
import math

import common


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the script's docstring as written and shows every default, so a learner need
    not read code to learn that train_bert.py runs 3 epochs at lr 5e-5. Flags that default to
    nothing (None) or to off (store_true) have no default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


# argparse types: each flag's range is checked while the command line is read, before anything is
# made, so --dropout 1.5 is argparse's one line naming the flag and the range, exit 2, not a
# traceback minutes later or a run that records nonsense. Pick the type that says what the flag
# means; tests/test_flags.py fails on a numeric flag left with a bare int or float.
SEED_MAX = 2**32 - 1  # numpy's legacy seed and scikit-learn's random_state take 0..2**32 - 1


def checked_number(text, kind, ok, accepted):
    """`text` as an int or float (`kind`) for which ok(value) holds; else ArgumentTypeError saying
    what is accepted. Floats must be finite: nan fails every comparison, inf passes some."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
    return value


def positive_int(text):
    """argparse type: a whole number >= 1 (--batch-size, --epochs, --r)."""
    return checked_number(text, int, lambda v: v >= 1, "a whole number of at least 1")


def nonnegative_int(text):
    """argparse type: a whole number >= 0, where 0 means off (--save-every)."""
    return checked_number(text, int, lambda v: v >= 0, "a whole number of at least 0")


def seed_int(text):
    """argparse type of --seed: a whole number in [0, 2**32 - 1], what numpy can be seeded with."""
    return checked_number(text, int, lambda v: 0 <= v <= SEED_MAX,
                          f"a whole number in [0, {SEED_MAX}]")


def sample_size(text):
    """argparse type of a stratified sample's size (--train-size, --sample): at least one row per
    class."""
    return checked_number(text, int, lambda v: v >= common.NUM_CLASSES,
                          f"a whole number of at least {common.NUM_CLASSES} (one row per class)")


def sequence_length(text):
    """argparse type of --max-len: room for [CLS], one token and [SEP]."""
    return checked_number(text, int, lambda v: v >= 3,
                          "a whole number of at least 3 ([CLS], one token, [SEP])")


def positive_float(text):
    """argparse type: a number > 0, where 0 would switch the thing off (--clip, --awp-eps)."""
    return checked_number(text, float, lambda v: v > 0, "a number greater than 0")


def nonnegative_float(text):
    """argparse type: a number >= 0 (--lr, --weight-decay, --penalty)."""
    return checked_number(text, float, lambda v: v >= 0, "a number of at least 0")


def fraction(text):
    """argparse type: a number in [0, 1], both ends meaningful (--warmup: none, all steps)."""
    return checked_number(text, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def fraction_below_1(text):
    """argparse type: a number in [0, 1) (dropout: at 1 nothing would pass)."""
    return checked_number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def fraction_above_0(text):
    """argparse type: a number in (0, 1] (--eda-alpha: at 0 a copy would change nothing)."""
    return checked_number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def cosine_similarity(text):
    """argparse type: a number in (-1, 1) (--eda-threshold: at 1 no word has a synonym, at -1
    every word is one)."""
    return checked_number(text, float, lambda v: -1 < v < 1, "a number in (-1, 1)")


def parse_seeds(text):
    """argparse type of --seeds: '0,1,2' -> [0, 1, 2], distinct whole numbers, each a seed_int."""
    try:
        seeds = [seed_int(s) for s in text.split(",")]
    except argparse.ArgumentTypeError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct whole numbers in [0, {SEED_MAX}] "
                                         f"separated by commas, like 0,1,2, got {text!r}")
    return seeds


def port_number(text):
    """argparse type of --port: 0 (any free port) to 65535."""
    return checked_number(text, int, lambda v: 0 <= v <= 65535, "a whole number in [0, 65535]")
