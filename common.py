"""The plumbing every script shares. Not a lesson: read the lessons first (README, "Read the code").

  1. constants          class names, file names, where things are downloaded from
  2. errors, writes     one-line errors for bad input; progress; temp-file-then-rename writes
  3. runtime            device, precision, DDP rank, seeds
  4. data               AG News CSV: find / download / validate / split
  5. tokenizer          the model's own WordPiece through the `tokenizers` library; length-bucketed
                        batches
  6. evaluation         probabilities (predict), metrics, the sklearn report, peak memory
  7. run folders        config.json, weights, metrics.json, *_probs.npy; reloading any finished run
  8. figures            one size and DPI for every PNG, written atomically

The lessons build on these: bert.py (the encoder), loop.py (training), eda.py and awp.py, the
training scripts, vote.py, analyze.py with explain.py, shapley.py and compare.py. Nothing here
imports them (load_run finds a run's script by name), so the imports point one way.
"""
import contextlib
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
import re
import resource
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score, classification_report, f1_score
from sklearn.model_selection import train_test_split
from tqdm import tqdm


# --------------------------------------------------------------------------------------------------
# 1. Constants
# --------------------------------------------------------------------------------------------------
CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]  # AG News labels 1..4 -> 0..3
NUM_CLASSES = len(CLASS_NAMES)
# The two classes the study found mixed up most.
BUSINESS, SCITECH = CLASS_NAMES.index("Business"), CLASS_NAMES.index("Sci/Tech")
# validation slice and --train-size subsample: the same rows for every run, so runs can vote
DATA_SEED = 42
VAL_FRACTION = 0.1
PAD_ID = 0  # padding: [PAD] in the BERT vocabularies and in train_lstm.py's word vocabulary
RESUME_FILE = "resume.safetensors"  # in a run folder while a run is unfinished
# Today's news, the second test set every finished run scores (issue 22)
CASES_FILE = Path(__file__).resolve().parent / "cases" / "news_2020s.csv"

# the release, as mirrored by fast.ai
AGNEWS_URL = "https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz"
AGNEWS_TEST_MD5 = "d52ea96a97a2d943681189a97654912d"  # official test.csv (7,600 rows)
AGNEWS_TRAIN_ROWS = 120_000
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
CACHE_DIR = Path(os.environ.get("AGNEWS_LAB_CACHE", Path.home() / ".cache" / "agnews-lab"))


# --------------------------------------------------------------------------------------------------
# 2. Errors, progress and atomic writes
# --------------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint). Scripts print it as one line and
    exit 2."""


def run_main(main):
    """Call main(); a UserError becomes one clear line on stderr instead of a traceback wall."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# Progress of long loops. On a terminal a tqdm bar; in a log file (CI, nohup) a plain line every
# PROGRESS_EVERY_S seconds, so a log never sits silent for minutes while the test set is scored.
PROGRESS_EVERY_S = float(os.environ.get("AGNEWS_PROGRESS_EVERY_S", 30))
PROGRESS_FIRST_S = min(10.0, PROGRESS_EVERY_S)  # the first line sooner: the run is alive


def progress_bar(**tqdm_args):
    """A tqdm bar sized to the terminal, or to 80 x 24 where the terminal reports no size (a
    pseudo-terminal as `script`, a terminal logger, makes one): there tqdm takes -1 rows and
    draws nothing at all, so a newcomer's log showed no bar."""
    size = shutil.get_terminal_size()  # falls back to 80 x 24 where the size is 0
    return tqdm(ncols=size.columns, nrows=size.lines, **tqdm_args)


def progress(items, desc, unit="rows", sizes=None, enabled=True):
    """Iterate over `items` showing progress. sizes: how many `unit`s each item counts for (a batch
    of 128 rows is 128 rows), so the bar and the log lines count rows, not batches."""
    items = list(items)
    sizes = [1] * len(items) if sizes is None else list(sizes)
    total = sum(sizes)
    if not enabled:
        yield from items
    elif sys.stderr.isatty():
        with progress_bar(total=total, desc=desc, unit=f" {unit}", leave=False) as bar:
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
            wait = PROGRESS_FIRST_S if last == t0 else PROGRESS_EVERY_S
            if now - last >= wait and done < total:
                print(f"{desc}: {done:,}/{total:,} {unit} ({done / total:.0%}), "
                      f"{done / (now - t0):.1f} {unit}/s", flush=True)
                last = now


