"""Why did the model say that? Three answers, each worked out by hand.

Run through analyze.py (--attribution, --shap, --contrast) on a finished run; analyze.py's --errors
finds the texts worth explaining. It teaches, in order:
  1. integrated gradients (--attribution): walk the input word embeddings in a straight line from a
     baseline x' ([PAD] in place of every word) to the text x, and credit token t with
         IG_t = sum_d (x - x')_td * integral_0^1 dF(x' + a (x - x'))/dx_td da,
     F = the predicted class's logit; the integral is a trapezoid rule over --steps points. The
     credits add up to F(x) - F(x') (completeness). Printed beside the attention weights of the
     models that pool with attention, and drawn as coloured tokens.
  2. Shapley values of whole words (--shap), computed in shapley.py (read it between 1 and 2):
     no gradients, only the model's logit on subsets of the words. Each word gets its marginal
     contribution f(S + word) - f(S) averaged over every order in which the words could arrive.
     Here they are printed and drawn beside IG per word, with the rank agreement of the two.
  3. the contrast (--contrast): why two similar texts get different classes. Both texts' four
     probabilities, where they sit on the run's PCA map of test rows, and Shapley values of their
     words for the difference of two logits: the words that decide between the two classes.
Every function takes the model and tokenizer of a run, or a `run` (analyze.SavedRun: its model,
tokenizer, test rows and probabilities); nothing here imports analyze.py, which imports this file.
tests/test_analyze.py checks IG by completeness; tests/test_shap.py checks the Shapley values on a
game known by hand and on tiny models.

Lesson 18 of README's reading path: read after shapley.py; next: compare.py, from one run to many,
and which difference between them is real.
"""
import textwrap
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from matplotlib.colors import Normalize
from sklearn.decomposition import PCA

import common
import shapley
from plumbing import agnews

