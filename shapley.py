"""Shapley values of words, by hand: how much did each word push the model's logit?

The Shapley value (Shapley 1953; SHAP, Lundberg & Lee 2017) is the one fair way to share out
f(all words) - f(no words) among the words: each word gets its marginal contribution
f(S + word) - f(S), averaged over every order in which the words could arrive. No gradients, only
the model's logits on subsets of the words, so it works for any model here (BERT heads and LSTMs).
The pieces, in order: words from WordPiece tokens; what "absent" means to each model (masked out of
attention, or dropped from a recurrence); the game f(S); exact values over all 2^n coalitions up
to 10 words; above that, random orders in antithetic pairs, which still add up exactly.
tests/test_shap.py checks them on a game known by hand and on tiny models. explain.py draws them
beside integrated gradients (--shap) and uses them for two texts (--contrast).

Lesson 17 of README's reading path: read after mixup_words.py; next: explain.py.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import spearmanr

import bert
import common


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
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices   # present first
    counts = present.sum(1)
    longest = max(int(counts.max()), 1)
    order = order[:, :longest]
    mask = torch.arange(longest, device=present.device)[None, :] < counts[:, None]   # (B, T')
    moved = [t.gather(1, order.view(*order.shape, *[1] * (t.dim() - 2))
                      .expand(-1, -1, *t.shape[2:]))
             for t in tensors]
    return mask, moved


@torch.no_grad()
def coalition_logits(model, input_ids, present):
    """Logits (B, 4) of the model seeing only the `present` (B, T) tokens of input_ids (B, T)."""
    if isinstance(getattr(model, "lstm", None), nn.LSTM):            # train_lstm.py: remove them
        mask, (ids,) = front_align(present, input_ids)
        ids = torch.where(mask, ids, common.PAD_ID)
        empty = ~mask[:, 0]
        mask[:, 0] = True                    # packing wants a step per row; zeroed again below
        features = model.features(ids, mask).masked_fill(empty[:, None], 0.0)
        return model.classifier(model.dropout(features))
    if isinstance(getattr(model, "head", None), bert.LSTMHead):      # BERT with holes, then pack
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
        coalitions = torch.as_tensor(np.asarray(coalitions, dtype=bool))               # (K, n)
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
        without = index[~coalitions[:, i]]                 # the coalitions S not holding i
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
        raise common.UserError(f"--shap-samples must be an even number of at least 2 (the "
                               f"permutations come in antithetic pairs), got {samples}")


def word_shapley(model, tokenizer, text, max_len, class_weights=None, samples=64, seed=0,
                 permutations=None):
    """Shapley values of the words of `text` for f = class_weights . logits (default: the logit of
    the predicted class). Exact up to SHAP_EXACT_WORDS words, else `samples` antithetic orders
    (or the given `permutations` (m, n)). The model is scored in eval mode and left as it came."""
    if permutations is None:
        check_shap_samples(samples)
    was_training = model.training
    try:
        return word_shapley_eval(model, tokenizer, text, max_len, class_weights, samples, seed,
                                 permutations)
    finally:
        model.train(was_training)


def word_shapley_eval(model, tokenizer, text, max_len, class_weights, samples, seed, permutations):
    """word_shapley's work; it switches the model to eval mode."""
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(common.encode(tokenizer, [text], max_len)[0]).to(device)   # (T,)
    words, word_of = group_words([tokenizer.id_to_token(int(i)) for i in input_ids])
    if not words:
        raise common.UserError(f"no words to explain in the text {text!r}")
    everything = torch.ones_like(input_ids[None], dtype=torch.bool)
    logits = coalition_logits(model.eval(), input_ids[None], everything)
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
    return WordShapley(words, values, float(f_text), float(f_empty), logits, method,
                       input_ids.cpu(), word_of)


def per_word(token_values, word_of, n_words):
    """Token values (T,) summed over the pieces of each word -> (n_words,); [CLS]/[SEP] dropped."""
    sums = np.zeros(n_words)
    np.add.at(sums, word_of[word_of >= 0],
              np.asarray(token_values, dtype=np.float64)[word_of >= 0])
    return sums


def rank_agreement(a, b):
    """Spearman's rank correlation and its p-value; nan with fewer than 3 words or a constant
    side."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


