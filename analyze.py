"""Error analysis of a saved run, as pictures and tables.

    python analyze.py --report --confusion                 # the newest finished run under runs/
    python analyze.py --run runs/bert_pooler --pca --tsne --sample 2000
    python analyze.py --run runs/bert_pooler --tfidf --top-k 15   # -> analysis/penalty_words.json
    python analyze.py --run runs/bert_attnpool --errors --attribution --top 5
    python analyze.py --run runs/bert_pooler --attribution --text 'Oracle buys PeopleSoft for $10bn'
    python analyze.py --run runs/bert_pooler --curves
    python analyze.py --run runs/bert_pooler --shap --text 'Oracle profit rises on software sales'
    python analyze.py --run runs/bert_pooler --contrast 'text A' 'text B'   # why two similar texts differ
    python analyze.py --compare                            # every experiment under runs/, seeds pooled
    python analyze.py --compare runs/study --baseline bert_pooler

Everything is read from the run folder: config.json (how it was trained), metrics.json (its history
and the fingerprint of its test split), test_probs.npy (its probabilities on that split) and, for the
embedding maps and attributions, the model itself. Figures are PNG files in <run>/analysis/ (or
--out); every table is printed.

The questions, in order: how good is it (--report), which classes does it mix up (--confusion), do
the classes separate in its sentence vectors (--pca, --tsne), which words go with the mix-ups
(--tfidf; the list feeds the attnpool head's --penalty-words), which texts does it get wrong with
the most confidence (--errors), which tokens pushed it there (--attribution; --shap, Shapley values
of whole words beside them), why two similar texts get different classes (--contrast), and did
training converge (--curves). Across runs: which experiment is better, by how much, and is the
difference more than seed and test-set noise (--compare)?
"""
import argparse
import csv
import json
import math
import textwrap
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from matplotlib.colors import Normalize
from scipy.stats import binomtest, spearmanr
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix, f1_score

import common

# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
DPI = 100
CONFUSION_SIZE = (12, 5)     # inches: counts | row-normalised rates
MAP_SIZE = (8, 7)            # one PCA or t-SNE scatter
CURVES_SIZE = (11, 4.5)      # loss | accuracy and macro F1
WIDE = 12                    # width of the figures whose height follows their content (tokens, words)
CLASS_COLOURS = ["tab:blue", "tab:green", "tab:orange", "tab:purple"]
BUSINESS, SCITECH = common.CLASS_NAMES.index("Business"), common.CLASS_NAMES.index("Sci/Tech")
TSNE_PCA_DIMS = 50           # t-SNE runs on the top principal components: much faster, same picture
PAD_ID = 0                   # common.pad_batch pads with id 0 ([PAD] in the BERT vocabularies)
# TF-IDF words: letters only (numbers and years are not topics), 2+ of them, English stop words out.
WORD_PATTERN = r"(?u)\b[^\W\d_]{2,}\b"


def save_figure(fig, path):
    """Write at a fixed DPI and no 'tight' cropping, so a figure's pixel size is its inches * DPI."""
    path = Path(path)
    common.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    plt.close(fig)
    print(f"wrote {path}")
    return path


# --------------------------------------------------------------------------------------------------
# The run: config, metrics, its test split and probabilities, its model (each loaded when first used)
# --------------------------------------------------------------------------------------------------
def newest_run(root="runs"):
    """The newest finished training run under root (a saved vote has no model: name it with --run)."""
    runs = [run for run in common.find_runs(root) if common.load_json(run / "config.json").get("script") != "vote"]
    if not runs:
        raise common.UserError(f"no finished run under {root}/: pass --run runs/NAME")
    return runs[-1]


class SavedRun:
    """A finished run folder. The test split, the saved probabilities and the model load on first use,
    so --curves needs no data and --confusion no model."""

    def __init__(self, run_dir, data_dir=None, device="auto"):
        self.dir = Path(run_dir)
        if not (self.dir / "metrics.json").exists():
            raise common.UserError(f"{self.dir}: no metrics.json (not a finished run folder)")
        self.config = common.load_json(self.dir / "config.json")
        self.metrics = common.load_json(self.dir / "metrics.json")
        self.data_dir = data_dir
        self.device = device

    @cache
    def split(self, name):
        return common.load_scored_split(self.dir, name, self.data_dir)

    @cache
    def probs_of(self, name):
        """(N, 4) float32, rows in the order of the val or test split."""
        return common.load_probs(self.dir, name, len(self.split(name)))

    @property
    def test(self):
        return self.split("test")

    @property
    def probs(self):
        return self.probs_of("test")

    @property
    def preds(self):
        return self.probs.argmax(1)

    @cached_property
    def runtime(self):
        return common.setup_runtime(self.device)

    @cached_property
    def model_and_tokenizer(self):
        model, tokenizer, _ = common.load_run(self.dir, self.runtime.device)
        return model, tokenizer

    @property
    def max_len(self):
        return self.config.get("max_len") or self.config.get("args", {}).get("max_len", 128)


# --------------------------------------------------------------------------------------------------
# --report and --confusion
# --------------------------------------------------------------------------------------------------
def show_report(run):
    common.print_report(run.test.labels, run.probs)
    macro_f1 = f1_score(run.test.labels, run.preds, average="macro")
    print(f"macro F1 {macro_f1:.4f}")
    return macro_f1


def plot_confusion(counts, rates, path):
    fig, axes = plt.subplots(1, 2, figsize=CONFUSION_SIZE)
    panels = [(counts, "counts", lambda i, j: f"{counts[i, j]}"),
              (rates, "rates (each true class's row sums to 1)", lambda i, j: f"{rates[i, j]:.2f}")]
    for ax, (values, title, label) in zip(axes, panels):
        image = ax.imshow(values, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046)
        for i in range(common.NUM_CLASSES):
            for j in range(common.NUM_CLASSES):
                dark = values[i, j] > values.max() / 2
                ax.text(j, i, label(i, j), ha="center", va="center", color="white" if dark else "black")
        ax.set_xticks(range(common.NUM_CLASSES), common.CLASS_NAMES)
        ax.set_yticks(range(common.NUM_CLASSES), common.CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def print_matrix(values, fmt):
    width = max(len(name) for name in common.CLASS_NAMES) + 2
    print("true \\ predicted".ljust(width + 6) + "".join(name.rjust(width) for name in common.CLASS_NAMES))
    for name, row in zip(common.CLASS_NAMES, values):
        print(name.ljust(width + 6) + "".join(format(v, fmt).rjust(width) for v in row))


def show_confusion(run, out_dir):
    """Counts (4, 4), rows = true class, columns = predicted; and the same divided by row totals."""
    counts = confusion_matrix(run.test.labels, run.preds, labels=range(common.NUM_CLASSES))
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    print("\nconfusion matrix, counts:")
    print_matrix(counts, "d")
    print("\nrow-normalised (recall on the diagonal):")
    print_matrix(rates, ".3f")
    plot_confusion(counts, rates, Path(out_dir) / "confusion.png")
    return counts


# --------------------------------------------------------------------------------------------------
# --pca and --tsne: the sentence vectors (model.features) of a stratified sample, in 2-D
# --------------------------------------------------------------------------------------------------
def sentence_features(run, texts):
    """model.features of texts, scored as the run scores its test rows (its precision): (N, F) float32."""
    model, tokenizer = run.model_and_tokenizer
    encoded = common.Encoded(common.encode(tokenizer, texts, run.max_len), np.zeros(len(texts), dtype=np.int64))
    return common.predict(model, encoded, run.runtime, features=True, desc="sentence vectors")


def plot_map(points, labels, wrong, title, axis_labels, path):
    """Scatter of 2-D points coloured by true class; misclassified points ringed in black."""
    fig, ax = plt.subplots(figsize=MAP_SIZE)
    for c, name in enumerate(common.CLASS_NAMES):
        at = labels == c
        ax.scatter(points[at, 0], points[at, 1], s=8, alpha=0.6, color=CLASS_COLOURS[c], label=name)
    ax.scatter(points[wrong, 0], points[wrong, 1], s=40, facecolors="none", edgecolors="black",
               linewidths=0.8, label=f"misclassified ({wrong.sum()})")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    ax.legend(loc="best", fontsize=9, title="colour = true class")
    fig.tight_layout()
    return save_figure(fig, path)


def map_pca(features, seed):
    """The 2-D PCA map of sentence vectors (S, F): (points (S, 2), the fitted PCA). --pca draws it;
    --contrast places two more texts on the same map."""
    pca = PCA(n_components=2, random_state=seed)
    return pca.fit_transform(features), pca


def show_maps(run, out_dir, methods, sample, seed):
    """methods: a subset of ("pca", "tsne"). Returns the written paths."""
    rows = common.stratified_indices(run.test.labels, sample, seed)
    features = sentence_features(run, [run.test.texts[i] for i in rows])   # (S, F)
    labels, wrong = run.test.labels[rows], run.preds[rows] != run.test.labels[rows]
    what = f"{run.dir.name}: sentence vectors of {len(rows)} test rows"
    print(f"\n{what} (features {features.shape[1]}-D, {wrong.sum()} misclassified)")
    paths = []
    if "pca" in methods:
        points, pca = map_pca(features, seed)
        ratio = pca.explained_variance_ratio_
        print(f"PCA explained variance: PC1 {ratio[0]:.3f}, PC2 {ratio[1]:.3f}, together {ratio.sum():.3f}")
        paths.append(plot_map(points, labels, wrong, f"PCA, {what}",
                              (f"PC1 ({ratio[0]:.1%} of variance)", f"PC2 ({ratio[1]:.1%})"),
                              Path(out_dir) / "pca.png"))
    if "tsne" in methods:
        reduced = features
        if min(features.shape) > TSNE_PCA_DIMS:
            reduced = PCA(n_components=TSNE_PCA_DIMS, random_state=seed).fit_transform(features)
        # perplexity ~ the number of neighbours each point keeps; it must stay below the point count
        perplexity = min(30.0, (len(rows) - 1) / 3)
        print(f"t-SNE of {len(rows)} points (one call into scikit-learn, no progress to show: about a minute "
              f"per 2,000 points on 2 CPU cores)", flush=True)
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                      random_state=seed).fit_transform(reduced)
        paths.append(plot_map(points, labels, wrong, f"t-SNE, {what}", ("t-SNE 1", "t-SNE 2"),
                              Path(out_dir) / "tsne.png"))
    return paths


