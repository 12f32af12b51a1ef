"""accuracy.sh, issue 21's runs in stages: on a tiny random BERT and a few rows every stage trains
what it names (the student's teacher is the vote of the control's seeds), and run again it trains
nothing (checked on the stage with a vote and a teacher; its training runs go through the same
run() as every stage's). What is tested is the script, not the accuracy: tests/test_distill.py,
test_fewsample.py and test_rdrop.py test the methods."""
import os
import subprocess
from pathlib import Path

import pytest

import common
from plumbing import runfolders
from conftest import AGNEWS_DIR, needs_rows, tiny_bert_folder

ROOT = Path(__file__).resolve().parents[1]
# after the stage's own flags (argparse takes the last): 64 labelled rows, 64 unlabelled ones
TINY = ("--train-size 64 --val-size 120 --test-size 120 --max-len 32 --batch-size 16 "
        "--unlabeled 64")
STAGES = {
    "schedule": ["pooler_e1", "pooler_e3", "pooler_e5", "pooler_e10"],
    "methods": ["pooler_e1_warmup0", "pooler_e1_warmup0.2", "pooler_e1_lr1e-4", "pooler_e1_llrd0.9",
                "pooler_e1_reinit2", "pooler_e1_rdrop1"],
    "heads": ["mean_e1", "mlp_res_e1", "textcnn_e1", "lora_r8_e1"],
    "distill": ["ensemble_e1", "student_e1", "unlabeled8000_soft", "unlabeled8000_pseudo0.9",
                "unlabeled8000_soft_eda1"],
    "large": ["pooler_24k_e2", "pooler_24k_e3", "pooler_24k_e4", "ensemble_24k",
              "ensemble_24k_pooler9", "student_24k_e2"],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-layer BERT of hidden size 32 with MiniLM's vocabulary (--reinit-top 2 needs a layer
    below the two), as a --model folder."""
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_model"), num_layers=3)


def accuracy(tmp_path, stage, **settings):
    """bash accuracy.sh STAGE, its runs under tmp_path/acc, the settings as its environment
    (AGNEWS_DIR: the tests' rows unless a setting names another; no LENGTH_60K unless given)."""
    env = {**os.environ, "AGNEWS_DIR": str(AGNEWS_DIR), "ROOT": str(tmp_path / "acc")}
    env.pop("LENGTH_60K", None)
    env.update({name: str(value) for name, value in settings.items()})
    return subprocess.run(["bash", str(ROOT / "accuracy.sh"), stage], env=env,
                          capture_output=True, text=True, cwd=ROOT)


def tiny(tmp_path, model, stage):
    """The settings that make a stage's runs tiny: 2 seeds, 1 epoch, the model and TINY's rows
    (--unlabeled only where a teacher speaks for the rows: the other stages refuse it)."""
    extra = TINY if stage == "distill" else TINY.rsplit(" --unlabeled", 1)[0]
    return {"SEEDS": "0,1", "EPOCHS": "1", "MEDIUM": tmp_path / "acc",
            "ENSEMBLE_EXP": "pooler_e1", "EXTRA": f"{extra} --model {model}"}


@needs_rows
def test_every_stage_runs_then_resumes_to_nothing(tmp_path, tiny_model):
    root = tmp_path / "acc"
    for stage, names in STAGES.items():
        done = accuracy(tmp_path, stage, **tiny(tmp_path, tiny_model, stage))
        assert done.returncode == 0, stage + done.stdout[-3000:] + done.stderr[-3000:]
        for name in names:
            runs = [root / name] if name.startswith("ensemble") else \
                [root / name / f"seed{seed}" for seed in (0, 1)]
            assert all(runfolders.is_finished(run) for run in runs), name
    config = common.load_json(root / "pooler_e1_llrd0.9" / "seed0" / "config.json")["args"]
    assert (config["llrd"], config["lr"]) == (0.9, 1e-4)
    assert common.load_json(root / "pooler_e1_warmup0.2" / "seed0" / "config.json")["args"][
        "warmup"] == 0.2
    assert common.load_json(root / "pooler_e10" / "seed1" / "config.json")["args"]["epochs"] == 10
    student = common.load_json(root / "student_e1" / "seed0" / "config.json")["args"]
    assert Path(student["teacher"]) == root / "ensemble_e1"
    pseudo = common.load_json(root / "unlabeled8000_pseudo0.9" / "seed0" / "config.json")["args"]
    assert pseudo["pseudo_threshold"] == 0.9
    noisy = common.load_json(root / "unlabeled8000_soft_eda1" / "seed1" / "config.json")["args"]
    assert (noisy["eda"], noisy["eda_n"], noisy["unlabeled"]) == (True, 1, 64)
    assert common.load_json(root / "unlabeled8000_soft_eda1" / "seed1" / "metrics.json")["rows"][
        "train"] == 2 * (64 + 64)
    assert common.load_json(root / "mean_e1" / "seed1" / "config.json")["args"]["head"] == "mean"
    assert common.load_json(root / "lora_r8_e1" / "seed0" / "config.json")["args"]["r"] == 8
    # the 24k student's teacher votes the seeds of 2, 3 and 4 epochs (2 seeds each here)
    members = common.load_json(root / "ensemble_24k_pooler9" / "metrics.json")["weights"]
    assert sorted(Path(m).relative_to(root).parts[0] for m in members) == sorted(
        f"pooler_24k_e{e}" for e in (2, 3, 4) for _ in (0, 1))
    student = common.load_json(root / "student_24k_e2" / "seed1" / "config.json")["args"]
    assert (Path(student["teacher"]), student["epochs"]) == (root / "ensemble_24k_pooler9", 2)

    mtimes = {p: p.stat().st_mtime for p in root.rglob("metrics.json")}
    again = accuracy(tmp_path, "distill", **tiny(tmp_path, tiny_model, "distill"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes            # nothing trained again


def test_an_unknown_stage_gets_one_line(tmp_path):
    done = accuracy(tmp_path, "everything")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "usage: bash accuracy.sh" in done.stderr


def data_folder(tmp_path, lines):
    """A folder whose train.csv has `lines` lines: all the 60k stages read of it before training."""
    folder = tmp_path / f"rows{lines}"
    folder.mkdir()
    (folder / "train.csv").write_text("label,text\n" + "1,a\n" * (lines - 1))
    return folder


def stage_60k(tmp_path, stage, folder, length):
    chosen = {} if length is None else {"LENGTH_60K": length}
    return accuracy(tmp_path, stage, AGNEWS_DIR=folder, LARGE=tmp_path / "large", **chosen)


@pytest.mark.parametrize("stage", ["60k", "60k-heads"])
def test_the_60k_stages_refuse_a_folder_of_fewer_rows(tmp_path, stage):
    for folder in (data_folder(tmp_path, 59_999), tmp_path / "no_such_folder"):
        done = stage_60k(tmp_path, stage, folder, "2")
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert f"accuracy.sh {stage}: {folder}/train.csv has" in done.stderr
        assert "ag_news_67k" in done.stderr
    assert not list(tmp_path.glob("acc/*/seed0"))                        # nothing trained


@pytest.mark.parametrize("length, says", [
    (None, "set LENGTH_60K to the epochs (1, 2 or 3)"),
    ("4", "set LENGTH_60K to the epochs (1, 2 or 3)"),
    ("2", "pooler_60k_e2/seed0 has not finished"),
    ("1", "large/bert_pooler/seed0 has not finished"),
])
def test_the_60k_heads_ask_for_a_chosen_length_and_finished_pooler_runs(tmp_path, length, says):
    """Before hours of training: the length chosen on validation, and the pooler seeds at it."""
    done = stage_60k(tmp_path, "60k-heads", data_folder(tmp_path, 60_000), length)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr
