"""AG News as rows: where the CSV files come from, how they are checked, how the splits are drawn.

Not a lesson: plumbing the training scripts share (read the lessons first: README, "Read the code").
  - Split               the rows of one split: texts, labels, each row's number in its file, and
                        (distill.py) a teacher's probabilities
  - load_csv            a file checked line by line: bad input gets one line naming file and line
  - find_data_dir       --data, else $AGNEWS_DIR, else data/ag_news/ (downloaded once, checked)
  - load_ag_news        train / val / test: the official test set, a fixed stratified 10% of
                        train.csv for validation (--val-size: a nested stratified part of it),
                        --train-size a stratified sample of the rest
  - load_cases          today's news (cases/), the second test set every finished run scores
"""
import csv
import hashlib
import html
import io
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

import common

# validation slice and --train-size subsample: the same rows for every run, so runs can vote
DATA_SEED = 42
VAL_FRACTION = 0.1
# Today's news, the second test set every finished run scores (issue 22)
CASES_FILE = Path(__file__).resolve().parent.parent / "cases" / "news_2020s.csv"
# the release, as mirrored by fast.ai
AGNEWS_URL = "https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz"
AGNEWS_TEST_MD5 = "d52ea96a97a2d943681189a97654912d"  # official test.csv (7,600 rows)
AGNEWS_TRAIN_ROWS = 120_000


@dataclass
class Split:
    texts: list   # title + " " + description, cleaned
    labels: np.ndarray  # (N,) int64 in 0..3, or distill.UNLABELED (-1): a label the run may not use
    # (N,) each row's number in its CSV file, so runs can be joined on rows (an EDA copy: its
    # original's)
    ids: np.ndarray = None
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


def decode_utf8(raw):
    """UTF-8 text, without the byte-order mark Excel and Notepad put first: kept, it would be part
    of the first field (the header `\ufefflabel,text`, the class `\ufeff"3"`)."""
    return raw.decode("utf-8-sig")


def undecodable_line(err):
    """The line number of the bytes a UnicodeDecodeError stopped at (err.object is what was decoded:
    with a byte-order mark, the bytes after it)."""
    return err.object[: err.start].count(b"\n") + 1


def csv_problem(err):
    """A csv.Error in words: the one a user can fix without knowing the csv module is a field over
    its size limit (a whole article pasted in one cell)."""
    if "field larger than field limit" in str(err):
        return (f"a field longer than the CSV reader's limit of {csv.field_size_limit():,} "
                f"characters; shorten it (the model reads only the start of a text)")
    return f"malformed CSV ({err})"


