"""Fixtures shared by several test files."""
import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

# Tests run on CPU, where the Triton kernels run under the interpreter. Triton reads this when a
# kernel is defined, so it must be set before any test module imports fused_kernels/ (some do
# through plumbing/classifiers.py, for the attnpool head), whatever order the files run in.
os.environ["TRITON_INTERPRET"] = "1"


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import bert  # noqa: E402
import common  # noqa: E402
from plumbing import runfolders  # noqa: E402


def find_rows():
    """(folder, None) where the AG News rows are (as the scripts find them: $AGNEWS_DIR, else
    data/ag_news; never downloaded here), or (None, why not)."""
    folder = Path(os.environ.get("AGNEWS_DIR") or "data/ag_news")
    if (folder / "train.csv").exists() and (folder / "test.csv").exists():
        return folder, None
    return None, ("needs AG News rows: set AGNEWS_DIR to a folder with train.csv and test.csv "
                  f"({folder})")


AGNEWS_DIR, NO_ROWS = find_rows()
# Tests that read real rows carry this mark; without rows only they skip, with the reason. The BERT,
# LoRA, kernel, loop and EDA-op tests make their own rows and run anywhere.
needs_rows = pytest.mark.skipif(AGNEWS_DIR is None, reason=NO_ROWS or "")


def pytest_sessionstart(session):
    """CI (.ci/run sets AGNEWS_LAB_REQUIRE_ROWS=1) runs every test: there, missing rows stop the run
    in one line instead of skipping a third of the suite."""
    if AGNEWS_DIR is None and os.environ.get("AGNEWS_LAB_REQUIRE_ROWS") == "1":
        pytest.exit(f"AGNEWS_LAB_REQUIRE_ROWS=1: the suite {NO_ROWS}", returncode=4)


def made_up_rows(count, seed, vocab_size=30522, min_len=4, max_len=32):
    """An Encoded split of `count` rows of random token ids ([CLS] ... [SEP], lengths min_len to
    max_len) and balanced labels 0..3: what the loop, LoRA and kernel tests train on, so they need
    no AG News rows."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        middle = torch.randint(1000, vocab_size, (length - 2,), generator=g).tolist()
        ids.append(np.array([101, *middle, 102], dtype=np.int64))
    labels = (np.arange(count) % common.NUM_CLASSES)[torch.randperm(count, generator=g).numpy()]
    return common.Encoded(ids, labels.astype(np.int64))


# A finished train_lstm.py run small enough to train in a few seconds on a CPU, yet one that has
# learned something (about 0.6 test accuracy): word vocabulary, 1,000 training rows, 3 epochs.
TINY_LSTM_ARGS = ["--arch", "bilstm_attn", "--train-size", "1000", "--val-size", "200",
                  "--test-size", "200", "--epochs", "3", "--batch-size", "32", "--lr", "1e-2",
                  "--embed-dim", "48", "--hidden-size", "48", "--max-len", "48", "--device", "cpu"]


def save_bert_folder(encoder, folder):
    """A bert.BertModel as a --model folder: config.json, model.safetensors under HuggingFace's key
    names and MiniLM's vocab.txt (its vocab_size must be MiniLM's 30,522). Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    names = bert.hf_names(encoder.config.num_hidden_layers)
    common.save_weights(folder / "model.safetensors",
                        {names[k]: v for k, v in encoder.state_dict().items()})
    (folder / "config.json").write_text(json.dumps({"model_type": "bert",
                                                    **dataclasses.asdict(encoder.config)}))
    shutil.copy(common.resolve_model("minilm") / "vocab.txt", folder / "vocab.txt")
    return folder


def tiny_bert_folder(folder, num_layers):
    """A random BERT of hidden size 32 (2 heads, MLP 64) and num_layers layers with MiniLM's
    vocabulary, drawn from seed 0, as a --model folder (save_bert_folder). Returns the folder."""
    torch.manual_seed(0)
    config = bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=num_layers,
                             num_attention_heads=2, intermediate_size=64)
    return save_bert_folder(bert.BertModel(config), folder)


class Killed(Exception):
    """Stands for the process being killed, in the tests that resume a run cut short."""


def die_after_epoch_1(monkeypatch):
    """From now on common.save_weights raises Killed right after writing the epoch-1 resume point:
    the run is cut exactly where a kill after that write would cut it."""
    save_weights = common.save_weights

    def save_then_die(path, tensors, metadata=None):
        save_weights(path, tensors, metadata)
        if (Path(path).name == runfolders.RESUME_FILE
                and json.loads(metadata["progress"])["epoch"] == 1):
            raise Killed
    monkeypatch.setattr(common, "save_weights", save_then_die)


@contextlib.contextmanager
def single_thread():
    """A small LSTM runs one time step after another, each a tiny matrix product: split over
    threads, the steps spend longer waiting for each other than computing (5x slower on a busy
    2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_cpu_thread():
    """torch on one CPU thread for the test, as it was afterwards."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_lstm_run(tmp_path_factory):
    """Path of a finished tiny bilstm_attn run (config.json, model.safetensors, tokenizer.json,
    metrics.json, val_probs.npy, test_probs.npy). Shared by the session: treat it as read-only."""
    import train_lstm
    if AGNEWS_DIR is None:
        pytest.skip(NO_ROWS)
    run_dir = tmp_path_factory.mktemp("runs") / "bilstm_attn"
    with single_thread():
        train_lstm.main([*TINY_LSTM_ARGS, "--data", str(AGNEWS_DIR), "--out", str(run_dir)])
    return run_dir
