"""A newcomer's first hour: the README's main command can be typed twice, long loops show progress
in a log, --help shows every default, and a failed start leaves nothing behind."""
import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import train_lora
from plumbing import run, runfolders
from conftest import AGNEWS_DIR, needs_rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_bert", "train_lora", "train_lstm", "vote", "analyze", "export", "serve"]


@needs_rows
def test_the_main_command_runs_twice_into_two_folders(tmp_path):
    """README's first command (here on fewer rows) typed twice: two run folders, numbered as other
    training tools number theirs; an explicit --out still refuses to overwrite. Output goes to a
    pipe, as in a log file, so the scoring loop prints plain progress lines there."""
    command = [sys.executable, str(ROOT / "train_lora.py"), "--r", "8", "--quick",
               "--train-size", "48", "--val-size", "40", "--test-size", "300", "--max-len", "32",
               "--device", "cpu"]
    env = {**os.environ, "AGNEWS_DIR": str(AGNEWS_DIR), "AGNEWS_PROGRESS_EVERY_S": "0"}
    outputs = [subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
               for _ in range(2)]
    for done in outputs:
        assert done.returncode == 0, done.stderr[-2000:]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["lora_r8_pooler", "lora_r8_pooler-2"]
    for run_dir in runs.iterdir():
        assert runfolders.is_finished(run_dir)
    assert "saved runs/lora_r8_pooler-2/" in outputs[1].stdout
    # A line now and then while 300 test rows are scored (every batch of 128 here, as the
    # interval is 0).
    assert "scoring test: 128/300 rows (43%)" in outputs[0].stdout

    again = subprocess.run([*command, "--out", "runs/lora_r8_pooler"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == ["error: runs/lora_r8_pooler already holds a run: "
                                                 "pass --resume to continue it, or --out to "
                                                 "choose another folder"]


def test_run_folders_are_numbered_and_resume_takes_the_newest(tmp_path):
    root = tmp_path / "runs"
    assert runfolders.default_run_dir("x", root=root) == root / "x"
    (root / "x").mkdir(parents=True)
    assert runfolders.default_run_dir("x", root=root) == root / "x"       # an empty folder is free
    (root / "x" / "config.json").write_text("{}")
    for k in (2, 3, 10):
        (root / f"x-{k}").mkdir()
        (root / f"x-{k}" / "config.json").write_text("{}")
    (root / "x-old").mkdir()                                           # not one of ours: ignored
    assert runfolders.default_run_dir("x", root=root) == root / "x-4"
    assert runfolders.default_run_dir("x", resume=True, root=root) == root / "x-10"
    with pytest.raises(common.UserError, match="no .*y to resume"):
        runfolders.default_run_dir("y", resume=True, root=root)


def test_seeds_make_one_ordinary_run_folder_per_seed(tmp_path, monkeypatch):
    """--seeds trains once per seed into <out>/seed<k>/ with that seed; a finished seed is kept."""
    trained = []

    def train_one(args):
        trained.append((args.seed, args.out))
        Path(args.out).mkdir(parents=True)
        (Path(args.out) / "metrics.json").write_text("{}")

    parser = argparse.ArgumentParser()
    run.add_common_args(parser, lr=1e-3, epochs=1)
    args = parser.parse_args(["--seeds", "3,1", "--out", str(tmp_path / "exp")])
    run.run_each_seed(args, "exp", train_one)
    assert trained == [(3, str(tmp_path / "exp" / "seed3")), (1, str(tmp_path / "exp" / "seed1"))]
    trained.clear()
    run.run_each_seed(parser.parse_args(["--seeds", "1,2", "--out", str(tmp_path / "exp")]),
                      "exp", train_one)
    assert trained == [(2, str(tmp_path / "exp" / "seed2"))]
    for bad in ("1,,2", "a", "1,1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seeds", bad])


@needs_rows
def test_seeds_end_to_end_give_runs_that_differ_only_in_the_seed(tmp_path):
    import train_lstm
    from conftest import TINY_LSTM_ARGS, single_thread
    args = [a if a != "1000" else "200" for a in TINY_LSTM_ARGS]
    args[args.index("--epochs") + 1] = "1"
    with single_thread():
        train_lstm.main([*args, "--data", str(AGNEWS_DIR), "--seeds", "0,1",
                         "--out", str(tmp_path / "lstm")])
    configs = [common.load_json(tmp_path / "lstm" / f"seed{k}" / "config.json") for k in (0, 1)]
    assert [c["args"]["seed"] for c in configs] == [0, 1]
    for c in configs:
        del c["args"]["seed"], c["args"]["out"]
    assert configs[0] == configs[1]
    assert [r.name for r in runfolders.find_runs(tmp_path)] == ["seed0", "seed1"]


def test_a_run_stopped_by_bad_input_leaves_no_folder(tmp_path, monkeypatch):
    """Offline, without the data: one clear line, and neither runs/ nor data/ is left behind."""
    def offline(url, dest):
        raise OSError("offline")
    monkeypatch.setattr(common, "download", offline)
    monkeypatch.delenv("AGNEWS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError, match="cannot download AG News"):
        train_lora.main(["--quick", "--device", "cpu"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    module = importlib.import_module(script)
    parser = module.build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines; compare word by word
    shown = 0
    for action in parser._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        assert f"(default: {action.default})" in text, f"{script} {action.option_strings[0]}"
        shown += 1
    # the test looked at something (export's flags are switches)
    assert shown >= 2 or script == "export"


def test_help_names_the_penalty_list_where_analyze_writes_it():
    import train_bert
    assert "runs/X/analysis/penalty_words.json" in train_bert.build_parser().format_help()


def test_progress_prints_lines_in_a_log_and_nothing_when_disabled(capsys, monkeypatch):
    monkeypatch.setattr(common, "PROGRESS_FIRST_S", 0.0)
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)
    assert list(common.progress(range(3), "counting", unit="rows", sizes=[10, 10, 5])) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert (lines[0].startswith("counting: 10/25 rows (40%), ")
            and lines[1].startswith("counting: 20/25 rows (80%)"))
    assert len(lines) == 2  # the end is the caller's to report
    assert list(common.progress(range(3), "quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().out == ""


def test_each_run_counts_its_own_peak_memory():
    """--seeds trains several runs in one process: a run's peak must not be an earlier one's."""
    cpu = torch.device("cpu")
    common.reset_peak_memory(cpu)
    big = np.ones(300_000_000 // 8)          # 300 MB, every page touched
    high = common.peak_memory(cpu)["cpu_max_rss_gb"]
    del big
    common.reset_peak_memory(cpu)
    low = common.peak_memory(cpu)["cpu_max_rss_gb"]
    assert low < high - 0.2, (low, high)


@needs_rows
def test_readme_order_votes_and_compares_both_runs(tmp_path):
    """README's first commands in order, at small size: the quick LoRA (validated on 1,000 rows),
    then a BiLSTM at its default settings (the whole validation slice), then a bare `vote.py` and
    `analyze.py --compare`: both runs take part in both. The vote fits its weights on the 1,000
    validation rows the two share. Then, in a shell without AGNEWS_DIR, `vote.py --text` finds the
    rows where the runs recorded them."""
    small = ["--train-size", "48", "--test-size", "300", "--max-len", "32", "--device", "cpu"]
    env = {**os.environ, "AGNEWS_DIR": str(AGNEWS_DIR)}

    def command(*args, environment=env):
        done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=environment,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    command(str(ROOT / "train_lora.py"), "--r", "8", "--quick", *small)
    command(str(ROOT / "train_lstm.py"), "--arch", "bilstm_attn", "--epochs", "1", *small)
    voted = command(str(ROOT / "vote.py"))
    assert "left out" not in voted
    assert ("validation: the weights are fitted on the 1,000 rows all 2 members were scored on "
            "(theirs: 1,000, 2,687)") in voted
    assert "lora_r8_pooler" in voted and "bilstm_attn" in voted
    compared = command(str(ROOT / "analyze.py"), "--compare", "--out", "cmp")
    assert "left out" not in compared
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert sorted(row.split(",")[0] for row in rows[1:]) == ["bilstm_attn", "lora_r8_pooler"]

    no_data = {k: v for k, v in env.items() if k != "AGNEWS_DIR"}
    typed = command(str(ROOT / "vote.py"), "--text", "Nadal wins in Paris", environment=no_data)
    assert "weights (fitted on val)" in typed


def test_a_bar_shows_in_a_terminal_that_reports_no_size():
    """`script` (a terminal logger) gives the program a pseudo-terminal of size 0 x 0; tqdm took
    -1 rows for it and drew nothing, so training sat silent for minutes. The bar now assumes
    80 x 24 there."""
    import pty
    code = ("import sys, time; sys.path.insert(0, {root!r}); import common\n"
            "for _ in common.progress(range(4), 'scoring'):\n"
            "    time.sleep(0.05)\n").format(root=str(ROOT))
    pid, fd = pty.fork()
    if pid == 0:  # the child, on the pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the child has exited and closed its side
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"scoring:  50%|" in out and b"2/4" in out


def test_a_log_file_hears_from_training_before_the_first_loss_is_read(monkeypatch, capsys,
                                                                      tmp_path):
    """In a log file the loss is read every --log-every (50) steps; a line by the clock comes
    between (PROGRESS_FIRST_S after the epoch starts, 10 s, then every PROGRESS_EVERY_S), from
    what the host knows. Here both are 0: a line after every step, the 3rd with the loss read."""
    import bert
    import loop
    from conftest import made_up_rows
    monkeypatch.setattr(common, "PROGRESS_FIRST_S", 0.0)
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)
    torch.manual_seed(0)
    model = bert.BertClassifier(bert.BertModel(bert.BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64)), head="fc")
    data = {"train": made_up_rows(48, seed=0), "val": made_up_rows(8, seed=1)}
    parser = run.add_common_args(argparse.ArgumentParser(), lr=1e-3, epochs=1)
    args = parser.parse_args(["--batch-size", "16", "--log-every", "3", "--device", "cpu"])
    loop.train(model, data, args, common.Runtime(torch.device("cpu"), precision="fp32"), tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1 ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1 step 1/3", "epoch 1 step 2/3",
                                                      "epoch 1 step 3/3"]
    assert lines[0].endswith("samples/s (loss every --log-every steps)")
    assert "loss" in lines[2] and "acc" in lines[2]