def load_csv(path):
    """Read one canonical AG News CSV: no header, every row "class 1..4","title","description".
    Any bad row stops the run with file:line and the reason; nothing is dropped silently."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise common.UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        content = decode_utf8(raw)
    except UnicodeDecodeError as err:
        raise common.UserError(f"{path}:{undecodable_line(err)}: bytes that are not UTF-8 "
                               f"({err.reason})") from None
    texts, labels = [], []
    # line ends as csv expects them
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    try:
        for row in reader:
            line = reader.line_num
            if len(row) != 3:
                raise common.UserError(f"{path}:{line}: expected 3 fields (class, title, "
                                       f"description), found {len(row)}")
            label, title, description = row
            if label.strip() not in {"1", "2", "3", "4"}:
                raise common.UserError(f"{path}:{line}: class must be 1, 2, 3 or 4, "
                                       f"found {label!r}")
            text = clean_text(f"{title} {description}")
            if not text:
                raise common.UserError(f"{path}:{line}: empty text (title and description are "
                                       f"both blank)")
            texts.append(text)
            labels.append(int(label) - 1)
    except csv.Error as err:
        raise common.UserError(f"{path}:{reader.line_num}: {csv_problem(err)}") from None
    if not texts:
        raise common.UserError(f"{path}: no rows")
    return Split(texts, np.array(labels, dtype=np.int64))


def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_ag_news(data_dir):
    """Fetch the release archive once, unpack and check it (test.csv's checksum, train.csv's row
    count) in a temp folder, and only then move the files into data_dir: a bad download leaves
    nothing behind that a later run would trust."""
    data_dir = Path(data_dir)
    print(f"AG News not found in {data_dir}; downloading {AGNEWS_URL}")
    with common.no_empty_folders_left(data_dir):
        data_dir.mkdir(parents=True, exist_ok=True)
        fetch_and_check_ag_news(data_dir)


def fetch_and_check_ag_news(data_dir):
    """download_ag_news's work, once data_dir exists."""
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        archive = Path(tmp) / "ag_news_csv.tgz"
        try:
            common.download(AGNEWS_URL, archive)
        except common.UserError:
            raise  # a full disk is no network trouble (common.CannotWrite is an OSError too)
        except OSError as err:
            raise common.UserError(
                f"cannot download AG News ({err}). Offline? Put the release's train.csv and "
                f"test.csv (headerless: \"class\",\"title\",\"description\") in {data_dir}/, "
                f"or point --data or $AGNEWS_DIR at a folder that has them") from None
        names = ("train.csv", "test.csv", "classes.txt")
        try:
            with tarfile.open(archive) as tar:
                contents = {name: tar.extractfile(f"ag_news_csv/{name}").read() for name in names}
        except (tarfile.TarError, KeyError, OSError) as err:
            raise common.UserError(f"{AGNEWS_URL}: not the AG News archive ({err})") from None
        for name, content in contents.items():
            try:  # apart from reading the archive: a full disk is not a bad archive
                (Path(tmp) / name).write_bytes(content)
            except OSError as err:
                raise common.cannot_write(data_dir / name, err, elsewhere="pass --data with a "
                                          "folder that holds the release's train.csv and "
                                          "test.csv") from None
        if md5_of(Path(tmp) / "test.csv") != AGNEWS_TEST_MD5:
            raise common.UserError(f"{AGNEWS_URL}: its test.csv differs from the official test set "
                                   f"(checksum)")
        if len(load_csv(Path(tmp) / "train.csv")) != AGNEWS_TRAIN_ROWS:
            raise common.UserError(f"{AGNEWS_URL}: its train.csv does not have "
                                   f"{AGNEWS_TRAIN_ROWS} rows")
        for name in names:
            os.replace(Path(tmp) / name, data_dir / name)


def find_data_dir(arg=None):
    """--data DIR, else $AGNEWS_DIR, else data/ag_news/ (downloaded there when missing)."""
    data_dir = Path(arg or os.environ.get("AGNEWS_DIR") or "data/ag_news")
    if not ((data_dir / "train.csv").exists() and (data_dir / "test.csv").exists()):
        if arg or os.environ.get("AGNEWS_DIR"):
            raise common.UserError(f"{data_dir}: needs train.csv and test.csv "
                                   f"(the AG News release's CSV files)")
        download_ag_news(data_dir)
    return data_dir


def stratified_indices(labels, size, seed):
    """Sorted indices of `size` rows with the class proportions of `labels` (sklearn's stratified
    split); all rows when size is None or too large."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    if size < common.NUM_CLASSES:
        raise common.UserError(f"a stratified sample needs at least {common.NUM_CLASSES} rows "
                               f"(one per class), got {size}")
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
    if size < common.NUM_CLASSES:
        raise common.UserError(f"a stratified sample needs at least {common.NUM_CLASSES} rows "
                               f"(one per class), got {size}")
    return split.subset(np.sort(nested_order(split.labels, seed)[:size]))


# How --val-size picks its rows: "nested" since runs record it in metrics.json; "sklearn" (an
# independent stratified sample per size) is how the runs before it were validated.
VAL_SAMPLING = "nested"


# The release's files as parsed, by (path, size, modification time): one process trains every seed
# of --seeds (and vote.py reads every member's rows) from the same files, and parsing train.csv is
# 0.7 s a time at 26,862 rows. Callers get subsets, which are copies, never these Splits.
_PARSED = {}


def load_csv_once(path):
    """load_csv, read again only when the file changed."""
    try:
        stat = Path(path).stat()
    except OSError:
        return load_csv(path)  # its one line says why
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _PARSED:
        _PARSED[key] = load_csv(path)
    return _PARSED[key]


def load_ag_news(data_dir=None, train_size=None, test_size=None, val_size=None,
                 val_sampling=VAL_SAMPLING):
    """train / val / test Splits. Test is the official test.csv; val is a fixed stratified 10% of
    train.csv, the same rows whatever --seed or --train-size, so every run's val_probs line up."""
    data_dir = find_data_dir(data_dir)
    full_train = load_csv_once(data_dir / "train.csv")
    test = load_csv_once(data_dir / "test.csv")
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
    names = [name.lower() for name in common.CLASS_NAMES]
    return names.index(field.lower()) if field.lower() in names else None