# --------------------------------------------------------------------------------------------------
# --tfidf: the words of each confusion, and the penalty word list for the attnpool head
# --------------------------------------------------------------------------------------------------
def confused_directions(counts):
    """(true, predicted) pairs with at least one error: Business<->Sci/Tech first, then by count."""
    first = [(BUSINESS, SCITECH), (SCITECH, BUSINESS)]
    others = [(t, p) for t in range(common.NUM_CLASSES) for p in range(common.NUM_CLASSES)
              if t != p and (t, p) not in first and counts[t, p] > 0]
    return [d for d in first if counts[d] > 0] + sorted(others, key=lambda d: -counts[d])


def direction_name(true_class, predicted):
    return f"{common.CLASS_NAMES[true_class]}->{common.CLASS_NAMES[predicted]}"


def is_single_piece(tokenizer, word):
    """True when the tokenizer keeps `word` whole. The attnpool head penalises every piece of a listed
    word, so a split word such as 'outsourcing' -> 'outs', '##our', '##cing' would penalise fragments
    that occur in unrelated words everywhere; an unknown word would penalise every [UNK]."""
    encoding = tokenizer.encode(word, add_special_tokens=False)
    return len(encoding.ids) == 1 and encoding.tokens[0] != getattr(tokenizer.model, "unk_token", None)


def top_words(texts, labels, preds, directions, top_k, keep=lambda word: True):
    """For each (true, predicted) direction: the top_k words by how much more mean TF-IDF weight
    they carry in the texts misclassified that way than in the texts of the true class classified
    right, as [(word, weight difference)], skipping words for which keep(word) is False.
    The contrast matters: ranked by weight alone, a Business text's top words are company, said,
    million, whatever went wrong; the difference keeps the words that pull it towards Sci/Tech."""
    vectorizer = TfidfVectorizer(stop_words="english", token_pattern=WORD_PATTERN)
    weights = vectorizer.fit_transform(texts)                      # (N, V) sparse
    vocabulary = vectorizer.get_feature_names_out()
    ranked = {}
    for true_class, predicted in directions:
        rows = np.flatnonzero((labels == true_class) & (preds == predicted))
        if len(rows) == 0:
            ranked[(true_class, predicted)] = []
            continue
        right = np.flatnonzero((labels == true_class) & (preds == true_class))
        mean = np.asarray(weights[rows].mean(0)).ravel()           # (V,)
        if len(right):
            mean -= np.asarray(weights[right].mean(0)).ravel()
        order = np.argsort(-mean, kind="stable")
        words = [(vocabulary[i], float(mean[i])) for i in order if mean[i] > 0 and keep(vocabulary[i])]
        ranked[(true_class, predicted)] = words[:top_k]
    return ranked


def penalty_tokenizer(config):
    """The tokenizer of the BERT model whose attnpool head will read the list: the run's own model
    for a BERT run, else the default model (its uncased vocabulary is bert-base-uncased's)."""
    model = config["model"] if config.get("script") in ("train_bert", "train_lora") else "minilm"
    return common.load_tokenizer(common.resolve_model(model))


