"""What makes fine-tuning fast, measured one trick at a time.

The study fine-tuned BERT the way most tutorials do, and it took 14 min 34 s on an RTX 3060 Ti. This
bench starts from that setting and adds one trick per rung, each on top of the ones before, training
the same real AG News rows, with the same batch size, from the same weights:

  0  the study's setting   every row padded to max_len; fp32; attention written out in plain torch
                           ops (softmax(QK^T/sqrt(d) + mask) V, every (T, T) score matrix stored);
                           an AdamW that updates one parameter tensor at a time; loss and accuracy
                           read back to the host (.item()) after every step
  1  + length bucketing    rows of similar length share a batch, padded to the longest in it:
                           AG News rows average ~50 tokens, so padding to 128 computes
                           mostly padding
  2  + AMP                 bf16 autocast: matmuls in bf16 (twice the rate of fp32 or more),
                           half the bytes
  3  + SDPA                one fused attention kernel (F.scaled_dot_product_attention, bert.py's
                           attention): no (T, T) matrices written out and read back
  4  + fused AdamW         one kernel updates every parameter, instead of ~10 small ops per tensor
  5  + no per-step sync    loss and accuracy summed on the device, read once at the end: the host
                           can queue the next step while the GPU still works (nothing to gain on a
                           CPU, where every op finishes before the next starts)
  6  + cheap dropout masks dropout.py: on a CPU, masks from 16 random bits an element instead of
                           bernoulli_'s float, and attention written out in training so that its
                           probabilities get them too (SDPA on a CPU draws its own); on a GPU
                           nothing changes (torch's masks are drawn inside the kernels there)
  7  + torch.compile       the model compiled: elementwise ops fused into fewer kernels,
                           fewer launches

and, in the same run, the peer: transformers' BertForSequenceClassification with its defaults (its
own attention implementation, fp32), fed the same bucketed batches as rungs 1-7, in the loop of rung
5 (fused AdamW, no per-step sync), once in fp32 and once under bf16 autocast, beside our model in
the same loop at the same precision.

    python bench/speed_ablation.py                                 # MiniLM, 512 real rows, CPU/GPU
    python bench/speed_ablation.py --device cuda --random-init bert-base --rows 1024
    python bench/speed_ablation.py --cpu-smoke                     # tiny random BERT, secs (tests)

Method. Every setting trains its own copy of the same weights on the same rows (one epoch of --rows,
or the first --steps x --batch-size of them in a shuffled order; bucketed or not, the same rows).
Each setting first runs those batches once untimed (every batch length is then seen: kernel choice,
allocator, compilation), then the settings are timed one after another, in alternating order, over
--rounds rounds, and each setting's median samples/s is reported: a noisy neighbour slows every
setting alike. A timed pass includes what a training step does: padding the batch on the host, the
copy to the device, forward, loss, backward, gradient clipping, AdamW, and the host reading loss and
accuracy. All eleven settings stay in memory together: eleven models with gradients and AdamW state,
~3.5 GB in all for MiniLM (a CPU run peaked at 5.3 GB RSS with torch.compile), ~18 GB for bert-base.
On a GPU, the table also shows model FLOPs utilisation (the model's training FLOPs per second over
the card's bf16 dense peak) and, from the fastest rung, the projected time of the study's run.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bert  # noqa: E402
import common  # noqa: E402
from plumbing import agnews, flags  # noqa: E402
from bench.models import GEOMETRIES, model_folder, set_attention  # noqa: E402

# The study's run, for the projection: bert-base on every AG News training row, 3 epochs.
STUDY_ROWS, STUDY_EPOCHS, STUDY_TIME = agnews.AGNEWS_TRAIN_ROWS, 3, "14 min 34 s on an RTX 3060 Ti"
# bf16 dense tensor-core peak of the cards we may be lent, in FLOP/s (vendor datasheets, without
# sparsity); the first name found in torch.cuda.get_device_name() wins, so the specific ones come
# first.
BF16_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("GH200", 989e12), ("A100", 312e12)]
# --cpu-smoke: a tiny random BERT, a few real rows, one round; compiled with the "eager" backend,
# which runs torch.compile's graph capture but not its code generation (minutes on a CPU).
SMOKE = dict(shape=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128),
             rows=48, batch_size=16, max_len=64, steps=2, rounds=1, compile_backend="eager")


@dataclass(frozen=True)
class Setting:
    """How one model trains: the tricks it uses, and whose model it is."""
    name: str
    bucket: bool = False       # pad to the longest row in a bucketed batch (else every row to
                               # max_len)
    amp: bool = False          # bf16 autocast
    attention: str = "written"  # dropout.WrittenOutAttention.impl: "written" (plain ops), "sdpa"
                                # (the fused kernel) or "auto" (SDPA, but written out in training
                                # on a CPU)
    cheap_masks: bool = False   # dropout.py's masks on a CPU (else torch's bernoulli_)
    fused_adamw: bool = False  # one AdamW kernel (else foreach=False: one parameter tensor at a
                               # time)
    sync: bool = True          # .item() of loss and accuracy every step
    compile: bool = False      # torch.compile of the model
    peer: bool = False         # transformers' BertForSequenceClassification instead of ours


# Each rung adds one trick to the rung before it.
TRICKS = [("the study's setting", {}), ("+ length bucketing", {"bucket": True}),
          ("+ AMP (bf16)", {"amp": True}),
          ("+ SDPA attention", {"attention": "sdpa"}), ("+ fused AdamW", {"fused_adamw": True}),
          ("+ no per-step sync", {"sync": False}),
          ("+ cheap dropout masks", {"attention": "auto", "cheap_masks": True}),
          ("+ torch.compile", {"compile": True})]


def ladder():
    rungs, tricks = [], {}
    for name, trick in TRICKS:
        tricks = {**tricks, **trick}
        rungs.append(Setting(name, **tricks))
    return rungs


def peer_settings(rungs):
    """The loop of rung 5 (bucketing, fused AdamW, no per-step sync; torch's dropout masks, no
    compile) around transformers' model in fp32 and bf16, and around ours in fp32 (in bf16, ours in
    that loop is rung 5 itself)."""
    rung5 = rungs[5]
    return {"ours fp32": replace(rung5, name="ours, fp32", amp=False),
            "theirs fp32": replace(rung5, name="transformers, fp32", amp=False, peer=True),
            "theirs bf16": replace(rung5, name="transformers, bf16", peer=True)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm",
                        help="pretrained model: minilm (default), bert-base-uncased or DIR")
    parser.add_argument("--random-init", choices=list(GEOMETRIES),
                        help="instead of --model: this geometry with random weights "
                             "(speed does not depend on them)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data", help="AG News folder (default $AGNEWS_DIR or data/ag_news)")
    parser.add_argument("--rows", type=flags.positive_int, default=512,
                        help="real AG News training rows (default 512); a timed pass is one "
                             "epoch of them")
    parser.add_argument("--batch-size", type=flags.positive_int, default=32)
    parser.add_argument("--max-len", type=flags.positive_int, default=128,
                        help="rows are cut to this; rung 0 pads to it")
    parser.add_argument("--steps", type=int, default=0,
                        help="timed batches per setting and round: the first steps x batch-size "
                             "rows (default 0: all of --rows)")
    parser.add_argument("--rounds", type=flags.positive_int, default=3,
                        help="timed rounds; the median is reported")
    parser.add_argument("--max-seconds", type=float, default=0,
                        help="start no further round that would end later than this many seconds "
                             "after the start (default 0: no limit); at least one round is always "
                             "timed")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of rung 7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny random 2-layer BERT on a few rows, one round, on the CPU: "
                             "checks the plumbing")
    args = parser.parse_args(argv)
    if args.steps < 0:
        raise common.UserError(f"--steps must be 0 (all rows) or more, got {args.steps}")
    args.shape = GEOMETRIES.get(args.random_init)
    if args.cpu_smoke:
        args.device = "cpu"
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------------------------
# What a step costs: FLOPs, and the card's peak
# --------------------------------------------------------------------------------------------------
def training_flops(cfg, batch, length):
    """Training FLOPs of one batch of `batch` rows padded to `length` tokens (padding is computed,
    so it counts). A matmul of a token with a weight matrix is 2 FLOPs per weight, and the backward
    pass costs two forwards (gradients of the activations and of the weights), so training is
        6 x (weights in matmuls) x tokens  +  6 x 2 x layers x batch x length^2 x hidden
    where the second term is attention's QK^T and softmax @ V (2 T^2 D FLOPs each, per sequence and
    layer, over all heads). Per layer the matmul weights are 4 D^2 (query, key, value, out) + 2 D I
    (feed-forward); the pooler and classifier (D^2 + 4 D) see only the [CLS] token of each row.
    Embeddings, LayerNorm, softmax and GELU add no matmul FLOPs and are left out."""
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    tokens = batch * length
    matmul_weights_per_layer = 4 * D * D + 2 * D * I
    forward = (L * (2 * matmul_weights_per_layer * tokens + 2 * 2 * batch * length * length * D)
               + 2 * (D * D + D * common.NUM_CLASSES) * batch)
    return 3 * forward


def bf16_peak_flops(device):
    """(peak FLOP/s, card name), or (None, name) for a card not in BF16_PEAK_FLOPS."""
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None), name


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# One setting: its model, its optimizer, its step
# --------------------------------------------------------------------------------------------------
class Trainee:
    """One setting's own copy of the model, its AdamW and its training step."""

    def __init__(self, setting, ours, folder, device, compile_backend):
        self.setting, self.device = setting, device
        if setting.peer:
            import transformers
            # not the report of the classifier it initialises
            transformers.logging.set_verbosity_error()
            model = transformers.BertForSequenceClassification.from_pretrained(
                folder, num_labels=common.NUM_CLASSES)
            self.attn_implementation = model.config._attn_implementation
            forward = lambda input_ids, mask: model(input_ids=input_ids,  # noqa: E731
                                                    attention_mask=mask.long()).logits
        else:
            model = copy.deepcopy(ours)  # the same weights for every rung
            set_attention(model, setting.attention, setting.cheap_masks)
            forward = model
        self.model = model.to(device).train()
        if setting.compile:
            # Every bucketed batch has its own length: compile once for any length, not once per
            # length.
            forward = torch.compile(model, dynamic=True, backend=compile_backend)
        self.forward = forward
        self.params = [p for p in model.parameters() if p.requires_grad]
        kind = {"fused": True} if setting.fused_adamw else {"foreach": False, "fused": False}
        # One group with weight decay on everything: the speed is that of loop.make_optimizer's two.
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-5, weight_decay=0.01, **kind)
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def step(self, rows, labels, pad_to):
        """One training step on one batch, as loop.train takes it: pad on the host, copy, forward,
        loss, backward, clip, AdamW; then loss and accuracy, read now (sync) or summed on the
        device."""
        input_ids, mask = common.to_device(rows, pad_to, self.device)         # (B, T), (B, T)
        labels = torch.from_numpy(labels).to(self.device, non_blocking=True)  # (B,)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.setting.amp):
            logits = self.forward(input_ids, mask)                            # (B, 4)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        correct = (logits.argmax(-1) == labels).sum()
        if self.setting.sync:  # the host waits here for the GPU to finish this step
            self.loss_sum += loss.item() * len(rows)
            self.correct += correct.item()
        else:                  # tensors on the device: the host goes on queueing the next step
            self.loss_sum = self.loss_sum + loss.detach() * len(rows)
            self.correct = self.correct + correct
        self.seen += len(rows)

    def read(self):
        """Mean loss and accuracy so far: the one read of the no-sync settings."""
        return float(self.loss_sum) / self.seen, int(self.correct) / self.seen


