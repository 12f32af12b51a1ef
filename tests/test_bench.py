"""bench/speed_ablation.py: its written-out attention computes what SDPA computes, its FLOPs
formula counts what torch's FLOP counter counts, and its CPU smoke run prints every rung and the
peer."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bert
import common
import dropout as cheap_dropout
from bench.models import set_attention
from bench.speed_ablation import TRICKS, training_flops
from conftest import AGNEWS_DIR, needs_rows

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    return bert.BertConfig(**{"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 128, **overrides})


def use_sdpa(model, sdpa):
    set_attention(model, "sdpa" if sdpa else "written")


def padded_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T), True = real token


@pytest.mark.parametrize("training", [False, True])
def test_written_out_attention_equals_sdpa(training):
    """Outputs and gradients, on fresh random inputs with padding; in training mode with dropout 0
    (with dropout the two draw different masks)."""
    torch.manual_seed(0)
    attention = cheap_dropout.WrittenOutAttention(
        tiny_config(attention_probs_dropout_prob=0.0)).train(training)
    x = torch.randn(3, 9, 64)
    mask = padded_mask([9, 5, 2], 9)[:, None, None, :]  # (B, 1, 1, T): keys only
    results = []
    for impl in ("sdpa", "written"):
        attention.impl = impl
        attention.zero_grad()
        xs = x.clone().requires_grad_()
        y = attention(xs, mask)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((y.detach(), xs.grad, attention.query.weight.grad.clone(),
                        attention.key.weight.grad.clone()))
    for fused, written_out in zip(*results):
        torch.testing.assert_close(written_out, fused, atol=1e-5, rtol=1e-5)
    # The mask matters: without it the written-out path attends to padding and differs.
    attention.impl = "written"
    assert (attention(x, None) - results[0][0]).abs().max() > 1e-3


def test_written_out_attention_in_the_whole_model():
    """Our BERT with every layer on the written-out path gives SDPA's token states, padding
    included."""
    torch.manual_seed(0)
    model = bert.BertModel(tiny_config()).eval()
    input_ids = torch.randint(1, 300, (4, 12))
    mask = padded_mask([12, 7, 3, 10], 12)
    use_sdpa(model, True)
    fused = model(input_ids, mask)
    use_sdpa(model, False)
    torch.testing.assert_close(model(input_ids, mask), fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sdpa", [False, True])
def test_training_flops_match_torch_flop_counter(sdpa):
    """The formula behind the bench's MFU against torch.utils.flop_counter on one
    forward+backward."""
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=3)
    model = bert.BertClassifier(bert.BertModel(cfg))
    use_sdpa(model, sdpa)
    B, T = 5, 11
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.randint(1, 300, (B, T)), padded_mask([11, 4, 8, 11, 2], T)),
                        torch.randint(0, 4, (B,))).backward()
    assert counter.get_total_flops() == training_flops(cfg, B, T)


@needs_rows
def test_speed_ablation_cpu_smoke():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "speed_ablation.py"), "--cpu-smoke",
                           "--data", str(AGNEWS_DIR)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rungs = re.findall(r"^\| (\d) \| (.+?) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+)x \|", out,
                       re.MULTILINE)
    assert ([(int(i), name) for i, name, *_ in rungs]
            == [(i, name) for i, (name, _) in enumerate(TRICKS)]), out
    assert all(float(rate) > 0 for _, _, rate, _, _ in rungs)
    assert float(rungs[0][4]) == 1.0  # rung 0 over itself
    ratios = re.search(r"^\| ours / transformers \| ([\d.]+)x \| ([\d.]+)x \|", out, re.MULTILINE)
    assert ratios and all(float(r) > 0 for r in ratios.groups()), out
    assert "each at its default precision" in out and "projected:" in out


def test_step_breakdown_groups_ops_and_puts_every_optimizer_op_in_one_group():
    """The breakdown's groups: a matmul's gradient is matmul, dropout's mask is dropout, and every
    op AdamW and clipping run (whatever small ops they are made of) counts as the optimizer's."""
    from bench.step_breakdown import OPTIMIZER, group_of, make_step, profile
    assert group_of("aten::mm") == group_of("MmBackward0") == "matmul"
    assert group_of("aten::bernoulli_") == "dropout masks"
    model = bert.BertClassifier(bert.BertModel(tiny_config()), head="pooler").train()
    cheap_dropout.use_cheap_dropout(model)  # as every run's model (plumbing/classifiers.py)
    batches = [(torch.randint(1, 300, (4, 9)), torch.ones(4, 9, dtype=torch.bool),
                torch.randint(0, 4, (4,))) for _ in range(3)]
    runtime = common.Runtime(torch.device("cpu"), precision="fp32")
    for fused in (False, True):
        shares, seconds, _ = profile(make_step(model, runtime, fused), batches, steps=1)
        assert shares[OPTIMIZER] > 0 and seconds > 0
        assert not any("adam" in group.lower() for group in shares if group != OPTIMIZER)
    # dropout.py's masks (ops inside its named range) count as dropout; the written-out attention
    # asks no aten::all, SDPA with dropout on a CPU (its math path) asks one a layer
    shares, _, all_calls = profile(make_step(model, runtime, True), batches, steps=1)
    assert shares["dropout masks"] > 0 and all_calls == 0
    set_attention(model, "sdpa", cheap_masks=False)
    _, _, all_calls = profile(make_step(model, runtime, True), batches, steps=1)
    assert all_calls == model.bert.config.num_hidden_layers
