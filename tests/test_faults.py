"""A disk that is full or read-only (issue 30): every write says in one line which file it could not
write and what to do, leaves no temp file, and a training run cut short by it can be resumed.

The disk is faked (the writer raises what it raises on a full or read-only disk: tests run as root,
where chmod does not stop a write); where the tests may mount, a real tiny tmpfs checks the messages
the Rust writers (safetensors, tokenizers) really give."""
import ast
import errno
import io
import os
import re
import shutil
import subprocess
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import analyze
import common
import export
import train_lstm
import vote
from plumbing import agnews, runfolders
from conftest import AGNEWS_DIR, NO_ROWS, TINY_LSTM_ARGS, single_thread

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# what safetensors and tokenizers raise on a full disk (their messages, checked on a real one below)
RUST_FULL = "No space left on device (os error 28)"
ADVICE = {errno.ENOSPC: "free some space, or pass --out on another disk",
          errno.EROFS: "pass --out on a writable disk",
          errno.EACCES: "pass --out in a folder you may write in"}


def written_then_full(*_, **__):
    raise FULL


class FullFile:
    """A file on a disk that fills up: the first byte of a write goes in, then ENOSPC."""
    def __init__(self, *args, **kwargs):
        self.file = open(*args, **kwargs)

    def write(self, data):
        self.file.write(data[:1])
        raise FULL

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.file.close()


def full_disk_for_common(monkeypatch):
    """common's own open() writes to a disk that fills up (json, npy, a download); reads as ever."""
    def full_open(file, mode="r", *args, **kwargs):
        opens = FullFile if set(mode) & set("wax+") else open
        return opens(file, mode, *args, **kwargs)
    monkeypatch.setattr(common, "open", full_open, raising=False)


class FullTokenizer:
    """Stands for a tokenizers.Tokenizer on a full disk (its Rust methods cannot be patched)."""
    @classmethod
    def from_file(cls, _):
        return cls()

    def no_padding(self):
        pass

    def no_truncation(self):
        pass

    def save(self, path, *_):
        Path(path).write_text("{")
        raise Exception(RUST_FULL)


def figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.figure(figsize=(2, 2))


def write_each_way(kind, path, monkeypatch):
    """Write `path` the way the scripts write a `kind` of file, on a disk that fills up midway."""
    if kind == "json":
        full_disk_for_common(monkeypatch)
        common.save_json(path, {"a": 1})
    elif kind == "npy":
        full_disk_for_common(monkeypatch)
        common.save_npy(path, np.zeros(3))
    elif kind == "safetensors":
        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 8)
            raise SafetensorError(f"Error while serializing: I/O error: {RUST_FULL}")
        monkeypatch.setattr(common, "save_file", save_file)
        common.save_weights(path, {"w": torch.zeros(3)})
    elif kind == "figure":
        fig = figure()
        monkeypatch.setattr(fig, "savefig", lambda tmp, **_: (Path(tmp).write_bytes(b"\x89PNG"),
                                                              written_then_full()))
        common.save_figure(fig, path)
    elif kind == "tokenizer":  # train_lstm.py's tokenizer.json
        common.atomic_write(path, lambda tmp: FullTokenizer().save(tmp))


@pytest.mark.parametrize("kind", ["json", "npy", "safetensors", "figure", "tokenizer"])
@pytest.mark.parametrize("old", [False, True])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch,
                                                                          kind, old):
    path = tmp_path / "run" / f"out.{kind}"
    if old:  # an earlier version of the file stays whole
        path.parent.mkdir()
        path.write_bytes(b"old")
    with pytest.raises(common.UserError) as caught:
        write_each_way(kind, path, monkeypatch)
    assert str(caught.value) == (f"cannot write {path}: No space left on device; "
                                 f"{ADVICE[errno.ENOSPC]}")
    if old:
        assert [p.name for p in path.parent.iterdir()] == [path.name]
        assert path.read_bytes() == b"old"
    else:  # nor the folder made for it (analyze.py --out figs/ on a full disk)
        assert not path.parent.exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("where", ["folder", "file"])
def test_a_folder_that_takes_no_writes_is_one_line_naming_it(tmp_path, monkeypatch, code, where):
    """A read-only disk or a folder we may not write in, met making the folder (mkdir) or the
    file (mkstemp)."""
    reason = os.strerror(code)
    path = tmp_path / "runs" / "x" / "metrics.json"
    if where == "folder":
        def mkdir(self, *_, **__):
            raise OSError(code, reason, str(self))
        monkeypatch.setattr(Path, "mkdir", mkdir)
        expected = f"cannot write {path}: {reason} ({path.parent}); {ADVICE[code]}"
    else:
        path.parent.mkdir(parents=True)
        def mkstemp(dir, prefix, suffix):
            raise OSError(code, reason, os.path.join(dir, f"{prefix}abc{suffix}"))
        monkeypatch.setattr(common.tempfile, "mkstemp", mkstemp)
        expected = f"cannot write {path}: {reason}; {ADVICE[code]}"
    with pytest.raises(common.UserError) as caught:
        common.save_json(path, {})
    assert str(caught.value) == expected