def timed_pass(trainee, plan, ids, labels):
    """Seconds for one pass over a plan's batches, from the first host-side padding to the last
    read."""
    batches, pad_to = plan
    synchronize(trainee.device)
    t0 = time.perf_counter()
    for idx in batches:
        trainee.step([ids[i] for i in idx], labels[idx], pad_to)
    trainee.read()
    synchronize(trainee.device)
    return time.perf_counter() - t0


def count_host_syncs(trainee, plan, ids, labels):
    """CUDA only: how many times one step of `trainee` makes the host wait for the GPU, and where
    the first one is (torch's sync debug mode warns at every synchronizing call). One step of the
    plan's first batch."""
    batch, pad_to = plan[0][0], plan[1]
    synchronize(trainee.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainee.step([ids[i] for i in batch], labels[batch], pad_to)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), (f"{Path(syncs[0].filename).name}:{syncs[0].lineno}" if syncs else None)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def load_rows(args, folder):
    """Real training rows as token ids. With random weights the tokenizer is --model's (default
    MiniLM's: the same uncased WordPiece vocabulary as bert-base-uncased, so the lengths are those
    of the study's model)."""
    splits = agnews.load_ag_news(args.data, train_size=args.rows)
    has_tokenizer = ((Path(folder) / "tokenizer.json").exists()
                     or (Path(folder) / "vocab.txt").exists())
    tokenizer = common.load_tokenizer(folder if has_tokenizer
                                      else common.resolve_model(args.model))
    ids = common.encode(tokenizer, splits["train"].texts, args.max_len)
    return ids, splits["train"].labels


