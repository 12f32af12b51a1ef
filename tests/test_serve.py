"""serve.py: the page for your own cases. Its answers equal vote.py's and shapley.py's on the same
text; bad requests get a 4xx with one line and the server keeps answering; and, in a real headless
Chromium where one is installed, typing a headline shows every run's verdict and coloured words."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http import HTTPStatus
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
# A run folder named to break out of an HTML attribute and run script, were its name put in the
# page unescaped: the page must show it as text and run nothing.
HOSTILE = ('lstm" onmouseover="document.title=\'hacked\'" '
           '<img src=x onerror="document.title=\'img\'">')


@pytest.fixture(scope="module")
def two_runs(tiny_lstm_run, tmp_path_factory):
    """Two tiny trained runs: the shared BiLSTM+attention and an LSTM trained here (seconds)."""
    lstm = tmp_path_factory.mktemp("runs") / HOSTILE
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


def strict_json(content):
    """JSON as a browser reads it: NaN and Infinity are not JSON (Python's json takes them)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(content, parse_constant=refuse)


def request(server, method, path, body=None, raw=None, timeout=60):
    """(status, JSON answer) of one request; raw: the body's bytes as they are."""
    host, port, _ = server
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data,
                       headers={"Content-Type": "application/json"} if data is not None else {})
    response = connection.getresponse()
    content = response.read()
    connection.close()
    return response.status, (strict_json(content) if "json" in response.getheader("Content-Type")
                             else content.decode())


def raw_exchange(server, data, timeout=10):
    """(status, JSON answer) for bytes sent as they are, headers and all; (None, None) where the
    server closes without an answer."""
    with socket.create_connection(server[:2], timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    if not received:
        return None, None
    head, _, content = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), strict_json(content)


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
    # half of a UTF-16 pair, which JSON can spell but no UTF-8 text can hold
    ("POST", "/api/classify", None, b'{"text": "\\ud800 oil"}', 400, "text: a lone surrogate"),
    ("POST", "/api/contrast", None, b'{"text": "oil", "text_b": "\\udfff"}', 400,
     "text_b: a lone surrogate"),
    # a number longer than Python's int reads (4,300 digits): a ValueError of its own
    ("POST", "/api/explain", None, b'{"text": "oil", "run": 1' + b"0" * 5_000 + b"}", 400,
     "5,001 digits"),
    # nested deeper than json's recursion allows: a RecursionError, not a JSONDecodeError
    ("POST", "/api/classify", None, b"[" * 32_000, 400, "nested too deeply"),
    ("POST", "/api/classify", None, b'{"text": "oil", "run": NaN}', 400, "NaN is not JSON"),
    ("POST", "/api/delete", {"text": HEADLINE}, None, 404, "no such API"),
    ("GET", "/../serve.py", None, None, 404, "no such page"),
    ("GET", "/web/page.html", None, None, 404, "no such page"),
])
def test_bad_requests_get_one_line_and_the_server_keeps_answering(server, method, path, body,
                                                                  raw, status, message):
    got, answer = request(server, method, path, body, raw)
    assert got == status and message in answer["error"] and "\n" not in answer["error"]
    assert request(server, "POST", "/api/classify", {"text": HEADLINE})[0] == 200


