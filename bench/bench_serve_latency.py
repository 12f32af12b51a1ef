"""How long a verdict takes on serve.py's page while explanations run: the latency of
/api/classify alone, then while --explanations clients each keep asking /api/explain for a long
text (the 2,000 characters the server allows, by default), as p50 and p99 over --requests.

    python bench/bench_serve_latency.py --runs runs/readme/lora_r8/seed0
    python bench/bench_serve_latency.py --runs A B --explanations 5 --requests 200
    python bench/bench_serve_latency.py --runs runs/readme/lora_r8/seed0 --int8

With --int8 it measures twice in one run, serve.py as it is (bf16 where the CPU has it) and then
serve.py --int8 (quantize.py's encoder), and ends with a table of the two side by side.

It starts `serve.py --runs ... --host 127.0.0.1 --port 0` as a child, so what is timed is the
command a learner runs, over real sockets; it prints the CPU model, as the figures depend on it.
Explanations run one at a time, within their budget of coalitions (serve.SHAP_BUDGET); a verdict
takes no lock, so it shares the CPU with the explanation running but never waits behind one.
"""
import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from plumbing import flags  # noqa: E402

HEADLINE = "Oracle shares rise as quarterly profit beats forecasts on strong software sales"
# 2,000 characters (serve.MAX_CHARS) of plain news words: the longest text the page explains
LONG_TEXT = (("Oil prices climb as producers agree to cut output while stock markets fall on "
              "fears of slower growth in China and Europe ") * 20)[:2000]


def start_server(runs, extra=()):
    """serve.py as a child on a free port of 127.0.0.1: (process, port, its output lines)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--runs", *runs,
                                "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *extra],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if match := re.match(r"serving http://127\.0\.0\.1:(\d+)/", line):
            break
    else:
        sys.exit("serve.py stopped before serving:\n" + "".join(lines))
    # Keep reading its log (a line per request): a full pipe would stop the server mid-answer
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, int(match[1]), lines


def post(port, path, body, timeout=600):
    """(seconds, status) of one POST."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST", path, body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return time.perf_counter() - start, response.status


def classify_latencies(port, requests, pause):
    seconds = []
    for _ in range(requests):
        took, status = post(port, "/api/classify", {"text": HEADLINE})
        if status != 200:
            sys.exit(f"/api/classify answered {status}")
        seconds.append(took)
        time.sleep(pause)
    return np.array(seconds)


def explain_forever(port, text, stop, done):
    """Ask for explanations one after another until `stop`; their (seconds, status) in `done`."""
    while not stop.is_set():
        try:
            done.append(post(port, "/api/explain", {"text": text, "run": 0}))
        except OSError:  # the server was stopped under a waiting request
            return


def show(name, seconds):
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000
    print(f"{name}: p50 {p50:.0f} ms, p99 {p99:.0f} ms over {len(seconds)} verdicts "
          f"(max {seconds.max() * 1000:.0f} ms)", flush=True)
    return p50, p99


def measure(args, extra=()):
    """One server's figures: (p50, p99) of verdicts alone and beside the explanations (ms)."""
    process, port, log = start_server(args.runs, extra)
    try:
        for _ in range(5):  # warm up: the first passes allocate (and compile, with --int8)
            post(port, "/api/classify", {"text": HEADLINE})
        took, status = post(port, "/api/explain", {"text": args.text, "run": 0})
        print(f"one explanation alone of {len(args.text):,} characters: {took:.1f} s "
              f"(status {status})", flush=True)
        alone = show("verdicts alone", classify_latencies(port, args.requests, args.pause))
        stop, done = threading.Event(), []
        clients = [threading.Thread(target=explain_forever, args=(port, args.text, stop, done),
                                    daemon=True) for _ in range(args.explanations)]
        for client in clients:
            client.start()
        time.sleep(1.0)  # every client has asked; one explanation runs, the others wait
        start = time.perf_counter()
        busy = classify_latencies(port, args.requests, args.pause)
        elapsed = time.perf_counter() - start
        beside = show(f"verdicts while {args.explanations} explanations run or wait", busy)
        print(f"load average now {os.getloadavg()[0]:.1f}", flush=True)
        stop.set()
        statuses = sorted({status for _, status in done})
        print(f"explanations answered meanwhile: {len(done)} in {elapsed:.0f} s "
              f"(statuses {statuses or 'none yet'})", flush=True)
        return alone, beside
    finally:
        # SIGTERM, not Ctrl-C's SIGINT: a command started in the background (`cmd &`, a test
        # suite run so) passes SIGINT on ignored, and the server would never hear it.
        process.terminate()
        process.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders for serve.py")
    parser.add_argument("--requests", type=flags.positive_int, default=200,
                        help="verdicts timed alone and again under the explanations")
    parser.add_argument("--explanations", type=flags.positive_int, default=5,
                        help="clients asking for explanations at once")
    parser.add_argument("--pause", type=float, default=0.05,
                        help="seconds between two verdicts (a person, not a load test)")
    parser.add_argument("--text", default=LONG_TEXT, help="the text each explanation asks about")
    parser.add_argument("--int8", action="store_true",
                        help="measure serve.py and then serve.py --int8, and compare")
    args = parser.parse_args()
    print(f"CPU: {common.cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} (other work slows both figures); runs: "
          f"{', '.join(args.runs)}", flush=True)
    servers = {"serve.py": ()}
    if args.int8:
        servers["serve.py --int8"] = ("--int8",)
    figures = {}
    for name, extra in servers.items():
        print(f"\n{name}", flush=True)
        figures[name] = measure(args, extra)
    if len(figures) > 1:
        print(f"\n| server | alone p50 | alone p99 | beside {args.explanations} explanations "
              "p50 | p99 |\n| --- | ---: | ---: | ---: | ---: |")
        for name, ((p50, p99), (busy50, busy99)) in figures.items():
            print(f"| {name} | {p50:.0f} ms | {p99:.0f} ms | {busy50:.0f} ms | {busy99:.0f} ms |")


if __name__ == "__main__":
    common.run_main(main)
