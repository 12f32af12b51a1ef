"""The shared training loop end to end on real AG News rows: every head learns, a killed-and-resumed
run ends exactly where an uninterrupted one does, and a saved run reloads to the same
probabilities."""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import loop
from plumbing import agnews, classifiers, run, runfolders
from conftest import AGNEWS_DIR, needs_rows

pytestmark = needs_rows  # every test here trains on, or reloads, real AG News rows
ROOT = Path(__file__).resolve().parents[1]
CPU = common.Runtime(torch.device("cpu"))


def train_args(**overrides):
    parser = run.add_common_args(argparse.ArgumentParser(), lr=1e-4, epochs=2)
    classifiers.add_bert_args(parser)
    args = parser.parse_args([])
    for key, value in {"batch_size": 16, "max_len": 64, **overrides}.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def sample():
    """A small stratified sample, tokenized once for every test here."""
    splits = agnews.load_ag_news(AGNEWS_DIR, train_size=320, val_size=80, test_size=200)
    tokenizer = common.load_tokenizer(common.resolve_model("minilm"))
    return splits, common.encode_splits(tokenizer, splits, 64)


def small_classifier(head, **head_kwargs):
    """MiniLM cut to its first 3 layers: the same pretrained weights, twice as fast to train."""
    model, _ = classifiers.build_bert_classifier({"model": "minilm", "head": head, "dropout": 0.1})
    model.bert.layers = model.bert.layers[:3]
    return model


@pytest.mark.parametrize("head", classifiers.HEAD_NAMES)
def test_each_head_learns(tmp_path, sample, head):
    torch.manual_seed(0)
    splits, data = sample
    model = small_classifier(head)
    loop.train(model, data, train_args(lr=3e-4, epochs=3), CPU, tmp_path)
    test = common.evaluate(common.predict(model, data["test"], CPU), data["test"].labels)
    assert test["accuracy"] > 0.6, (f"{head}: test accuracy {test['accuracy']:.3f} on 200 rows "
                                    "(chance 0.25)")


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    """Kill a real 2-epoch run (SIGKILL) as soon as its epoch-1 resume point exists, resume it, and
    compare with a run that was never interrupted: same history, same test probabilities."""
    def command(run_dir, *extra):
        return [sys.executable, str(ROOT / "train_bert.py"), "--head", "fc", "--train-size", "160",
                "--val-size", "40", "--test-size", "80", "--epochs", "2", "--max-len", "48",
                "--out", str(run_dir), "--data", str(AGNEWS_DIR), *extra]

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None and not (killed / runfolders.RESUME_FILE).exists():
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    _, metadata = common.load_weights(killed / runfolders.RESUME_FILE, with_metadata=True)
    assert json.loads(metadata["progress"])["epoch"] == 1
    changed = subprocess.run(command(killed, "--resume", "--lr", "1e-3"), capture_output=True,
                             text=True, cwd=ROOT)
    assert changed.returncode == 2 and ("the run was started with other flags "
                                        "(lr: 5e-05 then, 0.001 now)" in changed.stderr)
    subprocess.run(command(killed, "--resume"), check=True, capture_output=True, cwd=ROOT)

    whole, resumed = (json.loads((d / "metrics.json").read_text())
                      for d in (tmp_path / "whole", killed))
    for a, b in zip(whole["history"], resumed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert whole["test"] == pytest.approx(resumed["test"], abs=1e-6)
    assert np.abs(np.load(tmp_path / "whole" / "test_probs.npy")
                  - np.load(killed / "test_probs.npy")).max() < 1e-5


def test_cli_run_round_trips_and_refuses_to_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train_bert.py"), "--head", "fc", "--train-size", "160",
           "--val-size", "40", "--test-size", "80", "--epochs", "1", "--max-len", "48",
           "--out", str(run_dir), "--data", str(AGNEWS_DIR)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    for name in ("config.json", "model.safetensors", "metrics.json", "val_probs.npy",
                 "test_probs.npy"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "resume.safetensors").exists()
    saved = np.load(run_dir / "test_probs.npy")
    assert saved.dtype == np.float32 and saved.shape == (80, 4)
    assert np.allclose(saved.sum(1), 1, atol=1e-5)

    model, tokenizer, config = runfolders.load_run(run_dir)
    splits = agnews.load_ag_news(AGNEWS_DIR, 160, 80, 40)
    assert (splits["test"].fingerprint()
            == json.loads((run_dir / "metrics.json").read_text())["fingerprints"]["test"])
    test = common.Encoded(common.encode(tokenizer, splits["test"].texts, config["max_len"]),
                          splits["test"].labels)
    assert np.abs(common.predict(model, test, CPU) - saved).max() < 1e-5

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"error: {run_dir} already holds a run: "
                                                 "pass --resume to continue it, or --out to "
                                                 "choose another folder"]
