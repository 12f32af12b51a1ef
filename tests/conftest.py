"""Fixtures shared by several test files."""
import contextlib
import os

# Tests run on CPU, where the Triton kernels run under the interpreter. Triton reads this when a
# kernel is defined, so it must be set before any test module imports kernels/ (some do through
# common.py's attnpool head), whatever order the files run in.
os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402

AGNEWS_DIR = common.find_data_dir()  # --data, $AGNEWS_DIR or data/ag_news, as the scripts find it

# A finished train_lstm.py run small enough to train in a few seconds on a CPU, yet one that has
# learned something (about 0.6 test accuracy): word vocabulary, 1,000 training rows, 3 epochs.
TINY_LSTM_ARGS = ["--arch", "bilstm_attn", "--train-size", "1000", "--val-size", "200", "--test-size", "200",
                  "--epochs", "3", "--batch-size", "32", "--lr", "1e-2", "--embed-dim", "48", "--hidden-size", "48",
                  "--max-len", "48", "--device", "cpu", "--data", str(AGNEWS_DIR)]


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
        train_lstm.main([*TINY_LSTM_ARGS, "--out", str(run_dir)])
    return run_dir