def plot_words(ranked, counts, path):
    """One horizontal bar chart of mean TF-IDF weights per direction, stacked."""
    directions = list(ranked)
    fig, axes = plt.subplots(len(directions), 1, squeeze=False,
                             figsize=(WIDE, 1 + sum(0.25 * max(len(w), 1) + 0.8 for w in ranked.values())),
                             gridspec_kw={"height_ratios": [max(len(w), 1) + 3 for w in ranked.values()]})
    for ax, direction in zip(axes[:, 0], directions):
        words = ranked[direction]
        ax.barh(range(len(words)), [w for _, w in words], color=CLASS_COLOURS[direction[1]])
        ax.set_yticks(range(len(words)), [word for word, _ in words])
        ax.invert_yaxis()
        if not words:
            ax.text(0.5, 0.5, "no text misclassified this way", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{direction_name(*direction)}: {counts[direction]} texts, top words by TF-IDF contrast",
                     fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def show_tfidf(run, out_dir, pairs, top_k, json_path=None, split="val"):
    """Prints the words of every confused direction; writes the penalty list (Business<->Sci/Tech, or
    every confused direction with pairs="all") and its bar chart. Returns (word lists, JSON path).
    The words come from the validation errors by default: a list mined from the test errors would
    flatter the penalised model's score on that same test set."""
    rows, preds = run.split(split), run.probs_of(split).argmax(1)
    counts = confusion_matrix(rows.labels, preds, labels=range(common.NUM_CLASSES))
    tokenizer = penalty_tokenizer(run.config)
    directions = confused_directions(counts)
    print(f"\nconfusions of the {split} split ({len(rows)} rows)")
    ranked = top_words(rows.texts, rows.labels, preds, directions, top_k,
                       keep=lambda word: is_single_piece(tokenizer, word))
    print(f"\ntop {top_k} words of each confusion (mean TF-IDF over the texts misclassified that way, "
          f"minus over those of the true class classified right; whole words of the tokenizer only):")
    for direction, words in ranked.items():
        print(f"\n{direction_name(*direction)}  ({counts[direction]} texts)")
        print(textwrap.fill("  ".join(f"{word} {weight:.3f}" for word, weight in words), 100,
                            initial_indent="  ", subsequent_indent="  "))

    listed = [(BUSINESS, SCITECH), (SCITECH, BUSINESS)]
    if pairs == "all":
        listed += [d for d in directions if d not in listed]
    penalty_words = {direction_name(*d): [word for word, _ in ranked.get(d, [])] for d in listed}
    json_path = Path(json_path) if json_path else Path(out_dir) / "penalty_words.json"
    common.save_json(json_path, penalty_words)
    print(f"\nwrote {json_path} ({sum(map(len, penalty_words.values()))} words; "
          f"train with: python train_bert.py --head attnpool --penalty-words {json_path})")
    plot_words({d: ranked.get(d, []) for d in listed}, counts, Path(out_dir) / "tfidf_words.png")
    return penalty_words, json_path


# --------------------------------------------------------------------------------------------------
# --errors: the most confidently wrong test rows
# --------------------------------------------------------------------------------------------------
def confident_errors(probs, labels, top):
    """Indices of misclassified rows, highest probability of the (wrong) predicted class first."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    confidence = probs[wrong, preds[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:top]


def show_errors(run, top):
    rows = confident_errors(run.probs, run.test.labels, top)
    print(f"\nthe {len(rows)} most confidently wrong of {int((run.preds != run.test.labels).sum())} errors:")
    print(f"{'row':>5}  {'true':<9} {'predicted':<9} {'p(pred)':>7} {'p(true)':>7}  text")
    for i in rows:
        true_class, predicted = run.test.labels[i], run.preds[i]
        print(f"{i:>5}  {common.CLASS_NAMES[true_class]:<9} {common.CLASS_NAMES[predicted]:<9} "
              f"{run.probs[i, predicted]:>7.3f} {run.probs[i, true_class]:>7.3f}  "
              f"{textwrap.shorten(run.test.texts[i], 90, placeholder=' ...')}")
    return rows


# --------------------------------------------------------------------------------------------------
# --attribution: integrated gradients on the input word embeddings
# --------------------------------------------------------------------------------------------------
# Integrated gradients (Sundararajan et al. 2017) credits each input with its share of the change in
# the output along a straight path from a baseline x' to the input x:
#
#     attribution_t = sum_d (x - x')_td * integral_0^1 dF(x' + a (x - x'))/dx_td da
#
# F is the logit of the predicted class (logits, not probabilities: the softmax saturates, and then
# the gradients along most of the path are ~0). The integral is the trapezoid rule over `steps`
# intervals. Completeness: the attributions sum to F(x) - F(x'), up to that rule's error.
#
# Baseline: the same ids with every token except [CLS] and [SEP] replaced by [PAD], embedded by the
# model's own table (the usual reference for BERT, as in Captum's tutorials). Why not zeros? The
# word vectors are summed with position vectors and then LayerNorm-ed, so a zero word vector is a
# point the encoder has never been shown, while [PAD] is a row of the same table, of the same scale
# as the words. Only the words differ between x' and x: positions, [CLS], [SEP] and the attention
# mask stay, and the mask must not change along the path (IG integrates over embeddings only).
# For the LSTM runs the [PAD] row is all zeros (nn.Embedding's padding_idx), so there both coincide.
#
# The model is run unchanged: a forward hook swaps the output of its word-embedding table for the
# points of the path. This works for every model with one nn.Embedding of words (our BERT, the LSTMs).


def word_embedding_table(model):
    if hasattr(model, "bert"):
        return model.bert.embeddings.word
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if len(tables) != 1:
        raise common.UserError(f"--attribution: cannot tell which of the model's {len(tables)} embedding "
                               f"tables holds the words")
    return tables[0]


def integrated_gradients(model, input_ids, baseline_ids, target, steps=50, chunk=16):
    """input_ids, baseline_ids (T,) long; target the class whose logit is explained.
    Returns (attributions (T,), F(x), F(x')) as float tensors on the CPU."""
    model.eval()
    table = word_embedding_table(model)
    with torch.no_grad():
        x = table(input_ids[None]).float()                     # (1, T, D)
        x_base = table(baseline_ids[None]).float()             # (1, T, D)
    alphas = torch.linspace(0, 1, steps + 1, device=x.device)  # path points, both ends included
    trapezoid = torch.ones(steps + 1, device=x.device)
    trapezoid[[0, -1]] = 0.5
    trapezoid /= steps

    path = {}
    hook = table.register_forward_hook(lambda module, inputs, output: path["points"])
    grad_sum = torch.zeros_like(x[0])                          # (T, D)
    outputs = []
    try:
        # cuDNN's LSTM has no backward pass in eval mode; the plain kernels have one.
        with torch.backends.cudnn.flags(enabled=False):
            for a, w in zip(alphas.split(chunk), trapezoid.split(chunk)):
                points = (x_base + a[:, None, None] * (x - x_base)).requires_grad_(True)   # (S, T, D)
                path["points"] = points
                ids = input_ids.expand(len(a), -1)
                mask = torch.ones_like(ids, dtype=torch.bool)
                logit = model(ids, mask)[:, target].float()   # (S,)
                (grad,) = torch.autograd.grad(logit.sum(), points)
                grad_sum += (w[:, None, None] * grad).sum(0)
                outputs.append(logit.detach())
    finally:
        hook.remove()
    outputs = torch.cat(outputs)
    attributions = ((x - x_base)[0] * grad_sum).sum(-1)       # (T,)
    return attributions.cpu(), outputs[-1].cpu(), outputs[0].cpu()


def baseline_for(input_ids, tokenizer):
    specials = [tokenizer.token_to_id(tok) for tok in ("[CLS]", "[SEP]")]
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    for special in specials:
        if special is not None:
            keep |= input_ids == special
    return torch.where(keep, input_ids, torch.full_like(input_ids, PAD_ID))


def attention_weights(model, input_ids):
    """Attention over tokens (T,) of a model that keeps `last_weights` (attnpool, bilstm_attn), else None."""
    holders = [m for m in model.modules() if hasattr(m, "last_weights")]
    if not holders:
        return None
    for m in holders:
        m.last_weights = None
    with torch.no_grad():
        model(input_ids[None], torch.ones_like(input_ids[None], dtype=torch.bool))
    weights = next((m.last_weights for m in holders if m.last_weights is not None), None)
    return None if weights is None else weights[0].float().cpu()


def layout_tokens(tokens, chars_per_line):
    """(line, column) in characters of each token, wrapped like running text; and the line count."""
    positions, line, column = [], 0, 0
    for token in tokens:
        if column and column + len(token) > chars_per_line:
            line, column = line + 1, 0
        positions.append((line, column))
        column += len(token) + 1
    return positions, line + 1


def plot_tokens(tokens, panels, title, path):
    """Tokens as text boxes, one panel per (heading, values (T,), colormap, norm)."""
    font_size = 10
    char_width = 0.6 * font_size / 72                           # inches; DejaVu Sans Mono advance
    chars_per_line = int(WIDE / char_width) - 4
    positions, n_lines = layout_tokens(tokens, chars_per_line)
    rows = len(panels) * (n_lines + 2)                          # a heading and a gap per panel
    line_height = 0.3                                           # inches
    fig = plt.figure(figsize=(WIDE, (rows + 2) * line_height))
    ax = fig.add_axes((0, 0, 1, rows / (rows + 2)))
    ax.set_xlim(-1, chars_per_line + 3)
    ax.set_ylim(rows, -0.5)
    ax.axis("off")
    fig.suptitle(textwrap.shorten(title, 150), fontsize=11, y=1 - 0.5 / (rows + 2), va="center")
    for k, (heading, values, cmap, norm) in enumerate(panels):
        top = k * (n_lines + 2)
        ax.text(0, top, heading, fontsize=10, weight="bold", va="center")
        for token, (line, column), value in zip(tokens, positions, values):
            colour = matplotlib.colormaps[cmap](norm(float(value)))
            ax.text(column, top + 1 + line, token, family="monospace", fontsize=font_size, va="center",
                    bbox={"facecolor": colour, "edgecolor": "none", "boxstyle": "square,pad=0.15"})
    return save_figure(fig, path)


def explain(model, tokenizer, text, max_len, steps, title, path):
    """IG for one text: prints the tokens with their attributions and writes the coloured-token PNG.
    Returns (attributions (T,), F(x), F(x'), predicted class)."""
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(common.encode(tokenizer, [text], max_len)[0]).to(device)   # (T,)
    with torch.no_grad():
        logits = model(input_ids[None], torch.ones_like(input_ids[None], dtype=torch.bool))[0].float()
    predicted = int(logits.argmax())
    attributions, f_x, f_base = integrated_gradients(model, input_ids, baseline_for(input_ids, tokenizer),
                                                     predicted, steps)
    weights = attention_weights(model, input_ids)
    tokens = [tokenizer.id_to_token(int(i)) for i in input_ids]
    name = common.CLASS_NAMES[predicted]
    probability = float(logits.softmax(-1)[predicted])

    print(f"\n{title}\n  predicted {name} (p {probability:.3f}); logit {f_x:.3f} - baseline logit "
          f"{f_base:.3f} = {f_x - f_base:.3f}, sum of attributions {attributions.sum():.3f}")
    listing = [f"{tok} {a:+.3f}" for tok, a in zip(tokens, attributions.tolist())]
    if weights is not None:
        print("  token, attribution, attention weight of the model's pooling:")
        listing = [f"{item} ({w:.2f})" for item, w in zip(listing, weights.tolist())]
    print(textwrap.fill(" | ".join(listing), 110, initial_indent="  ", subsequent_indent="  "))

    limit = float(attributions.abs().max()) or 1.0
    panels = [(f"integrated gradients of the {name} logit: red pushes towards {name}, blue away "
               f"(scale +-{limit:.3f})", attributions, "bwr", Normalize(-limit, limit))]
    if weights is not None:
        # The darkest green at 1.5 x the largest weight, so black text stays readable on every box.
        panels.append((f"attention weights of the model's pooling (max {float(weights.max()):.3f}; "
                       f"uniform would be 1/{len(tokens)} = {1 / len(tokens):.3f})", weights,
                       "Greens", Normalize(0, 1.5 * float(weights.max()))))
    plot_tokens(tokens, panels, f"predicted {name} (p {probability:.2f})  |  {title}", path)
    return attributions, f_x, f_base, predicted


def show_attribution(run, out_dir, texts, top, steps):
    """IG over the given texts, or over the `top` most confidently wrong test rows."""
    model, tokenizer = run.model_and_tokenizer
    if texts:
        cases = [(text, f"--text {i + 1}: {text}") for i, text in enumerate(texts)]
    else:
        cases = [(run.test.texts[i], f"test row {i}, true {common.CLASS_NAMES[run.test.labels[i]]}: "
                                     f"{run.test.texts[i]}")
                 for i in confident_errors(run.probs, run.test.labels, top)]
    paths = []
    for k, (text, title) in enumerate(common.progress(cases, "attribution", unit="texts"), start=1):
        path = Path(out_dir) / f"attribution_{k:02d}.png"
        explain(model, tokenizer, text, run.max_len, steps, title, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# --shap: Shapley values of words, by hand
# --------------------------------------------------------------------------------------------------
# The Shapley value (Shapley 1953; SHAP, Lundberg & Lee 2017) shares f(all words) - f(no words) out
# among the words: word i gets its marginal contribution f(S + i) - f(S), averaged over every order
# in which the words could arrive (S = the words that came before i). It needs no gradient and no
# path, only the model's output on subsets of the words ("coalitions"), and it is the one sharing
# that is efficient (the values sum to f(all) - f(none)), symmetric, gives 0 to a word that never
# changes the output (dummy) and adds up over models (linear).
#
#   n <= SHAP_EXACT_WORDS: all 2^n coalitions, phi_i = sum_S |S|! (n-|S|-1)! / n! (f(S+i) - f(S)).
#   more words: `samples` random orders. Along one order the contributions telescope, so they sum
#   to f(all) - f(none) for every order drawn: efficiency holds exactly, not only on average. The
#   orders come in antithetic pairs, an order and its reverse: a word that arrives early in one
#   arrives late in the other, so a word whose effect depends on how much of the text is already
#   there is measured at both ends (a variance reduction that costs nothing).
#
# f is the LOGIT of the explained class (by default the predicted one), not its probability: the
# softmax saturates (at p = 0.99 the many words that all say "Sports" share almost nothing), and
# it is the F that --attribution's integrated gradients explain, so the two rank the same number.
# (A logit alone also moves when a word raises all four logits together, which changes no
# probability; --contrast explains a difference of two logits, which cannot.)
#
# A word is absent when its tokens are masked out of attention (attention_mask False at them): no
# token attends to them, so the encoder computes what it would for the text without them, except
# that the present words keep their positions (the position ids stay those of the full text,
# holes and all). Why not replace them by [MASK] or [UNK]? Those are tokens too: the encoder
# attends to them and they carry meaning of their own. [MASK] was only ever seen in pre-training,
# never by the fine-tuned classifier; [UNK] says "a rare word was here". A replacement moves the
# text off what the classifier was trained on, and whatever the odd token does is credited to the
# word it replaced. Masked positions are what every padded batch showed the model, only there
# they sat at the end of a row.
#
# The heads read the same mask: pooler, fc and mlp_res read [CLS] (always present), attnpool gives
# masked tokens weight 0, textcnn zeroes them (its windows see a gap of zeros, as at a row's end).
# A recurrence reads a mask as a LENGTH: pack_padded_sequence keeps the first mask.sum() steps of a
# row, which with holes would be the wrong tokens. So for the lstm head the present tokens' states
# move to the front before the head reads them, and for the train_lstm.py models the absent words
# are REMOVED from the id sequence: the recurrence runs over the present words, in their order (an
# LSTM has no positions to keep). With no word left (a word vocabulary has no [CLS]/[SEP]) it takes
# no step: the features are its initial state, zeros.
SHAP_EXACT_WORDS = 10         # up to this many words, all 2^n coalitions (1,024 at 10)
SHAP_BATCH = 64               # coalitions per forward pass
SPECIAL_TOKENS = ("[CLS]", "[SEP]")   # always present, never players


def group_words(tokens):
    """WordPiece tokens (T,) -> (words, word_of (T,) int64): a "##" piece joins the word before it;
    [CLS] and [SEP] belong to no word (-1). A word-level vocabulary's tokens are words already."""
    words, word_of = [], []
    for token in tokens:
        if token in SPECIAL_TOKENS:
            word_of.append(-1)
        elif token.startswith("##") and word_of and word_of[-1] >= 0:
            words[-1] += token[2:]
            word_of.append(len(words) - 1)
        else:
            words.append(token)
            word_of.append(len(words) - 1)
    return words, np.array(word_of, dtype=np.int64)


def front_align(present, *tensors):
    """Each row's present positions moved to its front, in order. present (B, T) bool, tensors
    (B, T, ...) -> prefix mask (B, T') and the tensors cut to T' = the most present in one row."""
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices   # (B, T) present first
    counts = present.sum(1)
    longest = max(int(counts.max()), 1)
    order = order[:, :longest]
    mask = torch.arange(longest, device=present.device)[None, :] < counts[:, None]   # (B, T')
    moved = [t.gather(1, order.view(*order.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
             for t in tensors]
    return mask, moved


@torch.no_grad()
def coalition_logits(model, input_ids, present):
    """Logits (B, 4) of the model seeing only the `present` (B, T) tokens of input_ids (B, T)."""
    if isinstance(getattr(model, "lstm", None), nn.LSTM):            # train_lstm.py: remove them
        mask, (ids,) = front_align(present, input_ids)
        ids = torch.where(mask, ids, PAD_ID)
        empty = ~mask[:, 0]
        mask[:, 0] = True                    # packing wants a step per row; zeroed again below
        features = model.features(ids, mask).masked_fill(empty[:, None], 0.0)
        return model.classifier(model.dropout(features))
    if isinstance(getattr(model, "head", None), common.LSTMHead):    # BERT with holes, then pack
        hidden = model.bert(input_ids, present)                      # (B, T, D)
        mask, (hidden, ids) = front_align(present, hidden, input_ids)
        return model.classifier(model.dropout(model.head(hidden, mask, ids)))
    return model(input_ids, present)


class WordGame:
    """The value function: coalitions (K, n) bool -> f (K,) float64, the combination of logits
    class_weights . logits (a one-hot: that class's logit) with only those words visible. Run in
    fp32 without autocast, so a coalition's value never depends on what shares its batch."""

    def __init__(self, model, input_ids, word_of, class_weights, batch=SHAP_BATCH):
        self.model = model.eval()
        self.input_ids = input_ids                                   # (T,) on the model's device
        self.word_of = torch.as_tensor(word_of)                      # (T,) -1 = [CLS]/[SEP]
        self.class_weights = torch.as_tensor(class_weights, dtype=torch.float64)   # (4,)
        self.batch = batch
        self.evaluated = 0

    def __call__(self, coalitions):
        coalitions = torch.as_tensor(np.asarray(coalitions, dtype=bool))            # (K, n)
        present = (self.word_of < 0)[None] | coalitions[:, self.word_of.clamp(min=0)]   # (K, T)
        starts = range(0, len(present), self.batch)
        values = []
        for start in common.progress(starts, "SHAP", unit="coalitions",
                                     sizes=[min(self.batch, len(present) - s) for s in starts]):
            chunk = present[start: start + self.batch].to(self.input_ids.device)
            logits = coalition_logits(self.model, self.input_ids.expand(len(chunk), -1), chunk)
            values.append(logits.double().cpu() @ self.class_weights)
        self.evaluated += len(present)
        return torch.cat(values).numpy()


def all_coalitions(n):
    """(2^n, n) bool: row k holds the words of the bits of k (row 0: none; the last row: all)."""
    return ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)


def shapley_exact(game, n):
    """Every coalition. Returns (values (n,), f(all), f(none))."""
    coalitions = all_coalitions(n)
    values = game(coalitions)                                        # (2^n,)
    sizes = coalitions.sum(1)
    # s! (n-s-1)! / n!, the chance that exactly a given s others come before i, = 1 / (n C(n-1, s))
    weight = np.array([1 / (n * math.comb(n - 1, s)) for s in range(n)])
    index = np.arange(2 ** n)
    phi = np.empty(n)
    for i in range(n):
        without = index[~coalitions[:, i]]                           # the coalitions S not holding i
        phi[i] = (weight[sizes[without]] * (values[without | (1 << i)] - values[without])).sum()
    return phi, values[-1], values[0]


def antithetic_permutations(n, samples, rng):
    """(samples, n) orders of the n words: samples / 2 random ones, each followed by its reverse."""
    firsts = np.stack([rng.permutation(n) for _ in range(samples // 2)])            # (samples/2, n)
    return np.stack([firsts, firsts[:, ::-1]], axis=1).reshape(samples, n)


def shapley_sampled(game, permutations):
    """The average marginal contribution over the given orders (m, n). Returns (values (n,),
    f(all), f(none))."""
    m, n = permutations.shape
    arrived = np.zeros((m, n + 1, n), dtype=bool)                    # coalition after k arrivals
    for k in range(n):
        arrived[:, k + 1] = arrived[:, k]
        arrived[np.arange(m), k + 1, permutations[:, k]] = True
    # Each distinct coalition is evaluated once: fewer forward rows, and every order starts at the
    # same f(none) and ends at the same f(all), so each telescopes to exactly f(all) - f(none).
    unique, inverse = np.unique(arrived.reshape(-1, n), axis=0, return_inverse=True)
    values = game(unique)[inverse.reshape(-1)].reshape(m, n + 1)
    contributions = np.diff(values, axis=1)                          # (m, n): of the k-th arrival
    phi = np.zeros(n)
    np.add.at(phi, permutations, contributions)
    return phi / m, values[0, -1], values[0, 0]


@dataclass
class WordShapley:
    """One text explained: its words, their Shapley values, and what they add up to."""
    words: list
    values: np.ndarray       # (n,) float64
    f_text: float            # f(all words)
    f_empty: float           # f(no words): [CLS] and [SEP] alone
    logits: np.ndarray       # (4,) of the full text
    method: str
    input_ids: torch.Tensor  # (T,)
    word_of: np.ndarray      # (T,) word index of each token, -1 for [CLS]/[SEP]

    @property
    def probs(self):
        return torch.from_numpy(self.logits).softmax(-1).numpy()

    @property
    def predicted(self):
        return int(self.logits.argmax())


def check_shap_samples(samples):
    if samples < 2 or samples % 2:
        raise common.UserError(f"--shap-samples must be an even number of at least 2 (the permutations "
                               f"come in antithetic pairs), got {samples}")


def word_shapley(model, tokenizer, text, max_len, class_weights=None, samples=64, seed=0,
                 permutations=None):
    """Shapley values of the words of `text` for f = class_weights . logits (default: the logit of
    the predicted class). Exact up to SHAP_EXACT_WORDS words, else `samples` antithetic orders
    (or the given `permutations` (m, n))."""
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(common.encode(tokenizer, [text], max_len)[0]).to(device)   # (T,)
    words, word_of = group_words([tokenizer.id_to_token(int(i)) for i in input_ids])
    if not words:
        raise common.UserError(f"no words to explain in the text {text!r}")
    logits = coalition_logits(model.eval(), input_ids[None], torch.ones_like(input_ids[None], dtype=torch.bool))
    logits = logits[0].double().cpu().numpy()
    if class_weights is None:
        class_weights = np.eye(common.NUM_CLASSES)[logits.argmax()]
    game = WordGame(model, input_ids, word_of, class_weights)
    n = len(words)
    if permutations is None and n <= SHAP_EXACT_WORDS:
        values, f_text, f_empty = shapley_exact(game, n)
        method = f"exact over all 2^{n} = {2 ** n:,} coalitions"
    else:
        if permutations is None:
            permutations = antithetic_permutations(n, samples, np.random.default_rng(seed))
        values, f_text, f_empty = shapley_sampled(game, permutations)
        method = f"{len(permutations)} sampled orders ({game.evaluated:,} distinct coalitions)"
    return WordShapley(words, values, float(f_text), float(f_empty), logits, method, input_ids.cpu(), word_of)


def per_word(token_values, word_of, n_words):
    """Token values (T,) summed over the pieces of each word -> (n_words,); [CLS]/[SEP] dropped."""
    sums = np.zeros(n_words)
    np.add.at(sums, word_of[word_of >= 0], np.asarray(token_values, dtype=np.float64)[word_of >= 0])
    return sums


def rank_agreement(a, b):
    """Spearman's rank correlation and its p-value; nan with fewer than 3 words or a constant side."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def plot_shap_and_ig(words, shap, ig, title, headings, xlabel, path):
    """Two bar charts, one row per word in text order: SHAP | integrated gradients."""
    y = np.arange(len(words))
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(WIDE, 1.6 + 0.25 * len(words)))
    for ax, values, heading in zip(axes, (shap, ig), headings):
        ax.barh(y, values, color=np.where(values >= 0, "tab:red", "tab:blue"))
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, words)
    axes[0].invert_yaxis()
    fig.suptitle(textwrap.shorten(title, 140), fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def explain_words(model, tokenizer, text, max_len, samples, seed, steps, title, path):
    """SHAP and integrated gradients of the predicted class's logit, per word: the printed table
    and one PNG. Returns (WordShapley, IG per word (n,), Spearman rho)."""
    result = word_shapley(model, tokenizer, text, max_len, samples=samples, seed=seed)
    predicted, name = result.predicted, common.CLASS_NAMES[result.predicted]
    input_ids = result.input_ids.to(next(model.parameters()).device)
    attributions, f_x, f_base = integrated_gradients(model, input_ids, baseline_for(input_ids, tokenizer),
                                                     predicted, steps)
    ig = per_word(attributions.numpy(), result.word_of, len(result.words))
    rho, p_value = rank_agreement(result.values, ig)

    print(f"\n{title}\n  predicted {name} (p {result.probs[predicted]:.3f}); SHAP of the {name} logit, "
          f"{result.method}")
    print(f"  SHAP: f(text) {result.f_text:.4f} - f(no words) {result.f_empty:.4f} = "
          f"{result.f_text - result.f_empty:.4f}; sum of the values {result.values.sum():.4f}")
    print(f"  IG:   F(x) {float(f_x):.4f} - F([PAD] baseline) {float(f_base):.4f} = {float(f_x - f_base):.4f}; "
          f"sum {float(attributions.sum()):.4f}")
    print(f"  Spearman rank agreement of SHAP and IG over {len(result.words)} words: rho {rho:.3f} "
          f"(p {p_value:.2g})")
    width = max(8, *(len(w) for w in result.words))
    print(f"  {'word'.ljust(width)} {'SHAP':>9} {'IG':>9}")
    for word, s, g in zip(result.words, result.values, ig):
        print(f"  {word.ljust(width)} {s:>+9.4f} {g:>+9.4f}")

    headings = (f"SHAP ({result.method.split(' (')[0]}); sum {result.values.sum():+.3f}",
                f"integrated gradients ({steps} steps, [PAD] baseline); sum {ig.sum():+.3f}")
    plot_shap_and_ig(result.words, result.values, ig,
                     f"{name} logit (p {result.probs[predicted]:.2f}), Spearman rho {rho:.2f}  |  {title}",
                     headings, f"share of the {name} logit: red towards {name}, blue away", path)
    return result, ig, rho


def chosen_cases(run, texts, top):
    """(text, title) of each --text, or of the `top` most confidently wrong test rows."""
    if texts:
        return [(text, f"--text {i + 1}: {text}") for i, text in enumerate(texts)]
    return [(run.test.texts[i], f"test row {i}, true {common.CLASS_NAMES[run.test.labels[i]]}: {run.test.texts[i]}")
            for i in confident_errors(run.probs, run.test.labels, top)]


def show_shap(run, out_dir, texts, top, samples, steps, seed):
    """SHAP beside IG for each text (or top error): the tables and shap_01.png, shap_02.png, ..."""
    check_shap_samples(samples)
    model, tokenizer = run.model_and_tokenizer
    paths = []
    for k, (text, title) in enumerate(chosen_cases(run, texts, top), start=1):
        path = Path(out_dir) / f"shap_{k:02d}.png"
        explain_words(model, tokenizer, text, run.max_len, samples, seed, steps, title, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# --contrast: two texts side by side
# --------------------------------------------------------------------------------------------------
# The review meeting's question: why do two similar articles get different classes? One figure:
# each text's four probabilities; where the two sit on the run's PCA map of test rows (fitted as
# --pca fits it: the same --sample rows, the same seed, hence the same map); and each text's words
# by their Shapley values for the DIFFERENCE of two logits, logit(c1) - logit(c2), with c1 and c2
# the two predictions (or, when both texts get the same class, that class and the runner-up).
# Red words push towards c1, blue towards c2, on one scale for both texts: the words that decide.
CONTRAST_SIZE = (16, 12)      # inches: probabilities | PCA map, above the two texts' words
CONTRAST_WORDS = 20           # words per text in the figure (largest |SHAP|); the table lists all


@torch.no_grad()
def text_outputs(model, tokenizer, texts, max_len):
    """Logits (N, 4) and sentence vectors (N, F) of whole texts, float64 on the CPU, in fp32."""
    model.eval()
    device = next(model.parameters()).device
    input_ids, mask = common.to_device(common.encode(tokenizer, texts, max_len), 0, device)
    features = model.features(input_ids, mask)
    logits = model.classifier(model.dropout(features))
    return logits.double().cpu().numpy(), features.double().cpu().numpy()


def contrast_classes(probs):
    """probs (2, 4) -> (c1, c2): the two predictions when they differ; else the shared prediction
    and the class with the next highest mean probability."""
    c1, c2 = probs.argmax(1)
    if c1 == c2:
        mean = probs.mean(0)
        mean[c1] = -1
        c2 = mean.argmax()
    return int(c1), int(c2)


def fit_map_pca(run, sample, seed):
    """show_maps' PCA: the same stratified test rows and seed. Returns (rows, 2-D points, PCA)."""
    rows = common.stratified_indices(run.test.labels, sample, seed)
    points, pca = map_pca(sentence_features(run, [run.test.texts[i] for i in rows]), seed)   # (S, 2)
    return rows, points, pca


def plot_contrast(texts, probs, results, classes, cosine, map_points, map_labels, text_points, ratio, path):
    c1, c2 = (common.CLASS_NAMES[c] for c in classes)
    fig = plt.figure(figsize=CONTRAST_SIZE)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.15])
    prob_ax, map_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    word_axes = [fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])]
    names = ["A", "B"]

    x = np.arange(common.NUM_CLASSES)
    for k, (name, shade) in enumerate(zip(names, ("0.25", "0.7"))):
        bars = prob_ax.bar(x + (k - 0.5) * 0.38, probs[k], 0.38, color=shade, label=f"text {name}")
        prob_ax.bar_label(bars, fmt="%.2f", fontsize=8)
    prob_ax.set_xticks(x, common.CLASS_NAMES)
    prob_ax.set_ylim(0, 1.1)
    prob_ax.set_ylabel("probability")
    prob_ax.set_title(f"predictions; cosine similarity of the sentence vectors {cosine:.3f}", fontsize=10)
    prob_ax.legend(fontsize=9)

    for c, name in enumerate(common.CLASS_NAMES):
        at = map_labels == c
        map_ax.scatter(map_points[at, 0], map_points[at, 1], s=6, alpha=0.35, color=CLASS_COLOURS[c], label=name)
    for name, point, p in zip(names, text_points, probs):
        predicted = int(p.argmax())
        map_ax.scatter(*point, s=500, marker="*", color=CLASS_COLOURS[predicted], edgecolors="black",
                       linewidths=1.5, zorder=3)
        map_ax.annotate(f"{name}: {common.CLASS_NAMES[predicted]}", point, xytext=(12, 8),
                        textcoords="offset points", fontsize=11, weight="bold",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "black"}, zorder=4)
    map_ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)")
    map_ax.set_ylabel(f"PC2 ({ratio[1]:.1%})")
    map_ax.set_title(f"PCA of {len(map_points)} test rows' sentence vectors (coloured by true class)", fontsize=10)
    map_ax.legend(loc="best", fontsize=8, markerscale=2)

    shown = [np.argsort(-np.abs(r.values), kind="stable")[:CONTRAST_WORDS] for r in results]
    limit = 1.15 * max(float(np.abs(r.values[s]).max()) for r, s in zip(results, shown)) or 1.0
    for ax, name, r, keep in zip(word_axes, names, results, shown):
        keep = keep[np.argsort(-r.values[keep], kind="stable")]       # most towards c1 on top
        values = r.values[keep]
        ax.barh(np.arange(len(keep)), values, color=np.where(values >= 0, "tab:red", "tab:blue"))
        ax.set_yticks(np.arange(len(keep)), [r.words[i] for i in keep])
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlim(-limit, limit)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"<- towards {c2}      SHAP of logit({c1}) - logit({c2})      towards {c1} ->")
        ax.set_title(f"text {name}: {len(keep)} of {len(r.words)} words; f(text) {r.f_text:+.2f} - f(no words) "
                     f"{r.f_empty:+.2f} = sum {r.values.sum():+.2f}", fontsize=10)

    heading = "\n".join(textwrap.shorten(f"{name}: {text}", 190) for name, text in zip(names, texts))
    fig.suptitle(heading, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save_figure(fig, path)


def show_contrast(run, out_dir, texts, samples, sample, seed):
    """Two texts side by side: the printed table and contrast.png. Returns (path, cosine, results,
    the two texts' points on the map (2, 2))."""
    check_shap_samples(samples)
    model, tokenizer = run.model_and_tokenizer
    logits, features = text_outputs(model, tokenizer, texts, run.max_len)
    probs = torch.from_numpy(logits).softmax(-1).numpy()                # (2, 4)
    cosine = float(features[0] @ features[1] / (np.linalg.norm(features[0]) * np.linalg.norm(features[1])))
    classes = contrast_classes(probs)
    class_weights = np.eye(common.NUM_CLASSES)[classes[0]] - np.eye(common.NUM_CLASSES)[classes[1]]
    results = [word_shapley(model, tokenizer, text, run.max_len, class_weights, samples, seed) for text in texts]
    rows, map_points, pca = fit_map_pca(run, sample, seed)
    # Placed from features scored as the map's rows were (bf16 where the run scores in bf16), so the
    # two stars sit exactly where two test rows with these texts would; the cosine above is fp32.
    text_points = pca.transform(sentence_features(run, texts))         # (2, 2)

    c1, c2 = (common.CLASS_NAMES[c] for c in classes)
    print(f"\ntwo texts side by side ({run.dir.name})")
    for name, text in zip("AB", texts):
        print(f"  {name}: {textwrap.shorten(text, 110)}")
    print(f"\n  {'class':<10} {'p(A)':>7} {'p(B)':>7}")
    for c, class_name in enumerate(common.CLASS_NAMES):
        print(f"  {class_name:<10} {probs[0, c]:>7.3f} {probs[1, c]:>7.3f}")
    predicted = [common.CLASS_NAMES[c] for c in probs.argmax(1)]
    print(f"  {'predicted':<10} {predicted[0]:>7} {predicted[1]:>7}")
    print(f"  cosine similarity of the sentence vectors: {cosine:.4f}")
    print(f"  on the PCA map of {len(rows)} test rows: A at ({text_points[0, 0]:+.2f}, {text_points[0, 1]:+.2f}), "
          f"B at ({text_points[1, 0]:+.2f}, {text_points[1, 1]:+.2f})")
    print(f"\n  SHAP of logit({c1}) - logit({c2}): + pushes towards {c1}, - towards {c2}")
    for name, r in zip("AB", results):
        print(f"  {name}: f(text) {r.f_text:+.4f} - f(no words) {r.f_empty:+.4f} = sum {r.values.sum():+.4f}; "
              f"{r.method}")
        listing = [f"{w} {v:+.3f}" for w, v in zip(r.words, r.values)]
        print(textwrap.fill(" | ".join(listing), 110, initial_indent="    ", subsequent_indent="    "))
    shared = sorted(set(results[0].words) & set(results[1].words))
    if shared:
        value_of = [dict(zip(r.words, r.values)) for r in results]   # a repeated word: its last value
        print("  words in both texts (A | B): " + ", ".join(f"{w} {value_of[0][w]:+.3f} | {value_of[1][w]:+.3f}"
                                                           for w in shared))
    path = plot_contrast(texts, probs, results, classes, cosine, map_points, run.test.labels[rows], text_points,
                         pca.explained_variance_ratio_, Path(out_dir) / "contrast.png")
    return path, cosine, results, text_points


# --------------------------------------------------------------------------------------------------
# --curves
# --------------------------------------------------------------------------------------------------
def show_curves(run, out_dir):
    history = run.metrics.get("history")
    if not history:
        raise common.UserError(f"{run.dir}/metrics.json: no history")
    keys = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"]
    missing = [k for k in keys if k not in history[0]]
    if missing:
        raise common.UserError(f"{run.dir}/metrics.json: history lacks {', '.join(missing)}")
    if "train_accuracy" in history[0]:  # runs trained before it was recorded lack it
        keys.insert(2, "train_accuracy")
    print("\n" + "".join(f"{k:>15}" for k in keys))
    for h in history:
        print(f"{h['epoch']:>15}" + "".join(f"{h[k]:>15.4f}" for k in keys[1:]))

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=CURVES_SIZE)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    steps = [point for h in history for point in h.get("train_loss_steps", [])]  # [global step, loss]
    if steps:
        # The loop reads the loss every --log-every steps and at each epoch's end: on the epoch axis,
        # step s of a run with S steps an epoch sits at s / S.
        per_epoch = max(s for s, _ in history[0]["train_loss_steps"])
        loss_ax.plot([s / per_epoch for s, _ in steps], [loss for _, loss in steps], color="tab:blue",
                     alpha=0.4, linewidth=1, label="train, between reads")
    elif len(history) == 1:
        loss_ax.text(0.5, 0.5, "one epoch: one point per line\n(this run recorded no per-step loss)",
                     ha="center", va="center", transform=loss_ax.transAxes, color="grey")
    for key, label in (("train_accuracy", "training accuracy"), ("val_accuracy", "validation accuracy"),
                       ("val_macro_f1", "validation macro F1")):
        if key in keys:
            score_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    best = run.metrics.get("best_epoch")
    for ax, title in ((loss_ax, "cross-entropy loss"), (score_ax, "accuracy and macro F1")):
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"best epoch ({best})")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(run.dir.name)
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / "curves.png")


