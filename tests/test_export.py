"""export.py: a finished run -> a HuggingFace folder, checked with the real clients. transformers'
pipeline and AutoModelForSequenceClassification, and peft's PeftModel on the exported base, must
give the probabilities the run itself saved (test_probs.npy) on the same real test rows; other heads
and broken run folders stop with one line; the folder appears whole or not at all."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers

import bert
import common
import export
import train_bert
import train_lora
from plumbing import runfolders
from conftest import AGNEWS_DIR, NO_ROWS, single_thread

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 48
SMALL_RUN = ["--train-size", "160", "--val-size", "40", "--test-size", "80", "--epochs", "1",
             "--max-len", str(MAX_LEN), "--device", "cpu", "--data", str(AGNEWS_DIR),
             "--precision", "fp32"]  # transformers scores in fp32: the run must too, for 1e-4


@pytest.fixture(scope="module")
def pooler_run(tmp_path_factory):
    """A finished full fine-tune with the pooler head, and its export."""
    if AGNEWS_DIR is None:
        pytest.skip(NO_ROWS)
    run_dir = tmp_path_factory.mktemp("runs") / "bert_pooler"
    with single_thread():
        train_bert.main([*SMALL_RUN, "--out", str(run_dir)])
        export.main([str(run_dir), str(run_dir.parent / "hf_pooler")])
    return run_dir, run_dir.parent / "hf_pooler"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished LoRA run (pooler head), and its export with --peft."""
    if AGNEWS_DIR is None:
        pytest.skip(NO_ROWS)
    run_dir = tmp_path_factory.mktemp("runs") / "lora"
    with single_thread():
        train_lora.main([*SMALL_RUN, "--r", "4", "--out", str(run_dir)])
        export.main([str(run_dir), str(run_dir.parent / "hf_lora"), "--peft"])
    return run_dir, run_dir.parent / "hf_lora"


def as_class_columns(results):
    """pipeline(top_k=None) output, [[{label, score}, ...] per text] -> (N, 4) in CLASS_NAMES
    order."""
    assert all(sorted(d["label"] for d in r) == sorted(common.CLASS_NAMES) for r in results)
    return np.array([[{d["label"]: d["score"] for d in r}[name] for name in common.CLASS_NAMES]
                     for r in results])


@torch.no_grad()
def hf_probs(model, tokenizer, texts, **tokenizer_kwargs):
    """Softmax probabilities of a transformers / peft model on texts, in one padded batch."""
    batch = tokenizer(list(texts), padding=True, return_tensors="pt", **tokenizer_kwargs)
    return model.eval()(**batch).logits.softmax(-1).numpy()


def check_against_run(run_dir, hf_dir):
    """pipeline and AutoModelForSequenceClassification on hf_dir give the run's saved test
    probabilities."""
    rows = runfolders.load_scored_split(run_dir, "test")
    saved = runfolders.load_probs(run_dir, "test", len(rows))
    with single_thread():
        classify = transformers.pipeline("text-classification", model=str(hf_dir), top_k=None,
                                         truncation=True, device="cpu")
        np.testing.assert_allclose(as_class_columns(classify(list(rows.texts))), saved,
                                   atol=1e-4, rtol=0)

        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            hf_dir, output_loading_info=True)
        assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
        assert model.config.id2label == dict(enumerate(common.CLASS_NAMES))
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        np.testing.assert_allclose(hf_probs(model, tokenizer, rows.texts, truncation=True), saved,
                                   atol=1e-4, rtol=0)

        # The rows longer than --max-len are where the cut matters: transformers' truncation gives
        # the ids common.encode gives ([CLS] ... [SEP], cut keeping the final [SEP]), and without it
        # the probabilities are not the run's.
        ours = common.encode(common.load_tokenizer(common.resolve_model("minilm")), rows.texts,
                             MAX_LEN)
        theirs = tokenizer(list(rows.texts), truncation=True)["input_ids"]
        assert [list(r) for r in ours] == theirs
        whole = tokenizer(list(rows.texts))["input_ids"]
        assert sum(len(ids) > MAX_LEN for ids in whole) >= 10
        assert np.abs(hf_probs(model, tokenizer, rows.texts) - saved).max() > 1e-3
    return rows, saved, tokenizer


def test_pooler_run_exports_to_what_transformers_loads(pooler_run):
    run_dir, hf_dir = pooler_run
    check_against_run(run_dir, hf_dir)
    config = common.load_json(hf_dir / "config.json")
    assert (config["architectures"] == ["BertForSequenceClassification"]
            and config["problem_type"] == "single_label_classification")
    assert config["label2id"] == {name: i for i, name in enumerate(common.CLASS_NAMES)}
    assert not (hf_dir / export.ADAPTER_DIR).exists()


