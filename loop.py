"""The training loop as every script runs it: plain_loop.py's loop, with what a real run needs.

train() is train_plain() plus, each as a named helper below it:
  - mixed precision (forward_loss; fp16's GradScaler),
  - gradient accumulation, and under DDP one all-reduce a step (gradients_reduced: no_sync),
  - running sums read without stalling the device (RunningLoss), a stop on a diverged loss,
  - the best epoch's weights, an exact resume point and Ctrl-C/SIGTERM at a step boundary
    (resume.py: ResumePoint, StopSignal),
  - DDP under torchrun and torch.compile (model_for_training),
  - and the options of lessons 6-9: AWP (awp.py), R-Drop (rdrop.py) and a teacher's soft targets
    (distill.py) in the loss, one rate per layer in the optimizer (fewsample.py).
tests/test_loop.py trains one tiny model with train() (every option off) and train_plain() and finds
the same weights. The flags, start and end of a run around train() are plumbing/run.py.

Lesson 10 of README's reading path: read after distill.py; next: train_bert.py, which builds a
model (bert.py, with dropout.py's masks) and calls train().
"""
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import awp
import common
import distill
import fewsample
import rdrop
import resume
from plain_loop import batch_tensors, warmup_linear_decay


def train(model, data, args, runtime, run_dir, weights_name="model.safetensors",
          trainable_only=False):
    """train_plain() as every script runs it. Each epoch ends with a validation pass; the best
    epoch's weights (by val macro F1) go to run_dir/weights_name, and a resume point to
    run_dir/resume.safetensors (also every --save-every steps, and on SIGINT/SIGTERM). Batches and
    dropout are drawn from (seed, epoch), and a resume point keeps the RNG state, so a resumed run
    repeats exactly what the whole run does. Returns the per-epoch history."""
    device, train_split = runtime.device, data["train"]
    model.to(device)
    batches_per_epoch = len(common.make_batches(train_split.lengths, args.batch_size, False,
                                                rank=runtime.rank, world_size=runtime.world_size))
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.llrd)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * args.epochs, args.warmup)
    objective = Objective(args.rdrop, args.distill_alpha, args.distill_t)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    step_model = model_for_training(model, runtime, args.compile)  # DDP, torch.compile
    perturber = awp.AWP(model, args.awp_lr, args.awp_eps) if args.awp else None
    resume_point = resume.ResumePoint(run_dir, args, model, optimizer, scheduler, scaler, runtime,
                                      trainable_only)
    at, running = resume.Progress(), None
    if args.resume and resume_point.path.exists():
        at, sums = resume_point.load()
        running = RunningLoss(device, **sums) if sums else None
    elif args.resume and runtime.is_main:
        print(f"--resume: no resume point in {run_dir}, so the run starts from its first step")
    stop = resume.StopSignal(runtime)
    try:
        for epoch in range(at.epoch, args.epochs):
            batches = common.make_batches(train_split.lengths, args.batch_size, shuffle=True,
                                          seed=args.seed * 1000 + epoch, bucket=not args.no_bucket,
                                          rank=runtime.rank, world_size=runtime.world_size)
            if at.batch == 0:  # a fresh epoch; a resumed one has its RNG state and sums back
                torch.manual_seed(args.seed * 1000 + epoch)  # this epoch's dropout masks
                running = RunningLoss(device)
            use_awp = perturber is not None and epoch + 1 >= args.awp_start
            step_model.train()
            # disable=None: a bar on a terminal; in a log file none, but lines: the loss every
            # --log-every steps, and by the clock between them (say_where).
            bar = common.progress_bar(total=len(batches), initial=at.batch,
                                      desc=f"epoch {epoch + 1}/{args.epochs}",
                                      disable=None if runtime.is_main else True, leave=False)
            t0 = time.perf_counter() - at.train_time_s
            next_line = time.perf_counter() + common.PROGRESS_FIRST_S
            pad_to = args.max_len if args.pad_to_max else 0
            for i in range(at.batch, len(batches)):
                input_ids, mask, labels = batch_tensors(train_split, batches[i], pad_to, device)
                soft = soft_targets(train_split, batches[i], device)  # (B, 4) or None
                group = min(args.grad_accum, len(batches) - i + i % args.grad_accum)  # last: short
                steps_now = (i + 1) % args.grad_accum == 0 or i + 1 == len(batches)
                with gradients_reduced(step_model, steps_now):
                    loss, logits = forward_loss(step_model, input_ids, mask, labels, runtime,
                                                soft, objective)
                    scaler.scale(loss / group).backward()
                    if use_awp:  # the batch again at weights moved up the loss; its gradient adds
                        with perturber.perturbed():
                            awp_loss = forward_loss(step_model, input_ids, mask, labels, runtime,
                                                    soft, objective)[0]
                            scaler.scale(awp_loss / group).backward()
                running.add(loss, logits, labels)
                bar.update()
                if (i + 1) % args.grad_accum and i + 1 < len(batches):
                    continue  # accumulate the next batch's gradient
                optimizer_step(params, optimizer, scheduler, scaler, args.clip)
                at.step, at.batch = at.step + 1, i + 1

                if at.step % args.log_every == 0:
                    mean_loss = log_progress(bar, running, at, runtime, steps_per_epoch,
                                             time.perf_counter() - t0)
                    stop_if_diverged("the training loss", mean_loss, at, args.lr)
                    next_line = time.perf_counter() + common.PROGRESS_EVERY_S
                elif bar.disable and runtime.is_main and time.perf_counter() >= next_line:
                    say_where(at, running, steps_per_epoch, time.perf_counter() - t0)
                    next_line = time.perf_counter() + common.PROGRESS_EVERY_S
                signum = stop.agreed()
                save_now = args.save_every and at.step % args.save_every == 0
                if signum or (save_now and at.batch < len(batches)):
                    at.train_time_s = time.perf_counter() - t0
                    resume_point.save(at, running)
                    if signum:
                        bar.close()
                        stop.exit(signum, at, resume_point.path)
            bar.close()

            record = end_of_epoch(epoch, model, data["val"], runtime, running, at,
                                  time.perf_counter() - t0, args.lr)
            at.history.append(record)
            at.epoch, at.batch, at.train_time_s = epoch + 1, 0, 0.0
            if runtime.is_main and record["val_macro_f1"] > at.best_f1:
                common.save_weights(Path(run_dir) / weights_name,
                                    resume.weights_to_save(model, trainable_only))
            at.best_f1 = max(at.best_f1, record["val_macro_f1"])
            resume_point.save(at, None)
            if runtime.world_size > 1:
                torch.distributed.barrier()  # no rank reads the best weights before rank 0 did
            signum = stop.agreed()  # a signal during validation: the resume point is written
            if signum:
                stop.exit(signum, at, resume_point.path)
    finally:
        stop.close()
    return at.history