# --------------------------------------------------------------------------------------------------
# --compare: experiments over seeds, and which differences are real
# --------------------------------------------------------------------------------------------------
# One experiment = one configuration; its seeds are runs whose config.json differs only in these keys.
NOT_THE_EXPERIMENT = {"seed", "seeds", "out", "resume", "device", "data", "log_every", "save_every"}
BOOTSTRAP_SAMPLES = 2000
COMPARE_WIDTH = 10           # inches; the height grows with the number of experiments


def experiment_key(config):
    """config.json without the seed and the flags that do not change what is trained."""
    args = {k: v for k, v in config.get("args", {}).items() if k not in NOT_THE_EXPERIMENT}
    rest = {k: v for k, v in config.items() if k not in ("args", "seed")}
    return json.dumps({**rest, "args": args}, sort_keys=True, default=str)


@dataclass
class Experiment:
    name: str
    runs: list                      # run folders, one per seed, in the order of `seeds`
    config: dict
    seeds: list                     # the seed of each run

    @cached_property
    def metrics(self):
        return [common.load_json(run / "metrics.json") for run in self.runs]

    def probs(self, rows):
        return [common.load_probs(run, "test", rows) for run in self.runs]

    @property
    def is_pooler_baseline(self):
        args = self.config.get("args", {})
        return (self.config.get("script") == "train_bert" and self.config.get("head") == "pooler"
                and not self.config.get("penalty_words") and not args.get("eda") and not args.get("awp"))