UMASK = os.umask(0o022)  # reading the umask means setting it: set it straight back
os.umask(UMASK)


@contextlib.contextmanager
def no_empty_folders_left(folder):
    """On an error inside the block, take back what it made: `folder`, when this process claimed
    it as a run folder (claim_run_dir) and nothing was trained in it yet (no resume point, no
    metrics.json), whatever else it holds (a tokenizer.json, a penalty list), and those of its
    parents that did not exist before and are left empty. A run stopped by bad input leaves no
    folder behind to be mistaken for a run, and the corrected command gets the same folder."""
    folder = Path(folder)
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for made in created:
            if made == folder and made.is_dir() and claimed_and_untrained(made):
                shutil.rmtree(made)
            elif made.is_dir() and not any(made.iterdir()):
                made.rmdir()
        raise


def claimed_and_untrained(folder):
    return (claim_owner(folder).get("pid") == os.getpid()
            and not (folder / RESUME_FILE).exists() and not (folder / "metrics.json").exists())


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
# 3. Runtime: device, precision, processes
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
    class on all 1,000 test rows (macro F1 0.8190 both). Without those instructions bf16 is
    emulated, and slower than fp32."""
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
    also joins the process group, one GPU per process; everything else reads rank and world size
    from here."""
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
    # a bad --precision stops here, before any rendezvous
    runtime = Runtime(dev, rank, world_size, precision)
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
# 4. AG News data
# --------------------------------------------------------------------------------------------------
@dataclass
class Split:
    texts: list   # title + " " + description, cleaned
    labels: np.ndarray  # (N,) int64 in 0..3
    ids: np.ndarray = None  # (N,) each row's number in its CSV file, so runs can be joined on rows
    soft: np.ndarray = None  # (N, 4) a teacher's probabilities (distill.py), or None

    def __post_init__(self):
        if self.ids is None:
            self.ids = np.arange(len(self.labels))

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        return Split([self.texts[i] for i in idx], self.labels[idx], self.ids[idx],
                     None if self.soft is None else self.soft[idx])

    def fingerprint(self):
        """Hash of texts and labels in order: two runs can vote only if they saw the same rows."""
        h = hashlib.sha1()
        for text, label in zip(self.texts, self.labels):
            h.update(f"{label}\t{text}\n".encode())
        return h.hexdigest()[:16]


# the ones that occur
HTML_ENTITIES = "quot|amp|lt|gt|nbsp|hellip|rsquo|lsquo|rdquo|ldquo|mdash|ndash"


def clean_text(text):
    """The release escapes line breaks as a lone backslash ("dwindling\\band") and turned the '&' of
    HTML entities into a space (" #39;" is an apostrophe, " #36;" a dollar sign, " quot;" a
    quote)."""
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
    # line ends as csv expects them
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    try:
        for row in reader:
            line = reader.line_num
            if len(row) != 3:
                raise UserError(f"{path}:{line}: expected 3 fields (class, title, description), "
                                f"found {len(row)}")
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
                f"cannot download AG News ({err}). Offline? Put the release's train.csv and "
                f"test.csv (headerless: \"class\",\"title\",\"description\") in {data_dir}/, "
                f"or point --data or $AGNEWS_DIR at a folder that has them") from None
        names = ("train.csv", "test.csv", "classes.txt")
        try:
            with tarfile.open(archive) as tar:
                for name in names:
                    (Path(tmp) / name).write_bytes(tar.extractfile(f"ag_news_csv/{name}").read())
        except (tarfile.TarError, KeyError, OSError) as err:
            raise UserError(f"{AGNEWS_URL}: not the AG News archive ({err})") from None
        if md5_of(Path(tmp) / "test.csv") != AGNEWS_TEST_MD5:
            raise UserError(f"{AGNEWS_URL}: its test.csv differs from the official test set "
                            f"(checksum)")
        if len(load_csv(Path(tmp) / "train.csv")) != AGNEWS_TRAIN_ROWS:
            raise UserError(f"{AGNEWS_URL}: its train.csv does not have {AGNEWS_TRAIN_ROWS} rows")
        for name in names:
            os.replace(Path(tmp) / name, data_dir / name)


def find_data_dir(arg=None):
    """--data DIR, else $AGNEWS_DIR, else data/ag_news/ (downloaded there when missing)."""
    data_dir = Path(arg or os.environ.get("AGNEWS_DIR") or "data/ag_news")
    if not ((data_dir / "train.csv").exists() and (data_dir / "test.csv").exists()):
        if arg or os.environ.get("AGNEWS_DIR"):
            raise UserError(f"{data_dir}: needs train.csv and test.csv "
                            f"(the AG News release's CSV files)")
        download_ag_news(data_dir)
    return data_dir