def soft_targets(split, rows, device):
    """A teacher's probabilities (B, 4) for the rows (distill.py), or None without a teacher."""
    if split.soft is None:
        return None
    return torch.from_numpy(split.soft[rows]).to(device, non_blocking=True)


def make_optimizer(model, lr, weight_decay, llrd=1.0):
    """The AdamW of plain_loop.make_optimizer (decay on matrices only, fused; tests/test_loop.py
    finds train() with llrd 1 equal to train_plain), built from fewsample.lr_groups so that, for
    llrd < 1, each encoder layer learns at its own rate. Fused measured on this project's 2-core
    EPYC (bench/step_breakdown.py): the optimizer's share of a MiniLM step 20% -> 8%."""
    groups = fewsample.lr_groups(model, lr, weight_decay, llrd)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")  # where torch has the kernel
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def model_for_training(model, runtime, compile=False):
    """What the training step calls: the model, wrapped in DDP under torchrun (gradients averaged
    over processes during backward), then with --compile in torch.compile. Both wrappers share the
    model's parameters, so `model` itself, what predict() scores and what is saved, stays the plain
    module with its usual state_dict keys."""
    step_model = model
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        step_model = torch.compile(step_model)
        if runtime.is_main:
            print("--compile: the first steps compile the model (a minute or more; again for new "
                  "batch shapes)")
    return step_model


