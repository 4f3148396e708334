"""Loading full-size EMNIST ByClass: first load, cached load, peak memory, batch augmentation speed.

    python benchmarks/load_data.py                    # synthetic files in a temporary folder
    python benchmarks/load_data.py --dir /tmp/byclass # reuse (or create) the files there

EMNIST cannot be downloaded everywhere, so this writes, once, stand-in files with exactly the
official names, IDX headers, sizes (697,932 train / 116,323 test images) and gzip compression,
filled with random pen strokes rather than noise so that gzip behaves roughly as on real
characters. Each measurement runs in a fresh process: the first load (gzip parse, transpose,
cache write), the cached load, and an epoch of batch gathering + augmentation without a model.
Writes outputs/benchmarks/load_data.json (--out).
"""
import gzip
import json
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runs import (Parser, UserError, check_outputs, get_device, one_line_errors, path_value,  # noqa: E402
                  write_json)
from train import batch_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 697_932, "test": 116_323}  # the official ByClass splits
TARGETS = {"cached_seconds": 1.0, "first_seconds": 60.0, "peak_gb": 2.0, "augment_images_per_sec": 50_000}


def stroke_bank(count, rng):
    """`count` anti-aliased pen strokes (line segments 2-3 px wide) on 28x28."""
    ends = rng.uniform(4, 24, size=(count, 2, 2))
    width = rng.uniform(1.0, 1.6, size=(count, 1, 1))
    ys, xs = np.mgrid[0:28, 0:28].astype(np.float32)
    start, end = ends[:, 0, None, None, :], ends[:, 1, None, None, :]
    points = np.stack([xs, ys], -1)[None]
    direction = end - start
    along = np.clip(((points - start) * direction).sum(-1) / np.maximum((direction ** 2).sum(-1), 1e-6), 0, 1)
    distance = np.linalg.norm(points - (start + along[..., None] * direction), axis=-1)
    return (np.clip(width + 0.5 - distance, 0, 1) * 255).astype(np.uint8)


def write_split(folder, split, rng, bank, chunk=50_000):
    """Images (three strokes each, stored transposed like EMNIST) and labels, gzipped IDX."""
    count = SIZES[split]
    images_path = folder / f"emnist-byclass-{split}-images-idx3-ubyte.gz"
    labels_path = folder / f"emnist-byclass-{split}-labels-idx1-ubyte.gz"
    with gzip.open(images_path.with_suffix(".gz.tmp"), "wb", compresslevel=6) as out:
        out.write(struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28))
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            picks = rng.integers(0, len(bank), size=(3, size))
            strokes = np.maximum(np.maximum(bank[picks[0]], bank[picks[1]]), bank[picks[2]])
            out.write(np.ascontiguousarray(strokes.transpose(0, 2, 1)).tobytes())
    images_path.with_suffix(".gz.tmp").replace(images_path)
    labels = rng.integers(0, 62, size=count, dtype=np.uint8)
    labels_path.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, count) + labels.tobytes()))


MARKER = "made-by-load_data.py"  # the folder holds this benchmark's synthetic files, and it may clear their caches


def ensure_files(folder):
    """The synthetic files in `folder`: a new or empty folder, or one this benchmark made before."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MARKER).is_file())):
        raise UserError(f"{folder} is not a folder this benchmark made (it holds other files): give --dir a new "
                        f"or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()
    rng = np.random.default_rng(0)
    bank = stroke_bank(4000, rng)
    for split in SIZES:
        if not (folder / f"emnist-byclass-{split}-labels-idx1-ubyte.gz").is_file():
            started = time.time()
            write_split(folder, split, rng, bank)
            print(f"wrote the synthetic {split} split in {time.time() - started:.0f}s")


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
import data, runs
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
images, labels = data.load_images("emnist-byclass", train=True, data_dir={folder!r}, download=False)
seconds = time.perf_counter() - started
result = {{"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "peak_above_import_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20,
          "shape": list(images.shape)}}
if {augment}:
    device = runs.get_device({device!r})
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for batch, target in data.iterate_batches(images, labels, {batch_size}, shuffle=True, generator=generator):
        data.augment(batch, 0.1736, 0.3248, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["augment_images_per_sec"] = len(labels) / (time.perf_counter() - started)
print(json.dumps(result))
"""


def measure(folder, augment=False, device="auto", batch_size=64):
    code = CHILD.format(root=str(ROOT), folder=str(folder), augment=augment, device=device, batch_size=batch_size)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:  # the child's own last line says why
        lines = [line for line in result.stderr.splitlines() if line.strip()] or [f"exit status {result.returncode}"]
        raise UserError(f"the measuring process failed: {lines[-1].removeprefix('error: ')}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, type=path_value, metavar="DIR",
                        help="new or empty folder for the synthetic files, or one this benchmark made "
                             "(default: emnist-byclass-synthetic in the temporary folder)")
    parser.add_argument("--device", default="auto", metavar="NAME", help="where the augmentation runs: auto, cpu, cuda, mps (default: %(default)s)")
    parser.add_argument("--batch-size", type=batch_size, default=64, metavar="N", help="augmentation batch (default: %(default)s)")
    parser.add_argument("--out", default="outputs/benchmarks/load_data.json", type=path_value, metavar="FILE", help="result JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    with one_line_errors():
        get_device(args.device)  # a device this machine lacks: one line now, not the child's traceback later
        check_outputs(args.out)
        run(args)


def run(args):
    folder = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "emnist-byclass-synthetic"
    ensure_files(folder)
    for split in SIZES:  # the first load must really parse: only the caches of this benchmark's own files go
        for cache in folder.glob(f"emnist-byclass-{split}-*-ubyte.*.npy"):
            cache.unlink()
    first = measure(folder)
    cached = measure(folder, augment=True, device=args.device, batch_size=args.batch_size)
    sizes = {path.name: path.stat().st_size for path in sorted(folder.glob("*.gz"))}
    rows = [("first load (parse, transpose, cache)", first["seconds"], first["peak_gb"], TARGETS["first_seconds"]),
            ("cached load", cached["seconds"], cached["peak_gb"], TARGETS["cached_seconds"])]
    print(f"ByClass training split {first['shape']} from {folder} on {platform.machine()}, python {platform.python_version()}")
    print(f"{'step':38} {'seconds':>8} {'peak RSS':>9} {'target':>8}")
    for name, seconds, peak, target in rows:
        print(f"{name:38} {seconds:8.2f} {peak:7.2f}GB {'<' + str(target) + 's':>8}")
    print(f"gather + augment, batch {args.batch_size}: {cached['augment_images_per_sec']:,.0f} images/s "
          f"(target > {TARGETS['augment_images_per_sec']:,})")
    write_json(args.out, {"folder": str(folder), "file_sizes": sizes, "first_load": first, "cached_load": cached,
                          "targets": TARGETS, "machine": platform.machine()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