@pytest.mark.parametrize("length, status, message", [
    ("-5", 400, "Content-Length: '-5' is not a number of bytes"),
    ("1" * 5_000, 400, "Content-Length: '11111111111111111111'... is not a number of bytes"),
    ("ten", 400, "Content-Length: 'ten' is not a number of bytes"),
    ("\u00b2", 400, "Content-Length: '\u00b2' is not a number of bytes"),  # isdigit(), not int
])
def test_a_content_length_that_is_no_size_gets_one_line(server, length, status, message):
    # Content-Length: -5 made the server read until the client hung up, then die in a traceback
    head = (f"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode("latin-1")  # as headers are read
    got, answer = raw_exchange(server, head + json.dumps({"text": HEADLINE}).encode())
    assert got == status and answer["error"] == message
    assert request(server, "POST", "/api/classify", {"text": HEADLINE})[0] == 200


def test_a_non_finite_number_is_one_error_line_not_broken_json(server, monkeypatch):
    # A run whose weights or outputs hold NaN made /api/runs answer `[NaN, NaN]`, which a browser
    # cannot read: the page stayed empty without a word.
    lab = server[2]
    monkeypatch.setattr(lab, "weights", np.array([np.nan, np.nan]))
    status, answer = request(server, "GET", "/api/runs")
    assert status == 500 and "NaN or infinity" in answer["error"] and "\n" not in answer["error"]
    nan = np.full((1, common.NUM_CLASSES), np.nan)
    monkeypatch.setattr(lab, "verdicts", lambda texts: ([nan, nan], nan))
    status, answer = request(server, "POST", "/api/classify", {"text": HEADLINE})
    assert status == 500 and "NaN or infinity" in answer["error"]
    monkeypatch.undo()
    assert request(server, "POST", "/api/classify", {"text": HEADLINE})[0] == 200


def test_classify_never_waits_behind_an_explanation(server, monkeypatch):
    # One long explanation held the one lock for a minute and every verdict waited behind it.
    entered, release = threading.Event(), threading.Event()
    word_shapley = serve.shapley.word_shapley

    def slow(*args, **kwargs):
        entered.set()
        release.wait(60)
        return word_shapley(*args, **kwargs)
    monkeypatch.setattr(serve.shapley, "word_shapley", slow)
    explained = []
    thread = threading.Thread(target=lambda: explained.append(
        request(server, "POST", "/api/explain", {"text": HEADLINE, "run": 0})))
    thread.start()
    try:
        assert entered.wait(30)
        start = time.perf_counter()
        status, _ = request(server, "POST", "/api/classify", {"text": HEADLINE}, timeout=10)
        assert status == 200 and time.perf_counter() - start < 10
    finally:
        release.set()
        thread.join(60)
    assert explained[0][0] == 200


def test_verdicts_beside_running_explanations_equal_those_alone(server):
    # Verdicts take no lock: forward passes in two threads at once must not disturb each other
    _, alone = request(server, "POST", "/api/classify", {"text": HEADLINE})
    long_text = " ".join(["oil prices climb as opec cuts output"] * 40)
    explained = []
    threads = [threading.Thread(target=lambda run=run: explained.append(
        request(server, "POST", "/api/explain", {"text": long_text, "run": run})[0]))
        for run in (0, 1)]
    for thread in threads:
        thread.start()
    beside = []
    while any(thread.is_alive() for thread in threads) or not beside:
        beside.append(request(server, "POST", "/api/classify", {"text": HEADLINE}))
    for thread in threads:
        thread.join()
    assert explained == [200, 200]
    for status, answer in beside:
        assert status == 200 and answer == alone


def test_an_explanation_keeps_to_its_budget_of_coalitions(server):
    status, info = request(server, "GET", "/api/runs")
    assert info["budget"] == {"coalitions": serve.SHAP_BUDGET, "orders": serve.SHAP_SAMPLES,
                              "exact_words": serve.shapley.SHAP_EXACT_WORDS}
    long_text = " ".join(["oil prices climb as opec cuts output"] * 40)  # the runs read 46 words
    status, words = request(server, "POST", "/api/explain", {"text": long_text, "run": 0})
    assert status == 200
    orders, coalitions = map(int, re.fullmatch(r"(\d+) sampled orders \(([\d,]+) distinct "
                                               r"coalitions\)", words["method"].replace(",", ""))
                             .groups())
    assert coalitions <= serve.SHAP_BUDGET and 2 <= orders < serve.SHAP_SAMPLES
    assert sum(words["values"]) == pytest.approx(words["f_text"] - words["f_empty"], abs=1e-4)
    for n in range(1, 1_000):  # every length: exact, or orders that fit, or one line
        if n <= serve.shapley.SHAP_EXACT_WORDS:
            assert serve.sampled_orders(n) is None and 2 ** n <= serve.SHAP_BUDGET
        elif n <= serve.SHAP_BUDGET // 2:
            orders = serve.sampled_orders(n)
            assert orders % 2 == 0 and 2 <= orders <= serve.SHAP_SAMPLES
            assert orders * (n - 1) + 2 <= serve.SHAP_BUDGET
        else:
            with pytest.raises(serve.BadRequest, match=f"{n:,} words"):
                serve.sampled_orders(n)


def test_too_many_explanations_waiting_are_told_to_come_back(server, monkeypatch):
    lab = server[2]
    monkeypatch.setattr(lab, "admitted", threading.BoundedSemaphore(1))
    lab.admitted.acquire()  # the queue is full
    status, answer = request(server, "POST", "/api/explain", {"text": HEADLINE, "run": 0})
    assert status == 503 and answer["error"].startswith("busy: ")
    assert request(server, "POST", "/api/classify", {"text": HEADLINE})[0] == 200
    lab.admitted.release()
    assert request(server, "POST", "/api/explain", {"text": HEADLINE, "run": 0})[0] == 200


def test_an_explanation_whose_client_hung_up_while_it_waited_is_not_computed(server,
                                                                             monkeypatch):
    lab, computed, asked, checked = server[2], [], threading.Event(), []
    orders, still_wanted = lab.orders, serve.Handler.still_wanted
    monkeypatch.setattr(lab, "orders", lambda *args: (asked.set(), orders(*args))[1])
    monkeypatch.setattr(lab, "words", lambda *args, **kwargs: computed.append(args))
    monkeypatch.setattr(serve.Handler, "still_wanted",
                        lambda self: (checked.append(still_wanted(self)), checked[-1])[1])
    body = json.dumps({"text": HEADLINE, "run": 0}).encode()
    with lab.explaining:  # another explanation runs
        with socket.create_connection(server[:2], timeout=10) as sock:
            sock.sendall(b"POST /api/explain HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert asked.wait(10)  # it waits for its turn
        time.sleep(0.2)  # and its client hangs up
    for _ in range(100):
        if checked:
            break
        time.sleep(0.05)
    assert checked == [False] and computed == []


def test_the_cases_are_scored_once_at_start(server, monkeypatch):
    # /api/cases scored every case under the lock on every page load
    def refuse(texts):
        raise AssertionError("the cases were scored again")
    monkeypatch.setattr(server[2], "verdicts", refuse)
    status, table = request(server, "GET", "/api/cases")
    assert status == 200 and len(table["cases"]) == 2


def test_an_idle_connection_is_closed(server, monkeypatch):
    # 100 silent sockets held 100 threads for ever
    assert 0 < serve.Handler.timeout <= 60
    monkeypatch.setattr(serve.Handler, "timeout", 0.5)
    with socket.create_connection(server[:2], timeout=10) as sock:
        start = time.perf_counter()
        assert sock.recv(100) == b""  # closed by the server, having said nothing
        assert time.perf_counter() - start < 5
    with socket.create_connection(server[:2], timeout=10) as sock:  # a body that stops coming
        sock.sendall(b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        received = b""
        while chunk := sock.recv(1000):  # until the server closes
            received += chunk
        assert received.startswith(b"HTTP/1.0 408 ") and b"did not come within 0.5 s" in received
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


def test_a_headline_typed_in_a_real_browser_shows_every_verdict_and_its_words(server, two_runs):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait
    page = browser()
    try:
        page.get(f"http://{server[0]}:{server[1]}/")
        wait = WebDriverWait(page, 60)
        wait.until(lambda p: p.find_elements("css selector", "#run option"))
        title = page.title
        page.find_element("id", "text").send_keys(HEADLINE)
        page.find_element("id", "classify").click()
        wait.until(lambda p: len(p.find_elements("css selector", "tr.run")) == 3)
        # The run named HOSTILE: its name shown as text everywhere, nothing of it run
        names = vote.display_names(two_runs)
        assert HOSTILE in names
        for row in page.find_elements("css selector", "tr.run"):
            ActionChains(page).move_to_element(row).click().perform()
        assert page.title == title
        assert page.execute_script(
            "return document.querySelectorAll('[onmouseover], [onerror], img').length") == 0
        assert [row.find_element("css selector", "td").text
                for row in page.find_elements("css selector", "tr.run")][:2] == names
        assert [option.text for option in page.find_elements("css selector", "#run option")] \
            == names
        assert [th.text for th in page.find_elements("css selector", "#cases th")][2:4] == names
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


def test_the_page_shows_a_line_for_an_answer_it_cannot_read(server):
    from selenium.webdriver.support.ui import WebDriverWait

    class Garbled(serve.Handler):
        """serve.py as it answered for a run with NaN weights, behind a proxy that fails."""

        def do_GET(self):
            if self.path == "/api/runs":
                return self.send(HTTPStatus.OK, b'{"runs": ["a"], "weights": [NaN, NaN]}',
                                 "application/json")
            super().do_GET()

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send(HTTPStatus.BAD_GATEWAY, b"<html><body>Bad gateway</body></html>",
                      "text/html")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Garbled)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    page = browser()
    try:
        page.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
        wait = WebDriverWait(page, 20)
        wait.until(lambda p: p.find_element("id", "error").text)
        line = page.find_element("id", "error").text
        assert line.startswith("/api/runs: ") and "not JSON" in line and "\n" not in line
        page.find_element("id", "text").send_keys(HEADLINE)
        page.find_element("id", "classify").click()
        wait.until(lambda p: p.find_element("id", "error").text.startswith("/api/classify"))
        assert "502" in page.find_element("id", "error").text
    finally:
        page.quit()
        httpd.shutdown()
        httpd.server_close()


def test_a_host_beyond_this_machine_gets_a_warning(two_runs, monkeypatch, capsys):
    # --host 0.0.0.0 listened on every address without a word
    monkeypatch.setattr(serve.Handler, "lab", serve.Handler.lab)  # main() sets it: put it back
    monkeypatch.setattr(serve, "Lab", lambda *args: None)
    monkeypatch.setattr(serve.ThreadingHTTPServer, "serve_forever",
                        lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    for host, warned in [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)]:
        serve.main(["--runs", *map(str, two_runs), "--host", host, "--port", "0"])
        out = capsys.readouterr().out
        assert ("warning: " in out and "no login" in out) == warned, out


def test_a_busy_port_is_said_before_any_model_loads(two_runs, monkeypatch):
    # A second serve.py loaded every model, then said the port was taken
    loaded = []
    monkeypatch.setattr(serve.Handler, "lab", serve.Handler.lab)
    monkeypatch.setattr(serve, "Lab", lambda *args: loaded.append(args))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(common.UserError, match=f"cannot listen on 127.0.0.1:{port} "):
            serve.main(["--runs", *map(str, two_runs), "--port", str(port)])
    assert loaded == []


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


def test_the_latency_bench_prints_its_figures(two_runs):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "bench" / "bench_serve_latency.py"),
                             "--runs", *map(str, two_runs), "--requests", "5",
                             "--explanations", "2", "--pause", "0"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "AGNEWS_DIR": str(AGNEWS_DIR)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CPU: ")
    assert re.search(r"verdicts alone: p50 \d+ ms, p99 \d+ ms over 5 verdicts", result.stdout)
    assert re.search(r"verdicts while 2 explanations run or wait: p50 \d+ ms", result.stdout)
