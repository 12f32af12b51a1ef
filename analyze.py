"""Error analysis of a saved run, as pictures and tables.

    python analyze.py --report --confusion                 # the newest finished run under runs/
    python analyze.py --run runs/bert_pooler --pca --tsne --sample 2000
    python analyze.py --run runs/bert_pooler --tfidf --top-k 15   # -> analysis/penalty_words.json
    python analyze.py --run runs/bert_attnpool --errors --attribution --top 5
    python analyze.py --run runs/bert_pooler --attribution --text 'Oracle buys PeopleSoft for $10bn'
    python analyze.py --run runs/bert_pooler --curves
    python analyze.py --run runs/bert_pooler --shap --text 'Oracle profit rises on software sales'
    python analyze.py --run runs/bert_pooler --contrast 'text A' 'text B'   # why two texts differ
    python analyze.py --compare                      # every experiment under runs/, seeds pooled
    python analyze.py --compare runs/study --baseline bert_pooler
    python analyze.py --learning-curve results/study-quick.csv results/study-medium.csv \
        results/study-large.csv --out figures   # or the study folders themselves
    python analyze.py --epochs-curve runs/acc/pooler_e1 runs/acc/pooler_e3 --out figures
    python analyze.py --score-cases runs/study-quick   # today's news for runs made before it

Everything is read from the run folder: config.json (how it was trained), metrics.json (its
history and the fingerprint of its test split), test_probs.npy (its probabilities on that split)
and, for the embedding maps and attributions, the model itself. Figures are PNG files in
<run>/analysis/ (or --out); every table is printed.

The questions, in order: how good is it (--report), which classes does it mix up (--confusion), do
the classes separate in its sentence vectors (--pca, --tsne), which words go with the mix-ups
(--tfidf; the list feeds the attnpool head's --penalty-words), which texts does it get wrong with
the most confidence (--errors), which tokens pushed it there (--attribution; --shap, Shapley values
of whole words beside them), why two similar texts get different classes (--contrast), and did
training converge (--curves). Across runs: which experiment is better, by how much, and is the
difference more than seed and test-set noise (--compare)?

This file is the tool; the lessons it calls have files of their own: mixup_words.py (--tfidf:
the words behind the mix-ups, the penalty list), explain.py (--attribution, --shap, --contrast:
integrated gradients by hand, and the figures), shapley.py (Shapley values of words, by hand),
compare.py (--compare: seeds, the paired bootstrap, McNemar) and learning_curves.py
(--learning-curve, --epochs-curve). None of them imports this file.
"""
import argparse
import textwrap
from functools import cache, cached_property
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix, f1_score

import common
import compare
import explain
import learning_curves
import mixup_words
import shapley
import vote
from plumbing import agnews, flags, runfolders

# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
# The figure helper (save_figure at a fixed DPI), the figure width WIDE, CLASS_COLOURS and the
# BUSINESS, SCITECH class indices live in common.py: explain.py, compare.py and mixup_words.py
# use them too.
CONFUSION_SIZE = (12, 5)     # inches: counts | row-normalised rates
MAP_SIZE = (8, 7)            # one PCA or t-SNE scatter
CURVES_SIZE = (11, 4.5)      # loss | accuracy and macro F1
TSNE_PCA_DIMS = 50           # t-SNE runs on the top principal components: much faster, same picture


# --------------------------------------------------------------------------------------------------
# The run: config, metrics, its test split and probabilities, its model (each loaded on first use)
# --------------------------------------------------------------------------------------------------
def newest_run(root="runs"):
    """The newest finished training run under root (a saved vote has no model: name it with
    --run)."""
    runs = [run for run in runfolders.find_runs(root) if runfolders.is_finished(run)
            and common.load_json(run / "config.json").get("script") != "vote"]
    if not runs:
        raise common.UserError(f"no finished run under {root}/: pass --run runs/NAME")
    return runs[-1]


