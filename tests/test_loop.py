"""The training loop's machinery (loop.py, resume.py, awp.py): the device-side running loss,
resume points inside an epoch (SIGKILL, SIGTERM), two processes under torchrun against one with
--grad-accum 2, adversarial weight perturbation, --precision and --compile. Tiny random BERTs and
LSTMs on real rows: what is checked is the machinery, not what the models learn."""
import argparse
import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import awp
import bert
import common
import dropout as cheap_dropout
import loop
import plain_loop
import resume
import train_lora
import train_lstm
from plumbing import run, runfolders
from conftest import AGNEWS_DIR, made_up_rows, needs_rows, save_bert_folder

ROOT = Path(__file__).resolve().parents[1]
# the reference: fp32 whatever the CPU has
CPU = common.Runtime(torch.device("cpu"), precision="fp32")
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)


def tiny_classifier(dropout=0.0, head="fc", layers=2):
    """A random 2-layer BERT of width 32 with MiniLM's vocabulary: a step takes milliseconds. With
    dropout.py's masks swapped in, as every run's model (plumbing/classifiers.py)."""
    torch.manual_seed(0)
    cfg = bert.BertConfig(**{**TINY, "num_hidden_layers": layers}, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout)
    model = bert.BertClassifier(bert.BertModel(cfg), head=head, dropout=dropout)
    return cheap_dropout.use_cheap_dropout(model)


def loop_args(**overrides):
    parser = run.add_common_args(argparse.ArgumentParser(), lr=1e-3, epochs=1)
    args = parser.parse_args([])
    for key, value in {"batch_size": 16, "max_len": 32, "device": "cpu", **overrides}.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def sample():
    """160 training rows (10 batches of 16) of random MiniLM token ids, 4 to 32 per row: the loop's
    maths does not care what the ids mean, and these need no AG News rows."""
    return {"train": made_up_rows(160, seed=0), "val": made_up_rows(40, seed=1),
            "test": made_up_rows(40, seed=2)}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """The tiny BERT as a --model DIR folder: config.json, model.safetensors under HuggingFace's key
    names, MiniLM's vocab.txt. Dropout 0.1, so a resumed run must also continue the RNG exactly."""
    return save_bert_folder(tiny_classifier(dropout=0.1).bert, tmp_path_factory.mktemp("tiny_bert"))


def bert_command(model_dir, run_dir, *extra):
    """train_bert.py on the tiny BERT: 2 epochs of 60 batches of 8."""
    return [sys.executable, str(ROOT / "train_bert.py"), "--model", str(model_dir), "--head", "fc",
            "--train-size", "480", "--val-size", "40", "--test-size", "80", "--epochs", "2",
            "--batch-size", "8", "--max-len", "32", "--lr", "1e-3", "--device", "cpu",
            "--data", str(AGNEWS_DIR), "--out", str(run_dir), *extra]


@pytest.fixture(scope="module")
def whole_run(tiny_bert, tmp_path_factory):
    """The uninterrupted run the interrupted ones must end equal to (it writes no mid-epoch
    points)."""
    run_dir = tmp_path_factory.mktemp("runs") / "whole"
    subprocess.run(bert_command(tiny_bert, run_dir), check=True, capture_output=True, cwd=ROOT)
    return run_dir