def gather_experiments(paths):
    """Finished runs under the given folders (default runs/), scored on the same rows, grouped into
    experiments by config-minus-seed and named after their folder."""
    runs = sorted({run for path in paths for run in common.find_runs(path)},
                  key=lambda run: (run / "metrics.json").stat().st_mtime)
    if not runs:
        raise common.UserError(f"--compare: no finished runs under {', '.join(map(str, paths))}")
    runs = common.largest_group_on_same_rows(runs, "compared")
    groups, seen = {}, {}
    for run in reversed(runs):  # newest first: of two runs of one experiment with one seed, the newer counts
        config = common.load_json(run / "config.json")
        key, seed = experiment_key(config), config.get("seed", config.get("args", {}).get("seed"))
        if (key, seed) in seen:
            print(f"left out: {run} (seed {seed} of the experiment of {seen[key, seed]}, which is newer)")
            continue
        seen[key, seed] = run
        groups.setdefault(key, (config, []))[1].append((seed, run))
    experiments, names = [], set()
    for config, members in groups.values():
        name = common.experiment_folder(members[0][1]).name
        while name in names:  # two configurations under one folder name: tell them apart
            name += "'"
        names.add(name)
        members.sort(key=lambda seed_run: (seed_run[0] is None, seed_run[0] or 0))
        experiments.append(Experiment(name, [run for _, run in members], config, [seed for seed, _ in members]))
    trained = {run: i for i, run in enumerate(runs)}
    return sorted(experiments, key=lambda e: min(trained[run] for run in e.runs))  # the order they were trained


