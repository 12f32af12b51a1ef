"""LSTM and BiLSTM + attention trained from scratch on AG News: the baselines BERT has to beat.

    python train_lstm.py --arch lstm         # embedding -> LSTM -> last state -> linear
    python train_lstm.py --arch bilstm_attn  # embedding -> BiLSTM -> additive attention -> linear
    python train_lstm.py --arch bilstm_attn --vocab wordpiece --model minilm
    python train_lstm.py --arch bilstm_attn --seeds 0,1,2   # runs/bilstm_attn/seed0, seed1, seed2

Nothing here is pretrained: the embeddings start random and everything learns from the labelled
rows alone. Two lessons on top of loop.py's training loop:
  - packed sequences: each row's recurrence stops at its own last token, so the padding added to
    make a rectangular batch neither costs time nor leaks into the states;
  - additive (Bahdanau-style) attention: instead of trusting the last state to remember the whole
    text, score every time step, softmax over the real tokens only, and take the weighted average.

Vocabulary (--vocab):
  word       (default) whole lowercased words seen at least --min-freq times in the training split,
             others become [UNK]. A from-scratch model learns one vector per word directly, the
             table fits the data, and attention weights land on readable words.
  wordpiece  the BERT WordPiece vocabulary of --model (30k pieces, [CLS] ... [SEP]): no unknown
             words, but rare words arrive in pieces the LSTM has to learn to put together.
The tokenizer is saved as tokenizer.json in the run folder, so a run reloads on its own.

Lesson 14 of README's reading path: read after fused_kernels/attn_pool.py; next: vote.py.
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

import common
import eda
import loop
from plumbing import flags, run, runfolders

ARCHS = ["lstm", "bilstm_attn"]
# ids 0 and 1 of the word vocabulary; 0 is also what common.pad_batch pads with
PAD, UNK = "[PAD]", "[UNK]"


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def train_word_tokenizer(texts, min_freq, max_len):
    """Word-level vocabulary of the training texts, normalised and split as BERT does (lowercase,
    accents stripped, punctuation split off), so both vocabularies see the same words.
    The tokenizer truncates to max_len itself, keeping the first words: common.encode's own cut
    keeps the last id, which is right for BERT's final [SEP] but would keep a stray word here."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(min_frequency=min_freq, special_tokens=[PAD, UNK],
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.enable_truncation(max_length=max_len)
    return tokenizer


def build_tokenizer(args, train_texts):
    if args.vocab == "word":
        return train_word_tokenizer(train_texts, args.min_freq, args.max_len)
    return common.load_tokenizer(common.resolve_model(args.model))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def init_forget_bias(lstm, value):
    """Start the forget gates open (Jozefowicz et al. 2015): with biases near 0 (PyTorch draws them
    from +-1/sqrt(H)) the gate sits near sigmoid(0) = 0.5, so the state halves at every step and
    early words reach the end faint.
    PyTorch keeps the gates [input, forget, cell, output] in one bias of 4H, twice (b_ih and b_hh):
    the forget slice of b_ih gets the value, that of b_hh 0, so their sum is the value."""
    with torch.no_grad():
        for name, bias in lstm.named_parameters():
            if name.startswith("bias"):
                H = bias.shape[0] // 4
                bias[H: 2 * H] = value if name.startswith("bias_ih") else 0.0


class AdditiveAttention(nn.Module):
    """Bahdanau-style scoring of each time step: s_t = v . tanh(W h_t + b). Softmax over the real
    tokens only (padding gets -inf, hence weight exactly 0); the feature is sum_t a_t h_t."""

    def __init__(self, in_dim, attn_dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, attn_dim)
        self.score = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, states, mask):
        scores = self.score(torch.tanh(self.proj(states))).squeeze(-1)  # (B, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.float().softmax(dim=-1)                         # (B, T), rows sum to 1
        pooled = (weights.unsqueeze(-1) * states.float()).sum(dim=1)     # (B, D)
        return pooled.to(states.dtype), weights


