"""Draw a character and watch the network read it: a small page and its JSON API.

    python demo.py                                # the published ByClass networks: letters and digits
    python demo.py --model vggnet                 # model_hub's, on http://127.0.0.1:8000
    python demo.py --model all                    # every network found in model_hub, and their ensemble
    python demo.py --ckpt model_hub/fine_tuned/lenet_tuned.pth --port 8080

    curl -s --data-binary @my_letter.png http://127.0.0.1:8000/predict
    # {"predictions": [{"label": "A", "probability": 0.93}, ...], "input": [784 pixels], ...}

The page (demo.html) sends the drawing as a PNG after each stroke; the server prepares it
exactly as `evaluate.py --image` does (evaluate.prepare_user_image), so the 28x28 preview on
the page is what the network sees. Listens on 127.0.0.1 unless --host says otherwise;
bodies over MAX_BODY bytes and anything that is not a picture get a 4xx with a JSON error.
"""
import runs

if __name__ == "__main__":
    runs.interrupt_quietly()  # Ctrl-C while torch loads: one line and exit 130

import ipaddress
import sys
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from data import DATASETS
from evaluate import find_checkpoint, predict_probabilities, prepare_user_image, written_at
from models import BYCLASS, MODELS, load_checkpoint, published_checkpoint
from runs import (DataError, Parser, UserError, add_run_flags, choose_precision, get_device, one_line_errors,
                  path_value)

PAGE = Path(__file__).with_name("demo.html")
MAX_BODY = 4 * 1024 * 1024  # a drawing is a few KB; a phone photo a few MB
TOP = 5
TIMEOUT = 10  # seconds a client may stay silent before its connection is closed
DECODERS = 2  # pictures decoded and read at once (a 40-megapixel one takes about 200 MB); the rest wait
BUSY_WAIT = 10  # seconds a request waits for a decoder before it gets 503
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Predictor:
    """The loaded networks; thread-safe top-5 answers for one picture."""

    def __init__(self, checkpoints, device, precision):
        self.device, self.precision, self.lock = device, precision, threading.Lock()
        try:
            self.page = PAGE.read_bytes()  # read before serving: a missing page refuses to start
        except OSError as err:
            raise UserError(f"the drawing page {PAGE} cannot be read ({err.strerror}): restore it from the "
                            f"repository (git checkout demo.html)") from None
        self.networks, self.sources = {}, {}
        for path, wanted in checkpoints:
            state, model = load_checkpoint(path, wanted, datasets=DATASETS)
            if state["model"] in self.networks:
                raise UserError(f"two checkpoints of {state['model']} ({path} and another): serve one per network")
            self.networks[state["model"]] = (state, model.to(device).eval())
            source = {"path": str(path), "dataset": state["dataset"], "written": written_at(path)}
            self.sources[state["model"]] = source
            print(f"network: {path} ({state['model']}, trained on {source['dataset']}, written {source['written']})")
        classes = {tuple(state["classes"]) for state, _ in self.networks.values()}
        if len(classes) > 1:
            raise UserError("the checkpoints predict different classes: serve networks of one dataset together")

    def predict(self, body):
        image = prepare_user_image(body, "the picture")  # DataError for anything that is not a picture
        answers, probabilities = {}, []
        with self.lock:
            for name, (state, model) in self.networks.items():
                p = predict_probabilities(model, image[None], state["mean"], state["std"], self.device,
                                          self.precision)[0]
                probabilities.append(p)
                answers[name] = top(p, state["classes"])
        result = {"input": image.flatten().tolist()}
        if len(answers) > 1:
            classes = next(iter(self.networks.values()))[0]["classes"]
            result["models"] = answers
            result["predictions"] = top(torch.stack(probabilities).mean(0), classes)
            result["ensemble"] = list(answers)
        else:
            result["predictions"] = next(iter(answers.values()))
        return result


def top(probabilities, classes):
    values, indices = probabilities.topk(min(TOP, len(classes)))
    return [{"label": str(classes[i]), "probability": round(float(p), 4)}
            for p, i in zip(values.tolist(), indices.tolist())]


