"""The flags of the BERT scripts and the classifier a run's config describes (which folder --model
names is common.resolve_model): plumbing for train_bert.py, train_lora.py and everything that
reloads their runs."""
from pathlib import Path

import bert
import common
import dropout as cheap_dropout
from plumbing import flags

# Every head a run may name: bert.py's, and lesson 13's attention pooling with its fused kernel.
ATTNPOOL = "attnpool"
HEAD_NAMES = [*bert.HEAD_NAMES, ATTNPOOL]


def bert_classifier(encoder, head="pooler", dropout=0.1, penalty_table=None, penalty=0.0):
    """bert.BertClassifier with any head of HEAD_NAMES; attnpool takes the penalty table. Triton
    is imported only for attnpool (it is installed on Linux only)."""
    if head == ATTNPOOL:
        from fused_kernels import attn_pool
        head = attn_pool.AttnPoolHead(encoder.config.hidden_size, penalty_table, penalty)
    return bert.BertClassifier(encoder, head, dropout)


def add_bert_args(parser):
    """Flags of the scripts that fine-tune BERT (train_bert.py, train_lora.py)."""
    parser.add_argument("--model", default="minilm",
                        help="minilm (default), bert-base-uncased, or a model folder")
    parser.add_argument("--head", default="pooler", choices=HEAD_NAMES,
                        help="what turns token states into one vector per text "
                             "(pooler = BertForSequenceClassification)")
    parser.add_argument("--dropout", type=flags.fraction_below_1, default=0.1,
                        help="dropout before the classifier (and in the head)")
    parser.add_argument("--penalty-words", help="attnpool: JSON word list from analyze.py --tfidf")
    parser.add_argument("--penalty", type=flags.nonnegative_float, default=2.0,
                        help="attnpool: score penalty of listed words")


# A copy in the run folder, so an attnpool run reloads on its own.
PENALTY_WORDS_FILE = "penalty_words.json"


def build_bert_classifier(config, pretrained=True, run_dir=None):
    """BertClassifier from a run's config (model, head, dropout, penalty_words, penalty); the
    encoder starts from the pretrained weights, or random ones when a saved run will overwrite them
    anyway. With run_dir, a saved run's own copy of the penalty word list is used. Dropout is
    dropout.py's (lesson 4) in every model built here, trained or scored.
    Returns (model, tokenizer)."""
    model_dir = common.resolve_model(config["model"])
    tokenizer = common.load_tokenizer(model_dir)
    positions = bert.BertConfig.from_json(model_dir / "config.json").max_position_embeddings
    if config.get("max_len", 0) > positions:
        raise common.UserError(f"--max-len {config['max_len']}: "
                               f"{config['model']} has {positions} positions")
    cfg = bert.BertConfig.from_json(model_dir / "config.json")
    encoder = bert.BertModel.from_pretrained(model_dir) if pretrained else bert.BertModel(cfg)
    penalty_words = config.get("penalty_words")
    if run_dir is not None and (Path(run_dir) / PENALTY_WORDS_FILE).exists():
        penalty_words = Path(run_dir) / PENALTY_WORDS_FILE
    table = None
    if penalty_words:
        if config["head"] != "attnpool":
            raise common.UserError(f"--penalty-words goes with --head attnpool, "
                                   f"not --head {config['head']}")
        try:
            from fused_kernels import attn_pool
            table = attn_pool.load_penalty_table(penalty_words, tokenizer, cfg.vocab_size)
        except ValueError as err:
            raise common.UserError(str(err)) from None
    model = bert_classifier(encoder, config["head"], config["dropout"], table,
                            config.get("penalty", 0.0))
    cheap_dropout.use_cheap_dropout(model)
    return model, tokenizer


def keep_penalty_words(config, run_dir):
    """Copy the word list the run trains with into its folder (build_bert_classifier checked it)."""
    if config.get("penalty_words"):
        words = Path(config["penalty_words"]).read_bytes()
        common.atomic_write(Path(run_dir) / PENALTY_WORDS_FILE,
                            lambda tmp: Path(tmp).write_bytes(words))
