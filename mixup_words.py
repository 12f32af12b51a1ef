"""The words behind the mix-ups: which words does a model's Business<->Sci/Tech confusion go with?

The study asked this with TF-IDF, and so do we (`python analyze.py --tfidf`). A word's TF-IDF weight
in a text is how often it occurs there times how rare it is across the texts (sklearn's smoothed
idf: 1 + ln((1 + N) / (1 + texts that have it))), each text's row scaled to unit length. Averaged
over the Business texts a model called Sci/Tech, the top words are mostly what every Business text
says (company, said, million). So we rank by a contrast instead:

    score(word) = mean TF-IDF over the texts misclassified true -> predicted
                - mean TF-IDF over the texts of the true class classified right

and what is left are the words that go with the mix-up (google, computer, software, internet in
Business -> Sci/Tech; sales, ceo, growth in Sci/Tech -> Business: the validation errors of the quick
study's pooler, seed 0). An association in the errors, not a cause: that a word moves the verdict is
what Shapley values test (shapley.py). The list for Business<->Sci/Tech is written as
penalty_words.json, and the attnpool head can be told to look away from those words (train_bert.py
--head attnpool --penalty-words; in the study and here that did not help: RESULTS.md).

Two details that matter: the words come from the VALIDATION errors by default (a list mined from
the test errors would flatter the penalised model on that same test set), and only words the
tokenizer keeps whole are listed (the head penalises every piece of a listed word, and the pieces
of a split word occur in unrelated words everywhere).

analyze.py --tfidf calls show_tfidf; tests/test_analyze.py checks the ranking on texts made to have
known answers.

Lesson 16 of README's reading path: read after vote.py; next: shapley.py.
"""
import textwrap
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import confusion_matrix

import common

# TF-IDF words: letters only (numbers and years are not topics), 2+ of them, English stop words out.
WORD_PATTERN = r"(?u)\b[^\W\d_]{2,}\b"


def confused_directions(counts):
    """(true, predicted) pairs with at least one error: Business<->Sci/Tech first, then by count."""
    first = [(common.BUSINESS, common.SCITECH), (common.SCITECH, common.BUSINESS)]
    others = [(t, p) for t in range(common.NUM_CLASSES) for p in range(common.NUM_CLASSES)
              if t != p and (t, p) not in first and counts[t, p] > 0]
    return [d for d in first if counts[d] > 0] + sorted(others, key=lambda d: -counts[d])


def direction_name(true_class, predicted):
    return f"{common.CLASS_NAMES[true_class]}->{common.CLASS_NAMES[predicted]}"


def is_single_piece(tokenizer, word):
    """True when the tokenizer keeps `word` whole. The attnpool head penalises every piece of a
    listed word, so a split word such as 'outsourcing' -> 'outs', '##our', '##cing' would penalise
    fragments that occur in unrelated words everywhere; an unknown word would penalise every
    [UNK]."""
    encoding = tokenizer.encode(word, add_special_tokens=False)
    unknown = getattr(tokenizer.model, "unk_token", None)
    return len(encoding.ids) == 1 and encoding.tokens[0] != unknown


def top_words(texts, labels, preds, directions, top_k, keep=lambda word: True):
    """For each (true, predicted) direction: the top_k words by how much more mean TF-IDF weight
    they carry in the texts misclassified that way than in the texts of the true class classified
    right, as [(word, weight difference)], skipping words for which keep(word) is False.
    The contrast matters: ranked by weight alone, a Business text's top words are company, said,
    million, whatever went wrong; the difference keeps the words that go with its mix-up."""
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
        words = [(vocabulary[i], float(mean[i])) for i in order
                 if mean[i] > 0 and keep(vocabulary[i])]
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
    height = 1 + sum(0.25 * max(len(w), 1) + 0.8 for w in ranked.values())
    fig, axes = plt.subplots(len(directions), 1, squeeze=False, figsize=(common.WIDE, height),
                             gridspec_kw={"height_ratios": [max(len(w), 1) + 3
                                                            for w in ranked.values()]})
    for ax, direction in zip(axes[:, 0], directions):
        words = ranked[direction]
        ax.barh(range(len(words)), [w for _, w in words],
                color=common.CLASS_COLOURS[direction[1]])
        ax.set_yticks(range(len(words)), [word for word, _ in words])
        ax.invert_yaxis()
        if not words:
            ax.text(0.5, 0.5, "no text misclassified this way", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(f"{direction_name(*direction)}: {counts[direction]} texts, top words by "
                     f"TF-IDF contrast", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def show_tfidf(run, out_dir, pairs, top_k, json_path=None, split="val"):
    """Prints the words of every confused direction; writes the penalty list (Business<->Sci/Tech,
    or every confused direction with pairs="all") and its bar chart. Returns (word lists, JSON
    path). The words come from the validation errors by default: a list mined from the test errors
    would flatter the penalised model's score on that same test set."""
    rows, preds = run.split(split), run.probs_of(split).argmax(1)
    counts = confusion_matrix(rows.labels, preds, labels=range(common.NUM_CLASSES))
    tokenizer = penalty_tokenizer(run.config)
    directions = confused_directions(counts)
    print(f"\nconfusions of the {split} split ({len(rows)} rows)")
    ranked = top_words(rows.texts, rows.labels, preds, directions, top_k,
                       keep=lambda word: is_single_piece(tokenizer, word))
    print(f"\ntop {top_k} words of each confusion (mean TF-IDF over the texts misclassified that "
          f"way, minus over those of the true class classified right; whole words of the tokenizer "
          f"only):")
    for direction, words in ranked.items():
        print(f"\n{direction_name(*direction)}  ({counts[direction]} texts)")
        print(textwrap.fill("  ".join(f"{word} {weight:.3f}" for word, weight in words), 100,
                            initial_indent="  ", subsequent_indent="  "))

    listed = [(common.BUSINESS, common.SCITECH), (common.SCITECH, common.BUSINESS)]
    if pairs == "all":
        listed += [d for d in directions if d not in listed]
    penalty_words = {direction_name(*d): [word for word, _ in ranked.get(d, [])] for d in listed}
    json_path = Path(json_path) if json_path else Path(out_dir) / "penalty_words.json"
    common.save_json(json_path, penalty_words)
    print(f"\nwrote {json_path} ({sum(map(len, penalty_words.values()))} words; "
          f"train with: python train_bert.py --head attnpool --penalty-words {json_path})")
    plot_words({d: ranked.get(d, []) for d in listed}, counts, Path(out_dir) / "tfidf_words.png")
    return penalty_words, json_path
