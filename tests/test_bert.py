"""Our hand-written BERT against transformers.BertModel on the same weights (the oracle)."""
import json

import pytest
import torch
import transformers

import bert
import common
from plumbing import classifiers

# Max abs difference. In float64 the two compute the same maths, at every position (measured
# 2e-14 on MiniLM): any slip in it shows far above 1e-9. In fp32 their attention kernels round
# differently (SDPA here, eager there); on real tokens that stays below 1e-5 (measured 4e-6), but
# padded positions, whose outputs nothing reads, drift up to 2e-4, so fp32 is checked on real ones.
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def padded_batch(vocab_size, lengths, generator):
    """Random non-pad ids (1..vocab-1), padded with 0 to the longest row."""
    T = max(lengths)
    input_ids = torch.randint(1, vocab_size, (len(lengths), T), generator=generator)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return input_ids.masked_fill(~mask, 0), mask


def compare(model_dir, input_ids, mask):
    for dtype in (torch.float64, torch.float32):
        ours = bert.BertModel.from_pretrained(model_dir).to(dtype).eval()
        theirs = (transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager")
                  .to(dtype).eval())
        with torch.no_grad():
            hidden = ours(input_ids, mask)
            pooled = ours.pooler(hidden)
            ref = theirs(input_ids=input_ids, attention_mask=mask.long())
        assert hidden.shape == ref.last_hidden_state.shape and hidden.dtype == dtype
        # Both mask padded keys only, so in exact maths padded queries match too.
        checked = mask if dtype == torch.float32 else torch.ones_like(mask)
        assert (hidden - ref.last_hidden_state)[checked].abs().max().item() < TOL[dtype], dtype
        assert (pooled - ref.pooler_output).abs().max().item() < TOL[dtype], dtype


def test_minilm_matches_transformers_on_padded_batch():
    generator = torch.Generator()
    print(f"input seed {generator.seed()}")  # shown on failure
    input_ids, mask = padded_batch(30522, [37, 5, 128, 64], generator)
    compare(common.resolve_model("minilm"), input_ids, mask)


@pytest.mark.parametrize("layers,hidden,heads,intermediate", [(1, 32, 2, 64), (3, 48, 4, 80),
                                                              (2, 64, 8, 256)])
def test_random_config_matches_transformers(tmp_path, layers, hidden, heads, intermediate):
    config = transformers.BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=intermediate,
                                     max_position_embeddings=64)
    torch.manual_seed(torch.seed())
    ref = transformers.BertModel(config)
    # the default init leaves biases and LayerNorms at 0/1: perturb them all
    for p in ref.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(torch.seed())
    input_ids, mask = padded_batch(97, [9, 1, 23, 17], generator)
    compare(tmp_path, input_ids, mask)


def test_an_all_real_mask_gives_what_no_mask_gives(tmp_path):
    """A batch without padding gives the same hidden states with its all-True mask as with no mask
    at all, so passing the mask always (as bert.py does, to avoid asking the GPU "any padding?")
    costs no accuracy."""
    model = bert.BertModel(bert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64)).eval()
    input_ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(model(input_ids, mask), model(input_ids, None), atol=1e-6)


# -- bad checkpoints: one clear error naming what is wrong -----------------------------------------
def write_model(tmp_path, state, config):
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, tmp_path / "model.safetensors")


@pytest.fixture
def small_checkpoint(tmp_path):
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path)
    from safetensors.torch import load_file
    return (tmp_path, load_file(tmp_path / "model.safetensors"),
            json.loads((tmp_path / "config.json").read_text()))


def test_missing_key_is_named(small_checkpoint):
    path, state, config = small_checkpoint
    del state["encoder.layer.0.attention.self.query.weight"]
    write_model(path, state, config)
    with pytest.raises(common.UserError,
                       match=r"missing \['encoder.layer.0.attention.self.query.weight'\]"):
        bert.BertModel.from_pretrained(path)


def test_unexpected_key_is_named(small_checkpoint):
    path, state, config = small_checkpoint
    state["encoder.layer.7.mystery.weight"] = torch.zeros(2)
    write_model(path, state, config)
    with pytest.raises(common.UserError, match=r"unexpected \['encoder.layer.7.mystery.weight'\]"):
        bert.BertModel.from_pretrained(path)


def test_misshaped_key_is_named(small_checkpoint):
    path, state, config = small_checkpoint
    config["intermediate_size"] = 48  # the checkpoint has 32
    write_model(path, state, config)
    with pytest.raises(common.UserError,
                       match=r"mis-shaped \['encoder.layer.0.intermediate.dense.weight "
                             r"\(32, 16\) != \(48, 16\)'"):
        bert.BertModel.from_pretrained(path)


def test_corrupt_safetensors_is_one_line(small_checkpoint):
    path, _, _ = small_checkpoint
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(common.UserError, match="not a readable safetensors file"):
        bert.BertModel.from_pretrained(path)


def test_unsupported_config_is_named(small_checkpoint):
    path, state, config = small_checkpoint
    config["hidden_act"] = "relu"
    write_model(path, state, config)
    with pytest.raises(common.UserError, match="hidden_act 'relu' is not supported"):
        bert.BertModel.from_pretrained(path)


def test_unknown_model_name_is_one_line(tmp_path):
    with pytest.raises(common.UserError,
                       match="expected minilm, bert-base-uncased or a model folder"):
        common.resolve_model(str(tmp_path / "nope"))


def test_unknown_head_is_named():
    encoder = bert.BertModel(bert.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=16))
    with pytest.raises(common.UserError, match="unknown head 'gru'"):
        bert.BertClassifier(encoder, head="gru")


@pytest.mark.parametrize("head", classifiers.HEAD_NAMES)
def test_every_head_gives_a_row_the_same_logits_alone_or_padded_in_a_batch(head):
    """Padding must not change a prediction: a test row's result may not depend on its batch."""
    torch.manual_seed(torch.seed())
    encoder = bert.BertModel(bert.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    model = classifiers.bert_classifier(encoder, head).eval()
    input_ids, mask = padded_batch(60, [5, 17, 2], torch.Generator().manual_seed(torch.seed()))
    with torch.no_grad():
        batched = model(input_ids, mask)
        for i, length in enumerate([5, 17, 2]):
            alone = model(input_ids[i: i + 1, :length], mask[i: i + 1, :length])
            assert (alone - batched[i]).abs().max().item() < 1e-5, f"{head}: row {i}"


def test_the_mean_head_is_sentence_transformers_mean_pooling_of_minilm():
    """--head mean is the sentence vector all-MiniLM-L6-v2 was trained to give (before its L2
    normalisation): the mean of transformers' last hidden states over the real tokens."""
    generator = torch.Generator()
    print(f"input seed {generator.seed()}")  # shown on failure
    input_ids, mask = padded_batch(30522, [23, 4, 61], generator)
    model_dir = common.resolve_model("minilm")
    ours = bert.BertClassifier(bert.BertModel.from_pretrained(model_dir), head="mean").eval()
    theirs = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        features = ours.features(input_ids, mask)
        hidden = theirs(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    for i, length in enumerate(mask.sum(1).tolist()):
        reference = hidden[i, :length].mean(0)              # the real tokens only
        assert (features[i] - reference).abs().max().item() < TOL[torch.float32], f"row {i}"
