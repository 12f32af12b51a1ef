"""AG News loading: canonical rows load, every kind of bad row stops with file:line, splits are
stable."""
import csv
import errno
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import common
from plumbing import agnews, runfolders
from conftest import AGNEWS_DIR, NO_ROWS


def write_rows(path, text):
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD = ('"3","Wall St. Bears","Reuters - Short-sellers\\band of ultra-cynics."\n'
        '"1","Title","Desc #39;s  #36;10 quot;hi quot; AT amp;T &lt;b&gt;"\n')


def test_canonical_rows_load_and_clean(tmp_path):
    split = agnews.load_csv(write_rows(tmp_path / "t.csv", GOOD))
    assert split.labels.tolist() == [2, 0]
    assert split.texts[0] == "Wall St. Bears Reuters - Short-sellers band of ultra-cynics."
    assert split.texts[1] == "Title Desc's $10\"hi\" AT&T <b>"


@pytest.mark.parametrize("content,message", [
    ('"3","only two"\n', r"t.csv:1: expected 3 fields .* found 2"),
    (GOOD + '"1","a","b","c"\n', r"t.csv:3: expected 3 fields .* found 4"),
    ('"5","title","desc"\n', r"t.csv:1: class must be 1, 2, 3 or 4, found '5'"),
    (GOOD + '"0","title","desc"\n', r"t.csv:3: class must be 1, 2, 3 or 4, found '0'"),
    ('"World","title","desc"\n', r"t.csv:1: class must be 1, 2, 3 or 4, found 'World'"),
    (GOOD + '"2"," ","  "\n', r"t.csv:3: empty text"),
    ('"1","unterminated,"desc"\n', r"t.csv:1: (malformed CSV|expected 3 fields)"),
    ("", r"t.csv: no rows"),
])
def test_bad_rows_name_file_line_and_reason(tmp_path, content, message):
    with pytest.raises(common.UserError, match=message):
        agnews.load_csv(write_rows(tmp_path / "t.csv", content))


def test_undecodable_bytes_name_their_line(tmp_path):
    path = write_rows(tmp_path / "t.csv", GOOD.encode() + b'"2","caf\xe9","x"\n')
    with pytest.raises(common.UserError, match=r"t.csv:3: bytes that are not UTF-8"):
        agnews.load_csv(path)


def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(common.UserError, match="needs train.csv and test.csv"):
        agnews.find_data_dir(str(tmp_path))


def test_the_release_is_parsed_once_a_process_until_a_file_changes(tmp_path, monkeypatch):
    """load_ag_news for every seed of --seeds parses each file once; an edited file is read again,
    and a run that changes its rows (distill.py sets Split.soft) never changes the next run's."""
    rows = "".join(f'"{1 + i % 4}","title {i}","text {i}"\n' for i in range(40))
    write_rows(tmp_path / "train.csv", rows)
    write_rows(tmp_path / "test.csv", rows)
    parsed, load_csv = [], agnews.load_csv
    monkeypatch.setattr(agnews, "load_csv", lambda path: parsed.append(path) or load_csv(path))
    first = agnews.load_ag_news(tmp_path)
    first["train"].soft = np.ones((len(first["train"]), 4))
    first["train"].texts[0] = "changed by a run"
    again = agnews.load_ag_news(tmp_path)
    assert len(parsed) == 2                                         # train.csv, test.csv: once
    assert again["train"].soft is None and again["train"].texts[0] != "changed by a run"
    assert all(again[k].fingerprint() == agnews.load_ag_news(tmp_path)[k].fingerprint()
               for k in again)
    write_rows(tmp_path / "train.csv", rows + '"2","a new row","added"\n')
    edited = agnews.load_ag_news(tmp_path)
    assert len(edited["train"]) + len(edited["val"]) == 41
    assert len(parsed) == 3                                         # train.csv again, alone


field = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=40)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(1, 4), field, field), min_size=1, max_size=8))
def test_fuzz_canonical_rows_round_trip_or_fail_cleanly(tmp_path, rows):
    """Rows written the way the release writes them load back with their labels in order, unless a
    text is empty after cleaning, which must be the one clear error — never a traceback or a
    drop."""
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    path = write_rows(tmp_path / "f.csv", buf.getvalue())
    empty = [i for i, (_, t, d) in enumerate(rows) if not agnews.clean_text(f"{t} {d}")]
    if empty:
        with pytest.raises(common.UserError, match=r"f.csv:\d+: empty text"):
            agnews.load_csv(path)
        return
    split = agnews.load_csv(path)
    assert split.labels.tolist() == [label - 1 for label, _, _ in rows]
    assert split.texts == [agnews.clean_text(f"{t} {d}") for _, t, d in rows]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_load_or_raise_user_error(tmp_path, content):
    path = write_rows(tmp_path / "g.csv", content)
    try:
        split = agnews.load_csv(path)
    except common.UserError as err:
        assert str(err).startswith(str(path))
    else:
        assert len(split) > 0 and set(split.labels.tolist()) <= {0, 1, 2, 3}


# -- the real data ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def splits():
    if AGNEWS_DIR is None:
        pytest.skip(NO_ROWS)
    return agnews.load_ag_news(AGNEWS_DIR)


def test_real_splits_are_official_and_disjoint(splits):
    assert len(splits["test"]) == 7600
    assert np.bincount(splits["test"].labels).tolist() == [1900] * 4
    assert (len(splits["train"]) + len(splits["val"])
            == len(agnews.load_csv(AGNEWS_DIR / "train.csv")))
    assert agnews.load_ag_news(AGNEWS_DIR)["val"].fingerprint() == splits["val"].fingerprint()


def test_validation_slice_is_stratified_and_independent_of_train_size(splits):
    small = agnews.load_ag_news(AGNEWS_DIR, train_size=1000)
    assert small["val"].fingerprint() == splits["val"].fingerprint()
    assert len(small["train"]) == 1000
    full = np.bincount(splits["train"].labels) / len(splits["train"])
    assert np.abs(np.bincount(small["train"].labels) / 1000 - full).max() < 0.01
    assert np.abs(np.bincount(splits["val"].labels) / len(splits["val"]) - full).max() < 0.01


# -- batches --------------------------------------------------------------------------------------
def test_batches_cover_every_row_once_and_bucketing_cuts_padding():
    lengths = np.random.default_rng().integers(5, 128, size=5000)
    for bucket in (False, True):
        batches = common.make_batches(lengths, 32, shuffle=True, seed=1, bucket=bucket)
        assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches)
    assert padded(common.make_batches(lengths, 32, True, 1, bucket=True)) < \
        0.7 * padded(common.make_batches(lengths, 32, True, 1, bucket=False))