def test_lora_run_exports_merged_and_as_a_peft_adapter(lora_run):
    run_dir, hf_dir = lora_run
    rows, saved, tokenizer = check_against_run(run_dir, hf_dir)   # the merged folder
    with single_thread():
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            hf_dir / export.BASE_DIR)
        # The base's classifier is zeros: were the adapter's classifier (modules_to_save) not
        # loaded, every class would come out at 0.25.
        np.testing.assert_allclose(hf_probs(base, tokenizer, rows.texts[:4], truncation=True), 0.25,
                                   atol=1e-7)
        model = peft.PeftModel.from_pretrained(base, hf_dir / export.ADAPTER_DIR)
        np.testing.assert_allclose(hf_probs(model, tokenizer, rows.texts, truncation=True), saved,
                                   atol=1e-4, rtol=0)
    adapted = sorted(name.removeprefix("base_model.model.")
                     for name, module in model.named_modules()
                     if isinstance(module, peft.tuners.lora.LoraLayer))
    assert adapted == sorted(f"bert.encoder.layer.{i}.attention.self.{t}"
                             for i in range(6) for t in ("query", "value"))


HF_TARGETS = {"query": "attention.self.query", "key": "attention.self.key",
              "value": "attention.self.value", "out": "attention.output.dense",
              "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}


@pytest.mark.parametrize("targets", [list(train_lora.TARGETS), ["key", "ffn_out"]])
def test_every_lora_target_lands_on_the_same_layer_in_peft(tmp_path, targets):
    """--targets on a small random BERT: peft must wrap exactly the layers we adapted, and compute
    what we compute. ffn_out without out is the trap: ffn_out's "output.dense" is a suffix of out's
    "attention.output.dense"."""
    torch.manual_seed(0)
    cfg = bert.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = bert.BertClassifier(bert.BertModel(cfg), "pooler", dropout=0.0).eval()
    config = {"dropout": 0.0, "r": 2, "alpha": 3, "lora_dropout": 0.0, "targets": targets}
    zeros = torch.zeros_like(model.classifier.weight), torch.zeros_like(model.classifier.bias)
    export.write_model(tmp_path / "base", model.bert, *zeros, config)
    input_ids = torch.randint(1, cfg.vocab_size, (3, 10))
    # (B, T), rows padded
    attention_mask = torch.arange(10)[None, :] < torch.tensor([[10], [7], [4]])
    input_ids[~attention_mask] = 0
    with torch.no_grad():
        without_lora = model(input_ids, attention_mask)
        train_lora.inject_lora(model, config["targets"], config["r"], config["alpha"],
                               config["lora_dropout"])
        for lora in train_lora.lora_layers(model):
            lora.lora_B.normal_(0, 0.5)  # B starts at zero; a trained one is not
        ours = model(input_ids, attention_mask)  # (B, 4)
        assert (ours - without_lora).abs().max() > 0.1
    export.write_adapter(tmp_path / "adapter", model, config, tmp_path / "base")

    with torch.no_grad():
        base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(theirs(input_ids=input_ids,
                                          attention_mask=attention_mask.long()).logits, ours,
                                   atol=1e-5, rtol=0)
        train_lora.merge_lora(model)
        export.write_model(tmp_path / "merged", model.bert, model.classifier.weight,
                           model.classifier.bias, config)
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "merged").eval()
        torch.testing.assert_close(merged(input_ids=input_ids,
                                          attention_mask=attention_mask.long()).logits, ours,
                                   atol=1e-5, rtol=0)
    adapted = {name.removeprefix("base_model.model.bert.")
               for name, module in theirs.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert adapted == {f"encoder.layer.{i}.{HF_TARGETS[t]}" for i in range(2) for t in targets}


def run_export(*argv):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT)


def copy_run(run_dir, dest, skip=()):
    shutil.copytree(run_dir, dest, ignore=lambda folder, names: [n for n in names if n in skip])
    return dest


@pytest.mark.parametrize("change", [{"head": "textcnn"},
                                    {"script": "train_lstm", "arch": "bilstm_attn"}])