def newest_run_note(run):
    """Which run analyze.py took without --run, and why. After a --seeds run the newest is one seed
    of an experiment (runs/<name>/seed<k>): analysing one seed is right, as each is an ordinary
    run, but the user thinks of runs/<name>, so name its seed folders too."""
    experiment = runfolders.experiment_folder(run)
    if experiment == Path(run):
        return f"no --run: {run}, the newest finished run; pass --run to choose another"
    seeds = sorted((int(match[1]), folder.name) for folder in experiment.iterdir()
                   if (match := runfolders.SEED_FOLDER.fullmatch(folder.name))
                   and runfolders.is_finished(folder))
    return (f"no --run: {run}, the newest finished run (seed folders of {experiment}: "
            f"{', '.join(name for _, name in seeds)}; pass --run to choose)")


class SavedRun:
    """A finished run folder. The test split, the saved probabilities and the model load on first
    use, so --curves needs no data and --confusion no model."""

    def __init__(self, run_dir, data_dir=None, device="auto", int8=False):
        self.dir = Path(run_dir)
        self.int8 = int8
        runfolders.check_finished(self.dir)   # the rule every reader follows
        self.config = common.load_json(self.dir / "config.json")
        self.metrics = common.load_json(self.dir / "metrics.json")
        self.data_dir = data_dir
        self.device = device

    @cache
    def split(self, name):
        return runfolders.load_scored_split(self.dir, name, self.data_dir)

    @cache
    def probs_of(self, name):
        """(N, 4) float32, rows in the order of the val or test split."""
        return runfolders.load_probs(self.dir, name, len(self.split(name)))

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
        model, tokenizer, _ = runfolders.load_run(self.dir, self.runtime.device, self.int8)
        return model, tokenizer

    @property
    def max_len(self):
        return self.config.get("max_len") or self.config.get("args", {}).get("max_len", 128)


# --------------------------------------------------------------------------------------------------
# --report and --confusion
# --------------------------------------------------------------------------------------------------
def show_report(run):
    common.print_report(run.test.labels, run.probs)
    macro_f1 = f1_score(run.test.labels, run.preds, average="macro", zero_division=0)
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
                ax.text(j, i, label(i, j), ha="center", va="center",
                        color="white" if dark else "black")
        ax.set_xticks(range(common.NUM_CLASSES), common.CLASS_NAMES)
        ax.set_yticks(range(common.NUM_CLASSES), common.CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    return common.save_figure(fig, path)


def print_matrix(values, fmt):
    width = max(len(name) for name in common.CLASS_NAMES) + 2
    print("true \\ predicted".ljust(width + 6)
          + "".join(name.rjust(width) for name in common.CLASS_NAMES))
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
# explain.sentence_features scores them and explain.map_pca fits the PCA map: --contrast places two
# texts on that same map, so both live beside it, in explain.py.
def plot_map(points, labels, wrong, title, axis_labels, path):
    """Scatter of 2-D points coloured by true class; misclassified points ringed in black."""
    fig, ax = plt.subplots(figsize=MAP_SIZE)
    for c, name in enumerate(common.CLASS_NAMES):
        at = labels == c
        ax.scatter(points[at, 0], points[at, 1], s=8, alpha=0.6, color=common.CLASS_COLOURS[c],
                   label=name)
    ax.scatter(points[wrong, 0], points[wrong, 1], s=40, facecolors="none", edgecolors="black",
               linewidths=0.8, label=f"misclassified ({wrong.sum()})")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    ax.legend(loc="best", fontsize=9, title="colour = true class")
    fig.tight_layout()
    return common.save_figure(fig, path)


def show_maps(run, out_dir, methods, sample, seed):
    """methods: a subset of ("pca", "tsne"). Returns the written paths."""
    rows = agnews.stratified_indices(run.test.labels, sample, seed)
    features = explain.sentence_features(run, [run.test.texts[i] for i in rows])   # (S, F)
    labels, wrong = run.test.labels[rows], run.preds[rows] != run.test.labels[rows]
    what = f"{run.dir.name}: sentence vectors of {len(rows)} test rows"
    print(f"\n{what} (features {features.shape[1]}-D, {wrong.sum()} misclassified)")
    paths = []
    if "pca" in methods:
        points, pca = explain.map_pca(features, seed)
        ratio = pca.explained_variance_ratio_
        print(f"PCA explained variance: PC1 {ratio[0]:.3f}, PC2 {ratio[1]:.3f}, "
              f"together {ratio.sum():.3f}")
        paths.append(plot_map(points, labels, wrong, f"PCA, {what}",
                              (f"PC1 ({ratio[0]:.1%} of variance)", f"PC2 ({ratio[1]:.1%})"),
                              Path(out_dir) / "pca.png"))
    if "tsne" in methods:
        reduced = features
        if min(features.shape) > TSNE_PCA_DIMS:
            reduced = PCA(n_components=TSNE_PCA_DIMS, random_state=seed).fit_transform(features)
        # perplexity ~ the number of neighbours each point keeps; it must stay below the point count
        perplexity = min(30.0, (len(rows) - 1) / 3)
        print(f"t-SNE of {len(rows)} points (one call into scikit-learn, no progress to show: "
              f"about a minute per 2,000 points on 2 CPU cores)", flush=True)
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                      random_state=seed).fit_transform(reduced)
        paths.append(plot_map(points, labels, wrong, f"t-SNE, {what}", ("t-SNE 1", "t-SNE 2"),
                              Path(out_dir) / "tsne.png"))
    return paths