def read_progress(path):
    """The resume point's progress metadata, or None while there is none. Read from the safetensors
    header through one open file: safe_open(..., "pt") opens the path twice (torch maps it again by
    name), and a resume point replaced between the two reads as a size mismatch though both are
    whole."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        return json.loads(header["__metadata__"]["progress"])
    except (OSError, ValueError, KeyError):
        return None


def wait_for_resume_point(process, run_dir, epoch):
    """Wait until the run has written a resume point inside epoch `epoch` (0-based); its
    progress."""
    while process.poll() is None:
        progress = read_progress(run_dir / runfolders.RESUME_FILE)
        if progress is not None and progress["epoch"] == epoch and progress["batch"] > 0:
            return progress
        time.sleep(0.01)
    pytest.fail(f"the run ended before it wrote a resume point inside epoch {epoch + 1}")


def assert_same_run(expected_dir, run_dir):
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (expected_dir, run_dir))
    for a, b in zip(expected["history"], got["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert np.allclose(a["train_loss_steps"], b["train_loss_steps"], rtol=0, atol=1e-6)
    assert np.abs(np.load(expected_dir / "test_probs.npy")
                  - np.load(run_dir / "test_probs.npy")).max() < 1e-6


# --------------------------------------------------------------------------------------------------
# The running loss: summed on the device, read every --log-every steps
# --------------------------------------------------------------------------------------------------
def largest_difference(model_a, model_b):
    b = model_b.state_dict()
    return max(float((value - b[name]).abs().max()) for name, value in model_a.state_dict().items())


def test_train_with_every_option_off_is_train_plain(sample, tmp_path):
    """train() (fp32, no accumulation, no AWP, no resume, one process) and train_plain() on the same
    rows and seed end at the same weights, to 1e-6, after 2 epochs of 10 steps with dropout on, so
    both also draw the same dropout masks. The tolerance can tell: the same plain loop at a learning
    rate 1% higher ends more than 100x the tolerance away."""
    args = loop_args(epochs=2, lr=1e-3, log_every=3)
    plain, full = tiny_classifier(dropout=0.1), tiny_classifier(dropout=0.1)
    start = tiny_classifier(dropout=0.1)
    plain_history = plain_loop.train_plain(plain, sample, args, CPU)
    history = loop.train(full, sample, args, CPU, tmp_path)
    assert largest_difference(plain, start) > 1e-3  # both loops did train
    assert largest_difference(plain, full) <= 1e-6
    for plain_val, record in zip(plain_history, history, strict=True):
        assert plain_val["macro_f1"] == pytest.approx(record["val_macro_f1"], abs=1e-9)
        assert plain_val["loss"] == pytest.approx(record["val_loss"], abs=1e-6)
    nudged = tiny_classifier(dropout=0.1)
    plain_loop.train_plain(nudged, sample, loop_args(epochs=2, lr=1.01e-3), CPU)
    assert largest_difference(plain, nudged) > 1e-4


def test_fused_adamw_on_the_cpu_takes_the_steps_of_the_unfused_one(sample):
    """make_optimizer fuses AdamW on the CPU too; 20 steps of it on a tiny BERT end where the
    default foreach AdamW on the same groups ends, to 1e-6 (measured 2.4e-7), but for the key
    biases: their gradient is zero in exact arithmetic (see the compile test below), so AdamW turns
    the two kernels' different rounding into steps of a full lr there (measured 2e-4)."""
    fused_model, foreach_model = tiny_classifier(dropout=0.0), tiny_classifier(dropout=0.0)
    fused = loop.make_optimizer(fused_model, lr=1e-3, weight_decay=0.01)
    assert fused.defaults["fused"]
    twin = dict(foreach_model.named_parameters())
    name_of = {p: name for name, p in fused_model.named_parameters()}
    groups = [{"params": [twin[name_of[p]] for p in group["params"]],
               "weight_decay": group["weight_decay"]} for group in fused.param_groups]
    foreach = torch.optim.AdamW(groups, lr=1e-3, foreach=True, fused=False)
    input_ids, mask, labels = batch_of(sample["train"])
    for _ in range(20):
        for model, optimizer in ((fused_model, fused), (foreach_model, foreach)):
            F.cross_entropy(model(input_ids, mask), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert largest_difference(fused_model, tiny_classifier(dropout=0.0)) > 1e-3  # it moved
    reference = foreach_model.state_dict()
    for name, value in fused_model.state_dict().items():
        if not name.endswith("attn.key.bias"):
            assert torch.allclose(value, reference[name], rtol=0, atol=1e-6), name


def test_running_loss_sums_what_a_plain_loop_would():
    gen = torch.Generator().manual_seed(0)
    running = loop.RunningLoss(torch.device("cpu"))
    loss_sum, correct, rows, last, curve = 0.0, 0, 0, (0.0, 0), []
    for step, size in enumerate([8, 8, 5, 8, 3, 8, 7], 1):
        logits, labels = (torch.randn(size, 4, generator=gen),
                          torch.randint(0, 4, (size,), generator=gen))
        loss = F.cross_entropy(logits, labels)
        running.add(loss, logits, labels)
        loss_sum += loss.item() * size
        correct += int((logits.argmax(1) == labels).sum())
        rows += size
        if step % 3 == 0 or step == 7:
            assert running.read(step, 1) == pytest.approx((loss_sum / rows, correct / rows),
                                                          abs=1e-12)
            curve.append([step, (loss_sum - last[0]) / (rows - last[1])])
            last = (loss_sum, rows)
    assert np.allclose(running.curve, curve, rtol=0, atol=1e-12)


def test_train_loss_in_history_is_the_loss_of_the_training_rows(sample, tmp_path):
    """lr 0 and dropout 0: the model never changes, so the loss and accuracy the loop summed over an
    epoch must be those of predict() on the training rows. The curve's points, weighted by their
    rows, average to the same loss."""
    model = tiny_classifier()
    [record] = loop.train(model, sample, loop_args(lr=0.0, log_every=3), CPU, tmp_path)
    reference = common.evaluate(common.predict(model, sample["train"], CPU), sample["train"].labels)
    assert record["train_loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert record["train_accuracy"] == pytest.approx(reference["accuracy"], abs=1e-9)
    steps, means = zip(*record["train_loss_steps"])
    assert steps == (3, 6, 9, 10)  # every 3 steps and the epoch's tail
    assert np.dot(means, [48, 48, 48, 16]) / 160 == pytest.approx(record["train_loss"], abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Resume points inside an epoch
# --------------------------------------------------------------------------------------------------
@needs_rows
def test_stopped_by_sigterm_then_killed_mid_epoch_and_resumed_twice_ends_like_an_uninterrupted_run(
        tiny_bert, whole_run, tmp_path):
    """SIGTERM inside epoch 1: the run finishes its step, writes a resume point, prints how to
    resume and exits 143. The printed command resumes it; SIGKILL inside epoch 2, as soon as a
    resume point there exists (--save-every, which may change between sessions); resumed again, the
    run skips the batches done, continues the RNG (dropout 0.1), and ends where the whole run
    ended."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(bert_command(tiny_bert, run_dir, "--save-every", "3"), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_resume_point(process, run_dir, epoch=0)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    progress = read_progress(run_dir / runfolders.RESUME_FILE)
    assert progress["epoch"] == 0 and 0 < progress["batch"] < 60
    assert (f"SIGTERM: stopped after step {progress['step']} "
            f"(epoch 1, batch {progress['batch']})" in out)
    assert common.load_weights(run_dir / runfolders.RESUME_FILE)["rng.cpu.0"].dtype == torch.uint8
    [how] = [line for line in out.splitlines() if line.startswith("to resume: ")]
    command = shlex.split(how.removeprefix("to resume: "))
    assert (command[0] == "python"
            and command[1:-1] == bert_command(tiny_bert, run_dir, "--save-every", "3")[1:])
    assert command[-1] == "--resume"

    # --save-every may change
    command = [sys.executable, *command[1:-3], "--save-every", "2", "--resume"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    seen = wait_for_resume_point(process, run_dir, epoch=1)
    process.kill()
    out, _ = process.communicate()
    assert f"resuming {run_dir} at epoch 1, batch {progress['batch']}" in out
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    assert seen["step"] % 2 == 0 and 0 < seen["batch"] < 60

    resumed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "at epoch 2, batch" in resumed.stdout
    assert_same_run(whole_run, run_dir)


def test_a_signal_is_noted_once_and_the_same_signal_twice_stops_at_once():
    """The first Ctrl-C is only noted (the loop stops at the next step boundary); another signal in
    between (torchrun passing SIGTERM on) changes nothing; a second Ctrl-C raises KeyboardInterrupt
    at once, with Python's own handler back in place."""
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    # A job started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored, and
    # StopSignal rightly leaves it so; this test is about a foreground run, so it is one.
    sigint_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = resume.StopSignal(CPU)
    try:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.agreed() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        stop.close()
        signal.signal(signal.SIGINT, sigint_handler)
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler


# --------------------------------------------------------------------------------------------------
# DDP: two processes under torchrun = one process with --grad-accum 2
# --------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_rows
def test_two_processes_under_torchrun_equal_one_with_grad_accum_2_and_only_rank_0_writes(tmp_path):
    """256 rows in batches of 16: 16 full batches. Rank r takes batches r, r+2, ...; one process
    with --grad-accum 2 steps on the same pairs (0,1), (2,3), ...; DDP averages the two gradients
    where the one process halves each loss. Dropout 0, so the weights must agree (to 1e-5), and so
    must the history (the running loss is summed over the processes) and the scores."""
    flags = ["--arch", "bilstm_attn", "--train-size", "256", "--val-size", "40",
             "--test-size", "40", "--epochs", "2", "--batch-size", "16", "--embed-dim", "16",
             "--hidden-size", "16", "--max-len", "32", "--dropout", "0", "--lr", "1e-2",
             "--device", "cpu", "--data", str(AGNEWS_DIR), "--save-every", "3",
             # to 1e-5: bf16 rounding would differ between the two sums of gradients
             "--precision", "fp32"]
    logs = tmp_path / "logs"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", "--redirects", "3", "--log-dir", str(logs),
                    str(ROOT / "train_lstm.py"), *flags, "--out", str(tmp_path / "ddp")],
                   check=True, capture_output=True, cwd=ROOT)
    subprocess.run([sys.executable, str(ROOT / "train_lstm.py"), *flags, "--grad-accum", "2",
                    "--out", str(tmp_path / "one")], check=True, capture_output=True, cwd=ROOT)

    ddp, one = (common.load_weights(tmp_path / d / "model.safetensors") for d in ("ddp", "one"))
    assert ddp.keys() == one.keys()
    for name in one:
        assert torch.allclose(ddp[name], one[name], rtol=0, atol=1e-5), name
    initial = train_lstm.build_model(json.loads((tmp_path / "one" / "config.json").read_text()))
    # it trained
    assert not torch.allclose(initial.classifier.weight, one["classifier.weight"], atol=1e-3)
    assert_same_run(tmp_path / "one", tmp_path / "ddp")
    assert (sorted(p.name for p in (tmp_path / "ddp").iterdir())
            == sorted(p.name for p in (tmp_path / "one").iterdir()))
    [rank0] = logs.glob("*/attempt_0/0/stdout.log")
    [rank1] = logs.glob("*/attempt_0/1/stdout.log")
    assert "saved" in rank0.read_text() and "epoch 2:" in rank0.read_text()
    # rank 1 prints nothing (and writes nothing: see the folder above)
    assert rank1.read_text() == ""


# --------------------------------------------------------------------------------------------------
# AWP
# --------------------------------------------------------------------------------------------------
def batch_of(data, rows=16):
    input_ids, mask = common.to_device(data.ids[:rows], 0, torch.device("cpu"))
    return input_ids, mask, torch.from_numpy(data.labels[:rows])


def test_awp_moves_matrices_up_the_loss_within_the_box_and_puts_every_weight_back_bit_for_bit(
        sample):
    model = tiny_classifier()
    input_ids, mask, labels = batch_of(sample["train"])
    perturber = awp.AWP(model, lr=1.0, eps=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    matrices = {n for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}
    assert "bert.pooler.dense.weight" not in matrices  # the fc head leaves the pooler frozen
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        clean = F.cross_entropy(model(input_ids, mask), labels)
        clean.backward()
        clean_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with perturber.perturbed():
            moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
            assert moved == matrices
            for n in moved:
                p = dict(model.named_parameters())[n]
                # (1e-4: rounding)
                assert ((p - before[n]).abs() <= 1e-2 * (1 + 1e-4) * before[n].abs()).all(), n
            adversarial = F.cross_entropy(model(input_ids, mask), labels)
            assert adversarial.item() > clean.item()
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            grads = torch.autograd.grad(adversarial, list(trainable.values()), retain_graph=True)
            expected = dict(zip(trainable, grads))
            adversarial.backward()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), f"{n} not restored bit for bit"
            if p.requires_grad:
                assert torch.allclose(p.grad, clean_grads[n] + expected[n],
                                      atol=1e-6), f"{n}: the gradients do not add"
        optimizer.step()
        optimizer.zero_grad()


def test_awp_under_lora_moves_only_the_trainable_weights(sample):
    model = train_lora.inject_lora(tiny_classifier(head="pooler"), ["query", "value"], r=4, alpha=8,
                                   dropout=0.0)
    input_ids, mask, labels = batch_of(sample["train"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(input_ids, mask), labels).backward()
    optimizer.step()  # B starts at 0, and a box of eps * |0| holds it there: one step first
    optimizer.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(input_ids, mask), labels).backward()
    with awp.AWP(model, lr=1.0, eps=1e-2).perturbed():
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}
    assert moved == expected and all("lora_" in n or n == "classifier.weight" for n in moved)
    assert len(moved) == 2 * 2 * 2 + 1  # A and B of query and value in 2 layers, and the classifier
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_awp_run_stopped_mid_epoch_resumes_exactly(sample, tmp_path, capsys):
    """In-process: a forward hook sends SIGTERM to this very process at the 13th training forward
    (the 7th batch, AWP making two forwards a batch), mid-epoch 1; the loop finishes the step,
    writes the resume point and exits 143. Resumed, it ends with the history and weights of a whole
    run."""
    args = loop_args(epochs=2, batch_size=16, awp=True, awp_eps=1e-2, log_every=2)
    whole = tiny_classifier(dropout=0.1)
    initial = {k: v.clone() for k, v in whole.state_dict().items()}
    expected = loop.train(whole, sample, args, CPU, tmp_path / "whole")

    stopped = tiny_classifier(dropout=0.1)
    calls = []

    def send_sigterm(module, inputs, output):
        calls.append(1) if module.training else None
        if len(calls) == 13 and module.training:
            signal.raise_signal(signal.SIGTERM)
    hook = stopped.register_forward_hook(send_sigterm)
    with pytest.raises(SystemExit) as stop:
        loop.train(stopped, sample, args, CPU, tmp_path / "stopped")
    hook.remove()
    assert stop.value.code == 143
    assert "SIGTERM: stopped after step 7 (epoch 1, batch 7)" in capsys.readouterr().out
    assert read_progress(tmp_path / "stopped" / runfolders.RESUME_FILE)["batch"] == 7

    resumed = tiny_classifier(dropout=0.1)
    resumed.load_state_dict(initial)
    history = loop.train(resumed, sample, loop_args(**{**vars(args), "resume": True}), CPU,
                         tmp_path / "stopped")
    for a, b in zip(expected, history, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_macro_f1"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert np.allclose(a["train_loss_steps"], b["train_loss_steps"], rtol=0, atol=1e-6)
    for name, value in whole.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], rtol=0, atol=1e-6), name


