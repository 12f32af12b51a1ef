"""A run's life, shared by the three training scripts: its flags, its start, its seeds, its end.

Not a lesson of its own (read loop.py for the loop): the plumbing around one call of loop.train().
  add_common_args  the flags every training script takes (data, sizes, optimizer, precision,
                   seeds, folder, resume; AWP's from awp.py and EDA's from eda.py)
  start_run        device and precision, seeds, the run folder, the data (EDA copies with --eda)
  run_each_seed    one run, or one per seed of --seeds into <folder>/seed<k>/
  finish_run       reload the best epoch, score val, test and today's news, write the run folder
"""
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

import awp
import common
import distill
import eda
import rdrop
from plumbing import agnews, flags, runfolders


def add_common_args(parser, lr, epochs, batch_size=32):
    """The flags every training script shares; defaults for lr/epochs/batch are the script's own."""
    parser.add_argument("--data",
                        help="AG News folder (train.csv, test.csv); default $AGNEWS_DIR or "
                             "data/ag_news")
    parser.add_argument("--train-size", type=flags.sample_size,
                        help="stratified subsample of the training rows")
    parser.add_argument("--val-size", type=flags.sample_size,
                        help="stratified subsample of the validation slice (smoke runs only)")
    parser.add_argument("--test-size", type=flags.sample_size,
                        help="stratified subsample of the official test set (smoke runs only)")
    parser.add_argument("--max-len", type=flags.sequence_length, default=128,
                        help="tokens per text at most, [CLS] and [SEP] included")
    parser.add_argument("--epochs", type=flags.positive_int, default=epochs,
                        help="passes over the training rows")
    parser.add_argument("--batch-size", type=flags.positive_int, default=batch_size,
                        help="rows per batch (per process under torchrun)")
    parser.add_argument("--grad-accum", type=flags.positive_int, default=1,
                        help="optimizer step every N batches")
    # lr 0 is allowed: the model stays as it starts, a control (tests/test_loop.py uses it)
    parser.add_argument("--lr", type=flags.nonnegative_float, default=lr,
                        help="peak learning rate of AdamW")
    parser.add_argument("--weight-decay", type=flags.nonnegative_float, default=0.01,
                        help="AdamW weight decay, on matrices only")
    parser.add_argument("--warmup", type=flags.fraction, default=0.1,
                        help="fraction of steps with linear warm-up")
    parser.add_argument("--clip", type=flags.positive_float, default=1.0,
                        help="max gradient norm")
    parser.add_argument("--no-bucket", action="store_true",
                        help="shuffle without grouping rows by length")
    parser.add_argument("--pad-to-max", action="store_true",
                        help="pad every row to --max-len (for comparison)")
    parser.add_argument("--seed", type=flags.seed_int, default=0,
                        help="seed of weights init, dropout and batch order")
    parser.add_argument("--seeds", type=flags.parse_seeds,
                        help="train once per seed, e.g. 0,1,2, into <out>/seed<k>/; with --out or "
                             "--resume a seed already finished there is kept, not trained again")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible")
    parser.add_argument("--precision", default="auto", choices=common.PRECISIONS,
                        help="autocast dtype; auto: bf16 on a GPU that has it, else fp16; on the "
                             "CPU bf16 where it has bf16 instructions (AVX512-BF16, AMX), else "
                             "fp32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for training (slow first steps)")
    parser.add_argument("--out",
                        help="run folder (default runs/<name>, or runs/<name>-2, -3, ... when "
                             "taken)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out (default: the newest "
                             "runs/<name>[-k])")
    parser.add_argument("--save-every", type=flags.nonnegative_int, default=0,
                        help="also write the resume point every N optimizer steps inside an epoch "
                             "(0: at epoch ends only)")
    parser.add_argument("--log-every", type=flags.positive_int, default=50,
                        help="read loss and accuracy off the device every N optimizer steps (bar, "
                             "log line, curve)")
    awp.add_awp_args(parser)
    eda.add_eda_args(parser)
    rdrop.add_rdrop_args(parser)
    distill.add_distill_args(parser)
    # Flags only the BERT scripts offer (fewsample.add_fewsample_args); elsewhere they stay off.
    parser.set_defaults(llrd=1.0, reinit_top=0)
    return parser


def start_run(args, name):
    """What every training script does first: device, seeds, run folder, data.
    Returns (runtime, run_dir, splits, t_start)."""
    t_start = time.perf_counter()
    runtime = common.setup_runtime(args.device, args.precision)
    # what auto chose: config.json and the resume check record it
    args.precision = runtime.precision
    common.reset_peak_memory(runtime.device)
    common.seed_everything(args.seed)
    # Rank 0 checks and claims the folder; the others write nothing in it.
    run_dir = runfolders.prepare_run_dir(args, name, claim=runtime.is_main)
    if runtime.world_size > 1:
        torch.distributed.barrier()  # no rank goes on before rank 0 has claimed the folder
    data_dir = agnews.find_data_dir(args.data)
    # Recorded (config.json's args), so vote.py and analyze.py find the rows in any shell.
    args.data_dir = str(data_dir.resolve())
    splits = agnews.load_ag_news(data_dir, args.train_size, args.test_size, args.val_size)
    splits = distill.attach_teacher(args, splits, data_dir, runtime)
    splits = eda.augment_train_split(args, splits, runtime)
    # Today's news: scored by finish_run beside the 2004 test set, never trained or chosen on.
    splits["cases"] = agnews.load_cases()
    return runtime, run_dir, splits, t_start