# A cases file's header: label,text, either name in quotes or not, any case, spaces around
HEADER = re.compile(r'\s*("?)label\1\s*,\s*("?)text\2\s*', re.IGNORECASE)


def read_cases(path):
    """A file of your own cases (vote.py --file, serve.py --file, cases/news_2020s.csv): one text a
    line, or, in a .csv file or one whose first line is the header `label,text`, CSV rows
    `label,text` (label 1..4 or a class name). The file's name or header decides, not a guess from
    its first text: "1,000 jobs cut" is a text, not label 1. In a .csv file, lines starting with #
    at the top are the file's comment (in a text file a # headline is a text); blank lines are
    skipped. Lines end at \n (\r\n too); an old Mac file, ending lines with \r alone, reads as
    one line. Returns [(label or None, text)]."""
    path = Path(path)
    try:
        # Split at \n only: str.splitlines also splits at U+2028, \x85, \x0c and more, which turn
        # up inside headlines copied from web pages, and would cut one case in two.
        lines = [line.removesuffix("\r") for line in decode_utf8(path.read_bytes()).split("\n")]
    except OSError as err:
        raise common.UserError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise common.UserError(f"{path}:{undecodable_line(err)}: bytes that are not "
                               f"UTF-8") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    while path.suffix.lower() == ".csv" and numbered and numbered[0][1].lstrip().startswith("#"):
        numbered = numbered[1:]  # a CSV file's opening comment: how it was made
    if not numbered:
        raise common.UserError(f"{path}: no texts")
    # Not through csv: a text file's first line may be any text (a 1 MB one, a stray quote), and
    # the csv module would stop on it before we know whether the file is CSV at all.
    header = HEADER.fullmatch(numbered[0][1]) is not None
    labelled = header or path.suffix.lower() == ".csv"
    if header:
        numbered = numbered[1:]
        if not numbered:
            raise common.UserError(f"{path}: only the header label,text; no texts below it")

    cases = []
    for n, line in numbered:
        label, text = None, line
        if labelled:
            try:
                # a lone \r is a line break only to splitlines; in a case it is a space (as
                # clean_text makes it), and csv would refuse it outside quotes
                fields = next(csv.reader([line.replace("\r", " ")], strict=True))
            except csv.Error as err:
                raise common.UserError(f"{path}:{n}: {csv_problem(err)}") from None
            label = parse_label(fields[0]) if len(fields) >= 2 else None
            if label is None:
                raise common.UserError(f"{path}:{n}: expected label,text with label 1..4 or one of "
                                       f"{', '.join(common.CLASS_NAMES)}, found {line[:60]!r}")
            text = ",".join(fields[1:])  # an unquoted text with commas arrives in pieces
        text = clean_text(text)
        if not text:
            raise common.UserError(f"{path}:{n}: empty text")
        cases.append((label, text))
    return cases


def load_cases(path=None):
    """Today's news (cases/news_2020s.csv, 400 labelled rows of 2020-2025 that we wrote), a second
    test set every finished run scores: a Split, ids its row numbers in the file."""
    path = Path(path) if path else CASES_FILE
    cases = read_cases(path)
    if any(label is None for label, _ in cases):
        raise common.UserError(f"{path}: every case needs a label to be a test set "
                               f"(label,text rows)")
    return Split([text for _, text in cases], np.array([label for label, _ in cases]))