# --------------------------------------------------------------------------------------------------
# --precision and --compile
# --------------------------------------------------------------------------------------------------
def test_the_cpu_is_read_from_its_first_core_and_unknown_where_linux_says_nothing(tmp_path,
                                                                                  monkeypatch):
    """What chooses bf16 (cpu_has_bf16) and the int8 product (quantize.default_product), and what
    every benchmark prints as its machine."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz \n"
                       "flags\t\t: fpu avx512_bf16 amx_int8\n\n"
                       "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert common.cpu_info("model name", cpuinfo) == "Some CPU @ 2.0GHz"
    assert set(common.cpu_info("flags", cpuinfo).split()) == {"fpu", "avx512_bf16", "amx_int8"}
    assert common.cpu_info("bogomips", cpuinfo) == ""
    assert common.cpu_info("flags", tmp_path / "no_such_file") == ""
    read = common.cpu_info
    monkeypatch.setattr(common, "cpu_info", lambda field: read(field, cpuinfo))
    assert common.cpu_has_bf16() and common.cpu_name() == "Some CPU @ 2.0GHz"
    monkeypatch.setattr(common, "cpu_info", lambda field: read(field, tmp_path / "no_such_file"))
    assert not common.cpu_has_bf16() and common.cpu_name() == "unknown CPU"


def test_bf16_on_the_cpu_trains_and_scores(sample, tmp_path):
    bf16 = common.setup_runtime("cpu", "bf16")
    assert (bf16.amp_dtype == torch.bfloat16
            and common.setup_runtime("cpu", "fp32").amp_dtype is None)
    auto = common.setup_runtime("cpu").precision  # auto: bf16 where the CPU has bf16 instructions
    assert auto == ("bf16" if common.cpu_has_bf16() else "fp32")
    model = tiny_classifier()
    [record] = loop.train(model, sample, loop_args(precision="bf16"), bf16, tmp_path)
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"])
    probs, fp32_probs = (common.predict(model, sample["test"], bf16),
                         common.predict(model, sample["test"], CPU))
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)
    difference = np.abs(probs - fp32_probs).max()
    assert 1e-5 < difference < 0.05, (f"bf16 vs fp32 probabilities differ by {difference}: "
                                      "is autocast on?")


def test_fp16_on_the_cpu_refuses_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        common.run_main(lambda: train_lstm.main(["--precision", "fp16", "--device", "cpu",
                                                 "--out", str(tmp_path / "r")]))
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --precision fp16 needs a CUDA GPU (on the CPU use bf16 or fp32)"]
    assert not (tmp_path / "r").exists()


def test_compiled_training_gives_the_eager_losses_and_weights(sample, tmp_path):
    """torch.compile (inductor, C++ on the CPU) of a 1-layer tiny BERT, rows padded to --max-len so
    one graph serves every batch. Kernels fuse and round differently: losses equal to 1e-5 (measured
    1e-8), weights to 1e-4 (measured 2e-5) after 10 steps."""
    args = loop_args(pad_to_max=True, lr=1e-3)
    eager, compiled = tiny_classifier(layers=1), tiny_classifier(layers=1)
    [expected] = loop.train(eager, sample, args, CPU, tmp_path / "eager")
    [record] = loop.train(compiled, sample, loop_args(**{**vars(args), "compile": True}), CPU,
                          tmp_path / "compiled")
    assert record["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)
    assert np.allclose(record["train_loss_steps"], expected["train_loss_steps"], rtol=0, atol=1e-5)
    saved = common.load_weights(tmp_path / "compiled" / "model.safetensors")
    assert saved.keys() == eager.state_dict().keys()  # the plain module is what gets saved
    for name, value in eager.state_dict().items():
        # Left out: the key bias, whose gradient is zero in exact arithmetic (it adds the same q.b
        # to every score of a query, which softmax ignores), so only rounding noise drives it, and
        # AdamW, dividing by that noise's own size, turns any noise into steps of a full lr.
        if not name.endswith("attn.key.bias"):
            assert torch.allclose(saved[name], value, rtol=0, atol=1e-4), name
    assert not torch.equal(saved["classifier.weight"], tiny_classifier(layers=1).classifier.weight)


# Run under torchrun by the test below: the tiny BERT, made-up rows, --grad-accum 2, and a DDP
# communication hook that counts the backward passes whose gradients are all-reduced.
NO_SYNC_CHILD = """
import json, os, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import common, loop, test_loop
from conftest import made_up_rows

