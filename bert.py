"""BERT by hand: the encoder, read top to bottom, then the heads that classify with it.

A text arrives as token ids (B, T) with an attention mask (B, T) that is False at padding. BERT:
  1. embeddings   token + position + segment vectors, summed, LayerNorm     -> (B, T, D)
  2. L layers     each: self-attention (every token looks at every real token; softmax(QK^T/sqrt(d))
                  V per head), add & LayerNorm, then a 2-layer GELU MLP, add & LayerNorm
  3. pooler       tanh(W h[CLS] + b): the pretrained sentence vector                      -> (B, D)
from_pretrained() loads HuggingFace's model.safetensors through a name map, so MiniLM or bert-base
weights drop straight in; tests/test_bert.py finds our outputs equal to transformers.BertModel's to
1e-5 on the same padded batch. Then the heads (the study's pooler, fc, lstm, textcnn, mlp_res and
mean, MiniLM's own pooling) and BertClassifier = encoder + head.
Plain torch: nn.Dropout and torch's fused attention (SDPA). Lesson 4, dropout.py, swaps in a
cheaper dropout mask for CPU training; lesson 13, fused_kernels/attn_pool.py, adds a head with a
Triton kernel. The flags and the model a run's config describes: plumbing/classifiers.py.

Lessons 1 and 2 of README's reading path: read this first; next: plain_loop.py, which trains it.
"""
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path):
        raw = common.load_json(path)
        if raw.get("hidden_act", "gelu") != "gelu":
            raise common.UserError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported "
                                   f"(only gelu)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise common.UserError(f"{path}: only absolute position embeddings are supported")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class BertEmbeddings(nn.Module):
    """token + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.segment = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        # One segment only (single-text classification): segment id 0 everywhere.
        x = self.word(input_ids) + self.position(positions) + self.segment.weight[0]  # (B, T, D)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d)) V in each of h heads of d = D / h
    features. query/key/value/out are separate nn.Linear layers, so LoRA can wrap any of them by
    name. The softmax and the product are torch's fused scaled_dot_product_attention (SDPA), which
    never writes the (B, h, T, T) probabilities to memory on a GPU; dropout.py writes the same
    maths out, op by op, where that is faster."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.out = nn.Linear(D, D)
        self.attn_dropout = cfg.attention_probs_dropout_prob  # on the probabilities (B, h, T, T)

    def split_heads(self, x):
        """(B, T, D) -> q, k, v, each (B, n_head, T, head_dim)."""
        B, T, D = x.shape
        return [proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                for proj in (self.query, self.key, self.value)]

    def join_heads(self, y):
        """(B, n_head, T, head_dim) -> (B, T, D) through the out projection."""
        B, _, T, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, attn_mask):
        q, k, v = self.split_heads(x)
        p = self.attn_dropout if self.training else 0.0
        # attn_mask (B, 1, 1, T), True = may attend: no query looks at padding.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.join_heads(y)                                   # (B, T, D)


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block, as in the original BERT:
    x = LN(x + Attn(x));  x = LN(x + FFN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, attn_mask):
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask)))
        x = self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))
        return x


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the pretrained sentence vector (trained on next-sentence prediction)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


# How HuggingFace names each of our parameters; {i} is the layer index. Every key is mapped by hand
# so a reader sees exactly which pretrained tensor lands where.
HF_NAMES = {
    "embeddings.word.weight": "embeddings.word_embeddings.weight",
    "embeddings.position.weight": "embeddings.position_embeddings.weight",
    "embeddings.segment.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    "layers.{i}.attn.query.weight": "encoder.layer.{i}.attention.self.query.weight",
    "layers.{i}.attn.query.bias": "encoder.layer.{i}.attention.self.query.bias",
    "layers.{i}.attn.key.weight": "encoder.layer.{i}.attention.self.key.weight",
    "layers.{i}.attn.key.bias": "encoder.layer.{i}.attention.self.key.bias",
    "layers.{i}.attn.value.weight": "encoder.layer.{i}.attention.self.value.weight",
    "layers.{i}.attn.value.bias": "encoder.layer.{i}.attention.self.value.bias",
    "layers.{i}.attn.out.weight": "encoder.layer.{i}.attention.output.dense.weight",
    "layers.{i}.attn.out.bias": "encoder.layer.{i}.attention.output.dense.bias",
    "layers.{i}.attn_norm.weight": "encoder.layer.{i}.attention.output.LayerNorm.weight",
    "layers.{i}.attn_norm.bias": "encoder.layer.{i}.attention.output.LayerNorm.bias",
    "layers.{i}.ffn_in.weight": "encoder.layer.{i}.intermediate.dense.weight",
    "layers.{i}.ffn_in.bias": "encoder.layer.{i}.intermediate.dense.bias",
    "layers.{i}.ffn_out.weight": "encoder.layer.{i}.output.dense.weight",
    "layers.{i}.ffn_out.bias": "encoder.layer.{i}.output.dense.bias",
    "layers.{i}.ffn_norm.weight": "encoder.layer.{i}.output.LayerNorm.weight",
    "layers.{i}.ffn_norm.bias": "encoder.layer.{i}.output.LayerNorm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}


# Checkpoint keys that are not parameters: buffers of HF's implementation, or pre-training heads.
HF_IGNORED = re.compile(r"(^|\.)position_ids$|^cls\.")


def hf_names(num_layers):
    """{our parameter name: HuggingFace's} for every parameter of a BertModel with num_layers
    layers: HF_NAMES with {i} filled in. from_pretrained reads through it, export.py writes
    through it."""
    names = {}
    for ours, hf in HF_NAMES.items():
        for i in range(num_layers) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = hf.format(i=i)
    return names


class BertModel(nn.Module):
    """Embeddings -> N x BertLayer -> token states (B, T, D). The pooler is applied on request."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = BertPooler(cfg)

    def forward(self, input_ids, attention_mask=None):
        # SDPA's boolean mask: True = may attend. (B, 1, 1, T) broadcasts over heads and queries,
        # so no query looks at a padded key. The mask is passed even when a batch has no padding:
        # asking the GPU "any padding?" (attention_mask.all()) would make the host wait for it
        # every step, and with length bucketing nearly every batch has some padding anyway.
        attn_mask = None if attention_mask is None else attention_mask[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x  # (B, T, D)

    @classmethod
    def from_pretrained(cls, model_dir):
        """Build from config.json and load model.safetensors (HuggingFace BertModel layout, with or
        without the "bert." prefix). Every key is mapped and every shape checked; any mismatch stops
        with the full list of missing, unexpected and mis-shaped keys."""
        model_dir = Path(model_dir)
        cfg = BertConfig.from_json(model_dir / "config.json")
        model = cls(cfg)
        state = common.load_weights(model_dir / "model.safetensors")
        state = {k.removeprefix("bert."): v for k, v in state.items() if not HF_IGNORED.search(k)}
        ours = model.state_dict()
        names = hf_names(cfg.num_hidden_layers)
        wanted = {name: names[name] for name in ours}  # our name -> the checkpoint's
        missing = [hf for hf in wanted.values() if hf not in state]
        unexpected = sorted(set(state) - set(wanted.values()))
        misshaped = [f"{hf} {tuple(state[hf].shape)} != {tuple(ours[n].shape)}"
                     for n, hf in wanted.items()
                     if hf in state and state[hf].shape != ours[n].shape]
        if missing or unexpected or misshaped:
            raise common.UserError(f"{model_dir / 'model.safetensors'} does not fit config.json: "
                                   f"missing {missing}, unexpected {unexpected}, "
                                   f"mis-shaped {misshaped}")
        model.load_state_dict({n: state[hf].float() for n, hf in wanted.items()})
        return model


# --------------------------------------------------------------------------------------------------
# Heads: token states (B, T, D) -> one feature vector per text (B, F), then a linear classifier
# --------------------------------------------------------------------------------------------------
class CLSHead(nn.Module):
    """fc: the [CLS] token's state as it is."""

    def __init__(self, hidden_size, **_):
        super().__init__()
        self.out_dim = hidden_size

    def forward(self, hidden, mask, input_ids):
        return hidden[:, 0]


class MeanHead(nn.Module):
    """mean: the average of the real tokens' states. all-MiniLM-L6-v2 was trained (as a
    sentence-transformers model) to make this average, L2-normalised, its sentence vector, so a
    classifier on it starts from what that training shaped; it did not train [CLS] or the pooler."""

    def __init__(self, hidden_size, **_):
        super().__init__()
        self.out_dim = hidden_size

    def forward(self, hidden, mask, input_ids):
        weights = mask[..., None].to(hidden.dtype)          # (B, T, 1): 1 = real token
        return (hidden * weights).sum(1) / weights.sum(1)  # (B, D)


class LSTMHead(nn.Module):
    """A BiLSTM over the token states; the last forward and first backward states, concatenated.
    Packing makes each row stop at its own length, so padding never enters the recurrence."""

    def __init__(self, hidden_size, **_):
        super().__init__()
        self.lstm = nn.LSTM(hidden_size, hidden_size // 2, batch_first=True, bidirectional=True)
        self.out_dim = 2 * (hidden_size // 2)

    def forward(self, hidden, mask, input_ids):
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(hidden, lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)        # h_n: (2, B, D/2), forward and backward directions
        return torch.cat([h_n[0], h_n[1]], dim=-1)


class TextCNNHead(nn.Module):
    """TextCNN (Kim 2014) over token states: 1-D convolutions of widths 2, 3, 4, then a max over
    time that skips padding."""

    def __init__(self, hidden_size, n_filters=128, widths=(2, 3, 4), **_):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(hidden_size, n_filters, w, padding=w // 2)
                                   for w in widths)
        self.out_dim = n_filters * len(widths)

    def forward(self, hidden, mask, input_ids):
        # Zero the padded positions first: a window that overhangs a row's end must see the same
        # zeros whether the batch pads that row or not, or a prediction would depend on its batch.
        x = (hidden * mask[..., None]).transpose(1, 2)            # (B, D, T): channels first
        pooled = []
        for conv in self.convs:
            c = F.relu(conv(x))[:, :, : hidden.shape[1]]          # (B, F, T); even widths yield T+1
            c = c.masked_fill(~mask[:, None, :], float("-inf"))
            pooled.append(c.max(dim=2).values)                    # (B, F)
        return torch.cat(pooled, dim=1)


class MLPResHead(nn.Module):
    """[CLS] through a two-layer MLP with a residual connection and LayerNorm: LN(h + MLP(h))."""

    def __init__(self, hidden_size, dropout=0.1, **_):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(),
                                 nn.Dropout(dropout),
                                 nn.Linear(2 * hidden_size, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.out_dim = hidden_size

    def forward(self, hidden, mask, input_ids):
        cls = hidden[:, 0]
        return self.norm(cls + self.mlp(cls))


HEADS = {"fc": CLSHead, "mean": MeanHead, "lstm": LSTMHead, "textcnn": TextCNNHead,
         "mlp_res": MLPResHead}

# pooler: the pretrained BertPooler, as AutoModelForSequenceClassification uses it
HEAD_NAMES = ["pooler", *HEADS]


class BertClassifier(nn.Module):
    """BERT -> head -> dropout -> linear: logits (B, 4). With head "pooler" this is exactly
    BertForSequenceClassification. `head` is a name of HEAD_NAMES or a head module of another
    lesson's (fused_kernels/attn_pool.py's AttnPoolHead): anything with forward(hidden, mask,
    input_ids) -> (B, F), an out_dim F and a name."""

    def __init__(self, bert, head="pooler", dropout=0.1):
        super().__init__()
        D = bert.config.hidden_size
        if isinstance(head, str) and head not in HEAD_NAMES:
            raise common.UserError(f"unknown head {head!r}; "
                                   f"choose one of {', '.join(HEAD_NAMES)}")
        self.bert = bert
        self.head_name = head if isinstance(head, str) else head.name
        if head == "pooler":
            self.head, out_dim = None, D
        else:
            self.head = HEADS[head](D, dropout=dropout) if isinstance(head, str) else head
            out_dim = self.head.out_dim
            # The pooler is unused by this head: no gradient, no optimizer state.
            self.bert.pooler.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(out_dim, common.NUM_CLASSES)

    def features(self, input_ids, attention_mask):
        """One vector per text (B, F): what the classifier sees, what analyze.py maps with PCA."""
        hidden = self.bert(input_ids, attention_mask)  # (B, T, D)
        if self.head is None:
            return self.bert.pooler(hidden)
        return self.head(hidden, attention_mask, input_ids)

    def forward(self, input_ids, attention_mask):
        return self.classifier(self.dropout(self.features(input_ids, attention_mask)))
