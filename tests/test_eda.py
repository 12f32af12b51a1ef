"""EDA (eda.py): each operation does what it says on a hand-made sentence, the synonym table holds
only whole non-stop words above the threshold (planted vectors and the real MiniLM vocabulary,
against a brute-force oracle) and is cached by content, augmentation touches only the training
split, keeps labels and is deterministic by seed (across processes too), and a --eda run prints its
row count and resumes exactly."""
import argparse
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

import common
import eda
import train_lstm
from plumbing import agnews, run
from conftest import AGNEWS_DIR, Killed, die_after_epoch_1, needs_rows, single_thread

ROOT = Path(__file__).resolve().parents[1]
SYNONYMS = {"stocks": ("shares", "equities"), "rise": ("climb",), "profit": ("earnings", "income")}
SENTENCE = "Stocks rise as profit beats forecasts, and stocks rally in Tokyo."
TOKENS = eda.EDA_TOKEN.findall(SENTENCE)  # 13 tokens: words and punctuation marks


def rng(seed=0):
    return random.Random(seed)


def is_subsequence(short, long):
    it = iter(long)
    return all(any(t == u for u in it) for t in short)


# --------------------------------------------------------------------------------------------------
# The four operations on a hand-made sentence
# --------------------------------------------------------------------------------------------------
def test_tokens_are_words_numbers_and_single_punctuation_marks():
    assert TOKENS == ["Stocks", "rise", "as", "profit", "beats", "forecasts", ",", "and", "stocks",
                      "rally", "in", "Tokyo", "."]


@pytest.mark.parametrize("seed", range(20))
def test_synonym_replacement_replaces_n_distinct_words_with_their_table_synonyms(seed):
    out = eda.eda_synonym_replacement(TOKENS, SYNONYMS, 2, rng(seed))
    assert len(out) == len(TOKENS)
    replaced = {}
    for old, new in zip(TOKENS, out):
        if old != new:
            assert new in SYNONYMS[old.lower()], f"{old} -> {new}"
            replaced.setdefault(old.lower(), set()).add(new)
    assert len(replaced) == 2  # two distinct words, of the three that have synonyms
    # "Stocks" and "stocks" get the same synonym
    assert all(len(news) == 1 for news in replaced.values())
    if "stocks" in replaced:
        assert out[0] != "Stocks" and out[8] != "stocks"  # every occurrence


def test_synonym_replacement_without_any_synonym_changes_nothing():
    tokens = ["the", "cat", "sat"]
    assert eda.eda_synonym_replacement(tokens, SYNONYMS, 3, rng()) == tokens


@pytest.mark.parametrize("seed", range(20))
def test_random_insertion_inserts_synonyms_of_words_of_the_sentence(seed):
    out = eda.eda_random_insertion(TOKENS, SYNONYMS, 3, rng(seed))
    assert len(out) == len(TOKENS) + 3
    # Take the original tokens out in order: what is left is what was inserted.
    inserted, rest = [], list(TOKENS)
    for token in out:
        if rest and token == rest[0]:
            rest.pop(0)
        else:
            inserted.append(token)
    assert rest == [] and len(inserted) == 3
    allowed = {s for t in TOKENS for s in SYNONYMS.get(t.lower(), ())}
    assert set(inserted) <= allowed, inserted


def test_random_insertion_without_any_synonym_changes_nothing():
    assert eda.eda_random_insertion(["the", "cat"], SYNONYMS, 2, rng()) == ["the", "cat"]


@pytest.mark.parametrize("seed", range(20))
def test_random_swap_keeps_the_multiset_of_tokens(seed):
    out = eda.eda_random_swap(TOKENS, 2, rng(seed))
    assert Counter(out) == Counter(TOKENS)
    assert sum(a != b for a, b in zip(out, TOKENS)) <= 4  # two swaps move at most four places


def test_random_swap_moves_something_and_leaves_one_token_alone():
    assert any(eda.eda_random_swap(TOKENS, 1, rng(s)) != TOKENS for s in range(5))
    assert eda.eda_random_swap(["alone"], 3, rng()) == ["alone"]


@pytest.mark.parametrize("seed", range(20))
def test_random_deletion_removes_tokens_keeps_order_and_never_empties(seed):
    out = eda.eda_random_deletion(TOKENS, 0.5, rng(seed))
    # P(no token deleted at p=0.5) = 2^-13: these 20 seeds all delete
    assert 1 <= len(out) < len(TOKENS)
    assert is_subsequence(out, TOKENS)
    everything = eda.eda_random_deletion(TOKENS, 1.0, rng(seed))
    assert len(everything) == 1 and everything[0] in TOKENS
    assert eda.eda_random_deletion(["alone"], 1.0, rng(seed)) == ["alone"]