# --------------------------------------------------------------------------------------------------
# --errors: the most confidently wrong test rows
# --------------------------------------------------------------------------------------------------
def show_errors(run, top):
    rows = explain.confident_errors(run.probs, run.test.labels, top)   # also the texts to explain
    errors = int((run.preds != run.test.labels).sum())
    print(f"\nthe {len(rows)} most confidently wrong of {errors} errors:")
    print(f"{'row':>5}  {'true':<9} {'predicted':<9} {'p(pred)':>7} {'p(true)':>7}  text")
    for i in rows:
        true_class, predicted = run.test.labels[i], run.preds[i]
        print(f"{i:>5}  {common.CLASS_NAMES[true_class]:<9} {common.CLASS_NAMES[predicted]:<9} "
              f"{run.probs[i, predicted]:>7.3f} {run.probs[i, true_class]:>7.3f}  "
              f"{textwrap.shorten(run.test.texts[i], 90, placeholder=' ...')}")
    return rows


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
    # [global step, loss] pairs
    steps = [point for h in history for point in h.get("train_loss_steps", [])]
    if steps:
        # The loop reads the loss every --log-every steps and at each epoch's end: on the epoch
        # axis, step s of a run with S steps an epoch sits at s / S.
        per_epoch = max(s for s, _ in history[0]["train_loss_steps"])
        loss_ax.plot([s / per_epoch for s, _ in steps], [loss for _, loss in steps],
                     color="tab:blue", alpha=0.4, linewidth=1, label="train, between reads")
    elif len(history) == 1:
        loss_ax.text(0.5, 0.5,
                     "one epoch: one point per line\n(this run recorded no per-step loss)",
                     ha="center", va="center", transform=loss_ax.transAxes, color="grey")
    for key, label in (("train_accuracy", "training accuracy"),
                       ("val_accuracy", "validation accuracy"),
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
    return common.save_figure(fig, Path(out_dir) / "curves.png")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
ACTIONS = ["report", "confusion", "pca", "tsne", "tfidf", "errors", "attribution", "curves", "shap",
           "contrast"]


def shap_samples(text):
    """argparse type of --shap-samples: shapley.check_shap_samples's rule, checked while the
    command line is read."""
    try:
        samples = int(text)
        shapley.check_shap_samples(samples)
    except (ValueError, common.UserError):
        raise argparse.ArgumentTypeError(f"expected an even whole number of at least 2 (the "
                                         f"permutations come in antithetic pairs), "
                                         f"got {text!r}") from None
    return samples


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    parser.add_argument("--run", help="run folder (default: the newest finished run under runs/)")
    parser.add_argument("--out",
                        help="folder for the figures and word list (default <run>/analysis)")
    parser.add_argument("--data", help="AG News folder (default: the one the run was trained on, "
                                       "or $AGNEWS_DIR)")
    parser.add_argument("--compare", nargs="*", metavar="RUN",
                        help="mean ± std over seeds of every experiment among these runs or "
                             "folders of runs (none named: runs/), each against --baseline; writes "
                             "compare.md, .csv, .png into --out (default runs/)")
    parser.add_argument("--compare-on", default="test", choices=["test", "val"],
                        help="--compare on the test set (compare.*), or on the validation split "
                             "(compare_val.*), the one to choose settings on")
    parser.add_argument("--learning-curve", nargs="+", metavar="STUDY",
                        help="test macro F1 against training rows, one line per experiment, from "
                             "studies of several sizes, each a folder of runs (runs/study-quick) "
                             "or its finished table (results/study-large.csv); writes "
                             "learning_curve.png into --out (default runs/)")
    parser.add_argument("--epochs-curve", nargs="+", metavar="EXPERIMENT",
                        help="validation and test macro F1 against epochs, from experiments "
                             "that differ only in --epochs (e.g. runs/acc/pooler_e1 "
                             "runs/acc/pooler_e3); writes epochs_curve.png into --out "
                             "(default runs/)")
    parser.add_argument("--score-cases", nargs="+", metavar="RUN",
                        help="score today's news (cases/news_2020s.csv) for the finished runs "
                             "under these folders that lack it (trained before it, or on an "
                             "earlier version), votes included; then --compare has its columns")
    parser.add_argument("--baseline", help="--compare, --learning-curve: the experiment "
                                           "(folder name) the others are measured against "
                                           "(default: the pooler head, bert_pooler)")
    parser.add_argument("--report", action="store_true",
                        help="classification report and macro F1 on the test set")
    parser.add_argument("--confusion", action="store_true",
                        help="confusion matrix: counts and row rates")
    parser.add_argument("--pca", action="store_true", help="PCA map of the sentence vectors")
    parser.add_argument("--tsne", action="store_true", help="t-SNE map of the sentence vectors")
    parser.add_argument("--sample", type=flags.sample_size, default=2000,
                        help="test rows in the PCA/t-SNE maps (stratified)")
    parser.add_argument("--tfidf", action="store_true",
                        help="top words of each confusion; writes the penalty list")
    parser.add_argument("--split", default="val", choices=["val", "test"],
                        help="--tfidf: whose errors to mine (default val: the penalty list is then "
                             "fair to test)")
    parser.add_argument("--pairs", default="business-scitech", choices=["business-scitech", "all"],
                        help="directions written to the penalty list")
    parser.add_argument("--top-k", type=flags.positive_int, default=15,
                        help="words per direction")
    parser.add_argument("--penalty-json",
                        help="where to write the penalty list (default <out>/penalty_words.json)")
    parser.add_argument("--errors", action="store_true",
                        help="the most confidently wrong test rows")
    parser.add_argument("--top", type=flags.positive_int, default=10,
                        help="rows for --errors (and --attribution without --text)")
    parser.add_argument("--attribution", action="store_true",
                        help="integrated-gradient token attributions")
    parser.add_argument("--text", action="append",
                        help="text to explain (repeatable); default: the top errors")
    parser.add_argument("--steps", type=flags.positive_int, default=50,
                        help="integrated-gradient steps (trapezoid rule)")
    parser.add_argument("--curves", action="store_true",
                        help="training and validation curves per epoch")
    parser.add_argument("--shap", action="store_true",
                        help="Shapley values of the words beside integrated gradients (each "
                             "--text, else the top errors)")
    parser.add_argument("--shap-samples", type=shap_samples, default=64,
                        help=f"--shap, --contrast: permutations (antithetic pairs, so even) for a "
                             f"text of more than {shapley.SHAP_EXACT_WORDS} words; up to that, "
                             f"exact enumeration")
    parser.add_argument("--contrast", nargs=2, metavar=("TEXT_A", "TEXT_B"),
                        help="two texts side by side: probabilities, cosine similarity, place on "
                             "the PCA map, SHAP of their words (one PNG)")
    parser.add_argument("--seed", type=flags.seed_int, default=0,
                        help="seed of the map sample, t-SNE, the SHAP orders and the --compare "
                             "bootstrap")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda when a GPU is visible")
    parser.add_argument("--int8", action="store_true",
                        help="wherever the run's model scores texts (maps, explanations) and "
                             "with --score-cases (printed beside the saved float scores, nothing "
                             "written): its BERT encoder in int8 (quantize.py)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if (args.compare is not None or args.learning_curve or args.epochs_curve
            or args.score_cases):  # many runs
        if args.score_cases:
            vote.score_todays_news(args.score_cases, args.device, args.int8)
        if args.compare is not None:
            compare.show_compare(args.compare or ["runs"], args.out or "runs", args.baseline,
                                 args.data, args.seed, args.compare_on)
        if args.learning_curve:
            learning_curves.show_learning_curve(args.learning_curve, args.out or "runs",
                                                args.data, args.seed,
                                                args.baseline or learning_curves.BASELINE)
        if args.epochs_curve:
            learning_curves.show_epochs_curve(args.epochs_curve, args.out or "runs")
        if not any(getattr(args, action) for action in ACTIONS):
            return
    if not any(getattr(args, action) for action in ACTIONS):
        raise common.UserError("nothing to do: pass one or more of --compare, "
                               + ", ".join(f"--{a}" for a in ACTIONS))
    if args.int8 and (args.attribution or args.shap):
        raise common.UserError("--int8 with --attribution or --shap: integrated gradients follow "
                               "the model's gradient, and int8 rounding has none")
    run_dir = args.run
    if run_dir is None:
        run_dir = newest_run()
        print(newest_run_note(run_dir))
    run = SavedRun(run_dir, args.data, args.device, args.int8)
    # int8 figures beside, never over, the float ones
    default_dir = run.dir / ("analysis-int8" if args.int8 else "analysis")
    out_dir = Path(args.out) if args.out else default_dir
    print(f"analysing {run.dir} ({run.config.get('script')}); figures go to {out_dir}/")
    # A typed text longer than the run's max_len is cut (common.encode): say how much is dropped.
    if args.text and (args.attribution or args.shap):
        common.note_long_texts(run.model_and_tokenizer[1], args.text, run.max_len,
                               names=[f"--text {k}" for k in range(1, len(args.text) + 1)])
    if args.contrast:
        common.note_long_texts(run.model_and_tokenizer[1], args.contrast, run.max_len,
                               names=["text A", "text B"])

    if args.report:
        show_report(run)
    if args.confusion:
        show_confusion(run, out_dir)
    if args.pca or args.tsne:
        methods = [m for m in ("pca", "tsne") if getattr(args, m)]
        show_maps(run, out_dir, methods, args.sample, args.seed)
    if args.tfidf:
        mixup_words.show_tfidf(run, out_dir, args.pairs, args.top_k, args.penalty_json,
                               args.split)
    if args.errors:
        show_errors(run, args.top)
    if args.attribution:
        explain.show_attribution(run, out_dir, args.text, args.top, args.steps)
    if args.curves:
        show_curves(run, out_dir)
    if args.shap:
        explain.show_shap(run, out_dir, args.text, args.top, args.shap_samples, args.steps,
                          args.seed)
    if args.contrast:
        explain.show_contrast(run, out_dir, args.contrast, args.shap_samples, args.sample,
                              args.seed)


if __name__ == "__main__":
    common.run_main(main)