def plan_batches(args, lengths):
    """The timed rows batched both ways, {bucket: (batches, pad_to)}: one shuffled epoch over the
    first --steps x --batch-size rows (or all), the same rows whether bucketed or not."""
    rows = np.random.default_rng(args.seed).permutation(len(lengths))
    if args.steps:
        rows = rows[: args.steps * args.batch_size]
    return {bucket: ([rows[b] for b in common.make_batches(lengths[rows], args.batch_size,
                                                           shuffle=True, seed=args.seed,
                                                           bucket=bucket)],
                     0 if bucket else args.max_len)
            for bucket in (False, True)}


def measure(args, trainees, plans, ids, labels, started):
    """Warm every setting up on its batches, then time them in alternating order, round after round.
    Returns {key: median samples/s}. A setting whose warm-up fails (torch.compile without a working
    compiler, say) is reported and left out, so the others still make a table."""
    for key, trainee in list(trainees.items()):
        t0 = time.perf_counter()
        try:
            timed_pass(trainee, plans[trainee.setting.bucket], ids, labels)
        except Exception as err:  # noqa: BLE001 - any failure: say which setting, measure the rest
            if not trainee.setting.compile:
                raise
            print(f"  {trainee.setting.name}: FAILED, left out "
                  f"({type(err).__name__}: {str(err).splitlines()[0]})")
            del trainees[key]
            continue
        print(f"  warm-up  {trainee.setting.name:22s} {time.perf_counter() - t0:7.1f} s",
              flush=True)
    rates, order, t_rounds = {key: [] for key in trainees}, list(trainees), time.perf_counter()
    for r in range(args.rounds):
        now = time.perf_counter()
        if r and args.max_seconds and now - started + (now - t_rounds) / r > args.max_seconds:
            print(f"  --max-seconds {args.max_seconds:g}: no time for another round; "
                  f"stopping after {r}")
            break
        # alternate, so drift hurts no one setting
        for key in (order if r % 2 == 0 else order[::-1]):
            plan = plans[trainees[key].setting.bucket]
            rates[key].append(sum(len(b) for b in plan[0])
                              / timed_pass(trainees[key], plan, ids, labels))
        print(f"  round {r + 1}/{args.rounds} samples/s: "
              + "  ".join(f"{key} {rates[key][-1]:.0f}" for key in order),
              flush=True)
    return {key: statistics.median(r) for key, r in rates.items()}