class LSTMClassifier(nn.Module):
    """embedding -> (Bi)LSTM -> pooled vector -> dropout -> linear: logits (B, 4).
    lstm:        the forward LSTM's state after each row's last real token.
    bilstm_attn: attention over the BiLSTM's states at every real token (forward and backward
                 concatenated); `last_weights` keeps the (B, T) weights of the last batch."""

    def __init__(self, vocab_size, arch="bilstm_attn", embed_dim=128, hidden_size=128, dropout=0.3):
        super().__init__()
        if arch not in ARCHS:
            raise common.UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        self.arch = arch
        bidirectional = arch == "bilstm_attn"
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.embed_dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True, bidirectional=bidirectional)
        init_forget_bias(self.lstm, 1.0)
        out_dim = 2 * hidden_size if bidirectional else hidden_size
        self.attention = AdditiveAttention(out_dim, hidden_size) if bidirectional else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(out_dim, common.NUM_CLASSES)
        self.last_weights = None

    def run_lstm(self, input_ids, attention_mask):
        """The LSTM over each row's real tokens only: packing hands it every row's length, so each
        recurrence stops at the row's last real token. Returns the packed states and h_n
        (directions, B, H), the state after each row's own last token (backward: its first)."""
        x = self.embed_dropout(self.embedding(input_ids))               # (B, T, E) float32
        # packing wants lengths on the CPU
        lengths = attention_mask.sum(dim=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        # The recurrence stays in float32 under mixed precision (TF32 on recent GPUs): cuDNN has no
        # bf16 LSTM everywhere, and rounding errors would compound over the time steps.
        with torch.autocast(x.device.type, enabled=False):
            packed_states, (h_n, _) = self.lstm(packed)                  # h_n back in batch order
        return packed_states, h_n

    def token_states(self, input_ids, attention_mask):
        """(B, T, H * directions) states, zero at padding, plus h_n."""
        packed_states, h_n = self.run_lstm(input_ids, attention_mask)
        states, _ = nn.utils.rnn.pad_packed_sequence(packed_states, batch_first=True,
                                                     total_length=input_ids.shape[1])
        return states, h_n

    def features(self, input_ids, attention_mask):
        """One vector per text (B, F): what the classifier sees, and what analyze.py maps with
        PCA."""
        if self.attention is None:
            _, h_n = self.run_lstm(input_ids, attention_mask)
            return h_n[-1]                                               # (B, H)
        states, _ = self.token_states(input_ids, attention_mask)         # (B, T, 2H)
        pooled, weights = self.attention(states, attention_mask)
        self.last_weights = weights.detach()
        return pooled                                                    # (B, 2H)

    def forward(self, input_ids, attention_mask):
        return self.classifier(self.dropout(self.features(input_ids, attention_mask)))


def build_model(config):
    return LSTMClassifier(config["vocab_size"], config["arch"], config["embed_dim"],
                          config["hidden_size"], config["dropout"])


def load_model(config, run_dir):
    """Rebuild a saved run of this script: its own tokenizer.json, then the model with its
    weights."""
    run_dir = Path(run_dir)
    if not (run_dir / "tokenizer.json").exists():
        raise common.UserError(f"{run_dir}: no tokenizer.json (not a finished train_lstm.py run)")
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    model = build_model(config)
    runfolders.load_checked(model, run_dir / "model.safetensors")
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    parser.add_argument("--arch", default="bilstm_attn", choices=ARCHS,
                        help="lstm: last state; bilstm_attn: attention over a BiLSTM")
    parser.add_argument("--vocab", default="word", choices=["word", "wordpiece"],
                        help="see the vocabulary notes above")
    parser.add_argument("--min-freq", type=flags.positive_int, default=2,
                        help="word vocab: keep words seen this often")
    parser.add_argument("--model", default="minilm",
                        help="wordpiece vocab: whose vocabulary (minilm, bert-base-uncased, DIR)")
    parser.add_argument("--embed-dim", type=flags.positive_int, default=200,
                        help="size of a word vector")
    parser.add_argument("--hidden-size", type=flags.positive_int, default=128,
                        help="LSTM state size per direction")
    parser.add_argument("--dropout", type=flags.fraction_below_1, default=0.3,
                        help="dropout on the word vectors and before the classifier")
    run.add_common_args(parser, lr=2e-3, epochs=5, batch_size=64)
    return parser


def run_name(args):
    return args.arch if args.vocab == "word" else f"{args.arch}_wordpiece"


def train(args):
    """One run: build the vocabulary, train from scratch, score, save into args.out."""
    runtime, run_dir, splits, t_start = run.start_run(args, run_name(args))
    tokenizer_path = run_dir / "tokenizer.json"
    # Only a resume point's weights need the old vocabulary (and it checks the flags, --train-size
    # among them); without one, --resume starts afresh, and so does the vocabulary.
    reused = args.resume and (run_dir / runfolders.RESUME_FILE).exists()
    if reused:
        # the vocabulary the saved embeddings belong to
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:
        # The vocabulary of the rows as they are: with --eda, each word of a row would be counted
        # once per copy, and --min-freq would let in words seen once (synonyms absent there become
        # [UNK]).
        tokenizer = build_tokenizer(args, eda.original_rows(args, splits["train"]).texts)
    config = {"script": "train_lstm", "arch": args.arch, "vocab": args.vocab,
              "vocab_size": tokenizer.get_vocab_size(),
              "embed_dim": args.embed_dim, "hidden_size": args.hidden_size, "dropout": args.dropout,
              "max_len": args.max_len, "args": vars(args)}

    model = build_model(config)
    data = common.encode_splits(tokenizer, splits, args.max_len)
    total, trainable = common.count_parameters(model)
    if runtime.is_main:
        print(f"{args.arch}, {args.vocab} vocab of {config['vocab_size']:,}: {total:,} parameters, "
              f"{trainable:,} trainable | train {len(splits['train'])}, val {len(splits['val'])}, "
              f"test {len(splits['test'])} rows | {runtime.device}, {runtime.precision}")

    if runtime.is_main and not reused:
        common.atomic_write(tokenizer_path, lambda tmp: tokenizer.save(tmp))
    history = loop.train(model, data, args, runtime, run_dir)
    run.finish_run(model, data, splits, runtime, run_dir, config, history, t_start)


def main(argv=None):
    args = build_parser().parse_args(argv)
    run.run_each_seed(args, run_name(args), train)


if __name__ == "__main__":
    common.run_main(main)
