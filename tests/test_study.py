"""study.sh, the study's table in one command: on a few rows and two seeds it trains every
experiment, votes seed k with seed k, scores each on today's news, writes the comparison with its
columns; run again, it trains nothing; it stops at a failure. The whole run takes the medium preset
(quick's code paths with other sizes), the failure quick's."""
import os
import subprocess
from pathlib import Path

import pytest

import common
from plumbing import agnews, runfolders
from conftest import AGNEWS_DIR, needs_rows, tiny_bert_folder

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"bert_pooler", "bert_fc", "bert_lstm", "bert_textcnn", "bert_mlp_res",
               "bert_attnpool", "bert_attnpool_penalty", "lora_r8", "lstm", "bilstm_attn",
               "vote_bilstm_attn+lora"}
# Flags after the preset's own win (argparse takes the last): a tiny study on a tiny random BERT, so
# that what is tested is the script (every step, seeds, resumption), not MiniLM's speed.
TINY = "--train-size 64 --val-size 120 --test-size 120 --max-len 32 --batch-size 16"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 1-layer BERT of hidden size 32 with MiniLM's vocabulary, as a --model folder."""
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_model"), num_layers=1)


def study(tmp_path, model, extra=TINY, preset="quick", jobs=1):
    """study.sh PRESET on the rows conftest found; without rows, $AGNEWS_DIR is left as it was
    (enough for a study that fails on its first flags, before any run reads rows). jobs > 1: that
    many runs at once (the GPU preset's way), each on one thread so they share the cores."""
    rows = {"AGNEWS_DIR": str(AGNEWS_DIR)} if AGNEWS_DIR is not None else {}
    env = {**os.environ, **rows, "ROOT": str(tmp_path / "study"), "SEEDS": "0,1",
           "EXTRA": f"{extra} --model {model}", "JOBS": str(jobs)}
    if jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(["bash", str(ROOT / "study.sh"), preset], env=env, capture_output=True,
                          text=True, cwd=ROOT)


@needs_rows
def test_the_study_runs_whole_then_resumes_to_nothing(tmp_path, tiny_model):
    """Two runs at a time, as the GPU preset runs them: the tiny runs are mostly Python's start-up
    (4 s of imports each), which one core does as fast as two."""
    done = study(tmp_path, tiny_model, preset="medium", jobs=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = tmp_path / "study"
    cases = agnews.load_cases()
    for name in EXPERIMENTS:
        for seed in (0, 1):
            run = root / name / f"seed{seed}"
            assert runfolders.is_finished(run), f"{name}/seed{seed}"
            assert runfolders.load_cases_probs(run, cases) is not None, f"{name}/seed{seed}: cases"
    assert (root / "bert_pooler" / "seed0" / "config.json").exists()
    assert common.load_json(root / "lstm" / "seed0" / "config.json")["args"]["epochs"] == 5
    table = (root / "compare.md").read_text().splitlines()
    assert (len([line for line in table if line.startswith("| ") and "---" not in line])
            == 1 + len(EXPERIMENTS))
    assert (root / "compare.png").exists() and (root / "compare.csv").exists()
    assert "baseline" in next(line for line in table if line.startswith("| bert_pooler |"))
    assert "today's news macro F1" in table[0]
    cases_cells = [line.split("|")[-4].strip() for line in table[2:] if line.startswith("| ")]
    assert len(cases_cells) == len(EXPERIMENTS) and "-" not in cases_cells

    mtimes = {p: p.stat().st_mtime for p in root.rglob("metrics.json") if "vote" not in str(p)}
    again = study(tmp_path, tiny_model, preset="medium", jobs=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes          # nothing trained again
    assert "is finished, kept" in (root / "logs" / "bert_pooler.log").read_text()


def test_the_study_stops_at_the_first_failure(tmp_path, tiny_model):
    done = study(tmp_path, tiny_model, extra=TINY + " --no-such-flag")
    assert done.returncode != 0
    assert "FAILED: bert_pooler" in done.stderr
    assert not (tmp_path / "study" / "bert_fc").exists()
