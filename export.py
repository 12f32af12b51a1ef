"""Export a finished run to a HuggingFace model folder that `transformers` (and `peft`) load as is.

    python export.py runs/bert_pooler hf/agnews-bert                # full fine-tune, --head pooler
    python export.py runs/lora_r8_pooler hf/agnews-lora --peft      # LoRA: merged, and as adapter

    from transformers import pipeline
    classify = pipeline("text-classification", model="hf/agnews-bert", top_k=None,
                        truncation=True)
    classify("Oil climbs as OPEC cuts output")  # [[{'label': ..., 'score': ...}, ...]], best first

What DIR holds (a BertForSequenceClassification, what AutoModelForSequenceClassification builds):
  config.json            the encoder's sizes, id2label = the four class names, the run's dropout
  model.safetensors      every weight under HuggingFace's name (bert.hf_names: the map we load
                         pretrained weights through, read the other way); a LoRA run's update B A is
                         merged into the weights, so the folder is an ordinary model
  tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json
                         the model's own lowercasing WordPiece, model_max_length = the run's
                         --max-len
With --peft (LoRA runs), two more folders inside DIR:
  adapter/               adapter_config.json + adapter_model.safetensors: A and B of every adapted
                         layer under peft's names, the trained classifier as modules_to_save
  base/                  the pretrained model the adapter goes on, with a classifier of zeros
                         (every class 0.25): the adapter brings the trained one.
                         adapter_config.json names it by absolute path; after moving DIR, pass
                         the base model yourself:
    base = AutoModelForSequenceClassification.from_pretrained("hf/agnews-lora/base")
    model = peft.PeftModel.from_pretrained(base, "hf/agnews-lora/adapter")

Only BERT runs with --head pooler export: that head (pooler -> dropout -> linear) is exactly
BertForSequenceClassification. transformers has no class for our other heads or for the LSTMs.
truncation=True: the run read at most --max-len tokens of a text ([CLS] ... [SEP]); transformers
cuts a text the same way, but only when asked. Without it, a longer text is read whole and may be
classified differently.

DIR is built in a temp folder beside it and renamed into place, so it appears whole or not at all;
an existing DIR is kept unless --force, which replaces only an earlier export (it holds
agnews_export.json), never a run or another folder.
"""
import argparse
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

import bert
import common
import train_lora
from plumbing import flags, runfolders

ADAPTER_DIR = "adapter"
BASE_DIR = "base"
# The special tokens of BERT's WordPiece vocabularies (common.load_tokenizer assumes them too).
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


# --------------------------------------------------------------------------------------------------
# Which runs export
# --------------------------------------------------------------------------------------------------
def check_exportable(run_dir, peft):
    """The run's config.json, if transformers has a class for what it trained; else one clear line.
    Read before any weight is loaded, so a refusal costs nothing."""
    run_dir = Path(run_dir)
    runfolders.check_finished(run_dir)   # the rule vote, analyze, serve and --teacher follow too
    config = common.load_json(run_dir / "config.json")
    script = config.get("script")
    if script == "train_lstm":
        raise common.UserError(f"{run_dir} is a train_lstm.py run ({config.get('arch', 'lstm')}): "
                               f"HuggingFace transformers has no model class for our LSTMs; only "
                               f"BERT runs with --head pooler export")
    if script not in ("train_bert", "train_lora"):
        raise common.UserError(f"{run_dir}/config.json: unknown key script={script!r}")
    if config.get("head") != "pooler":
        raise common.UserError(f"{run_dir} has --head {config.get('head')}: HuggingFace "
                               f"transformers has no model class for that head; only --head pooler "
                               f"runs export (as BertForSequenceClassification)")
    if peft and script != "train_lora":
        raise common.UserError(f"--peft: {run_dir} is a full fine-tune (train_bert.py), it has no "
                               f"LoRA adapter")
    return config


# --------------------------------------------------------------------------------------------------
# A BertForSequenceClassification folder
# --------------------------------------------------------------------------------------------------
def hf_config(bert_config, run_config):
    """config.json of BertForSequenceClassification: our encoder's sizes, the class names, the
    head's dropout."""
    return {"architectures": ["BertForSequenceClassification"], "model_type": "bert",
            **asdict(bert_config),
            # all our encoder implements
            "hidden_act": "gelu", "position_embedding_type": "absolute",
            "classifier_dropout": run_config["dropout"],
            "problem_type": "single_label_classification",
            "id2label": {str(i): name for i, name in enumerate(common.CLASS_NAMES)},
            "label2id": {name: i for i, name in enumerate(common.CLASS_NAMES)}}


