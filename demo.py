"""Draw a character and watch the networks read it: a small page (demo.html) and its JSON API.

    python demo.py                                   # the published networks and their ensemble
    python demo.py --model vggnet                    # model_hub's VGGNet, on http://127.0.0.1:8000
    python demo.py --ckpt model_hub/fine_tuned/lenet_tuned.pth --port 8080
    curl -s --data-binary @my_letter.png http://127.0.0.1:8000/predict
    # {"predictions": [{"label": "A", "probability": 0.93}, ...], "input": [784 pixels], ...}

The page sends the drawing as a PNG after each stroke; the server prepares it as `evaluate.py
--image` does, so the 28x28 preview on the page is what the networks see. It listens on 127.0.0.1
unless --host says otherwise and answers only requests addressed to that host (a page elsewhere
cannot reach it by rebinding its name). At most CONNECTIONS clients at once, each with DEADLINE
seconds to send its request; bodies over MAX_BODY bytes get 413, anything not a picture 400.
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from evaluate import find_checkpoint, prepare_picture, probabilities, published_checkpoint
from models import MODELS, load_checkpoint
from runs import Parser, UserError, get_device, one_line_errors

PAGE = Path(__file__).with_name("demo.html")
MAX_BODY = 4 * 1024 * 1024  # a drawing is a few KB, a phone photo a few MB
CONNECTIONS = 16  # clients served at once; more are closed at once (memory stays bounded)
DEADLINE = 10  # seconds a client has to send its whole request
TOP = 5


class Predictor:
    """The loaded networks: the top answers of each, and of their ensemble, for one picture."""

    def __init__(self, paths, device):
        self.device, self.lock, self.networks = device, threading.Lock(), {}
        for path in paths:
            ckpt, model = load_checkpoint(path)
            self.networks[ckpt["model"]] = (ckpt, model.to(device).eval())
            print(f"network: {path} ({ckpt['model']}, trained on {ckpt['dataset']})")
        if len({tuple(ckpt["classes"]) for ckpt, _ in self.networks.values()}) > 1:
            raise UserError("the checkpoints predict different classes: serve one dataset's")

    def predict(self, body):
        image = prepare_picture(body, "the picture")
        with self.lock:
            probs = {name: probabilities(model, image[None], ckpt["mean"], ckpt["std"],
                                         self.device)[0]
                     for name, (ckpt, model) in self.networks.items()}
        classes = next(iter(self.networks.values()))[0]["classes"]
        mean = sum(probs.values()) / len(probs)
        answer = {"input": image.flatten().tolist(), "predictions": top(mean, classes)}
        if len(probs) > 1:
            answer["models"] = {name: top(p, classes) for name, p in probs.items()}
        return answer


def top(probs, classes):
    values, indices = probs.topk(min(TOP, len(classes)))
    return [{"label": classes[i], "probability": round(p, 4)}
            for p, i in zip(values.tolist(), indices.tolist())]


class Handler(BaseHTTPRequestHandler):
    timeout = DEADLINE  # no single read waits longer; the deadline below bounds the whole request

    def send_json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def host_allowed(self):
        host = urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
        if self.server.hosts is None or host in self.server.hosts:
            return True
        self.close_connection = True
        hosts = ", ".join(sorted(self.server.hosts))
        self.send_json(421, {"error": f"this server answers requests for {hosts} only"})
        return False

    def do_GET(self):
        if not self.host_allowed():
            return
        if self.path == "/health":
            self.send_json(200, {"status": "ok", "models": list(self.server.predictor.networks)})
        elif self.path in ("/", "/index.html"):
            body = PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_json(404, {"error": f"no page {self.path}: use /, /health or POST /predict"})

    def do_POST(self):
        if not self.host_allowed():
            return
        if self.path != "/predict":
            return self.send_json(404, {"error": "POST a PNG or JPEG to /predict"})
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            return self.send_json(411, {"error": "send the picture with a Content-Length"})
        length = int(length)
        body, left = bytearray(), length
        while left:  # in pieces, each before the request's deadline
            if time.monotonic() > self.deadline:
                raise TimeoutError("too slow")
            chunk = self.rfile.read1(min(left, 65536))
            if not chunk:
                raise ConnectionError("closed early")
            left -= len(chunk)
            if length <= MAX_BODY:  # too big: read and dropped, so that the client can read the 413
                body += chunk
        if length > MAX_BODY:
            self.close_connection = True
            return self.send_json(413, {"error": f"the body is over the limit, {MAX_BODY:,} bytes"})
        try:
            answer = self.server.predictor.predict(bytes(body))
        except UserError as err:
            return self.send_json(400, {"error": str(err)})
        self.send_json(200, answer)

    def handle(self):
        self.deadline = time.monotonic() + DEADLINE
        try:
            super().handle()
        except OSError:  # a client that is too slow, resets or leaves: nothing to answer
            self.close_connection = True

    def log_message(self, *args):
        pass  # one line per stroke would drown the address the user needs


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, predictor, hosts):
        super().__init__(address, Handler)
        self.predictor, self.hosts = predictor, hosts
        self.slots = threading.BoundedSemaphore(CONNECTIONS)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):  # full: close it now, not queue it in memory
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS),
                        help="networks from --hub (default: the published ByClass networks)")
    parser.add_argument("--ckpt", nargs="+", metavar="FILE", help="checkpoints to serve instead")
    parser.add_argument("--hub", default="model_hub", help="(default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="listen there (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    with one_line_errors():
        paths = args.ckpt or [find_checkpoint(args.hub, name) for name in args.model or []] or \
            [path for path in map(published_checkpoint, MODELS) if path]
        if not paths:
            raise UserError("no published networks in this copy: give --model NAME or --ckpt FILE")
        predictor = Predictor(paths, get_device(args.device))
        loopback = args.host in ("127.0.0.1", "localhost", "::1")
        hosts = {args.host} | ({"127.0.0.1", "localhost", "::1"} if loopback else set())
        try:
            hosts = None if args.host in ("0.0.0.0", "::") else hosts  # every interface: any name
            server = Server((args.host, args.port), predictor, hosts)
        except OSError as err:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({err.strerror}): "
                            f"try another --port")
        if not loopback:
            print(f"warning: listening on {args.host}: whoever reaches it there can use the demo")
        print(f"serving {', '.join(predictor.networks)} on http://{args.host}:"
              f"{server.server_address[1]} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