def stratified_indices(labels, size, seed):
    """Sorted indices of `size` rows with the class proportions of `labels` (sklearn's stratified
    split); all rows when size is None or too large."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    if size < NUM_CLASSES:
        raise UserError(f"a stratified sample needs at least {NUM_CLASSES} rows (one per class), "
                        f"got {size}")
    keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels,
                               random_state=seed)
    return np.sort(keep)  # keep file order


def stratified_subset(split, size, seed):
    """`size` rows of `split` with its class proportions, in file order."""
    return split.subset(stratified_indices(split.labels, size, seed))


def nested_order(labels, seed):
    """A fixed order of all rows in which every prefix keeps the class proportions: the rows of
    class c, shuffled, take the places (k + 0.5) / n_c along [0, 1), and the order sorts by place.
    The first m rows then hold m * n_c / N rows of class c, give or take one."""
    rng = np.random.default_rng(seed)
    place = np.empty(len(labels))
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        place[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    return np.argsort(place, kind="stable")


def nested_subset(split, size, seed):
    """The first `size` rows of nested_order, in file order: stratified like stratified_subset,
    and nested, so a smaller --val-size is part of a larger one and runs validated on different
    sizes still share rows to fit a vote's weights on."""
    if size is None or size >= len(split):
        return split
    if size < NUM_CLASSES:
        raise UserError(f"a stratified sample needs at least {NUM_CLASSES} rows (one per class), "
                        f"got {size}")
    return split.subset(np.sort(nested_order(split.labels, seed)[:size]))


# How --val-size picks its rows: "nested" since runs record it in metrics.json; "sklearn" (an
# independent stratified sample per size) is how the runs before it were validated.
VAL_SAMPLING = "nested"


def load_ag_news(data_dir=None, train_size=None, test_size=None, val_size=None,
                 val_sampling=VAL_SAMPLING):
    """train / val / test Splits. Test is the official test.csv; val is a fixed stratified 10% of
    train.csv, the same rows whatever --seed or --train-size, so every run's val_probs line up."""
    data_dir = find_data_dir(data_dir)
    full_train = load_csv(data_dir / "train.csv")
    test = load_csv(data_dir / "test.csv")
    train_idx, val_idx = train_test_split(np.arange(len(full_train)), test_size=VAL_FRACTION,
                                          stratify=full_train.labels, random_state=DATA_SEED)
    train = stratified_subset(full_train.subset(np.sort(train_idx)), train_size, DATA_SEED)
    val_slice = full_train.subset(np.sort(val_idx))
    if val_sampling == "nested":
        val = nested_subset(val_slice, val_size, DATA_SEED)
    else:
        val = stratified_subset(val_slice, val_size, DATA_SEED)
    test = stratified_subset(test, test_size, DATA_SEED)
    return {"train": train, "val": val, "test": test}


def parse_label(field):
    """'1'..'4' as in AG News, or a class name (any case) -> 0..3; None if it is neither."""
    field = field.strip()
    if field in {"1", "2", "3", "4"}:
        return int(field) - 1
    names = [name.lower() for name in CLASS_NAMES]
    return names.index(field.lower()) if field.lower() in names else None