def test_a_file_in_the_place_of_a_folder_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(common.UserError, match=r"cannot write .*runs/x/m\.json: Not a directory"):
        common.save_json(tmp_path / "runs" / "x" / "m.json", {})
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(common.UserError, match=r"cannot write .*dir\.json: Is a directory"):
        common.save_json(tmp_path / "dir.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "runs"]


def test_a_refused_write_is_a_user_error_and_an_os_error(tmp_path, monkeypatch):
    """One line from run_main, and still an OSError with its errno for code that survives a failed
    write: eda.py caches its synonym table, and warns when it cannot."""
    full_disk_for_common(monkeypatch)
    with pytest.raises(common.UserError) as caught:
        common.save_json(tmp_path / "cache.json", {})
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC


def test_a_full_disk_while_downloading_is_not_called_offline(tmp_path, monkeypatch):
    class Response(io.BytesIO):
        headers = {}
    monkeypatch.setattr(common.urllib.request, "urlopen",
                        lambda *_, **__: Response(b"archive bytes"))
    full_disk_for_common(monkeypatch)
    monkeypatch.delenv("AGNEWS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError, match=r"^cannot write data/ag_news/tmp\w+/ag_news_csv"
                                                r"\.tgz: No space left on device; free some space, "
                                                r"or download it on another disk$"):
        agnews.find_data_dir()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [urllib.error.URLError("offline"), ValueError("a bug"),
                                   SafetensorError("tensor is not contiguous"),
                                   OSError(errno.ECONNRESET, "Connection reset by peer")])
def test_errors_not_about_the_disk_pass_unchanged(tmp_path, error):
    """Only a disk that cannot take the file becomes a UserError: a failed download must still
    reach agnews's "Offline?" message, and a bug must still show its traceback."""
    def write(tmp):
        Path(tmp).write_text("partial")
        raise error
    with pytest.raises(type(error)) as caught:
        common.atomic_write(tmp_path / "f", write)
    assert caught.value is error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_write_error_outside_the_helpers_is_one_line_too(code, capsys):
    """A script's own write (the run folder's mkdir in runfolders.py, say) that the disk refuses:
    run_main prints the file and what to do, not a traceback."""
    def main():
        raise OSError(code, os.strerror(code), "runs/x")
    with pytest.raises(SystemExit) as exit_:
        common.run_main(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot write runs/x: {os.strerror(code)}; "
                                       f"{ADVICE[code]}\n")