def test_each_copy_is_made_by_one_operation_and_n4_uses_each_once():
    synonyms = {**SYNONYMS, "tokyo": ("osaka",)}
    for seed in range(10):
        copies = eda.eda_copies(SENTENCE, synonyms, 4, 0.2, rng(seed))
        assert sorted(op for op, _ in copies) == sorted(eda.EDA_OPS)
        for op, text in copies:
            tokens = text.split(" ")
            n_changes = round(0.2 * len(TOKENS))  # 2.6 -> 3
            if op == "SR":
                assert len(tokens) == len(TOKENS)
                assert len({a.lower() for a, b in zip(TOKENS, tokens) if a != b}) == n_changes
            elif op == "RI":
                assert len(tokens) == len(TOKENS) + n_changes
            elif op == "RS":
                assert Counter(tokens) == Counter(TOKENS)
            else:
                assert is_subsequence(tokens, TOKENS) and len(tokens) >= 1
    ops = [op for op, _ in eda.eda_copies(SENTENCE, synonyms, 9, 0.1, rng())]
    assert sorted(ops[:4]) == sorted(ops[4:8]) == sorted(eda.EDA_OPS)  # rounds of all four


def test_n_changes_is_at_least_one():
    copies = eda.eda_copies("Stocks rise", SYNONYMS, 4, 0.1, rng())  # 0.1 * 2 tokens rounds to 0
    assert all(text != "Stocks rise" for op, text in copies if op in ("SR", "RI"))


# --------------------------------------------------------------------------------------------------
# The synonym table
# --------------------------------------------------------------------------------------------------
PLANTED = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "market", "markets", "trade", "shares",
           "##ing", "the", "2004", "x", "football", "soccer", "rise", "fall"]


def planted_model(folder):
    """A model folder with 8-d embeddings whose cosines are known: markets ~ market 0.96, trade ~
    market 0.71, shares ~ market 0.447 (just under 0.45), football ~ soccer 0.89, rise = -fall; and
    "##ing", "the", "2004", "x", [UNK] exactly equal to "market" (cosine 1), which the word rule
    must keep out."""
    e = torch.eye(8)
    vectors = {"market": e[0], "markets": e[0] + 0.3 * e[1], "trade": e[0] + e[2],
               "shares": e[0] + 2 * e[3], "football": e[4], "soccer": e[4] + 0.5 * e[5],
               "rise": e[6], "fall": -e[6]}
    table = torch.stack([vectors.get(w, e[0] if w in ("##ing", "the", "2004", "x", "[UNK]")
                                     else e[7])
                         for w in PLANTED])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(PLANTED) + "\n")
    save_file({"embeddings.word_embeddings.weight": table}, str(folder / "model.safetensors"))
    return folder


