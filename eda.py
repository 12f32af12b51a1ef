"""EDA: easy data augmentation (Wei & Zou 2019), with synonyms from the model's own embeddings.

The idea: make more training rows for free by editing the ones we have a little (swap a word for a
synonym, insert one, swap two, delete a few) and keep the label, betting that small edits keep the
topic. The four edits come first, each a few lines; then where the synonyms come from (no WordNet
here: the nearest words of the model's input embedding table); then the hook that start_run calls
with --eda. tests/test_eda.py checks each edit on sentences it makes, and RESULTS.md measures what
EDA is worth once the same number of optimizer steps is the control (little, for a pretrained
model; train_lstm.py, lesson 14, trains from scratch, where it helps more).

Lesson 6 of README's reading path, with awp.py: read after resume.py; next: awp.py.
"""
import argparse
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

import common
from plumbing import agnews, flags


# --eda adds n copies of every training row, each made by ONE of four cheap edits, label kept (the
# bet is that small edits keep the topic):
#   SR  synonym replacement  n_changes distinct words of the row each become one of their synonyms
#   RI  random insertion     n_changes times, a synonym of a word of the row goes in at a random
#                            place
#   RS  random swap          n_changes times, two tokens trade places
#   RD  random deletion      each token goes with probability alpha (never all of them)
# with n_changes = max(1, round(alpha * tokens)), so a long article is edited in the same proportion
# as a headline. As in the paper, RD reads alpha as a probability instead of a count.
EDA_OPS = ("SR", "RI", "RS", "RD")
EDA_THRESHOLD = 0.45  # cosine similarity a neighbour needs to count as a synonym (--eda-threshold)
EDA_NEIGHBOURS = 5    # synonyms kept per word at most, the nearest first
# a whole word: no "##" piece, [special], number, punctuation or lone letter
EDA_WORD = re.compile(r"[a-z]{2,}")
# what the edits move: a word or number, or one punctuation mark
EDA_TOKEN = re.compile(r"\w+|[^\w\s]")


def eda_synonym_replacement(tokens, synonyms, n_changes, rng):
    """SR: up to n_changes distinct words that have synonyms, each replaced (every time it occurs)
    by one of them. Distinct words in order of appearance, never a set: a set's order changes with
    the process's hash seed, and so would the copies."""
    words = [w for w in dict.fromkeys(t.lower() for t in tokens) if w in synonyms]
    replace = {w: rng.choice(synonyms[w]) for w in rng.sample(words, min(n_changes, len(words)))}
    return [replace.get(t.lower(), t) for t in tokens]


def eda_random_insertion(tokens, synonyms, n_changes, rng):
    """RI: n_changes times, a synonym of a random word of the row (one that has synonyms) goes in at
    a random place."""
    words = [t.lower() for t in tokens if t.lower() in synonyms]
    out = list(tokens)
    for _ in range(n_changes if words else 0):
        out.insert(rng.randrange(len(out) + 1), rng.choice(synonyms[rng.choice(words)]))
    return out


def eda_random_swap(tokens, n_changes, rng):
    """RS: n_changes times, two tokens at different places trade places."""
    out = list(tokens)
    for _ in range(n_changes if len(out) >= 2 else 0):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def eda_random_deletion(tokens, p, rng):
    """RD: each token goes with probability p; if none is left, one random token stays (no empty
    text)."""
    kept = [t for t in tokens if rng.random() >= p]
    return kept or [rng.choice(tokens)]


def eda_copies(text, synonyms, n, alpha, rng):
    """n augmented versions of one text, as (operation, text) pairs. The copies take the four
    operations in a fresh random order, round after round, so n=4 makes one copy with each. (The
    paper's eda.py makes n//4+1 copies with each and keeps a random n of them: the same mix on
    average, but a row may get two SRs and no RD.) Tokens are joined back with single spaces: the
    lab's tokenizers split punctuation off words anyway, so untouched tokens keep their ids (for all
    but 2 of the 24,175 training texts, whose "©" and "£10" WordPiece keeps glued to a word)."""
    tokens = EDA_TOKEN.findall(text)
    n_changes = max(1, round(alpha * len(tokens)))
    ops = []
    while len(ops) < n:
        ops += rng.sample(EDA_OPS, len(EDA_OPS))
    copies = []
    for op in ops[:n]:
        if op == "SR":
            new = eda_synonym_replacement(tokens, synonyms, n_changes, rng)
        elif op == "RI":
            new = eda_random_insertion(tokens, synonyms, n_changes, rng)
        elif op == "RS":
            new = eda_random_swap(tokens, n_changes, rng)
        else:
            new = eda_random_deletion(tokens, alpha, rng)
        copies.append((op, " ".join(new)))
    return copies