def test_ddp_shards_are_disjoint_and_equal_in_count():
    lengths = np.random.default_rng().integers(5, 50, size=1001)
    shards = [common.make_batches(lengths, 16, True, 3, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    rows = [np.concatenate(s) for s in shards]
    assert sum(len(r) for r in rows) == len(set(np.concatenate(rows).tolist()))
    # at most the batches that do not divide evenly
    assert sum(len(r) for r in rows) >= 1001 - 2 * 16


def test_encode_truncates_keeping_sep():
    tokenizer = common.load_tokenizer(common.resolve_model("minilm"))
    ids = common.encode(tokenizer, ["word " * 300, "short text"], max_len=16)
    assert len(ids[0]) == 16 and ids[0][0] == 101 and ids[0][-1] == 102
    assert ids[1].tolist() == tokenizer.encode("short text").ids


# -- the download (offline: a local archive stands in for the release) ---------------------------
def fake_release(tmp_path, monkeypatch, test_rows):
    folder = tmp_path / "release" / "ag_news_csv"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text(GOOD)
    (folder / "test.csv").write_text(test_rows)
    (folder / "classes.txt").write_text("\n".join(common.CLASS_NAMES) + "\n")
    archive = tmp_path / "release.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="ag_news_csv")
    monkeypatch.setattr(common, "download",
                        lambda url, dest: Path(dest).write_bytes(archive.read_bytes()))
    monkeypatch.setattr(agnews, "AGNEWS_TEST_MD5",
                        agnews.md5_of(folder / "test.csv") if test_rows == GOOD else "0" * 32)
    monkeypatch.setattr(agnews, "AGNEWS_TRAIN_ROWS", 2)
    monkeypatch.delenv("AGNEWS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


def test_download_unpacks_checks_and_finds_the_release(tmp_path, monkeypatch):
    fake_release(tmp_path, monkeypatch, GOOD)
    assert agnews.find_data_dir() == Path("data/ag_news")
    assert (sorted(p.name for p in (tmp_path / "data/ag_news").iterdir())
            == ["classes.txt", "test.csv", "train.csv"])
    # found again, no download
    assert len(agnews.load_csv(agnews.find_data_dir() / "test.csv")) == 2


def test_a_download_that_fails_its_checksum_leaves_nothing_behind(tmp_path, monkeypatch):
    fake_release(tmp_path, monkeypatch, '"1","other","rows"\n')
    with pytest.raises(common.UserError, match="differs from the official test set"):
        agnews.find_data_dir()
    # no empty data/ag_news/ left for the next run to stumble on
    assert not (tmp_path / "data").exists()


def test_nested_samples_are_prefixes_and_keep_the_class_proportions():
    """--val-size draws the first rows of one fixed stratified order: a smaller sample is part of
    a larger one (runs validated on 1,000 rows and on all share those 1,000), and every sample
    holds each class in proportion, give or take one row."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    labels = rng.choice(common.NUM_CLASSES, size=2687, p=[0.1, 0.2, 0.3, 0.4])
    split = agnews.Split([f"t{i}" for i in range(len(labels))], labels)
    previous = set()
    for size in (4, 50, 333, 1000, 2000, 2687):
        sample = agnews.nested_subset(split, size, seed=42)
        assert len(sample) == size and list(sample.ids) == sorted(sample.ids)
        assert previous <= set(sample.ids)
        previous = set(sample.ids)
        for c in range(common.NUM_CLASSES):
            expected = size * np.mean(labels == c)
            assert abs(np.sum(sample.labels == c) - expected) <= 1, (size, c)
    assert agnews.nested_subset(split, None, seed=42) is split


@pytest.mark.skipif(AGNEWS_DIR is None, reason=NO_ROWS or "")
def test_runs_before_nested_sampling_reload_their_own_validation_rows(tmp_path):
    """A run's metrics.json says how its --val-size rows were drawn; one written before "nested"
    (no val_sampling) reloads the independent stratified sample it was scored on."""
    old = agnews.load_ag_news(AGNEWS_DIR, val_size=500, val_sampling="sklearn")["val"]
    new = agnews.load_ag_news(AGNEWS_DIR, val_size=500)["val"]
    assert old.fingerprint() != new.fingerprint()
    for name, metrics in (("old", {}), ("new", {"val_sampling": "nested"})):
        run = tmp_path / name
        run.mkdir()
        common.save_json(run / "config.json", {"args": {"data": str(AGNEWS_DIR), "val_size": 500}})
        split = old if name == "old" else new
        common.save_json(run / "metrics.json", {**metrics,
                                                "fingerprints": {"val": split.fingerprint()}})
        assert runfolders.load_scored_split(run, "val").fingerprint() == split.fingerprint()


# -- files as editors save them (issue 30) --------------------------------------------------------
BOM = "\ufeff"  # the UTF-8 byte-order mark Excel and Notepad put first


@pytest.mark.parametrize("name", ["cases.txt", "cases.csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, name):
    path = write_rows(tmp_path / name, BOM + "label,text\n1,Rebels clash\n2,Nadal wins\n")
    assert agnews.read_cases(path) == [(0, "Rebels clash"), (1, "Nadal wins")]
    plain = write_rows(tmp_path / "plain.txt", BOM + "Rebels clash\n")
    assert agnews.read_cases(plain) == [(None, "Rebels clash")]


def test_the_release_csv_reads_with_a_byte_order_mark(tmp_path):
    split = agnews.load_csv(write_rows(tmp_path / "t.csv", BOM + GOOD))
    assert split.labels.tolist() == [2, 0]
    bad = write_rows(tmp_path / "b.csv", BOM.encode() + b'"1","a","b"\n\xff\n')
    with pytest.raises(common.UserError, match=r"b.csv:2: bytes that are not UTF-8"):
        agnews.load_csv(bad)
    with pytest.raises(common.UserError, match=r"b.csv:2: bytes that are not UTF-8"):
        agnews.read_cases(bad)


def test_only_line_feeds_end_a_case(tmp_path):
    """str.splitlines also splits at U+2028, U+2029, \\x85, \\x0b, \\x0c and \\x1c-\\x1e, which
    editors and web pages leave inside a headline: a case is a line ended by \\n (or \\r\\n)."""
    inside = "\u2028 \u2029 \x85 \x0b \x0c \x1c \x1d \x1e"
    plain = write_rows(tmp_path / "cases.txt", f"one {inside} two\r\nthree\n")
    assert agnews.read_cases(plain) == [(None, "one two"), (None, "three")]
    labelled = write_rows(tmp_path / "cases.csv", f"1,one {inside} two\r\n2,\"three\rfour\"\n")
    assert agnews.read_cases(labelled) == [(0, "one two"), (1, "three four")]


def test_a_huge_line_is_read_as_a_text_or_refused_with_file_line_and_limit(tmp_path):
    """The csv module stops at fields over 131,072 characters: a text file reads the line as any
    other (the model reads its first max_len tokens); a CSV file is refused with file:line."""
    huge = "word " * 250_000
    plain = write_rows(tmp_path / "cases.txt", f"{huge}\nNadal wins\n")
    assert [len(text) for _, text in agnews.read_cases(plain)] == [len(huge) - 1, 10]
    for name, content, line in [("first.csv", f"1,{huge}\n", 1),
                                ("later.csv", f"1,ok\n\n2,{huge}\n", 3),
                                ("header.txt", f"label,text\n1,{huge}\n", 2)]:
        with pytest.raises(common.UserError, match=rf"{name}:{line}: a field longer than the CSV "
                                                    rf"reader's limit of 131,072 characters"):
            agnews.read_cases(write_rows(tmp_path / name, content))
    with pytest.raises(common.UserError, match=r"t.csv:2: a field longer than the CSV reader's "
                                                r"limit of 131,072 characters"):
        agnews.load_csv(write_rows(tmp_path / "t.csv", f'"1","a","b"\n"2","{huge}","b"\n'))


def test_malformed_csv_in_a_case_file_names_file_and_line(tmp_path):
    for content, line in [('label,text\n1,"unterminated\n', 2), ('"label,text\n', 1),
                          ('1,ok\n2,"a"b\n', 2)]:
        with pytest.raises(common.UserError, match=rf"m.csv:{line}: "):
            agnews.read_cases(write_rows(tmp_path / "m.csv", content))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".txt", ".csv"]))
def test_fuzz_case_files_read_or_raise_user_error(tmp_path, content, suffix):
    path = write_rows(tmp_path / f"h{suffix}", content)
    try:
        cases = agnews.read_cases(path)
    except common.UserError as err:
        assert str(err).startswith(str(path))
    else:
        assert cases and all(text and label in (None, 0, 1, 2, 3) for label, text in cases)


def test_a_full_disk_while_unpacking_the_download_says_so(tmp_path, monkeypatch):
    """Not "not the AG News archive": the disk is full, and nothing is left behind."""
    fake_release(tmp_path, monkeypatch, GOOD)
    write_bytes = Path.write_bytes

    def full_at_train_csv(self, data):
        if self.name == "train.csv":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, data)
    monkeypatch.setattr(Path, "write_bytes", full_at_train_csv)
    with pytest.raises(common.UserError, match=r"^cannot write data/ag_news/train\.csv: No space "
                                                r"left on device; free some space, or pass --data "
                                                r"with a folder that holds the release's"):
        agnews.find_data_dir()
    assert not (tmp_path / "data").exists()
