"""Fixtures shared by several test files."""
import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

# Tests run on CPU, where the Triton kernels run under the interpreter. Triton reads this when a
# kernel is defined, so it must be set before any test module imports kernels/ (some do through
# common.py's attnpool head), whatever order the files run in.
os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


def pytest_sessionstart(session):
    """Before any test module is imported: find the AG News rows the tests read (as the scripts find
    them: $AGNEWS_DIR, else data/ag_news), or stop with one line that says where they must be."""
    try:
        common.find_data_dir()
    except common.UserError as err:
        pytest.exit(f"the tests read real AG News rows: set AGNEWS_DIR to a folder with the release's "
                    f"train.csv and test.csv ({err})", returncode=4)


# A finished train_lstm.py run small enough to train in a few seconds on a CPU, yet one that has
# learned something (about 0.6 test accuracy): word vocabulary, 1,000 training rows, 3 epochs.
TINY_LSTM_ARGS = ["--arch", "bilstm_attn", "--train-size", "1000", "--val-size", "200", "--test-size", "200",
                  "--epochs", "3", "--batch-size", "32", "--lr", "1e-2", "--embed-dim", "48", "--hidden-size", "48",
                  "--max-len", "48", "--device", "cpu"]


def save_bert_folder(bert, folder):
    """A common.BertModel as a --model folder: config.json, model.safetensors under HuggingFace's key
    names and MiniLM's vocab.txt (its vocab_size must be MiniLM's 30,522). Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    names = common.hf_names(bert.config.num_hidden_layers)
    common.save_weights(folder / "model.safetensors", {names[k]: v for k, v in bert.state_dict().items()})
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **dataclasses.asdict(bert.config)}))
    shutil.copy(common.resolve_model("minilm") / "vocab.txt", folder / "vocab.txt")
    return folder


class Killed(Exception):
    """Stands for the process being killed, in the tests that resume a run cut short."""


def die_after_epoch_1(monkeypatch):
    """From now on common.save_weights raises Killed right after writing the epoch-1 resume point: the
    run is cut exactly where a kill after that write would cut it."""
    save_weights = common.save_weights

    def save_then_die(path, tensors, metadata=None):
        save_weights(path, tensors, metadata)
        if Path(path).name == common.RESUME_FILE and json.loads(metadata["progress"])["epoch"] == 1:
            raise Killed
    monkeypatch.setattr(common, "save_weights", save_then_die)


@contextlib.contextmanager
def single_thread():
    """A small LSTM runs one time step after another, each a tiny matrix product: split over threads,
    the steps spend longer waiting for each other than computing (5x slower on a busy 2-core box)."""
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
    run_dir = tmp_path_factory.mktemp("runs") / "bilstm_attn"
    with single_thread():
        train_lstm.main([*TINY_LSTM_ARGS, "--data", str(common.find_data_dir()), "--out", str(run_dir)])
    return run_dir
