"""The models the benchmarks measure: a pretrained folder (--model), or one of the study's two
shapes with random weights (--random-init). Speed and memory depend on shapes, not on weights, and
the GPU machine has no model files."""
from pathlib import Path

import common
import dropout as cheap_dropout

# Shapes of the two models of the study: all-MiniLM-L6-v2 (this project's default) and bert-base.
GEOMETRIES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
}


def model_folder(model, shape, tmp):
    """A folder with config.json and model.safetensors to compare on: --model's folder, or, given a
    shape (BertConfig fields, e.g. GEOMETRIES["bert-base"]), random weights saved by transformers in
    HuggingFace layout into `tmp`, so that our BERT and transformers' load the very same file."""
    if shape is None:
        return common.resolve_model(model)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.BertModel(transformers.BertConfig(**shape)).save_pretrained(tmp)
    return Path(tmp)


def set_attention(model, impl="auto", cheap_masks=True):
    """How every attention layer of `model` computes (dropout.WrittenOutAttention.impl: "auto",
    "sdpa" or "written") and whether its dropouts draw dropout.py's cheap masks or torch's, so that
    a bench can hold the settings side by side. Swaps dropout.py's layers in first."""
    cheap_dropout.use_cheap_dropout(model)
    for module in model.modules():
        if isinstance(module, cheap_dropout.WrittenOutAttention):
            module.impl = impl
        if hasattr(module, "cheap_masks"):
            module.cheap_masks = cheap_masks
