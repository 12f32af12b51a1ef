"""fewsample.py: --llrd gives each layer the rate it should (read off the optimizer's groups, LoRA's
adapters included) and --reinit-top changes the named layers and the pooler only."""
import pytest
import torch

import bert
import common
import fewsample
import loop
import plain_loop
import resume
import train_lora


def tiny_classifier(layers=3, head="pooler"):
    torch.manual_seed(0)
    cfg = bert.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=layers,
                          num_attention_heads=4, intermediate_size=64)
    return bert.BertClassifier(bert.BertModel(cfg), head=head)


def rate_of_each_parameter(model, optimizer):
    where = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {name: (where[id(p)]["lr"], where[id(p)]["weight_decay"])
            for name, p in model.named_parameters() if p.requires_grad}


def expected_depth(name, layers=3):
    if name.startswith("bert.embeddings."):
        return layers + 1
    if name.startswith("bert.layers."):
        return layers - int(name.split(".")[2])
    return 0  # pooler, head, classifier


def test_llrd_gives_each_layer_its_rate_and_decays_matrices_only():
    model = tiny_classifier()
    optimizer = loop.make_optimizer(model, lr=1e-3, weight_decay=0.01, llrd=0.9)
    rates = rate_of_each_parameter(model, optimizer)
    assert len(rates) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, (lr, decay) in rates.items():
        assert lr == pytest.approx(1e-3 * 0.9 ** expected_depth(name), rel=1e-12), name
        assert decay == (0.01 if dict(model.named_parameters())[name].dim() >= 2 else 0.0), name
    assert rates["bert.pooler.dense.weight"][0] == rates["classifier.weight"][0] == 1e-3
    assert rates["bert.layers.2.ffn_in.weight"][0] == pytest.approx(0.9e-3)
    assert rates["bert.embeddings.word.weight"][0] == pytest.approx(1e-3 * 0.9 ** 4)
    # the schedule scales every group alike: the ratios hold mid-warm-up
    scheduler = plain_loop.warmup_linear_decay(optimizer, 10, 0.5)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    lrs = {group["depth"]: group["lr"] for group in optimizer.param_groups}
    assert lrs[4] / lrs[0] == pytest.approx(0.9 ** 4)


def test_without_llrd_the_groups_are_the_two_they_always_were():
    model = tiny_classifier()
    groups = loop.make_optimizer(model, lr=1e-3, weight_decay=0.01).param_groups
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.01, 1e-3), (0.0, 1e-3)]
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert all(p.dim() < 2 for p in groups[1]["params"])


def test_llrd_reaches_loras_adapters_by_their_layer():
    model = tiny_classifier()
    train_lora.inject_lora(model, ["query", "value"], r=2, alpha=4, dropout=0.0)
    rates = rate_of_each_parameter(model, loop.make_optimizer(model, 1e-3, 0.01, llrd=0.5))
    assert set(rates) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert rates["bert.layers.0.attn.query.lora_A"][0] == pytest.approx(1e-3 * 0.5 ** 3)
    assert rates["bert.layers.2.attn.value.lora_B"][0] == pytest.approx(1e-3 * 0.5)
    assert rates["classifier.weight"][0] == 1e-3
    assert not any(name.startswith("bert.embeddings") for name in rates)  # frozen: no group


@pytest.mark.parametrize("count", [1, 2])
def test_reinit_changes_the_top_layers_and_the_pooler_only(count):
    model = tiny_classifier(layers=3)
    with torch.no_grad():  # LayerNorms away from 1 and 0, so that their re-init can be seen
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    names = fewsample.reinit_top_layers(model, count)
    assert names == [f"bert.layers.{i}" for i in range(3 - count, 3)] + ["bert.pooler"]
    for key, value in model.state_dict().items():
        fresh = any(key.startswith(n + ".") for n in names)
        changed = not torch.equal(value, before[key])
        if key.endswith("norm.weight") and fresh:
            assert torch.equal(value, torch.ones_like(value)), key
        elif key.endswith(".bias") and fresh:
            assert torch.equal(value, torch.zeros_like(value)), key
        else:
            assert changed == fresh, key  # re-initialised weights moved, all others did not
    weight = model.bert.layers[2].ffn_in.weight
    assert weight.std().item() == pytest.approx(fewsample.INIT_STD, rel=0.15)
    with pytest.raises(common.UserError, match="--reinit-top 4: the encoder has 3 layers"):
        fewsample.reinit_top_layers(model, 4)
    assert fewsample.reinit_top_layers(model, 0) == []


def test_resuming_a_run_from_before_these_flags_accepts_them_off_only():
    """A resume point written before --llrd existed has no "llrd": resuming with --llrd 1 (what it
    ran with) goes on, with --llrd 0.9 it is a change of flags."""
    then = {"lr": 5e-5, "epochs": 1}
    assert resume.changed_flags(then, {"lr": 5e-5, "epochs": 1, "llrd": 1.0, "rdrop": 0.0}) == {}
    assert resume.changed_flags(then, {"lr": 5e-5, "epochs": 1, "llrd": 0.9}) == {
        "llrd": (1.0, 0.9)}
    assert resume.changed_flags({**then, "llrd": 0.9}, {**then, "llrd": 0.9}) == {}
