"""analyze.py: every flag on a tiny trained run (figures of the expected pixel size, tables that
agree with what training measured), integrated gradients (explain.py) checked by completeness, and
the penalty word list read back by the attnpool head's loader. The tests on a trained run need AG
News rows (needs_rows); the rest run anywhere."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

import analyze
import bert
import common
import explain
import mixup_words
import train_lstm
from fused_kernels.attn_pool import load_penalty_table
from plumbing import agnews, classifiers
from conftest import AGNEWS_DIR, needs_rows

ROOT = Path(__file__).resolve().parents[1]


def png_size(path):
    """(width, height) in pixels of a PNG, read back by matplotlib."""
    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def inches_to_pixels(size):
    return round(size[0] * common.DPI), round(size[1] * common.DPI)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """MiniLM + attnpool head, 1 epoch on 200 rows (~20 s on 2 idle cores): a real saved run, whose
    head keeps attention weights."""
    run_dir = tmp_path_factory.mktemp("analyze") / "bert_attnpool"
    subprocess.run([sys.executable, "train_bert.py", "--head", "attnpool", "--train-size", "200",
                    "--val-size", "40", "--test-size", "200", "--epochs", "1", "--max-len", "48",
                    "--lr", "1e-4", "--device", "cpu", "--data", str(AGNEWS_DIR),
                    "--out", str(run_dir)],
                   cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    return run_dir


@pytest.fixture(scope="module")
def run(bert_run):
    return analyze.SavedRun(bert_run, device="cpu")


# --------------------------------------------------------------------------------------------------
# --report, --confusion, --errors, --curves
# --------------------------------------------------------------------------------------------------
@needs_rows
def test_report_matches_what_training_measured(run, capsys):
    macro_f1 = analyze.show_report(run)
    # finish_run scored the same probabilities against its own labels: a misaligned split differs
    assert macro_f1 == pytest.approx(run.metrics["test"]["macro_f1"], abs=1e-9)
    printed = capsys.readouterr().out
    assert all(name in printed for name in common.CLASS_NAMES)
    assert f"macro F1 {macro_f1:.4f}" in printed


@needs_rows
def test_confusion_matrix_counts_the_saved_predictions(run, tmp_path):
    counts = analyze.show_confusion(run, tmp_path)
    labels, preds = run.test.labels, np.load(run.dir / "test_probs.npy").argmax(1)
    expected = np.zeros((4, 4), dtype=int)
    np.add.at(expected, (labels, preds), 1)                       # counted by hand, not by sklearn
    np.testing.assert_array_equal(counts, expected)
    assert np.trace(counts) / counts.sum() == pytest.approx(run.metrics["test"]["accuracy"])
    assert png_size(tmp_path / "confusion.png") == inches_to_pixels(analyze.CONFUSION_SIZE)


@needs_rows
def test_a_run_scored_on_other_rows_is_refused(bert_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "test_probs.npy"):
        shutil.copy(bert_run / name, copy / name)
    metrics = json.loads((bert_run / "metrics.json").read_text())
    metrics["fingerprints"]["test"] = "0123456789abcdef"
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(common.UserError, match="fingerprint"):
        analyze.SavedRun(copy).test


def test_confident_errors_are_the_wrong_rows_by_confidence():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=300).astype(np.float32)
    labels = rng.integers(0, 4, size=300)
    rows = explain.confident_errors(probs, labels, top=10)
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    confidence = probs[np.arange(300), preds]
    assert len(rows) == 10 and np.all(preds[rows] != labels[rows])
    assert np.all(np.diff(confidence[rows]) <= 0)
    # nothing more confident left out
    assert confidence[rows[-1]] >= np.sort(confidence[wrong])[-10]


@needs_rows
def test_cli_writes_tables_and_figures(bert_run, tmp_path, capsys):
    analyze.main(["--run", str(bert_run), "--out", str(tmp_path), "--report", "--errors",
                  "--top", "3", "--curves", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert ("most confidently wrong" in printed and "val_macro_f1" in printed
            and "train_accuracy" in printed)
    assert png_size(tmp_path / "curves.png") == inches_to_pixels(analyze.CURVES_SIZE)
    with pytest.raises(common.UserError, match="nothing to do"):
        analyze.main(["--run", str(bert_run)])


def test_without_runs_the_default_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError, match="no finished run"):
        analyze.main(["--report"])


# --------------------------------------------------------------------------------------------------
# --pca and --tsne
# --------------------------------------------------------------------------------------------------
def test_stratified_sample_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    rows = agnews.stratified_indices(labels, 100, seed=0)
    assert np.bincount(labels[rows]).tolist() == [40, 30, 20, 10]
    assert np.all(np.diff(rows) > 0)


@needs_rows
def test_pca_and_tsne_maps(run, tmp_path, capsys):
    # One OpenMP thread: on a busy 2-core box t-SNE's spinning threads take 20x longer than one.
    with threadpool_limits(1):
        paths = analyze.show_maps(run, tmp_path, ["pca", "tsne"], sample=100, seed=0)
    assert [p.name for p in paths] == ["pca.png", "tsne.png"]
    for path in paths:
        assert png_size(path) == inches_to_pixels(analyze.MAP_SIZE)
    assert "PCA explained variance" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# --tfidf
# --------------------------------------------------------------------------------------------------
W, S, B, T = range(4)


def test_directions_put_business_scitech_first_then_by_count():
    counts = np.zeros((4, 4), dtype=int)
    counts[T, B], counts[W, S], counts[S, W], counts[B, W] = 3, 5, 2, 7
    assert mixup_words.confused_directions(counts) == [(T, B), (B, W), (W, S), (S, W)]


def test_top_words_rank_by_tfidf_contrast_with_the_texts_classified_right():
    texts = ["company internet browser", "company internet web", "quarterly shares profit",
             "shares dividend", "company earnings", "company merger", "football goal",
             "tennis final", "election vote", "summit talks"]
    labels = np.array([B, B, T, T, B, B, S, S, W, W])
    preds = np.array([T, T, B, B, B, B, S, S, W, W])
    ranked = mixup_words.top_words(texts, labels, preds, [(B, T), (T, B), (W, S)], top_k=2)
    # "company" is in every Business text, right or wrong: it cancels out; "internet" is in both
    # errors.
    assert ranked[(B, T)][0][0] == "internet"
    assert "company" not in [w for w, _ in ranked[(B, T)]]
    assert ranked[(T, B)][0][0] == "shares"
    assert ranked[(W, S)] == []
    kept = mixup_words.top_words(texts, labels, preds, [(B, T)], top_k=5,
                                 keep=lambda w: w != "internet")
    assert ([w for w, _ in kept[(B, T)]] == ["browser", "web"]
            or [w for w, _ in kept[(B, T)]] == ["web", "browser"])


@needs_rows
def test_penalty_list_round_trips_into_the_attnpool_table(run, tmp_path):
    words, path = mixup_words.show_tfidf(run, tmp_path, pairs="all", top_k=15)
    assert list(words)[:2] == ["Business->Sci/Tech", "Sci/Tech->Business"]
    assert json.loads(path.read_text()) == words
    listed = {w for ws in words.values() for w in ws}
    assert listed, "the tiny run makes errors, so some words must be listed"
    tokenizer = common.load_tokenizer(common.resolve_model("minilm"))
    table = load_penalty_table(path, tokenizer, tokenizer.get_vocab_size())
    ids = [tokenizer.token_to_id(w) for w in listed]
    assert all(i is not None for i in ids) and table[ids].all()
    assert int(table.sum()) == len(listed)  # one whole-word piece each, nothing else
    assert png_size(tmp_path / "tfidf_words.png")[0] == common.WIDE * common.DPI


# --------------------------------------------------------------------------------------------------
# --attribution: integrated gradients
# --------------------------------------------------------------------------------------------------
def tiny_bert_classifier(head):
    cfg = bert.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return classifiers.bert_classifier(bert.BertModel(cfg), head).eval()


def check_completeness(model, input_ids, baseline_ids, steps):
    """IG's attributions sum to logit(x) - logit(x') within 5%, and its end points are the model's
    own logits (the embedding hook changes nothing at alpha = 0 and 1)."""
    mask = torch.ones(1, len(input_ids), dtype=torch.bool)
    with torch.no_grad():
        logits = model(input_ids[None], mask)[0]
        baseline_logits = model(baseline_ids[None], mask)[0]
    target = int(logits.argmax())
    attributions, f_x, f_base = explain.integrated_gradients(model, input_ids, baseline_ids, target,
                                                             steps)
    assert float(f_x) == pytest.approx(float(logits[target]), abs=1e-5)
    assert float(f_base) == pytest.approx(float(baseline_logits[target]), abs=1e-5)
    gap = float(f_x - f_base)
    assert abs(gap) > 1e-3
    assert float(attributions.sum()) == pytest.approx(gap, rel=0.05)
    return attributions


@pytest.mark.parametrize("head", ["pooler", "lstm", "attnpool"])
def test_integrated_gradients_complete_on_random_bert(head):
    torch.manual_seed(0)
    model = tiny_bert_classifier(head)
    input_ids = torch.cat([torch.tensor([101]), torch.randint(1, 100, (20,)), torch.tensor([102])])
    baseline_ids = torch.cat([input_ids[:1], torch.zeros(20, dtype=torch.long), input_ids[-1:]])
    attributions = check_completeness(model, input_ids, baseline_ids, steps=100)
    assert attributions.shape == (22,)


@pytest.mark.parametrize("arch", train_lstm.ARCHS)
def test_integrated_gradients_complete_on_random_lstm(arch):
    torch.manual_seed(0)
    model = train_lstm.build_model({"vocab_size": 200, "arch": arch, "embed_dim": 16,
                                    "hidden_size": 16, "dropout": 0.3}).eval()
    input_ids = torch.randint(2, 200, (15,))
    check_completeness(model, input_ids, torch.zeros_like(input_ids), steps=100)


@needs_rows
def test_attribution_of_a_trained_run(run, tmp_path, capsys):
    model, tokenizer = run.model_and_tokenizer
    text = "Oracle raises its hostile bid for PeopleSoft as software sales climb"
    input_ids = torch.from_numpy(common.encode(tokenizer, [text], run.max_len)[0])
    baseline_ids = explain.baseline_for(input_ids, tokenizer)
    # [CLS], [SEP] stay
    assert baseline_ids[0] == input_ids[0] and baseline_ids[-1] == input_ids[-1]
    assert torch.all(baseline_ids[1:-1] == common.PAD_ID)
    check_completeness(model, input_ids, baseline_ids,
                       steps=analyze.build_parser().get_default("steps"))

    paths = explain.show_attribution(run, tmp_path, [text], top=1, steps=20)
    assert png_size(paths[0])[0] == common.WIDE * common.DPI
    assert "attention weight of the model's pooling" in capsys.readouterr().out
    weights = explain.attention_weights(model, input_ids)
    assert weights.shape == input_ids.shape and float(weights.sum()) == pytest.approx(1, abs=1e-5)


def test_layout_wraps_tokens_into_lines():
    positions, n_lines = explain.layout_tokens(["aaaa", "bb", "cccc", "d"], chars_per_line=8)
    assert positions == [(0, 0), (0, 5), (1, 0), (1, 5)] and n_lines == 2


# --------------------------------------------------------------------------------------------------
# An LSTM run (the shared fixture of tests/conftest.py, where present)
# --------------------------------------------------------------------------------------------------
@needs_rows
def test_maps_and_attribution_of_an_lstm_run(request, tmp_path):
    try:
        lstm_run = request.getfixturevalue("tiny_lstm_run")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no tiny_lstm_run fixture")
    run = analyze.SavedRun(lstm_run, device="cpu")
    paths = analyze.show_maps(run, tmp_path, ["pca"], sample=100, seed=0)
    assert png_size(paths[0]) == inches_to_pixels(analyze.MAP_SIZE)
    paths = explain.show_attribution(run, tmp_path, None, top=1, steps=20)
    assert png_size(paths[0])[0] == common.WIDE * common.DPI