def test_planted_table_keeps_whole_words_above_the_threshold_nearest_first(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    table = eda.synonym_table(planted_model(tmp_path / "model"), 0.45, verbose=False)
    assert table == {"market": ("markets", "trade"), "markets": ("market", "trade"),
                     "trade": ("market", "markets"), "football": ("soccer",),
                     "soccer": ("football",)}
    lower = eda.synonym_table(tmp_path / "model", 0.4, verbose=False)
    assert (lower["shares"] == ("market", "markets")
            and lower["market"] == ("markets", "trade", "shares"))


def test_table_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    model = planted_model(tmp_path / "model")
    table = eda.synonym_table(model, 0.45, verbose=False)
    nearest_neighbours = eda.nearest_neighbours
    [cached] = (tmp_path / "cache" / "eda").glob("*.json")
    assert json.loads(cached.read_text())["synonyms"] == {w: list(s) for w, s in table.items()}

    def no_computing(*_):
        raise AssertionError("the cached table should have been used")
    monkeypatch.setattr(eda, "nearest_neighbours", no_computing)
    assert eda.synonym_table(model, 0.45, verbose=False) == table
    # Another threshold, or other embeddings under the same folder name, is another table: computed.
    with pytest.raises(AssertionError, match="cached"):
        eda.synonym_table(model, 0.5, verbose=False)
    weights = common.load_weights(model / "model.safetensors")
    weights["embeddings.word_embeddings.weight"][6] *= -1  # "markets" now points away from "market"
    save_file(weights, str(model / "model.safetensors"))
    with pytest.raises(AssertionError, match="cached"):
        eda.synonym_table(model, 0.45, verbose=False)
    # A damaged cache file is built again, not trusted and not fatal.
    monkeypatch.setattr(eda, "nearest_neighbours", nearest_neighbours)
    planted_model(model)  # the first embeddings again: the key of the first file
    cached.write_text("{ not json")
    assert eda.synonym_table(model, 0.45, verbose=False) == table
    assert json.loads(cached.read_text())["synonyms"] == {w: list(s) for w, s in table.items()}


@pytest.fixture(scope="module")
def minilm_table():
    """The real table of MiniLM (built once, then read from common.CACHE_DIR)."""
    return eda.synonym_table(common.resolve_model("minilm"), verbose=False)


def test_minilm_neighbours_are_whole_non_stop_words(minilm_table):
    assert len(minilm_table) > 10_000
    for word, synonyms in minilm_table.items():
        for w in (word, *synonyms):
            # no ##, [..], digits
            assert re.fullmatch(r"[a-z]{2,}", w) and w not in ENGLISH_STOP_WORDS, (word, w)
        assert word not in synonyms and 1 <= len(synonyms) <= eda.EDA_NEIGHBOURS
    for left_out in ("the", "and", "2004", "10", "##ing", "##s", "[UNK]", "[CLS]", ",", "x"):
        assert left_out not in minilm_table
    # a co-hyponym: where embedding neighbours are not synonyms
    assert "tuesday" in minilm_table["monday"]


def test_minilm_neighbours_match_brute_force_cosines(minilm_table):
    """For 40 words, the table equals the top-5 whole non-stop words by cosine over the vocabulary,
    computed here directly (float64, no chunks), above the threshold."""
    model_dir = common.resolve_model("minilm")
    embeddings = eda.input_embeddings(model_dir).double()
    vocab = common.load_tokenizer(model_dir).get_vocab()
    words = sorted((i, w) for w, i in vocab.items()
                   if re.fullmatch(r"[a-z]{2,}", w) and w not in ENGLISH_STOP_WORDS)
    ids = torch.tensor([i for i, _ in words])
    unit = torch.nn.functional.normalize(embeddings[ids], dim=1)
    queries = [w for _, w in words][::len(words) // 40][:40]
    checked = 0
    for q in queries:
        k = [w for _, w in words].index(q)
        cos = unit @ unit[k]
        cos[k] = -2
        top = cos.topk(eda.EDA_NEIGHBOURS + 1)
        values = top.values.tolist()
        expected = tuple(words[j][1] for c, j in zip(values[:-1], top.indices.tolist())
                         if c >= eda.EDA_THRESHOLD)
        # float32 (the table) and float64 (here) may disagree on a cosine within 1e-5 of the
        # threshold or of its neighbour in the ranking: such a word is skipped, not guessed.
        near_edge = (any(abs(c - eda.EDA_THRESHOLD) < 1e-5 for c in values)
                     or any(a - b < 1e-5 for a, b in zip(values, values[1:])))
        got = minilm_table.get(q, ())
        if not near_edge:
            assert got == expected, (q, got, expected)
            checked += bool(expected)
    assert checked >= 10  # the comparison was not vacuous


# --------------------------------------------------------------------------------------------------
# Splits: only train, labels kept, deterministic by seed
# --------------------------------------------------------------------------------------------------
def eda_args(**overrides):
    parser = run.add_common_args(argparse.ArgumentParser(), lr=1e-3, epochs=1)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args(["--eda"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# Made-up news-like rows: augmentation never asks what a text means, only which of its words have
# synonyms, so these serve as well as AG News rows and need none. 25 to 40 words each, about as long
# as an AG News row, so that at alpha 0.1 every copy is asked to change 3 or 4 tokens.
NEWS_WORDS = ("stocks shares markets prices oil company profit quarter investors bank government "
              "minister election president officials police troops rebels city capital team season "
              "coach players match championship victory league software computer internet users "
              "network technology researchers scientists space launch said reported announced rose "
              "fell won lost new big strong weak early late first final record").split()


def made_up_split(count, seed):
    """A Split of `count` made-up sentences drawn from NEWS_WORDS by seed, labels 0..3 in turn."""
    draw = random.Random(seed)
    texts = []
    for _ in range(count):
        words = [draw.choice(NEWS_WORDS) for _ in range(draw.randint(25, 40))]
        words[draw.randrange(3, len(words) - 3)] += ","
        texts.append(" ".join(words).capitalize() + ".")
    return agnews.Split(texts, np.arange(count, dtype=np.int64) % common.NUM_CLASSES)


@pytest.fixture(scope="module")
def splits():
    return {"train": made_up_split(120, seed=0), "val": made_up_split(40, seed=1),
            "test": made_up_split(40, seed=2)}


def test_only_train_grows_and_copies_keep_their_labels(splits, capsys):
    n = 3
    out = eda.augment_train_split(eda_args(eda_n=n), splits)
    N = len(splits["train"])
    for name in ("val", "test"):
        assert out[name].texts == splits[name].texts
        np.testing.assert_array_equal(out[name].labels, splits[name].labels)
    train = out["train"]
    assert len(train) == N * (n + 1)
    assert train.texts[:N] == splits["train"].texts  # the originals first, as they were
    np.testing.assert_array_equal(train.labels,
                                  np.concatenate([splits["train"].labels,
                                                  np.repeat(splits["train"].labels, n)]))
    # an unchanged copy
    as_tokens = [" ".join(eda.EDA_TOKEN.findall(t)) for t in splits["train"].texts]
    assert sum(a != b for a, b in zip(train.texts[N:], np.repeat(as_tokens, n))) > 0.9 * N * n
    printed = capsys.readouterr().out
    assert f"EDA: {N:,} training rows -> {N * (n + 1):,}" in printed
    originals = eda.original_rows(eda_args(eda_n=n), train)
    assert (originals.texts == splits["train"].texts
            and originals.fingerprint() == splits["train"].fingerprint())
    assert eda.augment_train_split(eda_args(eda=False), splits) is splits  # no --eda: untouched


def test_same_seed_same_rows_other_seed_other_rows(splits):
    a, b, c = (eda.augment_train_split(eda_args(seed=s), splits)["train"] for s in (0, 0, 1))
    assert a.texts == b.texts and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert a.texts[:len(splits["train"])] == c.texts[:len(splits["train"])]


SCRIPT = """
import argparse, json, numpy as np, eda
from plumbing import agnews
rows = json.load(open({rows!r}))
splits = {{name: agnews.Split(r["texts"], np.array(r["labels"])) for name, r in rows.items()}}
args = argparse.Namespace(eda=True, eda_n=4, eda_alpha=0.1, eda_threshold=eda.EDA_THRESHOLD,
                          seed=7, model="minilm")
print(eda.augment_train_split(args, splits)["train"].fingerprint())
"""


def test_rows_are_the_same_in_another_process_with_another_hash_seed(splits, minilm_table,
                                                                     tmp_path):
    """What --resume relies on: a new process draws the same copies, whatever its string hash
    seed."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({name: {"texts": split.texts, "labels": split.labels.tolist()}
                                for name, split in splits.items()}))
    prints = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(rows=str(rows))], cwd=ROOT,
                              env=env, capture_output=True, text=True, check=True)
        prints.append(done.stdout.strip().splitlines()[-1])
    here = eda.augment_train_split(eda_args(seed=7), splits)["train"].fingerprint()
    assert prints == [here, here]


@pytest.mark.parametrize("flag, value", [("eda_alpha", 0.0), ("eda_alpha", 1.5),
                                         ("eda_threshold", 1.0)])
def test_bad_settings_are_one_line(splits, flag, value):
    with pytest.raises(common.UserError, match=f"--{flag.replace('_', '-')}"):
        eda.augment_train_split(eda_args(**{flag: value}), splits)


# --------------------------------------------------------------------------------------------------
# train_lstm.py --eda end to end, and resumed
# --------------------------------------------------------------------------------------------------
FLAGS = ["--arch", "bilstm_attn", "--train-size", "200", "--val-size", "60", "--test-size", "60",
         "--epochs", "2", "--batch-size", "32", "--embed-dim", "16", "--hidden-size", "16",
         "--max-len", "32", "--device", "cpu", "--data", str(AGNEWS_DIR), "--eda", "--eda-n", "2"]


def train(run_dir, *flags):
    with single_thread():
        train_lstm.main([*FLAGS, *flags, "--out", str(run_dir)])
    return json.loads((run_dir / "metrics.json").read_text())


@needs_rows
def test_eda_run_prints_its_rows_and_resumes_exactly(tmp_path, monkeypatch, capsys, minilm_table):
    whole = train(tmp_path / "whole")
    printed = capsys.readouterr().out
    before, after = re.search(r"EDA: ([\d,]+) training rows -> ([\d,]+)", printed).groups()
    assert (int(before), int(after.replace(",", ""))) == (200, 200 * 3)
    assert whole["rows"] == {"train": 600, "val": 60, "test": 60, "cases": 400}
    plain = agnews.load_ag_news(AGNEWS_DIR, train_size=200, val_size=60, test_size=60)
    assert whole["fingerprints"]["val"] == plain["val"].fingerprint()
    assert whole["fingerprints"]["test"] == plain["test"].fingerprint()
    assert whole["fingerprints"]["train"] != plain["train"].fingerprint()

    save_weights = common.save_weights
    die_after_epoch_1(monkeypatch)
    with pytest.raises(Killed):
        train(tmp_path / "cut")
    monkeypatch.setattr(common, "save_weights", save_weights)
    resumed = train(tmp_path / "cut", "--resume")
    assert resumed["fingerprints"] == whole["fingerprints"]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in whole["history"]], abs=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "cut" / "test_probs.npy"),
                               np.load(tmp_path / "whole" / "test_probs.npy"), atol=1e-6, rtol=0)