synced = []
def count_reductions(state, bucket):
    if bucket.index() == 0:          # one per backward pass that talks (bucket 0 always goes)
        synced.append(1)
    return default_hooks.allreduce_hook(state, bucket)

wrap = loop.model_for_training
def wrapped(model, runtime, compile=False):
    step_model = wrap(model, runtime, compile)
    step_model.register_comm_hook(None, count_reductions)
    return step_model
loop.model_for_training = wrapped

def main():
    runtime = common.setup_runtime("cpu", "fp32")
    data = {"train": made_up_rows(160, seed=0), "val": made_up_rows(40, seed=1)}
    args = test_loop.loop_args(grad_accum=int(sys.argv[3]), epochs=1)
    loop.train(test_loop.tiny_classifier(), data, args, runtime, sys.argv[2])

common.run_main(main)   # as every script: it leaves the process group once main() returns
if os.environ["RANK"] == "0":
    print(json.dumps({"synced": len(synced),
                      "group_left": not torch.distributed.is_initialized()}))
"""


def test_gradient_accumulation_under_ddp_all_reduces_once_a_step(tmp_path):
    """Two processes, 160 made-up rows in batches of 16: each rank takes 5 batches an epoch. With
    --grad-accum 2 that is 3 optimizer steps (2 + 2 + 1 batches), and only the backward pass of
    each step's last batch may all-reduce: 3, not 5 (DDP's no_sync, loop.gradients_reduced). With
    --grad-accum 1 every one of the 5 does. No AG News rows needed. And common.run_main leaves the
    process group once the work is done (common.leave_process_group)."""
    child = tmp_path / "child.py"
    child.write_text(NO_SYNC_CHILD)
    counts = {}
    for accum in (1, 2):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", str(child), str(ROOT),
                               str(tmp_path / f"run{accum}"), str(accum)],
                              capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        counts[accum] = report["synced"]
        # left by run_main: exiting with gloo's threads alive can abort a finished run (SIGABRT)
        assert report["group_left"]
    assert counts == {1: 5, 2: 3}, counts
