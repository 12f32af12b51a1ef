"""LoRA by hand (train_lora.py): exact start at the pretrained model, merge = unmerged, parity with
peft on the same weights, gradients only where they belong, adapter round trip, and real
learning."""

import numpy as np
import peft
import pytest
import torch
import transformers

import bert
import common
import train_lora
from plumbing import agnews, runfolders
from conftest import AGNEWS_DIR, NO_ROWS, needs_rows
from train_lora import count_lora_parameters, inject_lora, merge_lora, unmerge_lora

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def tiny_classifier(head="pooler", seed=0):
    torch.manual_seed(seed)
    return bert.BertClassifier(bert.BertModel(bert.BertConfig(**TINY)), head=head, dropout=0.1)


def random_batch(batch=4, length=12, seed=1):
    """Random token ids with rows of different lengths, so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, TINY["vocab_size"], (batch, length), generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return input_ids.masked_fill(~mask, 0), mask


def randomize_lora(model, seed=2):
    """Non-zero B (it starts at zero), so the LoRA path really changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in train_lora.lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_zero_B_starts_exactly_at_the_pretrained_model():
    base = tiny_classifier().eval()
    lora = inject_lora(tiny_classifier(), ["query", "key", "value", "out", "ffn_in", "ffn_out"],
                       r=4, alpha=8, dropout=0.1).eval()
    input_ids, mask = random_batch()
    with torch.no_grad():
        assert torch.equal(lora(input_ids, mask), base(input_ids, mask))
        assert torch.equal(lora.bert(input_ids, mask), base.bert(input_ids, mask))


def test_merged_matches_unmerged_and_unmerge_restores_the_weights():
    model = inject_lora(tiny_classifier(), ["query", "value", "ffn_out"], r=4, alpha=8,
                        dropout=0.0).eval()
    input_ids, mask = random_batch()
    with torch.no_grad():
        pretrained = model(input_ids, mask)
    randomize_lora(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".base." in n}
    with torch.no_grad():
        unmerged = model(input_ids, mask)
        # B != 0: the adapters do change the output
        assert (unmerged - pretrained).abs().max() > 1e-2
        merged = merge_lora(model)(input_ids, mask)
        assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
        query = "bert.layers.0.attn.query.base.weight"
        assert not torch.equal(model.get_parameter(query), frozen[query])  # merged into the weight
        unmerge_lora(model)
        assert torch.allclose(model(input_ids, mask), unmerged, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.allclose(p, frozen[name], atol=1e-6), name


def test_parity_with_peft(tmp_path):
    torch.manual_seed(3)
    hf = transformers.BertModel(transformers.BertConfig(**TINY, hidden_dropout_prob=0.0,
                                                        attention_probs_dropout_prob=0.0))
    # fresh random weights everywhere, LayerNorm gains included (not the 1/0 init)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = bert.BertModel.from_pretrained(tmp_path).eval()

    r, alpha = 4, 12  # alpha/r = 3, not 2, so a wrong scaling would show
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha,
                                                 target_modules=["query", "value"],
                                                 lora_dropout=0.0)).eval()
    inject_lora(ours, ["query", "value"], r=r, alpha=alpha, dropout=0.0)
    randomize_lora(ours)
    hf_layers = hf.base_model.model.encoder.layer
    with torch.no_grad():
        for i, layer in enumerate(ours.layers):
            for name in ("query", "value"):
                peft_linear = getattr(hf_layers[i].attention.self, name)
                peft_linear.lora_A["default"].weight.copy_(getattr(layer.attn, name).lora_A)
                peft_linear.lora_B["default"].weight.copy_(getattr(layer.attn, name).lora_B)

    input_ids, mask = random_batch(batch=5, length=16, seed=4)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        got = ours(input_ids, mask)
    real = mask[..., None].expand_as(got)
    assert (got[real] - expected[real]).abs().max() < 1e-5
    hf_trainable, _ = hf.get_nb_trainable_parameters()
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count_lora_parameters(ours) == ours_trainable == hf_trainable


