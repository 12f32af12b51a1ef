"""A page for your own cases: type a headline, see every model's verdict and the words behind it.

    python serve.py                          # every finished run under runs/: http://127.0.0.1:8000/
    python serve.py --runs runs/lora_r8_pooler runs/bilstm_attn --port 8080
    python serve.py --file cases.csv         # also list these labelled cases, the errors first

The study judged its models by typing cases and looking. This page makes that a loop a learner can
run in seconds: type a headline, see each run's four probabilities and the weighted vote (the same
numbers as `vote.py --text`), pick a run and see its Shapley values per word (shapley.py: exact up
to 10 words, 32 antithetic orders above) as coloured words, change a word, look again. A second box
takes a similar text: both verdicts, the cosine of their sentence vectors, and each word's push
between the two classes (explain.py's --contrast, without the figure).

The server is the standard library's http.server and the page one static file (web/page.html):
nothing to install, and every line of it can be read; Gradio would give widgets for free but hides
the requests a learner should see. It listens on 127.0.0.1 unless --host says otherwise; requests
are JSON of at most 64 KB; it reads only the page and the runs named at start, never a file a
request names. Bad input is a 4xx with one line, shown on the page, and the server keeps serving.
Ctrl-C stops it.
"""
import argparse
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

import agnews
import common
import explain
import flags
import shapley
import vote

PAGE = Path(__file__).resolve().parent / "web" / "page.html"
MAX_BODY = 64 * 1024      # bytes of one request
MAX_CHARS = 2_000         # characters of one text: the models read only its first --max-len tokens
SHAP_SAMPLES = 32         # antithetic orders above SHAP_EXACT_WORDS words: a few seconds on a CPU


class BadRequest(Exception):
    """The request is not what the page sends: answered with 400 and this one line."""


class Lab:
    """The runs, loaded once, and the questions the page asks of them."""

    def __init__(self, runs, device, weights=None, data=None, cases=None):
        self.runtime = common.setup_runtime(device)
        self.runs = runs
        self.names = vote.display_names(runs)
        self.members = vote.load_members(runs, self.runtime.device)
        args = argparse.Namespace(weights=weights, data=data)
        self.weights, self.weights_from = vote.choose_weights(args, runs)
        self.cases = agnews.read_cases(cases) if cases else []
        self.lock = threading.Lock()  # one request at a time through the models

    def verdicts(self, texts):
        """Every run's probabilities (N, 4) for the texts, and the weighted vote's."""
        member_probs = vote.classify(self.members, texts, self.runtime)
        return member_probs, vote.ensemble_probs(member_probs, self.weights)

    def classify(self, text):
        member_probs, ensemble = self.verdicts([text])
        return {"classes": common.CLASS_NAMES,
                "runs": [{"name": name, "probs": probs[0].tolist(), "weight": float(weight)}
                         for name, probs, weight in zip(self.names, member_probs, self.weights)],
                "vote": {"probs": ensemble[0].tolist(), "weights_from": self.weights_from}}

    def words(self, text, run, class_weights=None):
        """Shapley values of the words of `text` for run `run`: of its predicted class's logit,
        or of class_weights . logits."""
        _, model, tokenizer, max_len = self.members[run]
        with torch.no_grad():
            result = shapley.word_shapley(model, tokenizer, text, max_len, class_weights,
                                          samples=SHAP_SAMPLES)
        return {"words": result.words, "values": result.values.tolist(),
                "f_text": result.f_text, "f_empty": result.f_empty, "method": result.method,
                "predicted": result.predicted, "probs": result.probs.tolist()}

    def explain(self, text, run):
        return {"run": self.names[run], **self.words(text, run)}

    def contrast(self, text_a, text_b, run):
        """Why two similar texts get different classes, for one run: both verdicts, the cosine of
        their sentence vectors, and each word's push between the two classes (c1 minus c2)."""
        _, model, tokenizer, max_len = self.members[run]
        with torch.no_grad():
            logits, features = explain.text_outputs(model, tokenizer, [text_a, text_b], max_len)
        probs = torch.from_numpy(logits).softmax(-1).numpy()
        cosine = float(features[0] @ features[1]
                       / (np.linalg.norm(features[0]) * np.linalg.norm(features[1])))
        c1, c2 = explain.contrast_classes(probs)
        one_hot = np.eye(common.NUM_CLASSES)
        texts = [self.words(text, run, one_hot[c1] - one_hot[c2]) for text in (text_a, text_b)]
        return {"run": self.names[run], "classes": [c1, c2], "cosine": cosine,
                "probs": probs.tolist(), "texts": texts}

    def case_table(self):
        """The cases file's rows with every run's verdict and the vote's, its errors first."""
        if not self.cases:
            return {"cases": []}
        member_probs, ensemble = self.verdicts([text for _, text in self.cases])
        rows = [{"text": text, "label": label,
                 "verdicts": [int(p[i].argmax()) for p in member_probs],
                 "vote": int(ensemble[i].argmax())}
                for i, (label, text) in enumerate(self.cases)]
        wrong = [row for row in rows if row["label"] is not None and row["vote"] != row["label"]]
        return {"cases": wrong + [row for row in rows if row not in wrong]}