def encoder_tensor(encoder, name):
    """Our parameter `name` (e.g. layers.0.attn.query.weight) of a BertModel, LoRA or not."""
    module_name, attr = name.rsplit(".", 1)
    module = encoder.get_submodule(module_name)
    if isinstance(module, train_lora.LoRALinear):
        assert module.merged, "train_lora.load_model merges: base.weight holds W + B A * alpha/r"
        module = module.base
    return getattr(module, attr)


def hf_state(encoder, classifier_weight, classifier_bias):
    """BertForSequenceClassification's state: the encoder under "bert." + HF's names, then the
    classifier."""
    state = {f"bert.{hf}": encoder_tensor(encoder, ours)
             for ours, hf in bert.hf_names(encoder.config.num_hidden_layers).items()}
    state["classifier.weight"] = classifier_weight   # (4, D)
    state["classifier.bias"] = classifier_bias       # (4,)
    return {k: v.detach().float() for k, v in state.items()}


def write_model(folder, encoder, classifier_weight, classifier_bias, run_config):
    """config.json and model.safetensors: what AutoModelForSequenceClassification.from_pretrained
    reads."""
    folder.mkdir(parents=True, exist_ok=True)
    common.save_json(folder / "config.json", hf_config(encoder.config, run_config))
    # format=pt: transformers reads the metadata to know the tensors are PyTorch's
    common.save_weights(folder / "model.safetensors",
                        hf_state(encoder, classifier_weight, classifier_bias),
                        metadata={"format": "pt"})


def write_tokenizer(folder, model_dir, max_len):
    """The model's own tokenizer files, set up as we use them: AutoTokenizer then gives the ids
    common.encode gives (with truncation=True, cut at the run's max_len keeping the final [SEP])."""
    from tokenizers import Tokenizer
    model_dir = Path(model_dir)
    if not ((model_dir / "tokenizer.json").exists() or (model_dir / "vocab.txt").exists()):
        raise common.UserError(f"{model_dir}: needs tokenizer.json or vocab.txt")
    if (model_dir / "tokenizer.json").exists():
        # A shipped tokenizer.json may carry fixed padding and truncation (MiniLM's: 128); we pad
        # per batch and cut at the run's max_len, so drop both, as common.load_tokenizer does.
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # Through common's writer, as every file here: a full disk is one line naming the file
        # (tokenizers itself raises a bare Exception, shutil an OSError without the file's name).
        common.atomic_write(folder / "tokenizer.json", tokenizer.save)
    for name in ("vocab.txt", "special_tokens_map.json"):  # vocab.txt: for the slow BertTokenizer
        if (model_dir / name).exists():
            common.atomic_write(folder / name,
                                lambda tmp, source=model_dir / name: shutil.copyfile(source, tmp))
    # Uncased WordPiece, as common.load_tokenizer builds it from vocab.txt (lowercase=True).
    common.save_json(folder / "tokenizer_config.json",
                     {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                      "strip_accents": None, "tokenize_chinese_chars": True,
                      "model_max_length": max_len, **SPECIAL_TOKENS})


# --------------------------------------------------------------------------------------------------
# A peft adapter folder
# --------------------------------------------------------------------------------------------------
def hf_module_name(i, target):
    """--targets name -> HF's name of that nn.Linear in layer i (ffn_out ->
    encoder.layer.{i}.output.dense)."""
    return (bert.HF_NAMES[f"layers.{{i}}.{train_lora.TARGETS[target]}.weight"]
            .removesuffix(".weight").format(i=i))


def peft_target_pattern(targets):
    """peft's target_modules as one regular expression that peft full-matches against module names.
    A list of names would not do: peft takes a list entry as a suffix, and "output.dense" (ffn_out)
    is a suffix of "attention.output.dense" (out) too."""
    alternatives = [re.escape(hf_module_name("{i}", t)).replace(re.escape("{i}"), r"\d+")
                    for t in targets]
    return rf"bert\.({'|'.join(alternatives)})"


def adapter_config(config, base_path):
    """adapter_config.json; peft fills in its defaults for every other key."""
    return {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": str(base_path),
            "r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config["lora_dropout"],
            "target_modules": peft_target_pattern(config["targets"]),
            "modules_to_save": ["classifier"],
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True}


