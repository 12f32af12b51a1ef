"""Stop anywhere, go on exactly: the resume point and the signals that write it.

A run of hours will be stopped: Ctrl-C, a kill, a batch scheduler's time limit, a session that
ends. `--resume` must then continue as if the run had never stopped: the same batches, the same
dropout masks, the same weights at the end (tests/test_loop.py stops a run twice, resumes it and
finds the uninterrupted run's losses and weights within 1e-6). What that takes, all of it in ONE
file written atomically (a kill mid-write must never leave the weights of one step beside the
progress of another):
  - Progress        where the run stands: epochs done, batches of this epoch done, optimizer steps,
                    the best validation score, the history of finished epochs
  - the model's trained weights, AdamW's two moments and step counts, the scheduler's step, fp16's
    loss scale
  - every process's random-number state: the dropout masks still to come are drawn from it
  - the epoch's running sums (loss, correct, rows), so its training loss is that of the whole epoch
  - the flags: a resumption with other flags would be another run (changed_flags says which)
StopSignal makes a signal end the run at a step boundary, where all of that is consistent, and
under DDP makes every process stop after the same step.

loop.py's train() (lesson 10) saves a ResumePoint every --save-every steps, at each epoch's end and
on a signal, and loads one with --resume.

Lesson 5 of README's reading path: read after dropout.py; next: eda.py and awp.py.
"""
import json
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import common
from plumbing import runfolders


@dataclass
class Progress:
    """Where a run stands; a resume point records it (with the tensors) and a resumed run starts
    from it."""
    epoch: int = 0            # epochs finished
    batch: int = 0            # batches of the current epoch done (0: the epoch has not started)
    step: int = 0             # optimizer steps done, all epochs
    best_f1: float = -1.0     # best validation macro F1 so far
    history: list = field(default_factory=list)  # one record per finished epoch
    train_time_s: float = 0.0  # spent in the current epoch so far


# Flags that may differ between a run and its resumption: where and how fast it runs, not what it
# computes.
RESUME_FREE_FLAGS = ("device", "resume", "out", "seeds", "save_every", "log_every", "compile",
                     "data_dir")


def changed_flags(then, now):
    """{flag: (its value then, now)} for the flags a resumption would change; a flag the saved run
    does not know is compared with the value in runfolders.ADDED_FLAGS, the one it ran with."""
    then = {**runfolders.ADDED_FLAGS, **then}
    return {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}


def weights_to_save(model, trainable_only):
    """A LoRA run saves only what it trained (the adapter and head); others save the whole model."""
    return common.trainable_state(model) if trainable_only else model.state_dict()


def optimizer_tensors(optimizer):
    """AdamW state as flat named tensors, so it fits safetensors (no pickle)."""
    flat = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_tensors(optimizer, flat):
    state = {}
    for name, value in flat.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


