"""quantize.py: int8 scoring by hand. The rounding keeps every value within half a step; the int8
layer equals the same maths done in float on the rounded values (and a wrong scale is caught); its
error against the float layer stays inside the bound the rounding gives; a quantized MiniLM's
sentence vectors stay those of the float one. Fresh random inputs each run; the seed is printed."""
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
import torch
import torch.nn as nn

import analyze
import bert
import common
import quantize
import serve
import train_bert
import train_lstm
import vote
from conftest import AGNEWS_DIR, NO_ROWS, needs_rows, single_thread, tiny_bert_folder
from plumbing import agnews, runfolders


def fresh_seed():
    seed = random.randrange(2 ** 31)
    torch.manual_seed(seed)
    return seed


@pytest.mark.parametrize("rows, cols", [(1, 7), (33, 384), (5, 1536)])
def test_rounding_stays_within_half_a_step_of_each_rows_range(rows, cols):
    seed = fresh_seed()
    x = torch.randn(rows, cols) * torch.rand(rows, 1) * 10     # rows of very different sizes
    x[0] = 0.0                                                  # a row of zeros
    q, scale = quantize.quantize_per_row(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= quantize.QMAX
    assert torch.equal(q[0], torch.zeros_like(q[0])), seed
    error = (q.float() * scale[:, None] - x).abs()
    assert (error <= scale[:, None] / 2 + 1e-6 * x.abs()).all(), seed
    # each nonzero row uses its whole range: its largest value lands on +-127
    assert (q[1:].abs().amax(dim=1) == quantize.QMAX).all(), seed


PRODUCTS = ["int_mm", *(["onednn"] if quantize.onednn_available() else [])]


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("shape, bias", [((4, 384), True), ((2, 9, 384), True), ((3, 1536), False)])
def test_the_int8_layer_equals_the_float_maths_on_the_rounded_values(shape, bias, product):
    """The reference: the same rounding, the product in float64 (fake quantization). The only
    difference left is the float32 rescaling of an exact integer sum. Both integer products."""
    seed = fresh_seed()
    linear = nn.Linear(shape[-1], 256, bias=bias)
    layer = quantize.Int8Linear(linear, product)
    assert layer.product == product
    x = torch.randn(shape) * 3
    got = layer(x)
    assert got.shape == (*shape[:-1], 256) and got.dtype == torch.float32
    want = quantize.linear_fake_quant(x.reshape(-1, shape[-1]), layer.weight_q,
                                      layer.weight_scale, linear.bias).reshape(got.shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_wrong_scale_is_caught_by_the_reference(product):
    """The test above can fail: a layer whose weight scales are one step off (127 -> 128, an easy
    slip) differs from the reference far beyond its tolerance."""
    seed = fresh_seed()
    linear = nn.Linear(384, 64)
    layer = quantize.Int8Linear(linear, product)
    x = torch.randn(8, 384)
    want = quantize.linear_fake_quant(x, layer.weight_q, layer.weight_scale, linear.bias)
    layer.weight_scale *= 127 / 128
    with pytest.raises(AssertionError):
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5,
                                   msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_rounding_equals_the_eager_one(dtype):
    """The compiled rounding (one loop instead of a pass per step) gives the eager numbers bit for
    bit: the same int8 values, the same scales. And it did compile (this needs a C++ compiler)."""
    seed = fresh_seed()
    x = (torch.randn(67, 384) * torch.rand(67, 1) * 10).to(dtype)
    x[3] = 0.0
    q, scale = quantize.quantize_per_row(x)
    fused_q, fused_scale = quantize.rows_to_int8(x)
    assert quantize.rows_to_int8.is_compiled(), "torch.compile fell back to eager here"
    assert torch.equal(fused_q, q) and torch.equal(fused_scale, scale), seed


@pytest.mark.parametrize("product", PRODUCTS)
def test_under_autocast_the_int8_layer_answers_in_bf16_like_a_linear(product):
    """Under bf16 autocast nn.Linear answers in bf16, so the GELU and adds after it run in bf16;
    Int8Linear does the same. Its products may round to bf16 before the row scale: the error
    against the reference stays within two bf16 roundings (2^-8 each) of |y| + |b|."""
    seed = fresh_seed()
    linear = nn.Linear(384, 96)
    layer = quantize.Int8Linear(linear, product)
    x = torch.randn(40, 384) * 3
    want = quantize.linear_fake_quant(x, layer.weight_q, layer.weight_scale, linear.bias)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        assert linear(x).dtype == got.dtype == torch.bfloat16
    bound = 2 * 2 ** -8 * (want.abs() + linear.bias.double().abs()[None, :])
    assert ((got.double() - want).abs() <= bound).all(), seed


def test_the_default_product_is_onednn_only_where_the_cpu_has_amx_int8(monkeypatch):
    """oneDNN's product is the default only on a CPU with AMX-INT8: on an AVX512-VNNI EPYC it took
    13 s for one product that torch._int_mm does in 3.4 ms. Elsewhere, and off the CPU, _int_mm."""
    linear = nn.Linear(384, 64)
    for flags, want in [({"avx512_vnni", "avx512_bf16"}, "int_mm"),
                        ({"avx512_vnni", "amx_int8", "amx_bf16"},
                         "onednn" if quantize.onednn_available() else "int_mm"),
                        (set(), "int_mm")]:
        monkeypatch.setattr(common, "cpu_flags", lambda flags=flags: flags)
        assert quantize.default_product("cpu") == want, flags
        assert quantize.Int8Linear(linear).product == want, flags
        assert quantize.default_product("cuda") == "int_mm"


def test_where_torch_compile_fails_the_rounding_runs_eager_and_says_so(monkeypatch, capsys):
    def no_compiler(function, **options):
        def broken(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return broken
    monkeypatch.setattr(torch, "compile", no_compiler)
    rounding = quantize.fused(quantize.quantize_per_row)
    # an input at fault fails eager too: its own error, and the compiler is not blamed
    with pytest.raises(IndexError):
        rounding(torch.randn(5))                       # one dimension: no rows to round
    assert capsys.readouterr().out == "" and rounding.is_compiled()
    x = torch.randn(5, 16)
    for _ in range(2):
        q, scale = rounding(x)
        want_q, want_scale = quantize.quantize_per_row(x)
        assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["quantize.py: torch.compile failed here (InvalidCxxCompiler: No working C++ "
                     "compiler found); int8 rounding runs eager: the same numbers, slower"]
    assert not rounding.is_compiled()


def test_the_int8_layer_is_within_the_rounding_bound_of_the_float_layer():
    """|y8 - y| <= sum_i (|x_i| s_w/2 + |W_i| s_x/2 + s_x s_w/4) for each output: each product
    x_i W_i moves by at most that when both are rounded half a step."""
    seed = fresh_seed()
    linear = nn.Linear(384, 128)
    layer = quantize.Int8Linear(linear)
    x = torch.randn(16, 384) * 2
    _, x_scale = quantize.quantize_per_row(x)
    s_w, s_x = layer.weight_scale[None, :], x_scale[:, None]                  # (1, out), (N, 1)
    bound = (x.abs().sum(1, keepdim=True) * s_w / 2
             + linear.weight.abs().sum(1)[None, :] * s_x / 2 + 384 * s_x * s_w / 4)
    with torch.no_grad():
        error = (layer(x) - linear(x)).abs()
    assert (error <= bound * (1 + 1e-4)).all(), seed
    assert error.max() > 0, seed   # int8 does round: the bound is not met by doing nothing


@pytest.fixture(scope="module")
def minilm():
    model_dir = common.resolve_model("minilm")
    return bert.BertModel.from_pretrained(model_dir).eval(), common.load_tokenizer(model_dir)


def test_a_quantized_minilm_keeps_its_sentence_vectors(minilm):
    """All 36 Linear layers of MiniLM's 6 layers in int8: the pooled [CLS] vectors of 64 of today's
    news keep a cosine of at least 0.99 with the float model's (measured: min 0.996, mean 0.997)."""
    encoder, tokenizer = minilm
    model = bert.BertClassifier(encoder, "pooler").eval()
    texts = list(agnews.load_cases().texts[:64])
    ids = common.encode(tokenizer, texts, 128)
    input_ids, mask = common.to_device(ids, 0, torch.device("cpu"))
    with torch.no_grad():
        float_vectors = model.features(input_ids, mask)
        quantized, swapped = quantize.quantize_encoder(model)
        int8_vectors = quantized.features(input_ids, mask)
    assert swapped == 36
    assert sum(isinstance(m, quantize.Int8Linear) for m in quantized.modules()) == 36
    assert isinstance(quantized.bert.pooler.dense, nn.Linear)    # the pooler stays float
    cosine = nn.functional.cosine_similarity(float_vectors, int8_vectors, dim=1)
    print(f"cosine: min {cosine.min():.4f}, mean {cosine.mean():.4f}")
    assert cosine.min() > 0.99


# --------------------------------------------------------------------------------------------------
# --int8 where runs are scored: vote.py, serve.py (vote.load_members), analyze.py
# --------------------------------------------------------------------------------------------------
def test_in_int8_swaps_a_berts_encoder_and_leaves_an_lstm_in_float(capsys):
    cfg = bert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64)
    model = runfolders.in_int8(bert.BertClassifier(bert.BertModel(cfg), "fc").eval(), "runs/x")
    assert sum(isinstance(m, quantize.Int8Linear) for m in model.modules()) == 6 * 2
    assert isinstance(model.classifier, nn.Linear)
    lstm = train_lstm.LSTMClassifier(vocab_size=50, embed_dim=8, hidden_size=8,
                                     arch="bilstm_attn").eval()
    assert runfolders.in_int8(lstm, "runs/lstm") is lstm
    assert not any(isinstance(m, quantize.Int8Linear) for m in lstm.modules())
    assert "runs/lstm has no BERT encoder; it scores in float" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_bert_run(tmp_path_factory):
    """A finished train_bert.py run of a 2-layer random BERT (MiniLM's vocabulary), 160 rows."""
    if AGNEWS_DIR is None:
        pytest.skip(NO_ROWS)
    folder = tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"), num_layers=2)
    run_dir = tmp_path_factory.mktemp("runs") / "bert_fc"
    with single_thread():
        train_bert.main(["--model", str(folder), "--head", "fc", "--train-size", "160",
                         "--val-size", "40", "--test-size", "80", "--epochs", "1",
                         "--max-len", "32", "--lr", "1e-3", "--device", "cpu",
                         "--data", str(AGNEWS_DIR), "--out", str(run_dir)])
    return run_dir


@needs_rows
def test_int8_scores_texts_and_todays_news_and_writes_nothing(tiny_bert_run, capsys):
    """vote.py --text --int8 gives a verdict per text; analyze.py --score-cases --int8 prints the
    int8 scores beside the saved float ones and leaves the run folder byte for byte as it was."""
    before = {p.name: p.read_bytes() for p in tiny_bert_run.iterdir() if p.is_file()}
    vote.main(["--runs", str(tiny_bert_run), "--text", "Stocks fell as oil prices rose",
               "--int8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "Stocks fell" in out
    analyze.main(["--score-cases", str(tiny_bert_run), "--int8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "today's news in int8: macro F1" in out and "saved (float):" in out
    assert "nothing written" in out
    after = {p.name: p.read_bytes() for p in tiny_bert_run.iterdir() if p.is_file()}
    assert after == before


@needs_rows
def test_serve_in_int8_gives_the_same_verdicts_from_threads_at_once(tiny_bert_run, capsys):
    """serve.py --int8: its verdicts take no lock, so the int8 layers run in several threads at
    once, with nothing compiled yet (torch.compile's tracer is not thread-safe: quantize.fused
    takes one call at a time); each answer equals the one given alone, and nothing fell back."""
    lab = serve.Lab([tiny_bert_run], "cpu", int8=True)
    assert any(isinstance(m, quantize.Int8Linear) for m in lab.members[0][1].modules())
    headlines = ["Stocks fell as oil prices rose", "Nadal wins the final in Paris",
                 "New chip doubles battery life of phones"]
    alone = {text: lab.classify(text) for text in headlines}
    torch._dynamo.reset()                              # cold again: the threads compile
    answers = []
    threads = [threading.Thread(target=lambda text=text: answers.append((text, lab.classify(text))))
               for text in headlines * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 9
    for text, answer in answers:
        assert answer == alone[text], text
    assert "torch.compile failed" not in capsys.readouterr().out
    assert quantize.rows_to_int8.is_compiled() and quantize.rescale.is_compiled()


@needs_rows
def test_int8_where_it_cannot_apply_is_one_line(tiny_bert_run):
    with pytest.raises(common.UserError, match="--int8 scores texts"):
        vote.main(["--runs", str(tiny_bert_run), "--int8"])
    with pytest.raises(common.UserError, match="integrated gradients"):
        analyze.main(["--run", str(tiny_bert_run), "--attribution", "--int8"])


@needs_rows
def test_the_bench_prints_its_table_and_the_breakdown_and_draws_them(tmp_path):
    root = Path(__file__).resolve().parents[1]
    figure = tmp_path / "int8.png"
    result = subprocess.run([sys.executable, str(root / "bench" / "bench_quantize.py"),
                             "--rows", "8", "--rounds", "1", "--breakdown", "--out", str(figure)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "AGNEWS_DIR": str(AGNEWS_DIR)})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    ways = 5 if quantize.default_product("cpu") == "onednn" else 4  # a bar each, 0.5 inch
    inches = (common.WIDE, 1.5 + 0.5 * ways)
    assert Image.open(figure).size == tuple(int(side * common.DPI) for side in inches)
    assert out.startswith("CPU: ") and "int8/bf16 instructions:" in out
    ours = f"ours int8 ({quantize.default_product('cpu')})"
    for way in ("fp32", "bf16", "ours int8 (int_mm)", ours, "torch dynamic int8"):
        assert re.search(rf"\| {re.escape(way)} \| \d+\.\d \| \d\.\d\dx \| ", out), way
    assert f"| seconds (self CPU, profiled) | bf16 | {ours} |" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for group in ("products", "copies", "rounding + rescaling", "the rest", "total"):
        assert re.fullmatch(rf"\| {re.escape(group)} \| \d+\.\d\d \| \d+\.\d\d \|",
                            rows[group]), group


def test_the_products_bench_times_each_product_alone():
    """--products: one product in each way, in milliseconds and against bf16; both integer
    products wherever torch has them (oneDNN's too, default or not)."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "bench" / "bench_quantize.py"),
                             "--products", "64", "384", "96"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| [^-(]", line)]
    names = ["fp32", "bf16", "torch._int_mm",
             *(["oneDNN qlinear"] if quantize.onednn_available() else [])]
    assert [line.split("|")[1].strip() for line in rows] == names
    for line in rows:
        assert re.fullmatch(r"\| .+ \| \d+\.\d\d \| \d+\.\d\dx \|", line), line
    assert "| bf16 |" in result.stdout and "| 1.00x |" in result.stdout


@needs_rows
def test_the_latency_bench_puts_int8_beside_bf16(tiny_bert_run):
    """bench_serve_latency.py --int8 measures serve.py, then serve.py --int8, and ends with both
    servers' figures side by side, each in whole milliseconds."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "bench" / "bench_serve_latency.py"),
                             "--runs", str(tiny_bert_run), "--int8", "--requests", "3",
                             "--explanations", "1", "--pause", "0", "--text", "Stocks fell"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "AGNEWS_DIR": str(AGNEWS_DIR)})
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| serve.py")]
    assert [line.split("|")[1].strip() for line in table] == ["serve.py", "serve.py --int8"]
    for line in table:
        assert re.fullmatch(r"\| serve\.py( --int8)? \|( \d+ ms \|){4}", line), line