def make_handler(predictor):
    class Handler(BaseHTTPRequestHandler):
        server_version = "emnist-cnn-demo"
        timeout = TIMEOUT  # a silent or slow client never holds a thread for long

        def handle(self):
            try:
                super().handle()
            except (ConnectionError, TimeoutError, OSError):
                self.close_connection = True  # the client went away: nothing to answer, keep serving

        def send_json(self, status, payload):
            try:
                body = json.dumps(payload, allow_nan=False).encode()  # NaN is not JSON: never sent
            except ValueError:
                status, body = 500, json.dumps({"error": "the network answered with numbers that are not "
                                                         "finite: its checkpoint is damaged"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def host_refused(self):
            """Answer 421 unless the Host header names the address served: a page elsewhere that rebinds
            its own name to this machine's address cannot reach the API from a browser here."""
            allowed = self.server.allowed_hosts
            host = (self.headers.get("Host") or "").strip().lower()
            if allowed is None or (urlsplit("//" + host).hostname or host) in allowed:  # without port or brackets
                return False
            self.close_connection = True
            self.send_json(421, {"error": f"this server answers requests for {', '.join(sorted(allowed))}, "
                                          f"not Host {host or '(none)'}"})
            return True

        def do_GET(self):
            if self.host_refused():
                return
            if self.path == "/health":
                self.send_json(200, {"status": "ok", "models": list(predictor.networks),
                                     "checkpoints": predictor.sources})
            elif self.path in ("/", "/index.html"):
                body = predictor.page
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_json(404, {"error": f"no page {self.path}: use /, /health or POST /predict"})

        def do_POST(self):
            if self.host_refused():
                return
            if self.path != "/predict":
                self.send_json(404, {"error": f"no endpoint {self.path}: POST a PNG or JPEG to /predict"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.send_json(411, {"error": "send the picture with a Content-Length"})
                return
            if length > MAX_BODY or length < 0:
                self.close_connection = True
                self.send_json(413, {"error": f"the body is {length:,} bytes; the limit is {MAX_BODY:,}"})
                self.discard(min(length, 4 * MAX_BODY))  # answered at once; then what the client still sends
                return
            body = self.rfile.read(length) if length > 0 else b""
            if not self.server.decoders.acquire(timeout=BUSY_WAIT):
                self.send_json(503, {"error": "too many pictures at once: try again in a moment"})
                return
            try:
                answer = predictor.predict(body)
            except DataError as err:
                answer = None
                self.send_json(400, {"error": str(err)})
            finally:
                self.server.decoders.release()
            if answer is not None:
                self.send_json(200, answer)

        def discard(self, most, seconds=2.0):
            """Read and drop up to `most` bytes for at most `seconds`, so that a client still sending its
            body can read the answer instead of a reset connection."""
            self.connection.settimeout(0.5)
            deadline = time.monotonic() + seconds
            try:
                while most > 0 and time.monotonic() < deadline and (chunk := self.rfile.read1(min(most, 65536))):
                    most -= len(chunk)
            except OSError:
                pass

        def log_message(self, *args):
            pass  # one line per stroke would drown the address the user needs

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allowed_hosts = None  # the Host names answered; None: any (a server on every interface)
    decoders = None  # bounds the pictures decoded at once

    def handle_error(self, request, client_address):
        """A client that resets or leaves mid-reply is logged in one line, never a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            sys.stderr.write(f"client {client_address[0]} went away ({type(error).__name__})\n")
        else:
            super().handle_error(request, client_address)


def make_server(predictor, host="127.0.0.1", port=8000):
    """A threading HTTP server (one thread a request) serving the page and the API."""
    server = Server((host, port), make_handler(predictor))
    server.daemon_threads = True
    server.decoders = threading.BoundedSemaphore(DECODERS)
    if not is_wildcard(host):
        server.allowed_hosts = {host.lower().strip("[]")} | (set(LOOPBACK_NAMES) if is_loopback(host) else set())
    return server


def is_wildcard(host):
    """0.0.0.0, ::, 0 and the like: every interface."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host) if ":" not in host else host).is_unspecified
    except (OSError, ValueError):
        return False


def is_loopback(host):
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def checkpoints_to_serve(args):
    """[(path, network it must hold, or None)]."""
    if args.ckpt:
        return [(Path(path), args.model[0] if args.model else None) for path in args.ckpt]
    names = list(MODELS) if "all" in args.model else list(dict.fromkeys(args.model))
    found = []
    for name in names:
        try:
            found.append((find_checkpoint(args.hub, name), name))
        except UserError as err:
            if len(names) == 1:
                raise
            print(f"skipping {name}: {err}")
    if not found:
        raise UserError(f"no checkpoints in {args.hub}: train one first, e.g. `python train.py --model lenet`")
    return found


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=None, choices=sorted(MODELS) + ["all"], metavar="NAME",
                        help=f"networks ({', '.join(sorted(MODELS))}) from --hub, or all (default: the --ckpt's, "
                             f"else all the published ByClass networks)")
    parser.add_argument("--ckpt", nargs="+", default=None, type=path_value, metavar="FILE",
                        help="checkpoints to serve instead")
    parser.add_argument("--host", default="127.0.0.1", metavar="HOST",
                        help="address to listen on; 0.0.0.0 opens it to the network (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, metavar="N", help="port (default: %(default)s)")
    add_run_flags(parser, "hub", "device", "precision")
    args = parser.parse_args(argv)
    if not args.model and not args.ckpt:  # the networks published with the repository, and their ensemble
        args.ckpt = [path for path in map(published_checkpoint, MODELS) if path is not None]
        if not args.ckpt:
            parser.error(f"no published networks in {BYCLASS}: give --model NAME or --ckpt PATH")
    if args.ckpt and args.model and (len(args.model) > 1 or "all" in args.model or len(args.ckpt) > 1):
        parser.error("with --ckpt, --model names the one network that checkpoint must hold")
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port} is not a port number")
    if not args.host.strip():
        parser.error("--host is empty: give an address, such as 127.0.0.1 (this machine only) or 0.0.0.0 (every "
                     "interface)")
    return args


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        device = get_device(args.device)
        predictor = Predictor(checkpoints_to_serve(args), device, choose_precision(args.precision, device))
        try:
            server = make_server(predictor, args.host, args.port)
        except OSError as err:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({err.strerror}): check --host, or pick "
                            f"another --port") \
                from None
        if not is_loopback(args.host):
            reach = "every interface" if is_wildcard(args.host) else args.host
            print(f"warning: listening on {reach}: anyone who can reach this machine there can use the demo",
                  flush=True)
        print(f"serving {', '.join(predictor.networks)} on http://{args.host}:{server.server_address[1]} "
              f"(Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