def macro_f1_from_counts(counts):
    """counts (..., 4, 4) confusion counts, rows true -> macro F1 (...,) over all four classes, as
    sklearn's f1_score(average="macro", labels=range(4)): a class with no true and no predicted row
    scores 0."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    fp, fn = counts.sum(-2) - tp, counts.sum(-1) - tp
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0).mean(-1)


def bootstrap_f1(preds, labels, weights):
    """Macro F1 of each prediction vector on each bootstrap resample of the rows.
    preds (R, N) class ids of R runs, labels (N,), weights (B, N) how often each row is drawn in each
    of B resamples -> (B, R). One matrix product per run: the resample's confusion counts are the
    draw counts summed per (true, predicted) cell."""
    cells = np.eye(common.NUM_CLASSES ** 2)[labels * common.NUM_CLASSES + preds]    # (R, N, 16)
    counts = np.einsum("bn,rnc->brc", weights, cells)                             # (B, R, 16)
    return macro_f1_from_counts(counts.reshape(*counts.shape[:2], common.NUM_CLASSES, common.NUM_CLASSES))


def paired_bootstrap(preds_a, preds_b, labels, samples=BOOTSTRAP_SAMPLES, seed=0, paired_seeds=False):
    """95% interval of mean macro F1 of A minus that of B. preds_a (Ra, N), preds_b (Rb, N): the test
    predictions of each experiment's seeds.

    How seeds enter: each resample draws the test rows with replacement (the same rows for both: the
    pairing, which removes the variation the two share, that of which texts happen to be in the test
    set), and the seeds with replacement; the statistic is the mean macro F1 over the drawn seeds. So
    the interval holds both the test set's sampling noise and the seed-to-seed noise of training.
    With paired_seeds (both ran the same seeds, row k of each trained with seed k: the same batch
    order, the same random head at the start) seed k of A is drawn with seed k of B, which removes
    the part of the seed noise the two share, as drawing the same test rows does for the rows; else
    each experiment's seeds are drawn on their own. With 3 seeds the seed noise is estimated crudely
    (resampling n values understates their variance by (n-1)/n): more seeds, a truer interval.
    Returns (observed difference, low, high)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)   # (B, N)
    f1_a, f1_b = bootstrap_f1(preds_a, labels, weights), bootstrap_f1(preds_b, labels, weights)
    pick_a = rng.integers(0, len(preds_a), size=(samples, len(preds_a)))
    pick_b = pick_a if paired_seeds else rng.integers(0, len(preds_b), size=(samples, len(preds_b)))
    diffs = (np.take_along_axis(f1_a, pick_a, 1).mean(1) - np.take_along_axis(f1_b, pick_b, 1).mean(1))
    observed = np.mean([macro_f1(labels, p) for p in preds_a]) - np.mean([macro_f1(labels, p) for p in preds_b])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(observed), float(low), float(high)