class ResumePoint:
    """run_dir/resume.safetensors: all a resumed run needs to go on exactly as if never stopped, in
    ONE file written atomically, so that a kill never leaves the weights of one step beside the
    progress of another. Tensors: model.* (the trainable ones only, for LoRA), opt.* (AdamW's
    moments and step counts), rng.* (every process's RNG states: dropout goes on with the very masks
    it would have drawn) and running (loss, correct, rows summed so far this epoch). Metadata
    "progress" (JSON): Progress, the flags, the scheduler and the GradScaler (fp16's loss scale).
    Every process takes part in save() (their RNG states and sums are gathered); rank 0 writes."""

    def __init__(self, run_dir, args, model, optimizer, scheduler, scaler, runtime, trainable_only):
        self.path = Path(run_dir) / runfolders.RESUME_FILE
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model, optimizer, scheduler, scaler)
        self.runtime, self.trainable_only = runtime, trainable_only
        # What must not change between a run and its resumption.
        self.run_args = {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE_FLAGS}

    def rng_states(self):
        """{rng.cpu.<rank>, rng.cuda.<rank>: uint8 state}, every process's (gathered on the CPU)."""
        mine = {"cpu": torch.get_rng_state()}
        if self.runtime.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        states = {}
        for kind, state in mine.items():
            parts = [state]
            if self.runtime.world_size > 1:
                parts = [torch.empty_like(state) for _ in range(self.runtime.world_size)]
                torch.distributed.all_gather(parts, state, group=self.runtime.control_group)
            states.update({f"rng.{kind}.{rank}": part for rank, part in enumerate(parts)})
        return states

    def save(self, at, running):
        """`running`: the epoch's RunningLoss while mid-epoch, None at an epoch's end."""
        tensors = self.rng_states()
        running_state = {}
        if running is not None:
            tensors["running"] = running.totals(self.runtime.world_size)
            running_state = {"read_sums": running.read_sums, "curve": running.curve}
        if not self.runtime.is_main:
            return
        tensors.update({f"model.{k}": v
                        for k, v in weights_to_save(self.model, self.trainable_only).items()})
        tensors.update({f"opt.{k}": v for k, v in optimizer_tensors(self.optimizer).items()})
        progress = {**vars(at), "args": self.run_args, "world_size": self.runtime.world_size,
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                    "running": running_state}
        common.save_weights(self.path, tensors, metadata={"progress": json.dumps(progress)})

    def load(self):
        """Restore everything in place; returns (Progress, the epoch's running sums as
        loop.RunningLoss's arguments, or None at an epoch's end)."""
        saved, metadata = common.load_weights(self.path, with_metadata=True)
        progress = json.loads(metadata["progress"])
        changed = changed_flags(progress["args"], self.run_args)
        if changed:
            raise common.UserError(
                f"{self.path}: the run was started with other flags "
                f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())})")
        if progress.get("world_size", self.runtime.world_size) != self.runtime.world_size:
            raise common.UserError(f"{self.path}: the run was started with "
                                   f"{progress['world_size']} processes, resume it with as many "
                                   f"(each one's batches depend on it)")
        self.model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")},
                                   strict=not self.trainable_only)
        load_optimizer_tensors(self.optimizer,
                               {k[4:]: v for k, v in saved.items() if k.startswith("opt.")})
        self.scheduler.load_state_dict(progress["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            # the scheduler restores its step count, not the optimizer's current lr
            group["lr"] = lr
        if self.scaler.is_enabled() and progress.get("scaler"):
            self.scaler.load_state_dict(progress["scaler"])
        rank = self.runtime.rank
        if f"rng.cpu.{rank}" in saved:
            torch.set_rng_state(saved[f"rng.cpu.{rank}"])
        if self.runtime.device.type == "cuda" and f"rng.cuda.{rank}" in saved:
            torch.cuda.set_rng_state(saved[f"rng.cuda.{rank}"], self.runtime.device)
        at = Progress(**{f.name: progress[f.name] for f in fields(Progress) if f.name in progress})
        running = None  # mid-epoch: what loop.RunningLoss needs to go on with the epoch's sums
        if "running" in saved:
            # the sums of all processes went to rank 0's file: the others start from zero
            totals = (saved["running"] if self.runtime.is_main else
                      torch.zeros(3, dtype=torch.float64))
            running = {"totals": totals, **progress["running"]}
        if self.runtime.is_main:
            print(f"resuming {self.path.parent} at epoch {at.epoch + 1}, batch {at.batch} "
                  f"(step {at.step})")
        return at, running


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM (kill, a batch scheduler's time limit, torchrun passing either
    on) end the run at a step boundary instead of wherever they land: the handler only notes the
    signal; the loop finishes the optimizer step in flight, writes a resume point, says how to
    resume and exits with 128 + the signal's number (130, 143: the shell's convention). The same
    signal twice stops at once, without a resume point.
    Under DDP every process must stop after the same step, or the others would wait forever in the
    next step's gradient all-reduce. So the processes agree after every step, over the runtime's
    control group: a few bytes between CPUs, no wait for the GPU. (torchrun passes a signal on to
    every worker and kills them 30 s later, so a step must take less than that.)"""

    def __init__(self, runtime):
        self.runtime, self.signum, self.previous = runtime, 0, {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                # a background job ignores Ctrl-C: keep it so
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self.note)

    def note(self, signum, frame):
        if signum == self.signum:  # asked twice: stop now, as if we had never caught it
            self.close()
            signal.raise_signal(signum)
        self.signum = self.signum or signum

    def agreed(self):
        """The signal number if any process got one (after this step), else 0."""
        if self.runtime.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                     group=self.runtime.control_group)
        return int(flag)

    def exit(self, signum, at, path):
        if self.runtime.world_size > 1:
            # rank 0 has written the resume point
            torch.distributed.barrier(group=self.runtime.control_group)
        if self.runtime.is_main:
            where = (f"epoch {at.epoch + 1}, batch {at.batch}" if at.batch else
                     f"the end of epoch {at.epoch}")
            how = ("rerun the same torchrun command with --resume"
                   if self.runtime.world_size > 1 else
                   f"python {shlex.join(sys.argv)}{'' if '--resume' in sys.argv else ' --resume'}")
            print(f"\n{signal.Signals(signum).name}: stopped after step {at.step} ({where}); "
                  f"resume point {path}\nto resume: {how}", flush=True)
        raise SystemExit(128 + signum)

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