def augment_split(split, synonyms, n, alpha, seed, ops=None):
    """A new Split: the rows of `split`, then n EDA copies of each (row 0's, then row 1's, ...),
    every copy with its original's label, row id and teacher's probabilities (distill.py: the
    teacher read the clean text): len(split) * (n + 1) rows. Deterministic by seed: one
    random.Random(seed) draws everything, row after row. A list passed as `ops` receives each
    copy's operation name."""
    rng = random.Random(seed)
    texts, originals = list(split.texts), []
    for i, text in enumerate(split.texts):
        for op, new_text in eda_copies(text, synonyms, n, alpha, rng):
            texts.append(new_text)
            originals.append(i)
            if ops is not None:
                ops.append(op)
    originals = np.array(originals, dtype=np.int64)
    soft = None if split.soft is None else np.concatenate([split.soft, split.soft[originals]])
    return agnews.Split(texts, np.concatenate([split.labels, split.labels[originals]]),
                        np.concatenate([split.ids, split.ids[originals]]), soft)


# The paper's synonyms come from WordNet. There is no WordNet and no internet here, so ours come
# from the model itself: the nearest whole words of its input embedding table by cosine similarity.
# Why that is a fair stand-in: pre-training pushes the input vector of a word towards those of words
# that fill the same slots in the same contexts, so its nearest neighbours are mostly words that
# could stand in its place: inflections ("shares" -> "share", "stocks"), near-synonyms
# ("company" -> "firm", "said" -> "told", "stated"). That is what SR and RI need: another plausible
# word, same topic.
# Where it fails: "fills the same slot" is not "means the same". Antonyms and co-hyponyms sit close
# (MiniLM cosines: "increase"/"decrease" 0.60, "strong"/"weak" 0.60, "democrats"/"republicans" 0.68,
# "monday"/"tuesday" 0.75, "rise"/"fall" 0.34), so some "synonyms" flip the meaning; and at a lower
# threshold company names trade places ("microsoft"/"ibm" 0.41, "microsoft"/"apple" 0.32), which can
# move a cue between Business and Sci/Tech. The threshold trades that noise against coverage (at
# 0.45, 15,514 of MiniLM's 21,420 candidate words have a synonym; about 40% of the tokens of AG News
# rows, punctuation and stop words included, can be replaced). Numbers are left out on purpose:
# "2004"/"2005" sit at 0.80, a changed fact, not a synonym. And a WordPiece vocabulary keeps only
# frequent words whole: rare ones ("sarkozy" = "sar ##ko ##zy") arrive in pieces and get no synonyms
# at all.
def input_embeddings(model_dir):
    """The (V, D) float32 word embedding table of a model folder's model.safetensors, read alone."""
    path = Path(model_dir) / "model.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            key = next((k for k in f.keys()
                        if k.removeprefix("bert.") == "embeddings.word_embeddings.weight"), None)
            if key is None:
                raise common.UserError(f"{path}: no embeddings.word_embeddings.weight "
                                       f"(not a BERT checkpoint)")
            return f.get_tensor(key).float()
    except (OSError, SafetensorError) as err:
        raise common.UserError(f"{path}: not a readable safetensors file ({err})") from None


def nearest_neighbours(vectors, k, threshold, chunk=1024):
    """For each row of vectors (V, D): the indices of up to k other rows with cosine similarity >=
    threshold, nearest first. All cosines at once would be a V x V matrix (21k x 21k floats, 1.8 GB,
    for MiniLM's whole words), so the queries go in chunks that each keep only their top k."""
    unit = F.normalize(vectors.float(), dim=1)                         # (V, D), rows of length 1
    neighbours = []
    for start in range(0, len(unit), chunk):
        cosines = unit[start: start + chunk] @ unit.T                  # (chunk, V)
        rows = torch.arange(len(cosines))
        # a word is not its own synonym
        cosines[rows, rows + start] = -2.0
        top, idx = cosines.topk(min(k, len(unit) - 1), dim=1)          # (chunk, k), nearest first
        neighbours += [[j for c, j in zip(cs, js) if c >= threshold]
                       for cs, js in zip(top.tolist(), idx.tolist())]
    return neighbours