def pass_flops(cfg, plan, lengths):
    """Training FLOPs of one pass over a plan's batches, each padded as that plan pads it."""
    batches, pad_to = plan
    return sum(training_flops(cfg, len(b), pad_to or int(lengths[b].max())) for b in batches)


def print_header(args, device, cfg, lengths, plans, peer):
    source = (f"{args.random_init} geometry, random weights" if args.random_init else
              "tiny random BERT, --cpu-smoke" if args.cpu_smoke else f"{args.model}, pretrained")
    batches = plans[True][0]
    rows = sum(len(b) for b in batches)
    # padding included
    tokens = {bucket: sum(len(b) * (pad_to or int(lengths[b].max())) for b in bucket_batches)
              for bucket, (bucket_batches, pad_to) in plans.items()}
    print(f"model: {source} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); "
          f"transformers' attention: {peer.attn_implementation}")
    if device.type == "cuda":
        peak, name = bf16_peak_flops(device)
        print(f"device: {name}, bf16 dense peak "
              + (f"{peak / 1e12:.0f} TFLOP/s" if peak
                 else "unknown (no MFU: add the card to BF16_PEAK_FLOPS)"))
    else:
        print(f"device: CPU, {torch.get_num_threads()} torch thread(s), "
              f"{torch.backends.cpu.get_cpu_capability()}, "
              f"""bf16 in hardware: {'yes (avx512_bf16/amx_bf16)' if common.cpu_has_bf16()
                                     else 'no (AMP rungs emulate it)'}""")
    print(f"data: {rows} real AG News training rows in {len(batches)} batches of "
          f"{args.batch_size}, cut to {args.max_len} tokens, "
          f"mean length {lengths[np.concatenate(batches)].mean():.0f}; tokens computed per pass: "
          f"{tokens[False]:,} padded to {args.max_len}, {tokens[True]:,} bucketed "
          f"({tokens[False] / tokens[True]:.2f}x fewer)")
    print(f"timing: {args.rounds} round(s), alternating order, median; torch {torch.__version__}\n",
          flush=True)


