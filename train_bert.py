"""Full fine-tuning of BERT on AG News, with a choice of head.

    python train_bert.py --head pooler            # = AutoModelForSequenceClassification
    python train_bert.py --head textcnn --epochs 3
    python train_bert.py --head attnpool --penalty-words runs/X/analysis/penalty_words.json
    python train_bert.py --head pooler --seeds 0,1,2  # runs/bert_pooler/seed0, seed1, seed2

Every weight of the encoder is trained, at a small learning rate (2e-5..5e-5): the pretrained
features are already good, and a large step would wreck them in the first updates.
The pieces live in their own files (bert.py: encoder and heads, loop.py: the training loop) and
the plumbing (plumbing/classifiers.py: which model, plumbing/run.py: a run's flags, start and end);
this script wires them together.

Lesson 11 of README's reading path: read after loop.py; next: train_lora.py.
"""
import argparse
from pathlib import Path

import common
import fewsample
import loop
from plumbing import classifiers, flags, run, runfolders


def load_model(config, run_dir):
    """Rebuild a saved run of this script: random encoder of the right shape, then the saved
    weights."""
    model, tokenizer = classifiers.build_bert_classifier(config, pretrained=False, run_dir=run_dir)
    runfolders.load_checked(model, Path(run_dir) / "model.safetensors")
    return model, tokenizer


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    classifiers.add_bert_args(parser)
    run.add_common_args(parser, lr=5e-5, epochs=3)
    fewsample.add_fewsample_args(parser)
    return parser


def train(args):
    """One run: fine-tune, score, save into args.out."""
    runtime, run_dir, splits, t_start = run.start_run(args, f"bert_{args.head}")
    config = {"script": "train_bert", "model": args.model, "head": args.head,
              "dropout": args.dropout,
              "penalty_words": args.penalty_words, "penalty": args.penalty, "max_len": args.max_len,
              "args": vars(args)}
    model, tokenizer = classifiers.build_bert_classifier(config)
    fresh = fewsample.reinit_top_layers(model, args.reinit_top)  # --reinit-top N, from the seed
    if runtime.is_main:
        classifiers.keep_penalty_words(config, run_dir)
        if fresh:
            print(f"--reinit-top {args.reinit_top}: {', '.join(fresh)} start from BERT's "
                  f"initialisation")
    data = common.encode_splits(tokenizer, splits, args.max_len)
    total, trainable = common.count_parameters(model)
    if runtime.is_main:
        print(f"{args.model} + {args.head} head: {total:,} parameters, {trainable:,} trainable | "
              f"train {len(splits['train'])}, val {len(splits['val'])}, "
              f"test {len(splits['test'])} rows | "
              f"{runtime.device}, {runtime.precision}")

    history = loop.train(model, data, args, runtime, run_dir)
    run.finish_run(model, data, splits, runtime, run_dir, config, history, t_start)


def main(argv=None):
    args = build_parser().parse_args(argv)
    run.run_each_seed(args, f"bert_{args.head}", train)


if __name__ == "__main__":
    common.run_main(main)