def test_runs_transformers_has_no_class_for_refuse_with_one_line(pooler_run, tmp_path, change):
    # Only config.json decides, so the pooler run's folder with another config stands in for such a
    # run.
    run_dir = copy_run(pooler_run[0], tmp_path / "run", skip=("model.safetensors",))
    common.save_json(run_dir / "config.json",
                     {**common.load_json(run_dir / "config.json"), **change})
    result = run_export(run_dir, tmp_path / "hf")
    assert result.returncode == 2
    assert (result.stderr.count("\n") == 1
            and "transformers has no model class" in result.stderr), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("which", ["pooler", "lora"])
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_corrupt_weights_stop_with_one_line(pooler_run, lora_run, tmp_path, which,
                                                       damage):
    run_dir, weights = ((pooler_run[0], "model.safetensors") if which == "pooler"
                        else (lora_run[0], "adapter.safetensors"))
    copy = copy_run(run_dir, tmp_path / "run", skip=(weights,))
    if damage == "truncated":
        data = (run_dir / weights).read_bytes()
        (copy / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserError) as err:
        export.main([str(copy), str(tmp_path / "hf")])
    message = str(err.value)
    assert "\n" not in message and str(copy / weights) in message, message
    assert (("No such file" in message) if damage == "missing"
            else ("not a readable safetensors file" in message))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_existing_folder_is_replaced_only_with_force_and_whole(pooler_run, tmp_path,
                                                                  monkeypatch):
    run_dir, earlier_export = pooler_run
    out = tmp_path / "hf"
    shutil.copytree(earlier_export, out)   # an earlier export: --force may replace it
    (out / "mine.txt").write_text("keep me")
    exported = sorted(p.name for p in out.iterdir())
    with pytest.raises(common.UserError, match="already exists: pass --force"):
        export.main([str(run_dir), str(out)])
    with pytest.raises(common.UserError, match="would replace the run folder"):
        export.main([str(run_dir), str(run_dir.parent), "--force"])

    # A failure after the model files were written: the old folder stays as it was, and neither the
    # temp folder nor a parent folder made for the new one is left behind.
    def fail(*_):
        raise common.UserError("the disk is full")
    monkeypatch.setattr(export, "write_tokenizer", fail)
    for target, force in ((out, ["--force"]), (tmp_path / "new" / "deeper" / "hf", [])):
        with pytest.raises(common.UserError, match="the disk is full"):
            export.main([str(run_dir), str(target), *force])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
        assert sorted(p.name for p in out.iterdir()) == exported
    monkeypatch.undo()

    export.main([str(run_dir), str(out), "--force"])
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's owner-only 0700


def tree(folder):
    """Every path under folder, so a test can tell that a refusal made nothing."""
    return sorted(p.relative_to(folder) for p in Path(folder).rglob("*"))


@pytest.mark.parametrize("target", ["a_file/hf", "a_file/deeper/hf", "RUN/config.json/hf"])
def test_a_target_under_a_file_stops_with_one_line(pooler_run, tmp_path, target):
    """mkdir under a file raises FileExistsError or NotADirectoryError: one line instead, naming
    the file, and neither the temp folder nor a parent folder left behind."""
    run_dir = pooler_run[0]
    (tmp_path / "a_file").write_text("not a folder")
    out = (tmp_path / target if not target.startswith("RUN/")
           else run_dir / target.removeprefix("RUN/"))
    before = tree(tmp_path), tree(run_dir)
    result = run_export(run_dir, out)
    assert result.returncode == 2
    assert (result.stderr.count("\n") == 1 and "is a file" in result.stderr
            and "Traceback" not in result.stderr), result.stderr
    assert (str(tmp_path / "a_file") if target.startswith("a_file")
            else str(run_dir / "config.json")) in result.stderr
    assert (tree(tmp_path), tree(run_dir)) == before


@pytest.mark.parametrize("unfinished", ["metrics.json deleted", "resume point left"])
def test_an_unfinished_run_is_refused_with_one_line(pooler_run, tmp_path, unfinished):
    """Only finished runs export, as vote.py and analyze.py use only finished runs."""
    skip = ("metrics.json",) if unfinished == "metrics.json deleted" else ()
    run_dir = copy_run(pooler_run[0], tmp_path / "run", skip=skip)
    if unfinished == "resume point left":
        (run_dir / runfolders.RESUME_FILE).write_bytes(b"")
    before = tree(tmp_path)
    result = run_export(run_dir, tmp_path / "hf")
    assert result.returncode == 2
    assert (result.stderr.count("\n") == 1 and str(run_dir) in result.stderr
            and ("no metrics.json" if skip else runfolders.RESUME_FILE) in result.stderr), \
        result.stderr
    assert tree(tmp_path) == before


def readme_snippet(name):
    """README's ```python block that names `name`, as a new user would copy it."""
    blocks = (ROOT / "README.md").read_text().split("```python\n")[1:]
    return next(block.split("```")[0] for block in blocks if name in block)


def test_readmes_pipeline_snippet_runs_from_the_project_folder(pooler_run):
    """README's snippet, run as typed in the project folder (its cwd on sys.path, where a folder of
    ours named like a package transformers imports would shadow it: issue 29's `kernels/`)."""
    _, hf_dir = pooler_run
    snippet = readme_snippet("pipeline(").replace('"hf/agnews-bert"', repr(str(hf_dir)))
    assert repr(str(hf_dir)) in snippet                    # the snippet still names that folder
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = ast.literal_eval(result.stdout.strip())     # [{label, score}, ...], the best first
    printed = printed[0] if isinstance(printed[0], list) else printed   # or one list per text
    assert sorted(d["label"] for d in printed) == sorted(common.CLASS_NAMES)