def macro_f1(labels, preds):
    """Macro F1 over all four classes, also where a small test sample lacks one."""
    return f1_score(labels, preds, average="macro", labels=range(common.NUM_CLASSES))


def mcnemar_exact(right_a, right_b):
    """Exact McNemar test: of the rows where exactly one of A and B is right, is A's share 1/2?
    b = A right, B wrong; c = the reverse; under H0 b ~ Binomial(b + c, 1/2). Two-sided p."""
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    if b + c == 0:
        return 1.0
    return float(binomtest(min(b, c), b + c, 0.5).pvalue)


def majority_right(preds, labels):
    """(N,) bool: the row is right for an experiment when more than half of its seeds get it right (a
    tie, with an even number of seeds, counts as wrong). McNemar needs one right/wrong per row and
    experiment. The majority of seeds is itself a little more accurate than a typical seed, so the p
    describes that majority; the interval describes the mean over seeds (with one seed they agree)."""
    return (preds == labels).mean(0) > 0.5


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def summarise(experiment, labels):
    """One row of the table, before the comparison with the baseline."""
    probs = experiment.probs(len(labels))
    preds = np.stack([p.argmax(1) for p in probs])                                # (R, N)
    per_class = np.stack([f1_score(labels, p, average=None, labels=range(common.NUM_CLASSES)) for p in preds])
    mixed = [int(np.sum((labels == BUSINESS) & (p == SCITECH)) + np.sum((labels == SCITECH) & (p == BUSINESS)))
             for p in preds]
    metrics = experiment.metrics
    memory = [m.get("memory", {}) for m in metrics]
    peak = [mem.get("cuda_max_allocated_gb", mem.get("cpu_max_rss_gb")) for mem in memory]
    trainable = {m.get("parameters", {}).get("trainable") for m in metrics}
    return {"experiment": experiment.name, "seeds": len(preds), "preds": preds,
            "accuracy": mean_std((preds == labels).mean(1)),
            "macro_f1": mean_std([macro_f1(labels, p) for p in preds]),
            "f1_runs": [macro_f1(labels, p) for p in preds],
            "f1_business": mean_std(per_class[:, BUSINESS]), "f1_scitech": mean_std(per_class[:, SCITECH]),
            "business_scitech_errors": mean_std(mixed),
            "train_time_s": mean_std([m.get("train_time_s", np.nan) for m in metrics]),
            "samples_per_s": mean_std([m.get("train_samples_per_s", np.nan) for m in metrics]),
            "trainable": trainable.pop() if len(trainable) == 1 else None,
            "peak_memory_gb": mean_std([np.nan if p is None else p for p in peak]),
            "memory_kind": "CUDA allocated" if any("cuda_max_allocated_gb" in m for m in memory) else "CPU max RSS"}


def compare_experiments(experiments, labels, baseline_name=None, seed=0):
    """Rows of the comparison table, the baseline's first, each against the baseline."""
    if baseline_name is not None:
        chosen = [e for e in experiments if e.name == baseline_name]
        if not chosen:
            raise common.UserError(f"--baseline {baseline_name}: no such experiment; there are "
                                   f"{', '.join(e.name for e in experiments)}")
        baseline = chosen[0]
    else:
        baseline = next((e for e in experiments if e.is_pooler_baseline), experiments[0])
    rows = [summarise(e, labels) for e in [baseline] + [e for e in experiments if e is not baseline]]
    experiment_of = {e.name: e for e in experiments}
    base = rows[0]
    for row in rows:
        row["baseline"] = base["experiment"]
        if row is base:
            row["diff"], row["p"] = None, None
            continue
        paired = len(experiment_of[row["experiment"]].seeds) > 1 and experiment_of[row["experiment"]].seeds == baseline.seeds
        row["seeds_paired"] = paired
        row["diff"] = paired_bootstrap(row["preds"], base["preds"], labels, seed=seed, paired_seeds=paired)
        row["p"] = mcnemar_exact(majority_right(row["preds"], labels), majority_right(base["preds"], labels))
    return rows