def gradients_reduced(step_model, now):
    """Under DDP every backward pass all-reduces the gradients across processes, by default. With
    --grad-accum k only their sum at the k-th micro-batch is used, so the k-1 before it need not
    talk at all: inside DDP's no_sync() a backward pass only adds to the local .grad, and the one
    outside it all-reduces that sum (the same result, 1 round of communication instead of k).
    One process: nothing to do."""
    if now or not hasattr(step_model, "no_sync"):   # the plain model, or the step's last batch
        return contextlib.nullcontext()
    return step_model.no_sync()


@dataclass(frozen=True)
class Objective:
    """What the loss asks beyond the labels: R-Drop's weight (rdrop.py; 0 = off) and the
    distillation settings, used where the rows carry a teacher's probabilities (distill.py)."""
    rdrop: float = 0.0
    distill_alpha: float = 0.0
    distill_t: float = 1.0


def forward_loss(model, input_ids, mask, labels, runtime, soft=None, objective=Objective()):
    """Logits (B, 4) under autocast, and the batch's loss, taken in fp32: the mean cross-entropy,
    or with soft targets the distillation loss; with R-Drop, half of (the two dropout passes'
    losses + rdrop times their symmetric KL), R-Drop's loss at one pass's scale."""
    def one_pass():
        with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype,
                            enabled=runtime.amp_dtype is not None):
            logits = model(input_ids, mask)
        return logits, distill.distill_loss(logits.float(), labels, soft,
                                            objective.distill_alpha, objective.distill_t)
    logits, loss = one_pass()
    if objective.rdrop:  # a second pass draws other dropout masks
        logits_2, loss_2 = one_pass()
        # the paper's loss, CE1 + CE2 + alpha * symmetric KL, halved: one pass's scale of loss
        loss = 0.5 * (loss + loss_2 + objective.rdrop * rdrop.symmetric_kl(logits, logits_2))
    return loss, logits