# --------------------------------------------------------------------------------------------------
# The texts to explain (analyze.py's --errors picks them the same way)
# --------------------------------------------------------------------------------------------------
def confident_errors(probs, labels, top):
    """Indices of misclassified rows, highest probability of the (wrong) predicted class first."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    confidence = probs[wrong, preds[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:top]


def chosen_cases(run, texts, top):
    """(text, title) of each --text, or of the `top` most confidently wrong test rows."""
    if texts:
        return [(text, f"--text {i + 1}: {text}") for i, text in enumerate(texts)]
    return [(run.test.texts[i],
             f"test row {i}, true {common.CLASS_NAMES[run.test.labels[i]]}: {run.test.texts[i]}")
            for i in confident_errors(run.probs, run.test.labels, top)]


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
# points of the path. This works for every model with one nn.Embedding of words (our BERT, the
# LSTMs).


def word_embedding_table(model):
    if hasattr(model, "bert"):
        return model.bert.embeddings.word
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if len(tables) != 1:
        raise common.UserError(f"--attribution: cannot tell which of the model's {len(tables)} "
                               f"embedding tables holds the words")
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
                points = x_base + a[:, None, None] * (x - x_base)          # (S, T, D)
                points.requires_grad_(True)
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
    return torch.where(keep, input_ids, torch.full_like(input_ids, common.PAD_ID))


def attention_weights(model, input_ids):
    """Attention over tokens (T,) of a model that keeps `last_weights` (attnpool, bilstm_attn),
    else None."""
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
    chars_per_line = int(common.WIDE / char_width) - 4
    positions, n_lines = layout_tokens(tokens, chars_per_line)
    rows = len(panels) * (n_lines + 2)                          # a heading and a gap per panel
    line_height = 0.3                                           # inches
    fig = plt.figure(figsize=(common.WIDE, (rows + 2) * line_height))
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
            ax.text(column, top + 1 + line, token, family="monospace", fontsize=font_size,
                    va="center",
                    bbox={"facecolor": colour, "edgecolor": "none", "boxstyle": "square,pad=0.15"})
    return common.save_figure(fig, path)


def explain(model, tokenizer, text, max_len, steps, title, path):
    """IG for one text: prints the tokens with their attributions and writes the coloured-token PNG.
    Returns (attributions (T,), F(x), F(x'), predicted class)."""
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(common.encode(tokenizer, [text], max_len)[0]).to(device)   # (T,)
    with torch.no_grad():
        mask = torch.ones_like(input_ids[None], dtype=torch.bool)
        logits = model(input_ids[None], mask)[0].float()
    predicted = int(logits.argmax())
    attributions, f_x, f_base = integrated_gradients(
        model, input_ids, baseline_for(input_ids, tokenizer), predicted, steps)
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
    cases = chosen_cases(run, texts, top)
    paths = []
    for k, (text, title) in enumerate(common.progress(cases, "attribution", unit="texts"), start=1):
        path = Path(out_dir) / f"attribution_{k:02d}.png"
        explain(model, tokenizer, text, run.max_len, steps, title, path)
        paths.append(path)
    return paths


def plot_shap_and_ig(words, shap, ig, title, headings, xlabel, path):
    """Two bar charts, one row per word in text order: SHAP | integrated gradients."""
    y = np.arange(len(words))
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(common.WIDE, 1.6 + 0.25 * len(words)))
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
    return common.save_figure(fig, path)


def explain_words(model, tokenizer, text, max_len, samples, seed, steps, title, path):
    """SHAP and integrated gradients of the predicted class's logit, per word: the printed table
    and one PNG. Returns (WordShapley, IG per word (n,), Spearman rho)."""
    result = shapley.word_shapley(model, tokenizer, text, max_len, samples=samples, seed=seed)
    predicted, name = result.predicted, common.CLASS_NAMES[result.predicted]
    input_ids = result.input_ids.to(next(model.parameters()).device)
    attributions, f_x, f_base = integrated_gradients(
        model, input_ids, baseline_for(input_ids, tokenizer), predicted, steps)
    ig = shapley.per_word(attributions.numpy(), result.word_of, len(result.words))
    rho, p_value = shapley.rank_agreement(result.values, ig)

    print(f"\n{title}\n  predicted {name} (p {result.probs[predicted]:.3f}); SHAP of the {name} "
          f"logit, {result.method}")
    print(f"  SHAP: f(text) {result.f_text:.4f} - f(no words) {result.f_empty:.4f} = "
          f"{result.f_text - result.f_empty:.4f}; sum of the values {result.values.sum():.4f}")
    print(f"  IG:   F(x) {float(f_x):.4f} - F([PAD] baseline) {float(f_base):.4f} = "
          f"{float(f_x - f_base):.4f}; sum {float(attributions.sum()):.4f}")
    print(f"  Spearman rank agreement of SHAP and IG over {len(result.words)} words: rho {rho:.3f} "
          f"(p {p_value:.2g})")
    width = max(8, *(len(w) for w in result.words))
    print(f"  {'word'.ljust(width)} {'SHAP':>9} {'IG':>9}")
    for word, s, g in zip(result.words, result.values, ig):
        print(f"  {word.ljust(width)} {s:>+9.4f} {g:>+9.4f}")

    headings = (f"SHAP ({result.method.split(' (')[0]}); sum {result.values.sum():+.3f}",
                f"integrated gradients ({steps} steps, [PAD] baseline); sum {ig.sum():+.3f}")
    plot_shap_and_ig(result.words, result.values, ig,
                     f"{name} logit (p {result.probs[predicted]:.2f}), Spearman rho {rho:.2f}  |  "
                     f"{title}",
                     headings, f"share of the {name} logit: red towards {name}, blue away", path)
    return result, ig, rho


def show_shap(run, out_dir, texts, top, samples, steps, seed):
    """SHAP beside IG for each text (or top error): the tables and shap_01.png, shap_02.png, ..."""
    shapley.check_shap_samples(samples)
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


def sentence_features(run, texts):
    """model.features of texts, scored as the run scores its test rows (its precision):
    (N, F) float32. The points of analyze.py's --pca and --tsne maps."""
    model, tokenizer = run.model_and_tokenizer
    encoded = common.Encoded(common.encode(tokenizer, texts, run.max_len),
                             np.zeros(len(texts), dtype=np.int64))
    return common.predict(model, encoded, run.runtime, features=True, desc="sentence vectors")


def map_pca(features, seed):
    """The 2-D PCA map of sentence vectors (S, F): (points (S, 2), the fitted PCA). --pca draws it;
    --contrast places two more texts on the same map."""
    pca = PCA(n_components=2, random_state=seed)
    return pca.fit_transform(features), pca


def fit_map_pca(run, sample, seed):
    """analyze.show_maps' PCA: the same stratified test rows and seed. Returns (rows, 2-D points,
    PCA)."""
    rows = agnews.stratified_indices(run.test.labels, sample, seed)
    features = sentence_features(run, [run.test.texts[i] for i in rows])
    points, pca = map_pca(features, seed)                               # (S, 2)
    return rows, points, pca


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


def plot_contrast(texts, probs, results, classes, cosine, map_points, map_labels, text_points,
                  ratio, path):
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
    prob_ax.set_title(f"predictions; cosine similarity of the sentence vectors {cosine:.3f}",
                      fontsize=10)
    prob_ax.legend(fontsize=9)

    for c, name in enumerate(common.CLASS_NAMES):
        at = map_labels == c
        map_ax.scatter(map_points[at, 0], map_points[at, 1], s=6, alpha=0.35,
                       color=common.CLASS_COLOURS[c], label=name)
    for name, point, p in zip(names, text_points, probs):
        predicted = int(p.argmax())
        map_ax.scatter(*point, s=500, marker="*", color=common.CLASS_COLOURS[predicted],
                       edgecolors="black", linewidths=1.5, zorder=3)
        map_ax.annotate(f"{name}: {common.CLASS_NAMES[predicted]}", point, xytext=(12, 8),
                        textcoords="offset points", fontsize=11, weight="bold",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "black"}, zorder=4)
    map_ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)")
    map_ax.set_ylabel(f"PC2 ({ratio[1]:.1%})")
    map_ax.set_title(f"PCA of {len(map_points)} test rows' sentence vectors (coloured by true "
                     f"class)", fontsize=10)
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
        ax.set_xlabel(f"<- towards {c2}      SHAP of logit({c1}) - logit({c2})      "
                      f"towards {c1} ->")
        ax.set_title(f"text {name}: {len(keep)} of {len(r.words)} words; f(text) {r.f_text:+.2f} "
                     f"- f(no words) {r.f_empty:+.2f} = sum {r.values.sum():+.2f}", fontsize=10)

    heading = "\n".join(textwrap.shorten(f"{name}: {text}", 190)
                        for name, text in zip(names, texts))
    fig.suptitle(heading, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return common.save_figure(fig, path)


def show_contrast(run, out_dir, texts, samples, sample, seed):
    """Two texts side by side: the printed table and contrast.png. Returns (path, cosine, results,
    the two texts' points on the map (2, 2))."""
    shapley.check_shap_samples(samples)
    model, tokenizer = run.model_and_tokenizer
    logits, features = text_outputs(model, tokenizer, texts, run.max_len)
    probs = torch.from_numpy(logits).softmax(-1).numpy()                # (2, 4)
    norms = np.linalg.norm(features[0]) * np.linalg.norm(features[1])
    cosine = float(features[0] @ features[1] / norms)
    classes = contrast_classes(probs)
    one_hot = np.eye(common.NUM_CLASSES)
    class_weights = one_hot[classes[0]] - one_hot[classes[1]]
    results = [shapley.word_shapley(model, tokenizer, text, run.max_len, class_weights, samples,
                                    seed)
               for text in texts]
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
    print(f"  on the PCA map of {len(rows)} test rows: "
          f"A at ({text_points[0, 0]:+.2f}, {text_points[0, 1]:+.2f}), "
          f"B at ({text_points[1, 0]:+.2f}, {text_points[1, 1]:+.2f})")
    print(f"\n  SHAP of logit({c1}) - logit({c2}): + pushes towards {c1}, - towards {c2}")
    for name, r in zip("AB", results):
        print(f"  {name}: f(text) {r.f_text:+.4f} - f(no words) {r.f_empty:+.4f} = "
              f"sum {r.values.sum():+.4f}; {r.method}")
        listing = [f"{w} {v:+.3f}" for w, v in zip(r.words, r.values)]
        print(textwrap.fill(" | ".join(listing), 110, initial_indent="    ",
                            subsequent_indent="    "))
    shared = sorted(set(results[0].words) & set(results[1].words))
    if shared:
        value_of = [dict(zip(r.words, r.values)) for r in results]   # repeated word: last value
        print("  words in both texts (A | B): "
              + ", ".join(f"{w} {value_of[0][w]:+.3f} | {value_of[1][w]:+.3f}" for w in shared))
    path = plot_contrast(texts, probs, results, classes, cosine, map_points, run.test.labels[rows],
                         text_points, pca.explained_variance_ratio_, Path(out_dir) / "contrast.png")
    return path, cosine, results, text_points
