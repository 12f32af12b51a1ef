"""run.py and the run folders it claims: two runs started at the same instant on one folder, and
the folders a failed start leaves (none)."""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
from plumbing import runfolders

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 20

# Each of two processes claims the same folders, one per round; a round starts for both when its
# go file appears, which they watch in a busy loop, so both reach the claim within microseconds.
CLAIMER = """
import argparse, os, sys
sys.path.insert(0, {root!r})
import common
from plumbing import runfolders
print("ready", flush=True)
for k in range({rounds}):
    go = os.path.join({folder!r}, f"go{{k}}")
    while not os.path.exists(go):
        pass
    args = argparse.Namespace(out=os.path.join({folder!r}, f"run{{k}}"), resume=False)
    try:
        runfolders.prepare_run_dir(args, "x")
        print(k, "claimed", flush=True)
    except common.UserError as err:
        print(k, "refused", err, flush=True)
"""


def test_two_runs_started_at_the_same_instant_get_one_folder_once(tmp_path):
    """20 rounds of two processes claiming one fresh folder at the same moment: each round exactly
    one gets it and the other is refused in one line. (Checking for an empty folder and then
    creating it let both through: both wrote, and one's results were lost.)"""
    script = CLAIMER.format(root=str(ROOT), rounds=ROUNDS, folder=str(tmp_path))
    claimers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for claimer in claimers:
        assert claimer.stdout.readline().strip() == "ready"
    for k in range(ROUNDS):
        (tmp_path / f"go{k}").touch()
        time.sleep(0.05)
    outputs = [claimer.communicate(timeout=60) for claimer in claimers]
    for claimer, (out, err) in zip(claimers, outputs):
        assert claimer.returncode == 0, err
    lines = [line.split(" ", 2) for out, _ in outputs for line in out.splitlines()]
    for k in range(ROUNDS):
        results = sorted(line[1] for line in lines if line[0] == str(k))
        assert results == ["claimed", "refused"], (k, results)
        [refusal] = [line[2] for line in lines if line[0] == str(k) and line[1] == "refused"]
        # The loser either lost the exclusive create, or came a moment later and found the claim.
        assert refusal.startswith((f"{tmp_path / f'run{k}'} was taken by another run started at "
                                   f"the same time (pid ",
                                   f"{tmp_path / f'run{k}'} already holds a run")), refusal


def test_a_failed_start_leaves_no_folder_and_no_claim(tmp_path):
    """The claim is the first thing in a new folder; a run that then fails before anything was
    trained (no resume point yet: only a tokenizer.json, say) takes the folder back, so the
    corrected command is not told the folder holds a run. A folder with a resume point is kept,
    and a claim of another process's is never removed."""
    out = tmp_path / "runs" / "x"
    args = argparse.Namespace(out=str(out), resume=False)
    with pytest.raises(common.UserError, match="bad data"):
        with runfolders.no_half_made_run_left(out):
            runfolders.prepare_run_dir(args, "x")
            assert (out / runfolders.CLAIM_FILE).exists()
            (out / "tokenizer.json").write_text("{}")
            raise common.UserError("bad data")
    assert not (tmp_path / "runs").exists()
    assert runfolders.prepare_run_dir(args, "x") == out  # the corrected command gets the folder

    trained = tmp_path / "trained"
    with pytest.raises(KeyboardInterrupt):
        with runfolders.no_half_made_run_left(trained):
            runfolders.prepare_run_dir(argparse.Namespace(out=str(trained), resume=False), "x")
            (trained / runfolders.RESUME_FILE).write_bytes(b"epoch 1")
            raise KeyboardInterrupt
    assert (trained / runfolders.RESUME_FILE).exists()

    other = tmp_path / "other"
    with pytest.raises(common.UserError):
        with runfolders.no_half_made_run_left(other):
            other.mkdir()
            (other / runfolders.CLAIM_FILE).write_text('{"pid": 1}')  # as if another claimed it
            raise common.UserError("bad data")
    assert (other / runfolders.CLAIM_FILE).exists()


def test_a_claimed_folder_is_taken_and_resume_needs_no_claim(tmp_path):
    out = tmp_path / "x"
    runfolders.prepare_run_dir(argparse.Namespace(out=str(out), resume=False), "x")
    with pytest.raises(common.UserError, match="already holds a run: pass --resume"):
        runfolders.prepare_run_dir(argparse.Namespace(out=str(out), resume=False), "x")
    assert runfolders.default_run_dir("x", root=tmp_path) == tmp_path / "x-2"
    assert runfolders.prepare_run_dir(argparse.Namespace(out=str(out), resume=True), "x") == out