def test_only_adapters_and_head_get_gradients():
    model = inject_lora(tiny_classifier(head="mlp_res"), ["query", "value"], r=4, alpha=8,
                        dropout=0.1)
    model.train()
    input_ids, mask = random_batch()
    torch.nn.functional.cross_entropy(model(input_ids, mask), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        trained = name.endswith(("lora_A", "lora_B")) or name.startswith(("head.", "classifier."))
        assert p.requires_grad == trained, name
        if trained:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B starts at zero, so A's first gradient is zero; B's is not, which is how training gets going.
    assert model.bert.layers[0].attn.query.lora_B.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0


def test_frozen_linears_in_bf16_give_the_same_amp_outputs():
    """autocast would cast the frozen weights to bf16 anyway: storing them in bf16 changes no
    bit."""
    model = inject_lora(tiny_classifier(), ["query", "value"], r=4, alpha=8, dropout=0.0).eval()
    randomize_lora(model)
    input_ids, mask = random_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids, mask)
        train_lora.store_frozen_linears_in(model, torch.bfloat16)
        after = model(input_ids, mask)
    assert model.bert.layers[0].attn.query.base.weight.dtype == torch.bfloat16
    # frozen, not adapted: also bf16
    assert model.bert.layers[0].ffn_in.weight.dtype == torch.bfloat16
    # trained: fp32 master copy
    assert model.bert.layers[0].attn.query.lora_A.dtype == torch.float32
    assert model.classifier.weight.dtype == torch.float32
    assert torch.equal(before, after)


def test_unknown_target_is_a_user_error():
    with pytest.raises(common.UserError, match="attn_out"):
        inject_lora(tiny_classifier(), ["query", "attn_out"], r=4, alpha=8, dropout=0.0)
    with pytest.raises(common.UserError, match="qkv"):
        train_lora.parse_targets("query,qkv")


@pytest.mark.parametrize("r, expected", [(4, 147_456), (8, 294_912)])
def test_bert_base_parameter_counts(r, expected):
    # bert-base geometry on the meta device: every shape, no memory, no download.
    with torch.device("meta"):
        encoder = bert.BertModel(bert.BertConfig(hidden_size=768, num_hidden_layers=12,
                                                 num_attention_heads=12, intermediate_size=3072))
        inject_lora(encoder, ["query", "value"], r=r, alpha=2 * r, dropout=0.0)
    assert count_lora_parameters(encoder) == expected  # 12 layers x 2 targets x (r*768 + 768*r)
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == expected


# --------------------------------------------------------------------------------------------------
# Real AG News rows: one small training run serves the round-trip and the learning tests.
# --------------------------------------------------------------------------------------------------
SMALL_RUN = ["--train-size", "480", "--val-size", "100", "--test-size", "400", "--epochs", "1",
             "--batch-size", "16", "--max-len", "64", "--seed", "0", "--device", "cpu",
             "--data", str(AGNEWS_DIR),
             # fp32: the round trip compares merged with unmerged to 1e-5
             "--precision", "fp32"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    if AGNEWS_DIR is None:
        pytest.skip(NO_ROWS)
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    train_lora.main([*SMALL_RUN, "--out", str(run_dir)])
    return run_dir


@needs_rows
def test_adapter_round_trip(small_run):
    saved = common.load_weights(small_run / "adapter.safetensors")
    assert any(k.endswith("lora_A") for k in saved) and "classifier.weight" in saved
    # no frozen weight in it
    assert not any(".base." in k or k.startswith("bert.embeddings") for k in saved)

    model, tokenizer, config = runfolders.load_run(small_run)
    assert all(layer.merged for layer in train_lora.lora_layers(model))
    # as SMALL_RUN
    splits = agnews.load_ag_news(AGNEWS_DIR, train_size=480, test_size=400, val_size=100)
    data = common.encode_splits(tokenizer, {"test": splits["test"]}, config["max_len"])
    probs = common.predict(model, data["test"], common.setup_runtime("cpu", "fp32"))
    np.testing.assert_allclose(probs, np.load(small_run / "test_probs.npy"), atol=1e-5, rtol=0)


def test_adapter_that_does_not_fit_is_refused(small_run, tmp_path):
    config = common.load_json(small_run / "config.json")
    for name in ("config.json", "metrics.json", "adapter.safetensors"):
        (tmp_path / name).write_bytes((small_run / name).read_bytes())
    common.save_json(tmp_path / "config.json", {**config, "targets": ["query", "key", "value"]})
    with pytest.raises(common.UserError, match="missing .*attn.key.lora_A"):
        runfolders.load_run(tmp_path)


def test_training_learns(small_run):
    metrics = common.load_json(small_run / "metrics.json")
    assert metrics["rows"]["test"] == 400
    assert metrics["test"]["accuracy"] > 0.5  # chance is 0.25
