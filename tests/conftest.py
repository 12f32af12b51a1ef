"""Fixtures shared by several test files."""
import os
from pathlib import Path

import pytest

AGNEWS_DIR = Path(os.environ.get("AGNEWS_DIR", "../shared/data/ag_news"))

# A finished train_lstm.py run small enough to train in a few seconds on a CPU, yet one that has
# learned something (about 0.6 test accuracy): word vocabulary, 1,000 training rows, 3 epochs.
TINY_LSTM_ARGS = ["--arch", "bilstm_attn", "--train-size", "1000", "--val-size", "200", "--test-size", "200",
                  "--epochs", "3", "--batch-size", "32", "--lr", "1e-2", "--embed-dim", "48", "--hidden-size", "48",
                  "--max-len", "48", "--device", "cpu", "--data", str(AGNEWS_DIR)]


@pytest.fixture(scope="session")
def tiny_lstm_run(tmp_path_factory):
    """Path of a finished tiny bilstm_attn run (config.json, model.safetensors, tokenizer.json,
    metrics.json, val_probs.npy, test_probs.npy). Shared by the session: treat it as read-only."""
    import train_lstm
    run_dir = tmp_path_factory.mktemp("runs") / "bilstm_attn"
    train_lstm.main([*TINY_LSTM_ARGS, "--out", str(run_dir)])
    return run_dir
