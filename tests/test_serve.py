"""serve.py: the page for your own cases. Its answers equal vote.py's and shapley.py's on the same
text; bad requests get a 4xx with one line and the server keeps answering; and, in a real headless
Chromium where one is installed, typing a headline shows every run's verdict and coloured words."""
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import serve
import train_lstm
import vote
from conftest import AGNEWS_DIR, NO_ROWS, TINY_LSTM_ARGS, single_thread

HEADLINE = "Nadal wins the French Open final in Paris"


@pytest.fixture(scope="module")
def two_runs(tiny_lstm_run, tmp_path_factory):
    """Two tiny trained runs: the shared BiLSTM+attention and an LSTM trained here (seconds)."""
    lstm = tmp_path_factory.mktemp("runs") / "lstm"
    args = [a if a != "bilstm_attn" else "lstm" for a in TINY_LSTM_ARGS]
    with single_thread():
        train_lstm.main([*args, "--data", str(AGNEWS_DIR), "--out", str(lstm)])
    return [tiny_lstm_run, lstm]


@pytest.fixture(scope="module")
def server(two_runs, tmp_path_factory):
    """serve.py's handler on a free port of 127.0.0.1, in a thread; yields (host, port, lab)."""
    if AGNEWS_DIR is None:
        pytest.skip(NO_ROWS)
    cases = tmp_path_factory.mktemp("cases") / "cases.csv"
    cases.write_text("label,text\nSports,Nadal wins in Paris\n"
                     "Business,Oil prices climb as OPEC cuts output\n")
    serve.Handler.lab = serve.Lab(two_runs, "cpu", cases=cases)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), serve.Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[0], httpd.server_address[1], serve.Handler.lab
    httpd.shutdown()
    httpd.server_close()


def request(server, method, path, body=None, raw=None):
    """(status, JSON answer) of one request; raw: the body's bytes as they are."""
    host, port, _ = server
    connection = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data,
                       headers={"Content-Type": "application/json"} if data is not None else {})
    response = connection.getresponse()
    content = response.read()
    connection.close()
    return response.status, (json.loads(content) if "json" in response.getheader("Content-Type")
                             else content.decode())


def test_verdicts_equal_vote_py_on_the_same_text(server, two_runs):
    status, answer = request(server, "POST", "/api/classify", {"text": HEADLINE})
    assert status == 200
    runtime = common.Runtime(torch.device("cpu"))
    member_probs = vote.classify(vote.load_members(two_runs, "cpu"), [HEADLINE], runtime)
    weights, how = vote.choose_weights(vote.build_parser().parse_args([]), two_runs)
    ensemble = vote.ensemble_probs(member_probs, weights)
    assert [run["name"] for run in answer["runs"]] == vote.display_names(two_runs)
    for run, probs, weight in zip(answer["runs"], member_probs, weights):
        np.testing.assert_allclose(run["probs"], probs[0], rtol=0, atol=1e-5)
        assert run["weight"] == pytest.approx(weight, abs=1e-9)
    np.testing.assert_allclose(answer["vote"]["probs"], ensemble[0], rtol=0, atol=1e-5)
    assert answer["vote"]["weights_from"] == how


def test_words_add_up_and_the_contrast_explains_both_texts(server):
    status, words = request(server, "POST", "/api/explain", {"text": HEADLINE, "run": 1})
    assert status == 200
    assert len(words["words"]) == len(HEADLINE.split()) and words["words"][1] == "wins"
    assert sum(words["values"]) == pytest.approx(words["f_text"] - words["f_empty"], abs=1e-4)
    status, contrast = request(server, "POST", "/api/contrast",
                               {"text": HEADLINE, "text_b": "Oil prices climb as OPEC cuts output",
                                "run": 0})
    assert status == 200
    assert -1 <= contrast["cosine"] <= 1 and len(set(contrast["classes"])) == 2
    for text in contrast["texts"]:
        assert sum(text["values"]) == pytest.approx(text["f_text"] - text["f_empty"], abs=1e-4)


def test_the_cases_file_lists_the_votes_errors_first(server):
    status, table = request(server, "GET", "/api/cases")
    assert status == 200 and len(table["cases"]) == 2
    wrong = [row["vote"] != row["label"] for row in table["cases"]]
    assert wrong == sorted(wrong, reverse=True)