def adapter_state(model, targets):
    """LoRA's A (r, in) and B (out, r) of every adapted layer, and the classifier, under the names
    peft saves them with (its adapter name "default" left out, as PeftModel.save_pretrained does).
    peft computes x A^T B^T * lora_alpha/r, the same as train_lora.LoRALinear."""
    state = {}
    for i, layer in enumerate(model.bert.layers):
        for target in targets:
            lora = layer.get_submodule(train_lora.TARGETS[target])
            prefix = f"base_model.model.bert.{hf_module_name(i, target)}"
            state[f"{prefix}.lora_A.weight"] = lora.lora_A
            state[f"{prefix}.lora_B.weight"] = lora.lora_B
    state["base_model.model.classifier.weight"] = model.classifier.weight
    state["base_model.model.classifier.bias"] = model.classifier.bias
    return {k: v.detach().float() for k, v in state.items()}


def write_adapter(folder, model, config, base_path):
    folder.mkdir(parents=True, exist_ok=True)
    common.save_json(folder / "adapter_config.json", adapter_config(config, base_path))
    common.save_weights(folder / "adapter_model.safetensors",
                        adapter_state(model, config["targets"]),
                        metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------
# What marks an export
# --------------------------------------------------------------------------------------------------
# Written into every export: --force replaces a folder that holds it (an earlier export), never a
# run or anything else.
EXPORT_MARKER = "agnews_export.json"


def is_export(folder):
    """A folder this script wrote: with its marker, or (written before the marker) a
    BertForSequenceClassification config.json with our four labels and no run's metrics.json."""
    folder = Path(folder)
    if (folder / EXPORT_MARKER).is_file():
        return True
    try:
        config = common.load_json(folder / "config.json")
    except common.UserError:
        return False
    return (config.get("architectures") == ["BertForSequenceClassification"]
            and config.get("label2id") == {name: i for i, name in enumerate(common.CLASS_NAMES)}
            and not (folder / "metrics.json").exists())


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    parser.add_argument("run", help="a finished run folder, e.g. runs/bert_pooler")
    parser.add_argument("out", help="the HuggingFace model folder to write")
    parser.add_argument("--peft", action="store_true",
                        help=f"LoRA runs: also write the adapter for peft ({ADAPTER_DIR}/) and the "
                             f"base model it goes on ({BASE_DIR}/) inside the folder")
    parser.add_argument("--force", action="store_true", help="replace the folder if it exists")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_dir, out = Path(args.run), Path(args.out)
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise common.UserError(f"{out}: that would replace the run folder {run_dir} itself; "
                               f"choose another folder")
    if out.resolve().is_relative_to(run_dir.resolve()) and out.exists():
        raise common.UserError(f"{out}: part of the run folder {run_dir}; choose another folder")
    # Before the slow part; checked again when writing.
    runfolders.check_target(out)
    runfolders.check_replaceable(out, args.force, is_export, "an export")

    check_exportable(run_dir, args.peft)
    model, _, config = runfolders.load_run(run_dir)   # a LoRA run comes back merged
    model_dir = common.resolve_model(config["model"])
    with runfolders.folder_written_atomically(out, args.force, is_export, "an export") as tmp:
        common.save_json(tmp / EXPORT_MARKER, {"run": str(run_dir), "script": config["script"],
                                               "peft": args.peft})
        write_model(tmp, model.bert, model.classifier.weight, model.classifier.bias, config)
        write_tokenizer(tmp, model_dir, config["max_len"])
        if args.peft:
            base = bert.BertModel.from_pretrained(model_dir)
            zeros = (torch.zeros_like(model.classifier.weight),
                     torch.zeros_like(model.classifier.bias))
            write_model(tmp / BASE_DIR, base, *zeros, config)
            write_tokenizer(tmp / BASE_DIR, model_dir, config["max_len"])
            write_adapter(tmp / ADAPTER_DIR, model, config, out.resolve() / BASE_DIR)
    merged = " (LoRA merged)" if config["script"] == "train_lora" else ""
    print(f"saved {out}/: BertForSequenceClassification{merged}, "
          f"labels {', '.join(common.CLASS_NAMES)}, "
          f"model_max_length {config['max_len']}")
    if args.peft:
        print(f"saved {out / ADAPTER_DIR}/: peft LoRA adapter "
              f"(r {config['r']}, {','.join(config['targets'])}) "
              f"for the base model in {out / BASE_DIR}/")


if __name__ == "__main__":
    common.run_main(main)
