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
the requests a learner should see. It listens on 127.0.0.1 unless --host says otherwise (and warns
when that reaches beyond this machine: the page has no login); requests are JSON of at most 64 KB;
it reads only the page and the runs named at start, never a file a request names. Bad input is a
4xx with one line, shown on the page, and the server keeps serving. An explanation has a budget of
coalitions and runs one at a time, beside the verdicts, which never wait for it. Ctrl-C stops it.
"""
import argparse
import contextlib
import errno
import ipaddress
import json
import select
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

import common
import explain
import shapley
import vote
from plumbing import agnews, flags

PAGE = Path(__file__).resolve().parent / "web" / "page.html"
MAX_BODY = 64 * 1024      # bytes of one request
MAX_CHARS = 2_000         # characters of one text: the models read only its first --max-len tokens
MAX_DIGITS = 20           # of a number in a request: the page sends run numbers, nothing longer
SHAP_SAMPLES = 32         # antithetic orders above SHAP_EXACT_WORDS words, where the budget allows
# Coalitions (forward rows) one text's explanation may evaluate: the 2^10 of the exact 10 words.
# Past them a text gets fewer orders: a 2,000-character text (126 words) took 67 s at 32 orders
# (3,998 coalitions) in a review; within the budget it gets 8 (1,002), 13-14 s on a 2-core CPU.
SHAP_BUDGET = 2 ** shapley.SHAP_EXACT_WORDS
EXPLAIN_QUEUE = 8         # explanations running or waiting; one more is told to come back (503)
IDLE_TIMEOUT_S = 30       # a connection silent this long is closed and its thread ends


class BadRequest(Exception):
    """The request is not what the page sends: answered with `status` (400) and this one line."""

    def __init__(self, line, status=HTTPStatus.BAD_REQUEST):
        super().__init__(line)
        self.status = status


class Gone(Exception):
    """The client hung up while its explanation waited for its turn: no one to answer."""


def sampled_orders(n_words):
    """The antithetic orders a text of n_words gets: None (exact: 2^n <= SHAP_BUDGET coalitions),
    else SHAP_SAMPLES or as many fewer as fit the budget (an order adds at most n - 1 coalitions
    to the two every order shares: no words and all words)."""
    if n_words <= shapley.SHAP_EXACT_WORDS:
        return None
    fits = 2 * ((SHAP_BUDGET - 2) // (2 * (n_words - 1)))
    if fits < 2:
        raise BadRequest(f"{n_words:,} words: an explanation's {SHAP_BUDGET:,} coalitions cover "
                         f"at most {SHAP_BUDGET // 2:,}; shorten the text")
    return min(SHAP_SAMPLES, fits)


class Lab:
    """The runs, loaded once, and the questions the page asks of them."""

    def __init__(self, runs, device, weights=None, data=None, cases=None, int8=False):
        self.runtime = common.setup_runtime(device)
        self.runs = runs
        self.names = vote.display_names(runs)
        self.members = vote.load_members(runs, self.runtime.device, int8)
        args = argparse.Namespace(weights=weights, data=data)
        self.weights, self.weights_from = vote.choose_weights(args, runs)
        self.cases = agnews.read_cases(cases) if cases else []
        self.case_rows = self.case_table()  # scored once: the runs and the file never change
        # Verdicts take no lock: an eval forward pass without gradients keeps no state that an
        # answer reads (model.eval() only sets training to False again, a tokenizer encodes
        # without changing; attention heads keep their last weights, which nothing here reads),
        # so they run beside an explanation instead of waiting behind it. Explanations
        # run one at a time, each within SHAP_BUDGET; at most EXPLAIN_QUEUE run or wait.
        self.explaining = threading.Lock()
        self.admitted = threading.BoundedSemaphore(EXPLAIN_QUEUE)

    @contextlib.contextmanager
    def explanation_turn(self, wanted):
        """Held while one explanation runs; BadRequest (503) where too many wait already, Gone
        where wanted() says its client hung up while it waited. (One that has started runs to its
        end: shapley.py has no way to stop, and the budget keeps that end near.)"""
        if not self.admitted.acquire(blocking=False):
            raise BadRequest(f"busy: {EXPLAIN_QUEUE} explanations are running or waiting; try "
                             f"again in a minute", HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            with self.explaining:
                if not wanted():
                    raise Gone
                yield
        finally:
            self.admitted.release()

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

    def orders(self, text, run):
        """sampled_orders for the words run `run` reads in `text` (as word_shapley finds them)."""
        _, _, tokenizer, max_len = self.members[run]
        ids = common.encode(tokenizer, [text], max_len)[0]
        tokens = [tokenizer.id_to_token(int(i)) for i in ids]
        return sampled_orders(len(shapley.group_words(tokens)[0]))

    def words(self, text, run, class_weights=None, samples=None):
        """Shapley values of the words of `text` for run `run`: of its predicted class's logit,
        or of class_weights . logits; samples: the orders (None: exact, or SHAP_SAMPLES)."""
        _, model, tokenizer, max_len = self.members[run]
        with torch.no_grad():
            result = shapley.word_shapley(model, tokenizer, text, max_len, class_weights,
                                          samples=samples or SHAP_SAMPLES)
        return {"words": result.words, "values": result.values.tolist(),
                "f_text": result.f_text, "f_empty": result.f_empty, "method": result.method,
                "predicted": result.predicted, "probs": result.probs.tolist()}

    def explain(self, text, run, wanted=lambda: True):
        samples = self.orders(text, run)  # a text past the budget is refused before it waits
        with self.explanation_turn(wanted):
            return {"run": self.names[run], **self.words(text, run, samples=samples)}

    def contrast(self, text_a, text_b, run, wanted=lambda: True):
        """Why two similar texts get different classes, for one run: both verdicts, the cosine of
        their sentence vectors, and each word's push between the two classes (c1 minus c2)."""
        samples = [self.orders(text, run) for text in (text_a, text_b)]
        _, model, tokenizer, max_len = self.members[run]
        with self.explanation_turn(wanted):
            with torch.no_grad():
                logits, features = explain.text_outputs(model, tokenizer, [text_a, text_b],
                                                        max_len)
            probs = torch.from_numpy(logits).softmax(-1).numpy()
            cosine = float(features[0] @ features[1]
                           / (np.linalg.norm(features[0]) * np.linalg.norm(features[1])))
            c1, c2 = explain.contrast_classes(probs)
            one_hot = np.eye(common.NUM_CLASSES)
            texts = [self.words(text, run, one_hot[c1] - one_hot[c2], n)
                     for text, n in zip((text_a, text_b), samples)]
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
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON can spell "\ud800"; no tokenizer can read it
        raise BadRequest(f"{key}: a lone surrogate (\\u{ord(text[err.start]):04x}, half of a "
                         f"UTF-16 pair) at character {err.start + 1}, not a character") from None
    text = agnews.clean_text(text)
    if not text:
        raise BadRequest(f"{key}: empty text")
    return text


