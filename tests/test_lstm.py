"""train_lstm.py: both architectures learn from scratch on real rows, packing changes nothing but
the cost, attention ignores padding, the word tokenizer truncates right, and a saved run reloads and
resumes to the same probabilities."""
import json

import numpy as np
import pytest
import torch

import common
import train_lstm
from plumbing import agnews, runfolders
from conftest import AGNEWS_DIR, Killed, die_after_epoch_1, needs_rows

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest.single_thread


def train(run_dir, *flags):
    train_lstm.main([*flags, "--out", str(run_dir), "--device", "cpu", "--data", str(AGNEWS_DIR)])
    return json.loads((run_dir / "metrics.json").read_text())


def random_batch(lengths, vocab_size, seed):
    """Padded random ids (B, T) with the given row lengths, never the pad id 0 inside a row."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, vocab_size, (n,), generator=gen).numpy() for n in lengths]
    return common.pad_batch(rows)


# --------------------------------------------------------------------------------------------------
# Learning on real rows
# --------------------------------------------------------------------------------------------------
@needs_rows
@pytest.mark.parametrize("arch", train_lstm.ARCHS)
def test_each_arch_learns_from_scratch(tmp_path, arch):
    metrics = train(tmp_path / arch, "--arch", arch, "--train-size", "2000", "--val-size", "300",
                    "--test-size", "400", "--epochs", "3", "--batch-size", "32", "--lr", "1e-2",
                    "--embed-dim", "64", "--hidden-size", "64", "--max-len", "64")
    history = metrics["history"]
    # Seen on seeds 0-2: lstm 0.63-0.67, bilstm_attn 0.71-0.74 test accuracy; chance is 0.25.
    assert metrics["test"]["accuracy"] > 0.5, (f"{arch}: test accuracy "
                                               f"{metrics['test']['accuracy']:.3f} on 400 rows")
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1
    assert history[-1]["val_accuracy"] > history[0]["val_accuracy"]


# --------------------------------------------------------------------------------------------------
# Packing, attention
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", train_lstm.ARCHS)
def test_packed_lstm_equals_plain_lstm_without_padding(arch):
    torch.manual_seed(0)
    model = train_lstm.LSTMClassifier(50, arch, embed_dim=16, hidden_size=12).eval()
    # all rows full: no padding
    input_ids, mask = random_batch([9, 9, 9, 9], 50, seed=1)
    states, h_n = model.token_states(input_ids, mask)
    plain_states, (plain_h_n, _) = model.lstm(model.embedding(input_ids))  # nn.LSTM without packing
    torch.testing.assert_close(states, plain_states, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_n, plain_h_n, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", train_lstm.ARCHS)
def test_padding_changes_nothing(arch):
    """A row padded in a batch gets the states, features and logits it gets alone, and zero states
    on its padding."""
    torch.manual_seed(0)
    model = train_lstm.LSTMClassifier(50, arch, embed_dim=16, hidden_size=12).eval()
    lengths = [7, 3, 11, 1]
    input_ids, mask = random_batch(lengths, 50, seed=2)
    states, _ = model.token_states(input_ids, mask)
    logits = model(input_ids, mask)
    for i, n in enumerate(lengths):
        alone_ids, alone_mask = input_ids[i: i + 1, :n], mask[i: i + 1, :n]
        alone_states, _ = model.token_states(alone_ids, alone_mask)
        torch.testing.assert_close(states[i, :n], alone_states[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits[i], model(alone_ids, alone_mask)[0], atol=1e-6, rtol=0)
        assert (states[i, n:] == 0).all()


def test_attention_weights_sum_to_one_over_real_tokens_and_are_zero_on_padding():
    torch.manual_seed(0)
    model = train_lstm.LSTMClassifier(50, "bilstm_attn", embed_dim=16, hidden_size=12).eval()
    input_ids, mask = random_batch([5, 12, 2, 8], 50, seed=3)
    features = model.features(input_ids, mask)
    weights = model.last_weights                                            # (B, T)
    assert weights.shape == input_ids.shape
    torch.testing.assert_close(weights.sum(1), torch.ones(4), atol=1e-6, rtol=0)
    assert (weights[~mask] == 0).all() and (weights[mask] > 0).all()
    # Reference: Bahdanau scores by hand, row by row over the real tokens only.
    states, _ = model.token_states(input_ids, mask)
    attention = model.attention
    for i in range(4):
        h = states[i, mask[i]]                                              # (n, 2H)
        scores = (torch.tanh(h @ attention.proj.weight.T + attention.proj.bias)
                  @ attention.score.weight[0])
        a = scores.softmax(0)
        torch.testing.assert_close(weights[i, mask[i]], a, atol=1e-6, rtol=0)
        torch.testing.assert_close(features[i], a @ h, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", train_lstm.ARCHS)
def test_forward_under_bf16_autocast_stays_close_to_float32(arch):
    """loop.train runs models under autocast on GPUs; the CPU's bf16 autocast checks that every
    dtype meets its partner and the logits move by rounding only."""
    torch.manual_seed(0)
    model = train_lstm.LSTMClassifier(50, arch, embed_dim=16, hidden_size=12).eval()
    input_ids, mask = random_batch([6, 10, 3], 50, seed=4)
    logits = model(input_ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_logits = model(input_ids, mask)
    torch.testing.assert_close(amp_logits.float(), logits, atol=0.05, rtol=0)


def test_forget_gates_start_open():
    """PyTorch's gate order is [input, forget, cell, output]: b_ih + b_hh of the forget gate is
    1."""
    model = train_lstm.LSTMClassifier(50, "bilstm_attn", embed_dim=8, hidden_size=6)
    for direction in ("", "_reverse"):
        total = (getattr(model.lstm, f"bias_ih_l0{direction}")
                 + getattr(model.lstm, f"bias_hh_l0{direction}"))
        assert (total[6:12] == 1.0).all() and (total[:6] != 1.0).all()


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def test_word_tokenizer_pads_with_0_and_truncates_keeping_the_first_words():
    texts = ["Oil prices rise again", "Oil stocks fall", "prices rise, stocks fall",
             "Café owners RISE"]
    tokenizer = train_lstm.train_word_tokenizer(texts, min_freq=2, max_len=4)
    assert tokenizer.token_to_id("[PAD]") == 0 and tokenizer.token_to_id("[UNK]") == 1
    assert tokenizer.encode("Oil PRICES rise").tokens == ["oil", "prices", "rise"]     # lowercased
    assert tokenizer.encode("cafe").ids == [1]                                       # unknown word
    long_text = "oil prices rise stocks fall oil"
    ids = common.encode(tokenizer, [long_text], max_len=4)[0]
    assert [tokenizer.id_to_token(i) for i in ids] == ["oil", "prices", "rise", "stocks"]


# --------------------------------------------------------------------------------------------------
# Saved runs
# --------------------------------------------------------------------------------------------------
def test_saved_run_reloads_to_its_test_probs(tiny_lstm_run):
    model, tokenizer, config = runfolders.load_run(tiny_lstm_run)
    args = config["args"]
    splits = agnews.load_ag_news(args["data"], args["train_size"], args["test_size"],
                                 args["val_size"])
    test = common.Encoded(common.encode(tokenizer, splits["test"].texts, config["max_len"]),
                          splits["test"].labels)
    probs = common.predict(model, test, common.Runtime(torch.device("cpu")))
    saved = np.load(tiny_lstm_run / "test_probs.npy")
    np.testing.assert_allclose(probs, saved, atol=1e-6, rtol=0)
    # it learned: chance is 0.25
    assert common.evaluate(saved, splits["test"].labels)["accuracy"] > 0.4


@needs_rows
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, monkeypatch):
    flags = ["--arch", "bilstm_attn", "--train-size", "400", "--val-size", "100",
             "--test-size", "100", "--epochs", "2", "--embed-dim", "16", "--hidden-size", "16",
             "--max-len", "32"]
    whole = train(tmp_path / "whole", *flags)

    save_weights = common.save_weights
    die_after_epoch_1(monkeypatch)
    with pytest.raises(Killed):
        train(tmp_path / "cut", *flags)
    monkeypatch.setattr(common, "save_weights", save_weights)
    with pytest.raises(common.UserError, match="already holds a run"):
        train(tmp_path / "cut", *flags)
    resumed = train(tmp_path / "cut", *flags, "--resume")

    losses = [h["train_loss"] for h in resumed["history"]]
    assert losses == pytest.approx([h["train_loss"] for h in whole["history"]], abs=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "cut" / "test_probs.npy"),
                               np.load(tmp_path / "whole" / "test_probs.npy"), atol=1e-6, rtol=0)
    assert not (tmp_path / "cut" / runfolders.RESUME_FILE).exists()
