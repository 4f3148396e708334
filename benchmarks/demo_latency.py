"""Latency of demo.py's POST /predict on this machine, per network (a benchmark, never a test).

    python benchmarks/demo_latency.py            # untrained networks: the time does not depend on the weights

Starts the demo server in this process on a free port, sends a 280x280 PNG drawing
(what the page sends) N times per network over HTTP, and reports the median and 95th
percentile round trip in milliseconds. Writes outputs/benchmarks/demo_latency.json (--out).
"""
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
from data import CLASSES  # noqa: E402
from runs import Parser, check_outputs, choose_precision, one_line_errors, positive_int, write_json  # noqa: E402
from models import build_model, save_checkpoint  # noqa: E402

NETWORKS = ["lenet", "alexnet", "vggnet", "resnet", "spinalnet"]


def drawing():
    picture = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(picture).line([(80, 60), (200, 60), (120, 230)], fill="black", width=18)
    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=positive_int, default=50, metavar="N",
                        help="timed requests per network (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=NETWORKS, choices=NETWORKS, metavar="NAME",
                        help=f"networks: {', '.join(NETWORKS)} (default: all five)")
    parser.add_argument("--out", default="outputs/benchmarks/demo_latency.json", metavar="FILE",
                        help="result JSON (default: %(default)s)")
    return parser.parse_args(argv)


def run(args):
    check_outputs(args.out)
    with tempfile.TemporaryDirectory() as folder:
        measure(args, Path(folder))


def measure(args, folder):
    body, results = drawing(), {}
    cpu = torch.device("cpu")
    for name in args.models:
        path = folder / f"{name}.pth"
        save_checkpoint(path, build_model(name, 62).eval(), model=name, num_classes=62, dataset="emnist-byclass",
                        classes=CLASSES["emnist-byclass"], mean=0.17, std=0.33, args={})
        server = demo.make_server(demo.Predictor([(path, name)], cpu, choose_precision("auto", cpu)), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        times = []
        for step in range(args.requests + 5):
            started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")) as response:
                response.read()
            if step >= 5:  # warm-up
                times.append(1000 * (time.perf_counter() - started))
        server.shutdown()
        server.server_close()
        times.sort()
        results[name] = {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * len(times)) - 1]}
        print(f"{name:10} median {results[name]['median_ms']:6.1f} ms   p95 {results[name]['p95_ms']:6.1f} ms")
    write_json(args.out, {"requests": args.requests, "threads": torch.get_num_threads(), "results": results})
    print(f"wrote {args.out}")


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