@pytest.mark.parametrize("method, path, body, raw, status, message", [
    ("POST", "/api/classify", {"text": "   "}, None, 400, "text: empty text"),
    ("POST", "/api/classify", {"text": "word " * 20_000}, None, 413, "at most 65,536"),
    ("POST", "/api/classify", {"text": "word " * 1_000}, None, 400, "5,000 characters; at most"),
    ("POST", "/api/classify", None, b"\xff\xfe{}", 400, "not UTF-8"),
    ("POST", "/api/classify", None, b"{text: 1", 400, "not JSON"),
    ("POST", "/api/classify", ["a", "list"], None, 400, "expected a JSON object"),
    ("POST", "/api/classify", {"txt": "typo"}, None, 400, "text: expected a text"),
    ("POST", "/api/explain", {"text": HEADLINE, "run": 7}, None, 400, "run: expected"),
    ("POST", "/api/delete", {"text": HEADLINE}, None, 404, "no such API"),
    ("GET", "/../serve.py", None, None, 404, "no such page"),
    ("GET", "/web/page.html", None, None, 404, "no such page"),
])
def test_bad_requests_get_one_line_and_the_server_keeps_answering(server, method, path, body,
                                                                  raw, status, message):
    got, answer = request(server, method, path, body, raw)
    assert got == status and message in answer["error"] and "\n" not in answer["error"]
    assert request(server, "POST", "/api/classify", {"text": HEADLINE})[0] == 200


def test_the_page_is_served_and_names_only_its_own_api(server):
    status, page = request(server, "GET", "/")
    assert status == 200 and "<textarea id=\"text\"" in page
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere


def browser():
    """Headless Chromium as web/screenshot.py starts it, or a skip saying what is missing."""
    from web.screenshot import headless_chromium
    try:
        return headless_chromium()
    except RuntimeError as err:
        pytest.skip(str(err))


def test_a_headline_typed_in_a_real_browser_shows_every_verdict_and_its_words(server):
    from selenium.webdriver.support.ui import WebDriverWait
    page = browser()
    try:
        page.get(f"http://{server[0]}:{server[1]}/")
        wait = WebDriverWait(page, 60)
        wait.until(lambda p: p.find_elements("css selector", "#run option"))
        page.find_element("id", "text").send_keys(HEADLINE)
        page.find_element("id", "classify").click()
        wait.until(lambda p: len(p.find_elements("css selector", "tr.run")) == 3)
        shown = [row.find_element("css selector", ".verdict").text
                 for row in page.find_elements("css selector", "tr.run")]
        _, answer = request(server, "POST", "/api/classify", {"text": HEADLINE})
        for text, probs in zip(shown, [run["probs"] for run in answer["runs"]]
                               + [answer["vote"]["probs"]]):
            top = int(np.argmax(probs))
            assert text == f"{common.CLASS_NAMES[top]} {probs[top]:.3f}"

        page.find_element("id", "explain").click()
        wait.until(lambda p: p.find_elements("css selector", "#words span.word"))
        spans = page.find_elements("css selector", "#words span.word")
        _, words = request(server, "POST", "/api/explain", {"text": HEADLINE, "run": 0})
        assert [span.text for span in spans] == words["words"]
        assert [float(span.get_attribute("data-value")) for span in spans] == pytest.approx(
            words["values"], abs=1e-9)

        page.find_element("id", "text").clear()
        page.find_element("id", "classify").click()  # bad input: one line on the page
        wait.until(lambda p: p.find_element("id", "error").text)
        assert page.find_element("id", "error").text == "text: empty text"
        cases = page.find_elements("css selector", "tr.case")
        assert len(cases) == 2  # the cases file, listed on the page
    finally:
        page.quit()


def test_the_command_prints_its_address_and_ctrl_c_stops_it(two_runs, tmp_path):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "serve.py"), "--runs", *map(str, two_runs), "--port", "0",
               "--device", "cpu"]
    # As from a terminal: a test run started in the background of a non-interactive shell has
    # SIGINT ignored, and a child that inherits that never sees the Ctrl-C this test sends.
    process = subprocess.Popen(command, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "AGNEWS_DIR": str(AGNEWS_DIR)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stdout:  # until the address is printed
        lines.append(line)
        if line.startswith("serving http://127.0.0.1:"):
            break
    address = lines[-1].split()[1]
    assert address.startswith("http://127.0.0.1:") and address.endswith("/"), lines
    host, port = address[len("http://"):-1].split(":")
    assert request((host, int(port), None), "GET", "/")[0] == 200
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert out.strip().endswith("stopped") and "Traceback" not in err