def checked_text(body, key):
    """body[key] as a cleaned text, or BadRequest saying what is wrong with it."""
    text = body.get(key)
    if not isinstance(text, str):
        raise BadRequest(f"{key}: expected a text")
    if len(text) > MAX_CHARS:
        raise BadRequest(f"{key}: {len(text):,} characters; at most {MAX_CHARS:,} (the models read "
                         f"only the first tokens of a text)")
    text = agnews.clean_text(text)
    if not text:
        raise BadRequest(f"{key}: empty text")
    return text


def checked_run(body, lab):
    run = body.get("run", 0)
    if not isinstance(run, int) or isinstance(run, bool) or not 0 <= run < len(lab.members):
        raise BadRequest(f"run: expected a whole number from 0 to {len(lab.members) - 1}")
    return run


def answer(lab, path, body):
    """The JSON answer to a POST to `path` with the JSON `body`."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    if path == "/api/classify":
        return lab.classify(checked_text(body, "text"))
    if path == "/api/explain":
        return lab.explain(checked_text(body, "text"), checked_run(body, lab))
    if path == "/api/contrast":
        return lab.contrast(checked_text(body, "text"), checked_text(body, "text_b"),
                            checked_run(body, lab))
    raise LookupError(path)


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /api/runs and /api/cases, POST /api/classify, /api/explain and
    /api/contrast. Nothing else exists: every other path is 404, and no path is ever a file."""

    lab = None  # set by main()

    def do_GET(self):
        if self.path == "/":
            self.send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/runs":
            self.send_json(HTTPStatus.OK, {"runs": self.lab.names, "classes": common.CLASS_NAMES,
                                           "weights": [float(w) for w in self.lab.weights],
                                           "weights_from": self.lab.weights_from})
        elif self.path == "/api/cases":
            with self.lab.lock:
                self.send_json(HTTPStatus.OK, self.lab.case_table())
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {self.path[:80]}"})

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self.send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "no Content-Length"})
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            if length <= 100 * MAX_BODY:  # read it away, so the client hears the answer
                self.rfile.read(length)
            return self.send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  {"error": f"request of {length:,} bytes; at most {MAX_BODY:,}"})
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
            with self.lab.lock:
                result = answer(self.lab, self.path, body)
        except UnicodeDecodeError:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": "the request is not UTF-8"})
        except json.JSONDecodeError as err:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": f"not JSON ({err.msg})"})
        except (BadRequest, common.UserError) as err:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except LookupError:
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such API: {self.path[:80]}"})
        except Exception as err:  # a bug: one line to the page and the log, and keep serving
            self.log_message("error on %s: %r", self.path, err)
            return self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                  {"error": f"{type(err).__name__}: {err}"})
        self.send_json(HTTPStatus.OK, result)

    def send_json(self, status, obj):
        self.send(status, json.dumps(obj).encode(), "application/json")

    def send(self, status, content, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, fmt, *args):
        print(f"{self.address_string()} {fmt % args}", flush=True)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    vote.add_member_args(parser)  # the runs and weights, chosen as vote.py chooses them
    parser.add_argument("--file", help="a labelled cases file (as vote.py --file reads) to list on "
                                       "the page with every verdict, the errors first")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=flags.port_number, default=8000,
                        help="port to listen on (0: any free one)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    groups = vote.find_members(args)
    seed, runs = next(iter(groups.items()))
    if seed is not None:
        print(f"runs: the seed {seed} runs of each folder")
    vote.note_copies(runs)
    print(f"loading {len(runs)} run{'s' if len(runs) != 1 else ''}: "
          f"{', '.join(map(str, runs))}", flush=True)
    Handler.lab = Lab(runs, args.device, args.weights, args.data, args.file)
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as err:
        raise common.UserError(f"cannot listen on {args.host}:{args.port} "
                               f"({err.strerror})") from None
    host, port = server.server_address[:2]
    print(f"serving http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    common.run_main(main)
