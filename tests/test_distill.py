"""distill.py: the distillation loss on a case computed by hand; a student trained with alpha 1 and
T 1 on a fixed teacher reproduces the teacher's probabilities on its training rows; unlabelled rows
carry no label of the file (a pseudo-label is the teacher's class); a teacher trained on other
rows, or unlabelled rows without a teacher, are refused in one line; a noisy student's EDA copies
carry their originals' labels and teacher probabilities; train_lstm.py runs with it."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bert
import common
import distill
import eda
import loop
import train_lstm
from plumbing import agnews, run
from conftest import AGNEWS_DIR, TINY_LSTM_ARGS, made_up_rows, needs_rows


CPU = common.Runtime(torch.device("cpu"))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_the_loss_on_a_hand_computed_case():
    """Row 1 labelled (class 0), row 2 unlabelled; T 2, alpha 0.25: row 1 is 0.75 CE + 0.25 T^2 KL,
    row 2 T^2 KL alone; the batch's loss is their mean."""
    z = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    q = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])
    T, alpha = 2.0, 0.25
    p_t, q_t = softmax(z / T), softmax(np.log(q) / T)
    kl = (q_t * (np.log(q_t) - np.log(p_t))).sum(-1) * T * T
    ce = -np.log(softmax(z)[0, 0])
    expected = 0.5 * ((1 - alpha) * ce + alpha * kl[0] + kl[1])
    loss = distill.distill_loss(torch.tensor(z), torch.tensor([0, distill.UNLABELED]),
                                torch.tensor(q), alpha, T)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # no soft targets: plain cross-entropy; alpha 0: the labelled rows ignore the teacher
    labels = torch.tensor([0, 1])
    assert distill.distill_loss(torch.tensor(z), labels).item() == pytest.approx(
        F.cross_entropy(torch.tensor(z), labels).item())
    assert distill.distill_loss(torch.tensor(z[:1]), labels[:1], torch.tensor(q[:1]), 0.0,
                                T).item() == pytest.approx(ce)
    # an unlabelled row's loss is the teacher's term alone: its gradient does not move towards
    # any class but where the teacher's distribution leads (here, as computed above)
    logits = torch.tensor(z[1:], requires_grad=True)
    distill.distill_loss(logits, torch.tensor([distill.UNLABELED]), torch.tensor(q[1:]), alpha,
                         T).backward()
    # d(T^2 KL)/dz = T (p_T - q_T)
    np.testing.assert_allclose(logits.grad.numpy()[0], T * (p_t[1] - q_t[1]), rtol=1e-5,
                               atol=1e-7)  # fp32


def test_a_student_with_alpha_1_and_t_1_reproduces_its_teacher(tmp_path):
    """A tiny BERT, dropout 0, trained by loop.train on 32 rows whose only target is a fixed
    teacher's probabilities (alpha 1: the labels get weight 0) ends with the teacher's
    probabilities on those rows: largest difference < 0.05 (measured: 0.013 after 100 epochs of 2
    steps), where it starts > 0.3 away."""
    torch.manual_seed(0)
    cfg = bert.BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    model = bert.BertClassifier(bert.BertModel(cfg), head="pooler", dropout=0.0)
    train = made_up_rows(32, seed=3, vocab_size=2000)
    rng = np.random.default_rng(0)
    train.soft = rng.dirichlet(np.ones(4) * 0.7, size=32).astype(np.float32)
    train.labels = rng.integers(0, 4, 32)  # labels that disagree with the teacher: weight 0
    data = {"train": train, "val": made_up_rows(8, seed=4, vocab_size=2000)}
    runtime = common.Runtime(torch.device("cpu"), precision="fp32")
    start = common.predict(model, train, runtime)
    assert np.abs(start - train.soft).max() > 0.3
    args = run.add_common_args(argparse.ArgumentParser(), lr=1e-2, epochs=100).parse_args([])
    for key, value in {"batch_size": 16, "max_len": 32, "device": "cpu", "teacher": "fixed",
                       "distill_alpha": 1.0, "distill_t": 1.0, "warmup": 0.0,
                       "weight_decay": 0.0, "log_every": 10_000}.items():
        setattr(args, key, value)
    loop.train(model, data, args, runtime, tmp_path)
    end = common.predict(model, train, runtime)
    assert np.abs(end - train.soft).max() < 0.05


