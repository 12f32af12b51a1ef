"""dropout.py: the cheap masks drop at the rate asked (to 2^-17), every 16-bit lane alike, keep the
expected value exactly, pass the gradient through the kept elements only, and are a function of the
seed; swapped into bert.py's model (use_cheap_dropout) they train it on a CPU (attention written
out), and the loop's exact resume and train_plain equality (tests/test_loop.py) run with them,
dropout 0.1."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bert
import dropout as cheap_dropout
from bench.models import set_attention


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_drop_rate_is_p_within_a_stated_tolerance(p):
    """Rounding p to a multiple of 2^-16 moves it by at most 2^-17; the measured rate on 2^22
    elements is within 5 standard errors of that (sigma = sqrt(p(1-p)/n) <= 2.5e-4)."""
    k = cheap_dropout.drop_threshold(p)
    assert abs(k / cheap_dropout.LEVELS - p) <= 2 ** -17
    torch.manual_seed(0)
    n = 1 << 22
    rate = cheap_dropout.drop_mask((n,), p).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - k / cheap_dropout.LEVELS) < 5 * sigma


def test_every_16_bit_lane_drops_at_the_same_rate():
    """Each 64-bit word gives four decisions. torch's plain random_() leaves an int64's sign bit 0,
    which would make every fourth lane never drop; the full-range draw must not."""
    torch.manual_seed(1)
    mask = cheap_dropout.drop_mask((1 << 22,), 0.1).view(-1, 4).float()  # (words, lanes)
    lane_rates = mask.mean(0)
    sigma = (0.1 * 0.9 / mask.shape[0]) ** 0.5
    assert (lane_rates - 0.1).abs().max() < 5 * sigma, lane_rates
    # the test can tell: the same draw with the sign bit of each word cleared
    words = torch.empty(1 << 20, dtype=torch.int64).random_()
    biased = (words.view(torch.int16).view(-1, 4)
              < cheap_dropout.drop_threshold(0.1) - cheap_dropout.LEVELS // 2).float().mean(0)
    assert biased[3] == 0.0 and (biased[:3] - 0.1).abs().max() < 5 * sigma * 2


def test_kept_elements_scaled_to_keep_the_expected_value():
    torch.manual_seed(2)
    p = 0.1
    x = torch.rand(1 << 20) + 0.5
    y = cheap_dropout.dropout(x, p, training=True)
    kept = y != 0
    keep_probability = 1 - cheap_dropout.drop_threshold(p) / cheap_dropout.LEVELS
    torch.testing.assert_close(y[kept], x[kept] / keep_probability, rtol=1e-6, atol=0)
    # E[y] = x: the mean of y / x over 2^20 elements is 1 within 5 standard errors
    ratio = (y / x).mean().item()
    sigma = ((1 - keep_probability) / keep_probability / x.numel()) ** 0.5
    assert abs(ratio - 1) < 5 * sigma


def test_gradient_flows_through_kept_elements_only():
    torch.manual_seed(3)
    x = torch.randn(64, 96, requires_grad=True)
    weights = torch.randn(64, 96)
    y = cheap_dropout.dropout(x, 0.3, training=True)
    (y * weights).sum().backward()
    kept = (y != 0).float()
    scale = 1 / (1 - cheap_dropout.drop_threshold(0.3) / cheap_dropout.LEVELS)
    torch.testing.assert_close(x.grad, weights * kept * scale, rtol=1e-6, atol=1e-7)


def test_masks_are_a_function_of_the_seed():
    def draw(seed):
        torch.manual_seed(seed)
        return cheap_dropout.drop_mask((4, 1000), 0.1), cheap_dropout.drop_mask((4, 1000), 0.1)
    first, again, other = draw(7), draw(7), draw(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # the generator moves on between layers
    assert not torch.equal(first[0], other[0])


def test_identity_in_eval_and_at_zero_and_torch_when_asked():
    x = torch.randn(8, 16)
    assert cheap_dropout.dropout(x, 0.5, training=False) is x
    assert cheap_dropout.dropout(x, 0.0, training=True) is x
    torch.manual_seed(4)
    ours_off = cheap_dropout.dropout(x, 0.5, training=True, cheap_masks=False)
    torch.manual_seed(4)
    torch.testing.assert_close(ours_off, F.dropout(x, 0.5, training=True), rtol=0, atol=0)
    assert torch.equal(cheap_dropout.dropout(x, 1.0), torch.zeros_like(x))
    # within 2^-17 of 1 the threshold is 65536 (no int16 holds 32768): every element dropped
    assert torch.equal(cheap_dropout.dropout(x, 1 - 1e-7), torch.zeros_like(x))
    assert cheap_dropout.drop_mask((3, 5), 1 - 1e-7).all()
    module = cheap_dropout.Dropout(0.5).eval()
    assert module(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        cheap_dropout.Dropout(1.5)


def test_bf16_stays_bf16():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert cheap_dropout.dropout(x, 0.1, training=True).dtype == torch.bfloat16


def tiny_model(dropout):
    cfg = bert.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    return bert.BertModel(cfg)


def test_bert_on_a_cpu_trains_through_the_written_out_attention_with_cheap_masks():
    """In training on a CPU, impl "auto" is the written-out attention with dropout.py's masks:
    the same output as forcing "written" under the same seed; SDPA (torch's masks) differs; with
    dropout 0 every path gives the same output."""
    input_ids = torch.randint(1, 300, (3, 10))
    mask = torch.arange(10)[None, :] < torch.tensor([10, 6, 3])[:, None]

    def output(model, impl, cheap_masks=True):
        set_attention(model, impl, cheap_masks)
        torch.manual_seed(5)
        return model.train()(input_ids, mask)

    model = tiny_model(0.1)
    auto = output(model, "auto")
    torch.testing.assert_close(auto, output(model, "written"), rtol=0, atol=0)
    assert (auto - output(model, "sdpa", cheap_masks=False)).abs().max() > 1e-3
    quiet = tiny_model(0.0)
    torch.testing.assert_close(output(quiet, "auto"), output(quiet, "sdpa"), rtol=1e-5,
                               atol=1e-5)
    # in eval every dropout is off and "auto" is SDPA
    set_attention(model, "auto")
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids, mask)
        set_attention(model, "written")
        torch.testing.assert_close(model(input_ids, mask), evaluated, rtol=1e-5, atol=1e-5)


def test_the_swap_keeps_every_weight_and_changes_nothing_in_eval():
    """use_cheap_dropout turns bert.py's plain model into lesson 4's in place: no nn.Dropout and
    no plain SelfAttention left, the same state_dict (keys and values), the same eval output; in
    training on a CPU it draws the cheap masks (its output differs from the plain model's)."""
    plain = tiny_model(0.1)
    swapped = cheap_dropout.use_cheap_dropout(copy.deepcopy(plain))
    kinds = [type(m) for m in swapped.modules()]
    assert nn.Dropout not in kinds and bert.SelfAttention not in kinds
    assert kinds.count(cheap_dropout.WrittenOutAttention) == 2
    assert kinds.count(cheap_dropout.Dropout) == 1 + 2  # the embeddings', one a layer's residuals
    expected = plain.state_dict()
    assert list(swapped.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in swapped.state_dict().items())
    input_ids = torch.randint(1, 300, (3, 10))
    mask = torch.arange(10)[None, :] < torch.tensor([10, 6, 3])[:, None]
    with torch.no_grad():
        torch.testing.assert_close(swapped.eval()(input_ids, mask), plain.eval()(input_ids, mask),
                                   rtol=0, atol=0)
        torch.manual_seed(5)
        cheap = swapped.train()(input_ids, mask)
        torch.manual_seed(5)
        assert (cheap - plain.train()(input_ids, mask)).abs().max() > 1e-3
    assert cheap_dropout.use_cheap_dropout(swapped) is swapped  # a second swap changes nothing
    assert [type(m) for m in swapped.modules()] == kinds
