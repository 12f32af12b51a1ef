"""rdrop.py and loop.forward_loss with --rdrop: the symmetric KL on a case computed by hand, and the
loss of a batch = (the two dropout passes' cross-entropies + alpha * their symmetric KL) / 2."""
import math

import pytest
import torch
import torch.nn.functional as F

import bert
import common
import loop
import rdrop


def test_symmetric_kl_on_a_hand_computed_case():
    """p_a = (1/2, 1/2), p_b = (3/4, 1/4): KL(a||b) = 1/2 ln(2/3) + 1/2 ln 2, KL(b||a) = 3/4 ln(3/2)
    + 1/4 ln(1/2); the statistic is their mean (the same value both ways round)."""
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[math.log(3.0), 0.0]])
    kl_ab = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_ba = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert rdrop.symmetric_kl(a, b).item() == pytest.approx(0.5 * (kl_ab + kl_ba), abs=1e-7)
    assert rdrop.symmetric_kl(b, a).item() == pytest.approx(0.5 * (kl_ab + kl_ba), abs=1e-7)
    assert rdrop.symmetric_kl(a, a).item() == 0.0
    # rows are averaged
    both = rdrop.symmetric_kl(torch.cat([a, a]), torch.cat([b, a]))
    assert both.item() == pytest.approx(0.25 * (kl_ab + kl_ba), abs=1e-7)


def tiny_model(dropout):
    torch.manual_seed(0)
    cfg = bert.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout)
    return bert.BertClassifier(bert.BertModel(cfg), dropout=dropout).train()


def test_the_rdrop_loss_is_half_of_both_cross_entropies_plus_alpha_times_symmetric_kl():
    model = tiny_model(0.3)
    runtime = common.Runtime(torch.device("cpu"), precision="fp32")
    input_ids = torch.randint(1, 200, (6, 11))
    mask = torch.ones(6, 11, dtype=torch.bool)
    labels = torch.randint(0, 4, (6,))
    torch.manual_seed(5)
    loss, logits = loop.forward_loss(model, input_ids, mask, labels, runtime,
                                     objective=loop.Objective(rdrop=2.0))
    torch.manual_seed(5)  # the same two passes, by hand: the same masks in the same order
    first, second = model(input_ids, mask), model(input_ids, mask)
    by_hand = 0.5 * (F.cross_entropy(first, labels) + F.cross_entropy(second, labels)
                     + 2.0 * rdrop.symmetric_kl(first, second))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    torch.testing.assert_close(logits, first)
    assert rdrop.symmetric_kl(first, second).item() > 1e-4  # the two passes did differ
    # without dropout the two passes agree and R-Drop adds nothing
    quiet = tiny_model(0.0)
    plain, _ = loop.forward_loss(quiet, input_ids, mask, labels, runtime)
    twice, _ = loop.forward_loss(quiet, input_ids, mask, labels, runtime,
                                 objective=loop.Objective(rdrop=2.0))
    assert twice.item() == pytest.approx(plain.item(), rel=1e-6)