def read_cases(path):
    """A file of your own cases (vote.py --file, serve.py --file, cases/news_2020s.csv): one text a
    line, or, in a .csv file or one whose first line is the header `label,text`, CSV rows
    `label,text` (label 1..4 or a class name). The file's name or header decides, not a guess from
    its first text: "1,000 jobs cut" is a text, not label 1. In a .csv file, lines starting with #
    at the top are the file's comment (in a text file a # headline is a text); blank lines are
    skipped. Returns [(label or None, text)]."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: bytes that are not UTF-8") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    while path.suffix.lower() == ".csv" and numbered and numbered[0][1].lstrip().startswith("#"):
        numbered = numbered[1:]  # a CSV file's opening comment: how it was made
    if not numbered:
        raise UserError(f"{path}: no texts")
    first = [f.strip().lower() for f in next(csv.reader([numbered[0][1]]))]
    header = first == ["label", "text"]
    labelled = header or path.suffix.lower() == ".csv"
    if header:
        numbered = numbered[1:]
        if not numbered:
            raise UserError(f"{path}: only the header label,text; no texts below it")

    cases = []
    for n, line in numbered:
        label, text = None, line
        if labelled:
            try:
                fields = next(csv.reader([line], strict=True))
            except csv.Error as err:
                raise UserError(f"{path}:{n}: malformed CSV ({err})") from None
            label = parse_label(fields[0]) if len(fields) >= 2 else None
            if label is None:
                raise UserError(f"{path}:{n}: expected label,text with label 1..4 or one of "
                                       f"{', '.join(CLASS_NAMES)}, found {line[:60]!r}")
            text = ",".join(fields[1:])  # an unquoted text with commas arrives in pieces
        text = clean_text(text)
        if not text:
            raise UserError(f"{path}:{n}: empty text")
        cases.append((label, text))
    return cases


def load_cases(path=None):
    """Today's news (cases/news_2020s.csv, 400 labelled rows of 2020-2025 that we wrote), a second
    test set every finished run scores: a Split, ids its row numbers in the file."""
    path = Path(path) if path else CASES_FILE
    cases = read_cases(path)
    if any(label is None for label, _ in cases):
        raise UserError(f"{path}: every case needs a label to be a test set (label,text rows)")
    return Split([text for _, text in cases], np.array([label for label, _ in cases]))


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


def note_long_texts(tokenizer, texts, max_len, names=None, reader="the model"):
    """Print one note for each typed text longer than max_len tokens: encode cuts it without a
    word, and a user who pasted a whole article should know the model saw only its start.
    names: what to call each text (default text 1, text 2, ...)."""
    from tokenizers import Tokenizer
    if tokenizer.truncation is not None:  # train_lstm.py's word tokenizer cuts at max_len itself
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
    names = names or [f"text {i}" for i in range(1, len(texts) + 1)]
    for name, enc in zip(names, tokenizer.encode_batch(list(texts))):
        if len(enc.ids) > max_len:
            print(f"note: {name} is {len(enc.ids)} tokens; {reader} reads the first {max_len} "
                  f"({len(enc.ids) - max_len} dropped)")


def pad_batch(rows, pad_id=PAD_ID, length=None):
    """List of 1-D id arrays -> input_ids (B, T) and attention_mask (B, T); T = the longest row, or
    `length` when given (padding every row to --max-len, for comparison)."""
    longest = length or max(len(r) for r in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
    input_ids = torch.from_numpy(input_ids)
    lengths = torch.tensor([len(r) for r in rows])
    # (B, T) bool, True = real token
    attention_mask = torch.arange(longest)[None, :] < lengths[:, None]
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
                                for c in np.array_split(order,
                                                        max(1, math.ceil(len(order) / chunk)))])
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world_size
    if per_rank == 0:
        raise UserError(f"{len(lengths)} rows make {len(batches)} batches of {batch_size}: "
                        f"fewer than the {world_size} processes; use a smaller --batch-size or "
                        f"more rows")
    return batches[rank::world_size][:per_rank]


@dataclass
class Encoded:
    """A split after tokenization: what the loops iterate over."""
    ids: list            # N arrays of token ids
    labels: np.ndarray   # (N,) 0..3, or distill.UNLABELED for a row whose label is not used
    soft: np.ndarray = None  # (N, 4) a teacher's probabilities (distill.py), or None

    @property
    def lengths(self):
        return np.array([len(r) for r in self.ids])


def encode_splits(tokenizer, splits, max_len):
    return {name: Encoded(encode(tokenizer, s.texts, max_len), s.labels, s.soft)
            for name, s in splits.items()}


# --------------------------------------------------------------------------------------------------
# 6. Evaluation
# --------------------------------------------------------------------------------------------------
def to_device(rows, pad_to, device):
    """Batch of id arrays -> (input_ids, attention_mask) on device; pad_to=0 pads to the longest
    row."""
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
        with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype,
                            enabled=runtime.amp_dtype is not None):
            out = model.features(input_ids, mask) if features else model(input_ids, mask)
        out = out.float() if features else out.float().softmax(-1)
        chunks.append(out.cpu().numpy())
    outputs = np.concatenate(chunks)
    result = np.empty_like(outputs)
    result[order] = outputs
    return result


def predict_ids(model, ids, runtime, desc="scoring"):
    """Softmax probabilities (N, 4) of encoded texts without labels (none are needed to score)."""
    return predict(model, Encoded(ids, np.zeros(len(ids), dtype=np.int64)), runtime, desc=desc)


def predict_texts(model, tokenizer, max_len, texts, runtime, desc="scoring"):
    """Softmax probabilities (N, 4) of raw texts, encoded by the run's own tokenizer."""
    return predict_ids(model, encode(tokenizer, texts, max_len), runtime, desc=desc)