def print_results(args, cfg, rates, settings, plans, lengths, device, our_default):
    peak = bf16_peak_flops(device)[0] if device.type == "cuda" else None
    rows = {bucket: sum(len(b) for b in plan[0]) for bucket, plan in plans.items()}

    def mfu(key):
        """Model FLOPs per second over the card's bf16 peak."""
        bucket = settings[key].bucket
        return pass_flops(cfg, plans[bucket], lengths) * rates[key] / rows[bucket] / peak

    rungs = [key for key in rates if key.isdigit()]  # rung 7 is missing if torch.compile failed
    print("\n| rung | setting | samples/s | x previous | x first |" + (" MFU |" if peak else ""))
    print("| --- | --- | ---: | ---: | ---: |" + (" ---: |" if peak else ""))
    for i, key in enumerate(rungs):
        previous = rates[rungs[i - 1]] if i else rates[key]
        print(f"| {key} | {settings[key].name} | {rates[key]:.1f} | {rates[key] / previous:.2f}x | "
              f"{rates[key] / rates[rungs[0]]:.2f}x |" + (f" {mfu(key):.1%} |" if peak else ""))

    ours = {"fp32": rates["ours fp32"], "bf16": rates["5"]}
    theirs = {"fp32": rates["theirs fp32"], "bf16": rates["theirs bf16"]}
    print("\npeer: transformers' BertForSequenceClassification, its defaults, the same bucketed "
          "batches, in the loop of rung 5 (fused AdamW, no per-step sync), beside ours in the same "
          "loop:")
    print("| samples/s | fp32 | bf16 autocast |\n| --- | ---: | ---: |")
    print(f"| ours | {ours['fp32']:.1f} | {ours['bf16']:.1f} |")
    print(f"| transformers | {theirs['fp32']:.1f} | {theirs['bf16']:.1f} |")
    print(f"| ours / transformers | {ours['fp32'] / theirs['fp32']:.2f}x | "
          f"{ours['bf16'] / theirs['bf16']:.2f}x |")
    print(f"each at its default precision (ours {our_default} on {device.type}, "
          f"transformers fp32): ours is {ours[our_default] / theirs['fp32']:.2f}x transformers "
          f"(issue 11's goal: 1.5x on a CPU, 2x on a GPU)")
    fastest = max(rungs, key=rates.get)
    print(f"fastest rung ({fastest}, {settings[fastest].name}) over transformers fp32: "
          f"{rates[fastest] / theirs['fp32']:.2f}x")

    seconds = STUDY_ROWS * STUDY_EPOCHS / rates[fastest]
    shape = {k: getattr(cfg, k) for k in GEOMETRIES["bert-base"]}
    caveat = ("" if shape == GEOMETRIES["bert-base"] else
              f" (NOT the study's model: this is {cfg.num_hidden_layers} layers x "
              f"{cfg.hidden_size}; --random-init bert-base gives the study's)")
    print(f"projected: {STUDY_ROWS:,} rows x {STUDY_EPOCHS} epochs of training on this "
          f"{device.type} at rung {fastest}'s samples/s: {seconds / 60:.1f} min{caveat}; "
          f"the study took {STUDY_TIME}")


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    runtime = common.setup_runtime(args.device)
    device = runtime.device
    # fp32 means fp32, as in the study and by PyTorch's default; setup_runtime allows TF32 matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise common.UserError(f"{torch.cuda.get_device_name(device)} has no bf16: "
                               f"the AMP rungs need it")
    our_default = "fp32" if runtime.amp_dtype is None else "bf16"  # what loop.train uses here
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, args.shape, tmp)
        ids, labels = load_rows(args, folder)
        lengths = np.array([len(r) for r in ids])
        plans = plan_batches(args, lengths)
        torch.manual_seed(args.seed)
        ours = bert.BertClassifier(bert.BertModel.from_pretrained(folder), head="pooler")
        rungs = ladder()
        settings = {str(i): rung for i, rung in enumerate(rungs)} | peer_settings(rungs)
        trainees = {key: Trainee(setting, ours, folder, device, args.compile_backend)
                    for key, setting in settings.items()}
    print_header(args, device, ours.bert.config, lengths, plans, trainees["theirs fp32"])
    rates = measure(args, trainees, plans, ids, labels, started)
    if device.type == "cuda":
        # Rung 0 reads loss and accuracy every step; rung 5 should not make the host wait at all.
        for key in ("0", "5"):
            count, first = count_host_syncs(trainees[key], plans[settings[key].bucket], ids, labels)
            print(f"host syncs in one step of rung {key}: {count}"
                  + (f" (the first at {first})" if first else ""))
    print_results(args, ours.bert.config, rates, settings, plans, lengths, device, our_default)
    if args.cpu_smoke:
        print(f"\n(--cpu-smoke: a tiny random model, compiled with the {args.compile_backend!r} "
              f"backend; the figures say nothing about speed)")


if __name__ == "__main__":
    common.run_main(main)