def checked_run(body, lab):
    run = body.get("run", 0)
    if not isinstance(run, int) or isinstance(run, bool) or not 0 <= run < len(lab.members):
        raise BadRequest(f"run: expected a whole number from 0 to {len(lab.members) - 1}")
    return run


def whole_number(digits):
    """json's reader of whole numbers, refusing the long ones in one line (Python's int refuses
    over 4,300 digits with a ValueError that is no JSONDecodeError)."""
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise BadRequest(f"a number of {len(digits.lstrip('-')):,} digits; at most {MAX_DIGITS}")
    return int(digits)


def no_constant(name):
    """json's reader of NaN and Infinity, which Python takes and JSON does not have."""
    raise BadRequest(f"not JSON ({name} is not JSON)")


def parsed(raw):
    """The request's bytes as JSON, or BadRequest saying why not in one line."""
    try:
        return json.loads(raw.decode("utf-8"), parse_int=whole_number, parse_constant=no_constant)
    except UnicodeDecodeError:
        raise BadRequest("the request is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise BadRequest(f"not JSON ({err.msg})") from None
    except RecursionError:  # json reads nesting by recursion: 32,000 "[" raise this instead
        raise BadRequest("not JSON we read (nested too deeply)") from None


def answer(lab, path, body, wanted=lambda: True):
    """The JSON answer to a POST to `path` with the JSON `body`; wanted() says whether the client
    still waits for it."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    if path == "/api/classify":
        return lab.classify(checked_text(body, "text"))
    if path == "/api/explain":
        return lab.explain(checked_text(body, "text"), checked_run(body, lab), wanted)
    if path == "/api/contrast":
        return lab.contrast(checked_text(body, "text"), checked_text(body, "text_b"),
                            checked_run(body, lab), wanted)
    raise LookupError(path)


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /api/runs and /api/cases, POST /api/classify, /api/explain and
    /api/contrast. Nothing else exists: every other path is 404, and no path is ever a file."""

    lab = None  # set by main()
    timeout = IDLE_TIMEOUT_S  # on the socket's reads and writes: a silent client frees its thread

    def do_GET(self):
        if self.path == "/":
            self.send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/runs":
            self.send_json(HTTPStatus.OK, {"runs": self.lab.names, "classes": common.CLASS_NAMES,
                                           "weights": [float(w) for w in self.lab.weights],
                                           "weights_from": self.lab.weights_from,
                                           "budget": {"coalitions": SHAP_BUDGET,
                                                      "orders": SHAP_SAMPLES,
                                                      "exact_words": shapley.SHAP_EXACT_WORDS}})
        elif self.path == "/api/cases":
            self.send_json(HTTPStatus.OK, self.lab.case_rows)
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {self.path[:80]}"})

    def body(self):
        """The request's bytes, or BadRequest: no Content-Length (411), one that is no size (400:
        reading -5 bytes read until the client hung up), more than MAX_BODY (413)."""
        header = self.headers.get("Content-Length")
        if header is None:
            raise BadRequest("no Content-Length", HTTPStatus.LENGTH_REQUIRED)
        digits = header.strip()
        if not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_DIGITS:
            self.close_connection = True  # where the body ends is unknown
            shown = repr(header[:MAX_DIGITS]) + ("..." if len(header) > MAX_DIGITS else "")
            raise BadRequest(f"Content-Length: {shown} is not a number of bytes")
        length = int(digits)
        if length > MAX_BODY:
            self.close_connection = True
            if length <= 100 * MAX_BODY:  # read it away, so the client hears the answer
                self.rfile.read(length)
            raise BadRequest(f"request of {length:,} bytes; at most {MAX_BODY:,}",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            return self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise BadRequest(f"the request's {length:,} bytes did not come within "
                             f"{self.timeout} s", HTTPStatus.REQUEST_TIMEOUT) from None

    def still_wanted(self):
        """False where the client has hung up: its end closed (a read would return nothing) or
        reset. A client that still waits sends nothing more: nothing to read, at once."""
        if not select.select([self.connection], [], [], 0)[0]:
            return True
        try:
            return self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def do_POST(self):
        try:
            result = answer(self.lab, self.path, parsed(self.body()), self.still_wanted)
        except Gone:
            self.close_connection = True
            return self.log_message("%s: the client hung up while it waited; not computed",
                                    self.path)
        except BadRequest as err:
            return self.send_json(err.status, {"error": str(err)})
        except common.UserError as err:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except LookupError:
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such API: {self.path[:80]}"})
        except Exception as err:  # a bug: one line to the page and the log, and keep serving
            self.log_message("error on %s: %r", self.path, err)
            return self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                  {"error": f"{type(err).__name__}: {err}"})
        self.send_json(HTTPStatus.OK, result)

    def send_json(self, status, obj):
        try:
            content = json.dumps(obj, allow_nan=False)
        except ValueError:  # NaN or infinity: JSON has no word for them, and a browser refuses it
            self.log_message("error on %s: a NaN or infinity in the answer", self.path)
            status, content = HTTPStatus.INTERNAL_SERVER_ERROR, json.dumps({
                "error": f"{self.path[:80]}: the answer holds NaN or infinity (a run's weights or "
                         f"outputs are not finite numbers: retrain it, or leave it out)"})
        self.send(status, content.encode(), "application/json")

    def send(self, status, content, kind):
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
        except (BrokenPipeError, ConnectionResetError):  # one line, not socketserver's traceback
            self.close_connection = True
            self.log_message("%s: the client hung up before its answer", self.path)

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


def exposure_warning(host, port):
    """One line where the address listened on reaches beyond this machine, else None."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # not an address: say so all the same
        pass
    where = "every address of this machine" if host in ("0.0.0.0", "::") else host
    return (f"warning: listening on {where}: the page has no login, and anyone who reaches port "
            f"{port} can use it and its models (--host 127.0.0.1 keeps it to this machine)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    groups = vote.find_members(args)
    seed, runs = next(iter(groups.items()))
    if seed is not None:
        print(f"runs: the seed {seed} runs of each folder")
    vote.note_copies(runs)
    try:  # the port first: a busy one is said before the models take their time to load
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as err:
        busy = "; --port chooses another" if err.errno == errno.EADDRINUSE else ""
        raise common.UserError(f"cannot listen on {args.host}:{args.port} "
                               f"({err.strerror}){busy}") from None
    host, port = server.server_address[:2]
    try:
        print(f"loading {len(runs)} run{'s' if len(runs) != 1 else ''}: "
              f"{', '.join(map(str, runs))}", flush=True)
        Handler.lab = Lab(runs, args.device, args.weights, args.data, args.file, args.int8)
        if warning := exposure_warning(host, port):
            print(warning, flush=True)
        print(f"serving http://{host}:{port}/  (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()


if __name__ == "__main__":
    common.run_main(main)