def evaluate(probs, labels):
    preds = probs.argmax(1)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"loss": loss, "accuracy": float(accuracy_score(labels, preds)),
            # zero_division=0: a class never predicted (small runs) scores 0, without a warning
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0))}


def reset_peak_memory(device):
    """Count this run's peak memory from now: with --seeds several runs share one process, and an
    earlier seed's peak must not count for the next one."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # Linux: VmHWM, the peak resident set, starts again
        Path("/proc/self/clear_refs").write_text("5")
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
        # KiB on Linux
        return {"cpu_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def trainable_state(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def print_report(labels, probs, title="official test set"):
    preds = probs.argmax(1)
    print(f"\n{title}: {len(labels)} rows")
    print(classification_report(labels, preds, labels=list(range(NUM_CLASSES)),
                                target_names=CLASS_NAMES, digits=4, zero_division=0))


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# --------------------------------------------------------------------------------------------------
# 7. Run folders
# --------------------------------------------------------------------------------------------------
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
            raise UserError(f"--resume: no {Path(root) / name} to resume "
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
            raise UserError(f"{run_dir} is finished: nothing to resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, "
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
        raise UserError(f"{run_dir} was taken by another run started at the same time "
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
        raise UserError(f"{path} does not fit the model its config.json describes: "
                        f"missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}")
    model.load_state_dict(state, strict=not trainable_only)


def load_scored_split(run_dir, name, data_dir=None):
    """The val or test rows a finished run was scored on: loaded with the data flags it was trained
    with (config["args"]) and checked against the fingerprint in its metrics.json, so its saved
    probabilities and these labels line up row by row."""
    run_dir = Path(run_dir)
    args = load_json(run_dir / "config.json").get("args", {})
    metrics = load_json(run_dir / "metrics.json")
    recorded = args.get("data_dir")  # where the run found its data (runs since it is recorded)
    if not data_dir and not args.get("data") and recorded and Path(recorded).is_dir():
        data_dir = recorded
    splits = load_ag_news(data_dir or args.get("data"), args.get("train_size"),
                          args.get("test_size"), args.get("val_size"),
                          metrics.get("val_sampling", "sklearn"))
    expected = metrics.get("fingerprints", {}).get(name)
    if expected is None:
        raise UserError(f"{run_dir}/metrics.json: no fingerprints.{name}, so its {name} rows "
                        f"cannot be checked")
    if splits[name].fingerprint() != expected:
        raise UserError(f"{run_dir}: the {name} split loaded now "
                        f"(fingerprint {splits[name].fingerprint()}, {len(splits[name])} rows) "
                        f"is not the one the run was scored on ({expected}); "
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


def load_cases_probs(run_dir, cases):
    """A finished run's probabilities on today's news (cases_probs.npy), or None for a run scored
    before cases/ existed or on another version of the file (its fingerprint differs)."""
    metrics = load_json(Path(run_dir) / "metrics.json")
    if metrics.get("fingerprints", {}).get("cases") != cases.fingerprint():
        return None
    return load_probs(run_dir, "cases", len(cases))


def scored_rows(run, splits=("val", "test")):
    """(split, row count, fingerprint) of the rows a finished run was scored on."""
    metrics = load_json(Path(run) / "metrics.json")
    try:
        return tuple((split, metrics["rows"][split], metrics["fingerprints"][split])
                     for split in splits)
    except KeyError as err:
        raise UserError(f"{run}/metrics.json: no rows or fingerprints for {err}") from None


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
# config.json or resume point that lacks one ran with this value (loop.changed_flags, and
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


# --------------------------------------------------------------------------------------------------
# 8. Figures
# --------------------------------------------------------------------------------------------------
DPI = 100
WIDE = 12                    # inches: width of the figures whose height follows their content
CLASS_COLOURS = ["tab:blue", "tab:green", "tab:orange", "tab:purple"]


def save_figure(fig, path):
    """Write at a fixed DPI and no 'tight' cropping: a figure's pixel size is its inches * DPI."""
    import matplotlib.pyplot as plt  # only the scripts that draw load matplotlib
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    plt.close(fig)
    print(f"wrote {path}")
    return path