def run_each_seed(args, name, train_one):
    """Call train_one(args) once, or with --seeds once per seed, each into <folder>/seed<k>/: an
    ordinary run folder, so vote.py, analyze.py and --resume work on each as on any run. <folder> is
    --out or default_run_dir(name). A seed whose folder holds a finished run is kept, not trained
    again, so an interrupted --seeds command picks up where it stopped. A run that fails before
    writing anything leaves no empty folder behind."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not args.out:
        # Each process would number the folder on its own, and one might see the other's new folder.
        raise common.UserError("under torchrun, pass --out: every process must write to the same "
                               "run folder")
    if args.seeds is None:
        args.out = str(Path(args.out) if args.out else
                       runfolders.default_run_dir(name, args.resume))
        with runfolders.no_half_made_run_left(args.out):
            return train_one(args)
    base = Path(args.out) if args.out else runfolders.default_run_dir(name, args.resume)
    if any((base / name).exists()
           for name in ("config.json", runfolders.RESUME_FILE, runfolders.CLAIM_FILE)):
        # seed<k>/ inside a run would be read as parts of it, and it as one of theirs
        raise common.UserError(f"--seeds: {base} holds a run of its own; pass --out with a new "
                               f"folder for the seeds")
    for seed in args.seeds:
        run_args = copy.copy(args)
        run_args.seed, run_args.out = seed, str(runfolders.seed_folder(base, seed))
        if runfolders.is_finished(run_args.out):
            print(f"seed {seed}: {run_args.out} is finished, kept")
            continue
        print(f"seed {seed} of {','.join(map(str, args.seeds))}: {run_args.out}")
        with runfolders.no_half_made_run_left(run_args.out):
            train_one(run_args)


def finish_run(model, data, splits, runtime, run_dir, config, history, t_start):
    """Reload the best epoch, score val, test and today's news (cases/), print the report, write
    probabilities and metrics, drop the resume point. Every training script ends here."""
    run_dir = Path(run_dir)
    parameters = dict(zip(("total", "trainable"), common.count_parameters(model)))
    # The best epoch's weights, in the model as every reader rebuilds it (vote.py, serve.py,
    # analyze.py): the same texts then get the same probabilities here and there. (The training
    # model differs in its last bits: a LoRA run keeps its update unmerged and its frozen weights
    # in bf16.)
    model = runfolders.rebuild_model(config, run_dir)[0].to(runtime.device).eval()
    t0 = time.perf_counter()
    val_probs = common.predict(model, data["val"], runtime, desc="scoring val")
    test_probs = common.predict(model, data["test"], runtime, desc="scoring test")
    cases_probs = common.predict(model, data["cases"], runtime, desc="scoring today's news")
    score_time = time.perf_counter() - t0
    for name, probs in (("val", val_probs), ("test", test_probs), ("today's news", cases_probs)):
        if not np.isfinite(probs).all():  # the best epoch's weights give nan: never a result
            raise common.UserError(f"{run_dir}: the best epoch's weights score {name} rows as "
                                   f"nan or inf; the run is not finished (lower --lr)")
    test = common.evaluate(test_probs, data["test"].labels)
    wall = time.perf_counter() - t_start
    train_time = sum(h["train_time_s"] for h in history)
    metrics = {"test": test, "val": common.evaluate(val_probs, data["val"].labels),
               "cases": common.evaluate(cases_probs, data["cases"].labels),
               "history": history,
               "best_epoch": max(history, key=lambda h: h["val_macro_f1"])["epoch"],
               "train_time_s": train_time, "score_time_s": score_time, "wall_time_s": wall,
               "train_samples_per_s": sum(h["train_samples_per_s"] for h in history) / len(history),
               "rows": {k: len(v) for k, v in splits.items()}, "val_sampling": agnews.VAL_SAMPLING,
               # which data folder, by content: runs of two folders differ in their validation rows
               "train_csv_md5": agnews.md5_of(Path(config["args"]["data_dir"]) / "train.csv"),
               "fingerprints": {k: v.fingerprint() for k, v in splits.items()},
               "parameters": parameters,
               "memory": common.peak_memory(runtime.device)}
    if runtime.is_main:
        common.print_report(data["test"].labels, test_probs)
        common.save_npy(run_dir / "val_probs.npy", val_probs.astype(np.float32))
        common.save_npy(run_dir / "test_probs.npy", test_probs.astype(np.float32))
        common.save_npy(run_dir / "cases_probs.npy", cases_probs.astype(np.float32))
        common.save_json(run_dir / "config.json", config)
        common.save_json(run_dir / "metrics.json", metrics)
        (run_dir / runfolders.RESUME_FILE).unlink(missing_ok=True)
        mem = ", ".join(f"{k} {v:.2f}" for k, v in metrics["memory"].items())
        # Training time counts every session of a resumed run; wall time only this session.
        cases = metrics["cases"]
        print(f"today's news ({len(cases_probs)} cases, {agnews.CASES_FILE.name}): accuracy "
              f"{cases['accuracy']:.4f}  macro F1 {cases['macro_f1']:.4f}")
        print(f"test accuracy {test['accuracy']:.4f}  macro F1 {test['macro_f1']:.4f}  | training "
              f"{train_time:.1f} s ({metrics['train_samples_per_s']:.1f} samples/s), scoring "
              f"{score_time:.1f} s, wall {wall:.1f} s this session | peak memory: {mem}")
        print(f"saved {run_dir}/")
    return metrics