def verdict(row):
    """'+0.0123 [+0.0040, +0.0210] *' where the interval excludes 0, else the plain 'inside the noise'."""
    if row["diff"] is None:
        return "baseline"
    diff, low, high = row["diff"]
    real = low > 0 or high < 0
    paired = " (seeds paired)" if row.get("seeds_paired") else ""
    return f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]" + (" *" if real else " (inside the noise)") + paired


COMPARE_COLUMNS = ["experiment", "seeds", "test accuracy", "macro F1", "F1 Business", "F1 Sci/Tech",
                   "Business<->Sci/Tech errors", "training time (s)", "samples/s", "trainable parameters",
                   "peak memory (GB)", "macro F1 - baseline [95% CI]", "McNemar p"]


def table_cells(row):
    def pm(pair, digits):
        mean, std = pair
        return "-" if np.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return [row["experiment"], str(row["seeds"]), pm(row["accuracy"], 4), pm(row["macro_f1"], 4),
            pm(row["f1_business"], 4), pm(row["f1_scitech"], 4), pm(row["business_scitech_errors"], 1),
            pm(row["train_time_s"], 0), pm(row["samples_per_s"], 1),
            "-" if row["trainable"] is None else f"{row['trainable']:,}", pm(row["peak_memory_gb"], 2),
            verdict(row), "-" if row["p"] is None else f"{row['p']:.2g}"]


def plot_compare(rows, path):
    """Macro F1 per experiment: mean with a ±1 std bar, each seed a dot; the baseline's mean dashed."""
    fig, ax = plt.subplots(figsize=(COMPARE_WIDTH, 2 + 0.45 * len(rows)))
    for y, row in enumerate(rows):
        mean, std = row["macro_f1"]
        marked = row["diff"] is not None and (row["diff"][1] > 0 or row["diff"][2] < 0)
        ax.errorbar(mean, y, xerr=std, fmt="o", color="tab:red" if marked else "tab:blue", capsize=4)
        ax.scatter(row["f1_runs"], [y] * len(row["f1_runs"]), s=14, color="black", alpha=0.6, zorder=3)
    ax.axvline(rows[0]["macro_f1"][0], color="grey", linestyle="--")
    ax.set_title(f"dashed: the baseline's mean ({rows[0]['experiment']}); red: its 95% interval of the "
                 f"difference excludes 0", fontsize=10)
    ax.set_yticks(range(len(rows)), [f"{r['experiment']} ({r['seeds']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("test macro F1: mean ± std over seeds (black dots: the seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def show_compare(paths, out_dir, baseline_name=None, data_dir=None, seed=0):
    """Print the table; write compare.md, compare.csv and compare.png into out_dir."""
    experiments = gather_experiments(paths)
    labels = common.load_scored_split(experiments[0].runs[0], "test", data_dir).labels
    rows = compare_experiments(experiments, labels, baseline_name, seed)
    cells = [table_cells(row) for row in rows]
    markdown = "\n".join(["| " + " | ".join(COMPARE_COLUMNS) + " |", "|" + " --- |" * len(COMPARE_COLUMNS)]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    note = (f"Test set: {len(labels):,} rows. Mean ± std over seeds; peak memory is {rows[0]['memory_kind']}. "
            f"Differences in macro F1 against {rows[0]['experiment']}: 95% paired bootstrap over test rows and "
            f"seeds ({BOOTSTRAP_SAMPLES} resamples; seed k drawn with the baseline's seed k where both ran the "
            f"same seeds); * = the interval excludes 0. McNemar: exact, on the "
            f"rows each experiment's majority of seeds gets right (a tie counts as wrong).")
    print("\n" + markdown + "\n\n" + note)
    out_dir = Path(out_dir)
    common.atomic_write(out_dir / "compare.md", lambda tmp: Path(tmp).write_text(markdown + "\n\n" + note + "\n"))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COMPARE_COLUMNS)
            writer.writerows(cells)
    common.atomic_write(out_dir / "compare.csv", write_csv)
    print(f"wrote {out_dir / 'compare.md'}\nwrote {out_dir / 'compare.csv'}")
    plot_compare(rows, out_dir / "compare.png")
    return rows



# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
ACTIONS = ["report", "confusion", "pca", "tsne", "tfidf", "errors", "attribution", "curves", "shap", "contrast"]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--run", help="run folder (default: the newest finished run under runs/)")
    parser.add_argument("--out", help="folder for the figures and word list (default <run>/analysis)")
    parser.add_argument("--data", help="AG News folder (default: the one the run was trained on, or $AGNEWS_DIR)")
    parser.add_argument("--compare", nargs="*", metavar="RUN",
                        help="mean ± std over seeds of every experiment among these runs or folders of runs "
                             "(none named: runs/), each against --baseline; writes compare.md, .csv, .png "
                             "into --out (default runs/)")
    parser.add_argument("--baseline", help="--compare: the experiment (folder name) the others are measured "
                                           "against (default: the pooler head when present)")
    parser.add_argument("--report", action="store_true", help="classification report and macro F1 on the test set")
    parser.add_argument("--confusion", action="store_true", help="confusion matrix: counts and row rates")
    parser.add_argument("--pca", action="store_true", help="PCA map of the sentence vectors")
    parser.add_argument("--tsne", action="store_true", help="t-SNE map of the sentence vectors")
    parser.add_argument("--sample", type=int, default=2000, help="test rows in the PCA/t-SNE maps (stratified)")
    parser.add_argument("--tfidf", action="store_true", help="top words of each confusion; writes the penalty list")
    parser.add_argument("--split", default="val", choices=["val", "test"],
                        help="--tfidf: whose errors to mine (default val: the penalty list is then fair to test)")
    parser.add_argument("--pairs", default="business-scitech", choices=["business-scitech", "all"],
                        help="directions written to the penalty list")
    parser.add_argument("--top-k", type=int, default=15, help="words per direction")
    parser.add_argument("--penalty-json", help="where to write the penalty list (default <out>/penalty_words.json)")
    parser.add_argument("--errors", action="store_true", help="the most confidently wrong test rows")
    parser.add_argument("--top", type=int, default=10, help="rows for --errors (and --attribution without --text)")
    parser.add_argument("--attribution", action="store_true", help="integrated-gradient token attributions")
    parser.add_argument("--text", action="append", help="text to explain (repeatable); default: the top errors")
    parser.add_argument("--steps", type=int, default=50, help="integrated-gradient steps (trapezoid rule)")
    parser.add_argument("--curves", action="store_true", help="training and validation curves per epoch")
    parser.add_argument("--shap", action="store_true",
                        help="Shapley values of the words beside integrated gradients (each --text, else the "
                             "top errors)")
    parser.add_argument("--shap-samples", type=int, default=64,
                        help=f"--shap, --contrast: permutations (antithetic pairs, so even) for a text of more "
                             f"than {SHAP_EXACT_WORDS} words; up to that, exact enumeration")
    parser.add_argument("--contrast", nargs=2, metavar=("TEXT_A", "TEXT_B"),
                        help="two texts side by side: probabilities, cosine similarity, place on the PCA map, "
                             "SHAP of their words (one PNG)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the map sample, t-SNE, the SHAP orders and the --compare bootstrap")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when a GPU is visible")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.compare is not None:  # about many runs, not one: it needs no --run
        show_compare(args.compare or ["runs"], args.out or "runs", args.baseline, args.data, args.seed)
        if not any(getattr(args, action) for action in ACTIONS):
            return
    if not any(getattr(args, action) for action in ACTIONS):
        raise common.UserError("nothing to do: pass one or more of --compare, "
                               + ", ".join(f"--{a}" for a in ACTIONS))
    for flag, value in (("--sample", args.sample), ("--top-k", args.top_k), ("--top", args.top),
                        ("--steps", args.steps)):
        if value < 1:
            raise common.UserError(f"{flag} must be at least 1, got {value}")
    run = SavedRun(args.run or newest_run(), args.data, args.device)
    out_dir = Path(args.out) if args.out else run.dir / "analysis"
    print(f"analysing {run.dir} ({run.config.get('script')}); figures go to {out_dir}/")

    if args.report:
        show_report(run)
    if args.confusion:
        show_confusion(run, out_dir)
    if args.pca or args.tsne:
        show_maps(run, out_dir, [m for m in ("pca", "tsne") if getattr(args, m)], args.sample, args.seed)
    if args.tfidf:
        show_tfidf(run, out_dir, args.pairs, args.top_k, args.penalty_json, args.split)
    if args.errors:
        show_errors(run, args.top)
    if args.attribution:
        show_attribution(run, out_dir, args.text, args.top, args.steps)
    if args.curves:
        show_curves(run, out_dir)
    if args.shap:
        show_shap(run, out_dir, args.text, args.top, args.shap_samples, args.steps, args.seed)
    if args.contrast:
        show_contrast(run, out_dir, args.contrast, args.shap_samples, args.sample, args.seed)


if __name__ == "__main__":
    common.run_main(main)