def test_export_writes_its_tokenizer_files_through_the_helpers(tmp_path, monkeypatch):
    import tokenizers
    monkeypatch.setattr(tokenizers, "Tokenizer", FullTokenizer)
    with pytest.raises(common.UserError,
                       match=rf"^cannot write {tmp_path}/tokenizer\.json: No space left on device"):
        export.write_tokenizer(tmp_path, common.resolve_model("minilm"), 64)
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "copyfile", written_then_full)  # vocab.txt: a copy
    with pytest.raises(common.UserError,
                       match=rf"^cannot write {tmp_path}/vocab\.txt: No space left on device"):
        export.write_tokenizer(tmp_path, common.resolve_model("minilm"), 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


# -- a real tiny disk, where the tests may mount one (root) ---------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs, mounted read-write; skipped where mounting is not allowed."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk_is_one_line_for_every_writer(tiny_disk):
    big = np.zeros(100_000, dtype=np.float32)  # 400 KB: more than the disk holds
    tokenizer = common.load_tokenizer(common.resolve_model("minilm"))  # tokenizer.json: 700 KB
    writers = [("w.safetensors", lambda p: common.save_weights(p, {"w": torch.from_numpy(big)})),
               ("p.npy", lambda p: common.save_npy(p, big)),
               ("m.json", lambda p: common.save_json(p, big.tolist())),
               ("tokenizer.json", lambda p: common.atomic_write(p, tokenizer.save))]
    for name, write in writers:
        path = tiny_disk / "run" / name
        with pytest.raises(common.UserError) as caught:
            write(path)
        assert str(caught.value) == (f"cannot write {path}: No space left on device; "
                                     f"{ADVICE[errno.ENOSPC]}"), name
        assert list(tiny_disk.iterdir()) == [], name


def test_a_real_read_only_disk_is_one_line(tiny_disk):
    common.save_json(tiny_disk / "runs" / "old.json", {})
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    for path in (tiny_disk / "runs" / "x" / "m.json", tiny_disk / "runs" / "m.json"):
        with pytest.raises(common.UserError, match=re.escape(f"cannot write {path}: Read-only "
                                                             f"file system")):
            common.save_json(path, {})


# -- the scripts ----------------------------------------------------------------------------------
def fail_nth_save(monkeypatch, n):
    """From the n-th safetensors file on, the disk is full (the first n - 1 are written)."""
    saved = []
    save_file = common.save_file

    def save(tensors, filename, metadata=None):
        saved.append(filename)
        if len(saved) >= n:
            raise SafetensorError(f"Error while serializing: I/O error: {RUST_FULL}")
        save_file(tensors, filename, metadata=metadata)
    monkeypatch.setattr(common, "save_file", save)


@pytest.mark.skipif(AGNEWS_DIR is None, reason=NO_ROWS or "")
def test_training_on_a_disk_that_fills_up_stops_in_one_line_and_resumes(tmp_path, monkeypatch,
                                                                         capsys):
    """The third weights file (epoch 2's) finds the disk full: one line, and epoch 1's resume point
    is there for --resume once space is freed."""
    run_dir = tmp_path / "run"
    argv = [*TINY_LSTM_ARGS, "--epochs", "2", "--data", str(AGNEWS_DIR), "--out", str(run_dir)]
    fail_nth_save(monkeypatch, 3)  # 1: epoch 1's best weights, 2: its resume point
    with single_thread(), pytest.raises(SystemExit) as exit_:
        common.run_main(lambda: train_lstm.main(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: cannot write {run_dir}/\S+\.safetensors: No space left on "
                        rf"device; {ADVICE[errno.ENOSPC]}\n", err), err
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert (run_dir / runfolders.RESUME_FILE).exists()
    monkeypatch.undo()
    with single_thread():
        train_lstm.main([*argv, "--resume"])
    assert runfolders.is_finished(run_dir)
    assert [h["epoch"] for h in common.load_json(run_dir / "metrics.json")["history"]] == [1, 2]


@pytest.mark.skipif(AGNEWS_DIR is None, reason=NO_ROWS or "")
def test_vote_and_analyze_out_on_a_full_disk_stop_in_one_line(tiny_lstm_run, tmp_path,
                                                               monkeypatch, capsys):
    for member in ("a", "b"):
        shutil.copytree(tiny_lstm_run, tmp_path / member)
    full_disk_for_common(monkeypatch)
    out = tmp_path / "vote"
    with pytest.raises(SystemExit):
        common.run_main(lambda: vote.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"),
                                           "--out", str(out)]))
    # vote.py writes a temp folder beside --out and renames it: the file is named in either
    assert re.fullmatch(rf"error: cannot write {out}/\w+\.npy: "
                        rf"No space left on device; {ADVICE[errno.ENOSPC]}\n",
                        capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing half-made
    monkeypatch.undo()

    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", written_then_full)
    with pytest.raises(SystemExit):
        common.run_main(lambda: analyze.main(["--run", str(tmp_path / "a"), "--confusion",
                                              "--out", str(tmp_path / "figs"), "--device", "cpu"]))
    assert re.fullmatch(rf"error: cannot write {tmp_path}/figs/confusion\.png: No space left on "
                        rf"device; {ADVICE[errno.ENOSPC]}\n", capsys.readouterr().err)
    assert not (tmp_path / "figs").exists()  # no temp file, no empty folder


def main_block_calls(path):
    """The calls made under `if __name__ == "__main__":` in the file at `path`, as source text."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return [ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)]
    return None


def test_every_script_that_can_raise_a_user_error_prints_it_as_one_line():
    """A script (top level or bench/) that imports common can meet a UserError (no rows, a bad
    run folder): its entry point goes through common.run_main, or the user reads a traceback."""
    root = Path(__file__).resolve().parents[1]
    scripts = [p for p in sorted(root.glob("*.py")) + sorted(root.glob("bench/*.py"))
               if re.search(r"^import common\b", p.read_text(), re.M)]
    bare = [str(p.relative_to(root)) for p in scripts
            if (calls := main_block_calls(p)) is not None and "common.run_main" not in calls]
    assert len(scripts) > 20, "the scan found too few scripts to mean anything"
    assert not bare, f"entry points that print a traceback for a UserError: {bare}"