def synonym_table(model_dir, threshold=EDA_THRESHOLD, verbose=True):
    """{word: (synonyms, nearest first)} for every whole word of the model's vocabulary that is not
    a stop word (sklearn's English list) and has a neighbour at cosine >= threshold. Building it
    takes seconds (cosines between ~21k words), so it is cached in CACHE_DIR/eda/ under a hash of
    everything it is computed from (embeddings, vocabulary, stop words, threshold): a changed model
    folder never gets a stale table."""
    model_dir = Path(model_dir)
    embeddings = input_embeddings(model_dir)                           # (V, D)
    vocab = common.load_tokenizer(model_dir).get_vocab()                      # token -> id
    words = sorted((i, w) for w, i in vocab.items()
                   if i < len(embeddings) and EDA_WORD.fullmatch(w) and w not in ENGLISH_STOP_WORDS)
    ids, names = [i for i, _ in words], [w for _, w in words]
    key = hashlib.sha1(embeddings.numpy())
    key.update(json.dumps([words, sorted(ENGLISH_STOP_WORDS), threshold, EDA_NEIGHBOURS]).encode())
    cache = common.CACHE_DIR / "eda" / f"synonyms-{key.hexdigest()[:16]}.json"
    if cache.exists():
        try:
            return {w: tuple(s) for w, s in common.load_json(cache)["synonyms"].items()}
        except (common.UserError, KeyError, TypeError, AttributeError):
            pass  # unreadable: build it again
    t0 = time.perf_counter()
    neighbours = nearest_neighbours(embeddings[ids], EDA_NEIGHBOURS, threshold)
    table = {names[k]: tuple(names[j] for j in near) for k, near in enumerate(neighbours) if near}
    try:
        common.save_json(cache, {"model": str(model_dir), "threshold": threshold,
                                 "neighbours": EDA_NEIGHBOURS, "synonyms": table})
    except OSError as err:
        print(f"warning: cannot cache the EDA synonym table in {cache} ({err})", file=sys.stderr)
    if verbose:
        print(f"EDA synonym table of {model_dir}: {len(table):,} of {len(names):,} whole words "
              f"have a neighbour at cosine >= {threshold} "
              f"({time.perf_counter() - t0:.1f} s, cached in {cache})")
    return table


def add_eda_args(parser):
    """--eda and its settings; every training script gets them through add_common_args."""
    parser.add_argument("--eda", action="store_true",
                        help="EDA: add augmented copies of every training row "
                             "(synonyms from --model's embeddings)")
    parser.add_argument("--eda-n", type=flags.positive_int, default=4,
                        help="EDA: augmented copies per training row")
    parser.add_argument("--eda-alpha", type=flags.fraction_above_0, default=0.1,
                        help="EDA: share of a row's tokens each copy changes")
    parser.add_argument("--eda-threshold", type=flags.cosine_similarity, default=EDA_THRESHOLD,
                        help="EDA: cosine similarity a neighbour needs to count as a synonym")


def augment_train_split(args, splits, runtime=None):
    """start_run's hook. With --eda, splits["train"] gets args.eda_n copies of each row, drawn from
    args.seed with the synonyms of args.model; val and test are never touched (their fingerprints
    are what runs are compared on). A resumed run reloads its data through here and, deterministic
    by seed, gets the very same rows. Without --eda, the splits as they are."""
    if not getattr(args, "eda", False):
        return splits
    # The command line checked these already (add_eda_args); again, by the same types, for args
    # made in code rather than parsed.
    for flag, check, value in (("--eda-alpha", flags.fraction_above_0, args.eda_alpha),
                               ("--eda-threshold", flags.cosine_similarity, args.eda_threshold)):
        try:
            check(repr(value))
        except argparse.ArgumentTypeError as err:
            raise common.UserError(f"{flag}: {err}") from None
    is_main = runtime is None or runtime.is_main
    model = getattr(args, "model", "minilm")
    synonyms = synonym_table(common.resolve_model(model), args.eda_threshold, verbose=is_main)
    train, ops = splits["train"], []
    augmented = augment_split(train, synonyms, args.eda_n, args.eda_alpha, args.seed, ops)
    if is_main:
        copies = augmented.texts[len(train):]
        # an untouched copy reads so
        as_tokens = [" ".join(EDA_TOKEN.findall(text)) for text in train.texts]
        unchanged = sum(text == as_tokens[k // args.eda_n] for k, text in enumerate(copies))
        print(f"EDA: {len(train):,} training rows -> {len(augmented):,} "
              f"({args.eda_n} {'copy' if args.eda_n == 1 else 'copies'} each "
              f"at alpha {args.eda_alpha}; "
              f"synonyms of {model}: {len(synonyms):,} words at cosine >= {args.eda_threshold}; "
              f"{unchanged:,} copies came out unchanged)")
        for k in range(min(3, len(copies))):
            print(f"  {ops[k]}  {train.texts[k // args.eda_n]}\n   ->  {copies[k]}")
    return {**splits, "train": augmented}


def original_rows(args, train):
    """The rows of a training split before its EDA copies (they come first), or the split itself
    without --eda. For what should be learnt from the data as it is, such as train_lstm.py's word
    vocabulary: counted over the copies too, each word of a row is seen n+1 times, so --min-freq 2
    would admit words seen once (at 2,000 rows and n=4 the vocabulary doubles, 6,262 -> 12,384
    words)."""
    if not getattr(args, "eda", False):
        return train
    return train.subset(np.arange(len(train) // (args.eda_n + 1)))