@needs_rows
def test_unlabelled_rows_carry_no_label_and_pseudo_labels_are_the_teachers(tiny_lstm_run,
                                                                           monkeypatch):
    # the teacher is scored afresh here, whatever test ran before (the fork_rng check needs it)
    monkeypatch.setattr(distill, "_TEACHER_PROBS", {})
    splits = agnews.load_ag_news(AGNEWS_DIR, train_size=1000, val_size=200, test_size=200)
    pool = agnews.load_ag_news(AGNEWS_DIR)["train"]
    truth = dict(zip(pool.ids.tolist(), pool.labels.tolist()))

    def attach(**overrides):
        args = argparse.Namespace(**{"teacher": str(tiny_lstm_run), "unlabeled": 300,
                                     "pseudo_threshold": None, "distill_alpha": 0.5,
                                     "distill_t": 2.0, "eda": False, **overrides})
        fresh = {k: v.subset(np.arange(len(v))) for k, v in splits.items()}
        return distill.attach_teacher(args, fresh, AGNEWS_DIR, CPU)["train"]

    state = torch.get_rng_state()
    train = attach()
    assert torch.equal(torch.get_rng_state(), state)  # the teacher drew from a forked stream
    labelled, extra = train.subset(np.arange(1000)), train.subset(np.arange(1000, 1300))
    assert (extra.labels == distill.UNLABELED).all() and (labelled.labels >= 0).all()
    assert not set(extra.ids) & set(splits["train"].ids)
    assert not set(extra.ids) & set(splits["val"].ids)
    assert len({truth[i] for i in extra.ids.tolist()}) == 4  # the file had labels: all dropped
    members = distill.teacher_members(tiny_lstm_run)
    expected = distill.teacher_probs(members, train.texts, CPU)
    np.testing.assert_allclose(train.soft, expected, atol=1e-6)
    # the next seed of --seeds, on the same rows with the same teacher: not scored again
    calls = []
    monkeypatch.setattr(distill, "teacher_probs", lambda *a: calls.append(a) or expected)
    assert np.array_equal(attach().soft, train.soft) and calls == []

    pseudo = attach(pseudo_threshold=0.4)
    extra = pseudo.subset(np.arange(1000, len(pseudo)))
    assert 0 < len(extra) <= 300 and (extra.soft.max(1) >= 0.4).all()
    assert (extra.labels == extra.soft.argmax(1)).all()
    assert any(truth[i] != label for i, label in zip(extra.ids.tolist(), extra.labels))


@needs_rows
@pytest.mark.parametrize("pseudo_threshold", [None, 0.4])
def test_a_noisy_students_eda_copies_carry_their_originals_label_and_teacher(tiny_lstm_run,
                                                                             pseudo_threshold):
    """--teacher --unlabeled --eda, through start_run's two hooks in their order: every row, the
    unlabelled ones too, gets an EDA copy with its original's teacher probabilities (the teacher
    read the clean text) and its label: the file's, a pseudo-label, or UNLABELED."""
    splits = agnews.load_ag_news(AGNEWS_DIR, train_size=1000, val_size=200, test_size=200)
    args = argparse.Namespace(teacher=str(tiny_lstm_run), unlabeled=300,
                              pseudo_threshold=pseudo_threshold, distill_alpha=0.5, distill_t=2.0,
                              eda=True, eda_n=1, eda_alpha=0.1, eda_threshold=eda.EDA_THRESHOLD,
                              seed=0, model="minilm")
    taught = distill.attach_teacher(args, splits, AGNEWS_DIR, CPU)["train"]
    noisy = eda.augment_train_split(args, {"train": taught}, CPU)["train"]
    n = len(taught)
    assert len(noisy) == 2 * n and 1000 < n <= 1300
    originals, copies = noisy.subset(np.arange(n)), noisy.subset(np.arange(n, 2 * n))
    assert originals.texts == taught.texts and np.array_equal(originals.soft, taught.soft)
    np.testing.assert_array_equal(copies.soft, taught.soft)
    np.testing.assert_array_equal(copies.labels, taught.labels)
    assert (copies.labels[1000:] == (distill.UNLABELED if pseudo_threshold is None else
                                     taught.soft[1000:].argmax(1))).all()
    assert sum(a != b for a, b in zip(copies.texts, taught.texts)) > 0.9 * n  # edited copies


@needs_rows
def test_a_teacher_of_other_rows_and_unlabelled_rows_without_a_teacher_are_refused(
        tiny_lstm_run):
    splits = agnews.load_ag_news(AGNEWS_DIR, train_size=900, val_size=200, test_size=200)
    args = argparse.Namespace(teacher=str(tiny_lstm_run), unlabeled=0, pseudo_threshold=None,
                              distill_alpha=0.5, distill_t=2.0, eda=False)
    with pytest.raises(common.UserError, match="trained on other rows than this run's 900"):
        distill.attach_teacher(args, splits, AGNEWS_DIR, CPU)
    args.teacher, args.unlabeled = None, 100
    with pytest.raises(common.UserError, match="--unlabeled and --pseudo-threshold need"):
        distill.attach_teacher(args, splits, AGNEWS_DIR, CPU)


@needs_rows
@pytest.mark.parametrize("noise", [[], ["--eda", "--eda-n", "1"]], ids=["clean", "noisy"])
def test_train_lstm_learns_from_a_teacher_and_unlabelled_rows(tiny_lstm_run, tmp_path, noise):
    out = tmp_path / "student"
    train_lstm.main([*TINY_LSTM_ARGS, "--data", str(AGNEWS_DIR), "--out", str(out), "--epochs",
                     "1", "--teacher", str(tiny_lstm_run), "--unlabeled", "100", *noise])
    metrics = common.load_json(out / "metrics.json")
    assert metrics["rows"]["train"] == 1100 * (2 if noise else 1)
    assert common.load_json(out / "config.json")["args"]["teacher"] == str(tiny_lstm_run)
    assert metrics["test"]["accuracy"] > 0.4
