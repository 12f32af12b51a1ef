"""Every numeric flag of every script is checked while the command line is read: a value out of
range is argparse's one line naming the flag and the range, exit 2, before any folder is touched
(issue 18). And a training run stopped by a check made later leaves nothing behind."""
import importlib
from pathlib import Path

import pytest

import analyze
import common
import loop
import train_lstm
from plumbing import flags, runfolders
from conftest import AGNEWS_DIR, TINY_LSTM_ARGS, needs_rows, single_thread

SCRIPTS = ["train_bert", "train_lora", "train_lstm", "vote", "analyze", "export", "serve"]
POSITIONALS = {"export": ["RUN", "OUT"]}  # what a parser needs besides the flag under test

# Each numeric type: values it must refuse (just outside its range, or not a number) and values at
# the edge of its range it must accept. A numeric flag whose type is not here fails the test.
REFUSED = {
    flags.positive_int: ["0", "-1", "1.5", "x"],
    flags.nonnegative_int: ["-1", "0.5"],
    flags.seed_int: ["-1", str(flags.SEED_MAX + 1), "1.0"],
    flags.sample_size: [str(common.NUM_CLASSES - 1)],
    flags.sequence_length: ["2"],
    flags.positive_float: ["0", "-1", "nan", "inf", "x"],
    flags.nonnegative_float: ["-1e-9", "nan", "inf"],
    flags.fraction: ["-0.1", "1.5"],
    flags.fraction_below_1: ["1", "-0.1"],
    flags.fraction_above_0: ["0", "1.5"],
    flags.cosine_similarity: ["1", "-1"],
    flags.parse_seeds: ["-1", "0,-1", str(flags.SEED_MAX + 1), "1,1"],
    analyze.shap_samples: ["0", "3"],
    flags.port_number: ["-1", "65536"],
}
ACCEPTED = {
    flags.positive_int: ["1"],
    flags.nonnegative_int: ["0"],
    flags.seed_int: ["0", str(flags.SEED_MAX)],
    flags.sample_size: [str(common.NUM_CLASSES)],
    flags.sequence_length: ["3"],
    flags.positive_float: ["1e-12"],
    flags.nonnegative_float: ["0"],
    flags.fraction: ["0", "1"],
    flags.fraction_below_1: ["0", "0.999"],
    flags.fraction_above_0: ["1e-9", "1"],
    flags.cosine_similarity: ["-0.999", "0.999"],
    flags.parse_seeds: [f"0,{flags.SEED_MAX}"],
    analyze.shap_samples: ["2"],
    flags.port_number: ["0", "65535"],
}


def parse(script, flag, value, capsys):
    """Parse `flag=value` with the script's own parser: (namespace or None, error lines)."""
    parser = importlib.import_module(script).build_parser()
    argv = [*POSITIONALS.get(script, []), f"{flag}={value}"]  # "=": "-1" cannot pass for a flag
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        assert stop.code == 2, (script, flag, value)
        args = None
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return args, errors


def test_every_numeric_flag_refuses_values_out_of_its_range_in_one_line(capsys):
    walked = 0
    for script in SCRIPTS:
        for action in importlib.import_module(script).build_parser()._actions:
            if action.type is None or not action.option_strings:
                continue
            flag = action.option_strings[0]
            assert action.type not in (int, float), (
                f"{script} {flag}: a bare {action.type.__name__} takes any value; give it one of "
                f"flags.py's range-checked types")
            assert action.type in REFUSED, (
                f"{script} {flag}: type {action.type.__name__} is not known to this test; add the "
                f"values it refuses and accepts to REFUSED and ACCEPTED")
            if action.default is not None:  # argparse never checks a default that is not a string
                assert action.type(str(action.default)) == action.default, (script, flag)
            for value in REFUSED[action.type]:
                args, errors = parse(script, flag, value, capsys)
                assert args is None, f"{script} {flag}={value} was accepted"
                assert len(errors) == 1 and f"argument {flag}: expected " in errors[0], (
                    script, flag, value, errors)
                assert repr(value) in errors[0]  # the line shows what was typed
            for value in ACCEPTED[action.type]:
                args, errors = parse(script, flag, value, capsys)
                assert args is not None and not errors, (script, flag, value, errors)
            walked += 1
    assert walked >= 70  # the walk saw the flags (75 when written)


def no_folder_left(tmp_path):
    return not any(tmp_path.iterdir())


BAD_SEEDS = [["--seeds", "-1"], ["--seed", "-1"], ["--seed", str(flags.SEED_MAX + 1)]]


@pytest.mark.parametrize("script, flags",
                         [(script, flags) for script in ("train_bert", "train_lora", "train_lstm")
                          for flags in BAD_SEEDS] + [("analyze", flags) for flags in BAD_SEEDS[1:]])
def test_a_bad_seed_is_one_line_before_any_folder_is_made(script, flags, tmp_path, monkeypatch,
                                                          capsys):
    """It was numpy's ValueError traceback, after the run folder (.../seed-1) had been made."""
    monkeypatch.chdir(tmp_path)  # a default runs/ would show up here
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main([*flags, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {flags[0]}: expected " in errors[0], errors
    assert no_folder_left(tmp_path)


@needs_rows
def test_a_failed_start_leaves_nothing_so_the_corrected_command_runs(tmp_path, monkeypatch,
                                                                     capsys):
    """train_lstm.py used to write tokenizer.json before all its checks, and a run stopped after it
    left a folder that refused the corrected command: "already holds a run: pass --resume"."""
    tiny = [a if a != "1000" else "200" for a in TINY_LSTM_ARGS]
    tiny[tiny.index("--epochs") + 1] = "1"
    tiny += ["--data", str(Path(AGNEWS_DIR).resolve())]
    out = tmp_path / "lstm"
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as stop:  # a bad flag: argparse stops before anything
        train_lstm.main([*tiny, "--save-every", "-5", "--out", str(out)])
    assert stop.value.code == 2
    assert no_folder_left(tmp_path)

    def check_inside_the_loop(model, data, args, runtime, run_dir, **kwargs):
        """Stands for a check only the loop can make (or a crash before the first resume point),
        once the tokenizer is written."""
        assert (Path(run_dir) / "tokenizer.json").exists()
        raise common.UserError("stopped inside the loop")
    train = loop.train
    monkeypatch.setattr(loop, "train", check_inside_the_loop)
    for where in (["--out", str(out)], []):  # [] : the default runs/bilstm_attn
        with pytest.raises(common.UserError, match="stopped inside the loop"):
            train_lstm.main([*tiny, *where])
        assert no_folder_left(tmp_path), where
    monkeypatch.setattr(loop, "train", train)

    capsys.readouterr()
    with single_thread():
        train_lstm.main([*tiny, "--out", str(out)])
    assert runfolders.is_finished(out) and (out / "tokenizer.json").exists()