def optimizer_step(params, optimizer, scheduler, scaler, clip):
    """Unscale (fp16 only), clip, step, zero the gradients, advance the schedule. Nothing here waits
    for the GPU: clip_grad_norm_ keeps the norm on the device, and GradScaler hands its inf check to
    the fused AdamW on CUDA instead of reading it back."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


class RunningLoss:
    """The epoch's training loss and accuracy, summed on the device where they are computed. Adding
    to a device tensor queues work and returns at once; `.item()` every step would make the CPU wait
    for the GPU to finish before it could queue the next step. read() fetches the sums (one wait)
    every --log-every steps and at the epoch's end, summed over processes under DDP, and adds a
    point [step, mean loss since the last read] to `curve`."""

    def __init__(self, device, totals=None, read_sums=(0.0, 0.0, 0.0), curve=()):
        # sum over rows of the loss
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.rows = 0  # counted on the host: known without asking the device
        if totals is not None:  # a resumed epoch: the sums so far (all processes') go to rank 0
            self.loss_sum += totals[0].item()
            self.correct += int(totals[1])
            self.rows = int(totals[2])
        self.read_sums = list(read_sums)  # totals at the last read
        self.curve = [list(point) for point in curve]

    def add(self, loss, logits, labels):
        self.loss_sum += loss.detach().double() * len(labels)
        self.correct += (logits.argmax(-1) == labels).sum()
        self.rows += len(labels)

    def totals(self, world_size):
        """(loss * rows, correct, rows) so far this epoch, over all processes (a collective under
        DDP)."""
        sums = torch.stack([self.loss_sum, self.correct.double(),
                            torch.full_like(self.loss_sum, self.rows)])
        if world_size > 1:
            torch.distributed.all_reduce(sums)
        return sums

    def read(self, step, world_size):
        """(mean loss, accuracy) so far this epoch."""
        loss_sum, correct, rows = self.totals(world_size).tolist()
        if rows > self.read_sums[2]:
            self.curve.append([step, (loss_sum - self.read_sums[0]) / (rows - self.read_sums[2])])
        self.read_sums = [loss_sum, correct, rows]
        return loss_sum / rows, correct / rows




def stop_if_diverged(what, value, at, lr):
    """A loss or probability that is nan or inf stays so: every later step builds on it, and the
    best epoch would be chosen among nonsense. Stop the run in one line (every process reads the
    same all-reduced value, so all stop together); it is not finished, so nothing reads it as a
    result. Checked where the loss is read anyway, so it costs no extra wait for the device.
    (Under fp16, a batch whose logits overflow makes the epoch's sum inf too, though GradScaler
    skips its step: such a run stops as well; bf16, the default where the device has it, does
    not overflow.)"""
    if not math.isfinite(value):
        raise common.UserError(f"training diverged: {what} is {value} at step {at.step} (epoch "
                               f"{at.epoch + 1}); the run is not finished. Lower --lr (now "
                               f"{lr:g}) or raise --warmup")


def log_progress(bar, running, at, runtime, steps_per_epoch, seconds):
    """Read the running loss (one wait for the device, every process) and show it: on the bar on a
    terminal, as a short line in a log file (rank 0). Returns the mean loss so far this epoch."""
    loss, accuracy = running.read(at.step, runtime.world_size)
    samples_s = running.read_sums[2] / seconds
    if not runtime.is_main:
        return loss
    if bar.disable:
        step_in_epoch = at.step - at.epoch * steps_per_epoch
        print(f"epoch {at.epoch + 1} step {step_in_epoch}/{steps_per_epoch}: loss {loss:.4f} "
              f"acc {accuracy:.4f} {samples_s:.1f} samples/s", flush=True)
    else:
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.4f}", samples_s=f"{samples_s:.1f}")
    return loss


def say_where(at, running, steps_per_epoch, seconds):
    """In a log file between two reads of the loss: a line by the clock (10 s after the epoch
    starts, then every 30 s) from what the host knows, so it costs no wait for the device and no
    collective under DDP (it is rank 0's alone)."""
    step_in_epoch = at.step - at.epoch * steps_per_epoch
    print(f"epoch {at.epoch + 1} step {step_in_epoch}/{steps_per_epoch}: "
          f"{running.rows / seconds:.1f} samples/s (loss every --log-every steps)", flush=True)


def end_of_epoch(epoch, model, val_split, runtime, running, at, train_time, lr):
    """The epoch's record in the history: its training loss, accuracy and curve (read off the
    device), time and speed, and a validation pass; printed as one line (rank 0). A loss or a
    validation probability that is not finite stops the run (stop_if_diverged)."""
    train_loss, train_accuracy = running.read(at.step, runtime.world_size)
    stop_if_diverged("the training loss", train_loss, at, lr)
    val_probs = common.predict(model, val_split, runtime, desc="scoring val")    # (N, 4)
    if not np.isfinite(val_probs).all():
        stop_if_diverged("a validation probability", float("nan"), at, lr)
    val = common.evaluate(val_probs, val_split.labels)
    record = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
              "train_time_s": train_time, "train_samples_per_s": running.read_sums[2] / train_time,
              **{f"val_{k}": v for k, v in val.items()}, "train_loss_steps": running.curve}
    if runtime.is_main:
        print(f"epoch {epoch + 1}: train loss {train_loss:.4f}  val loss {val['loss']:.4f}  "
              f"val acc {val['accuracy']:.4f}  val macro F1 {val['macro_f1']:.4f}  "
              f"({record['train_samples_per_s']:.1f} samples/s)")
    return record
