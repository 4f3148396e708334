"""Training throughput of each network in fp32 and bf16, side by side in one run, on this machine.

    python benchmarks/throughput.py           # -> benchmarks/results/throughput-{isa}.json
    python benchmarks/throughput.py --models lenet resnet --steps 20

Each measurement is train.train_one_epoch over `--steps` batches of 64 augmented images (the study's
affine, data.train_batches on uint8 images held on the device), after two warm-up batches; fp32 and
bf16 (autocast, channels_last) alternate network by network, so both meet the same machine load.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402
from models import MODELS, build_model  # noqa: E402


def images_per_second(name, precision, steps, batch_size=64):
    images = torch.randint(0, 256, ((steps + 2) * batch_size, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 62, (len(images),))
    model = build_model(name, 62).to(
        memory_format=torch.channels_last if precision == "bf16" else torch.preserve_format
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = data.train_batches(
        images,
        labels,
        0.17,
        0.33,
        batch_size,
        torch.Generator().manual_seed(0),
        data.AUGMENTS["study"],
    )
    warm = [next(batches) for _ in range(2)]
    train.train_one_epoch(model, optimizer, iter(warm), lambda step: 0.01, 1.0, precision)
    start = time.perf_counter()
    _, _, seen = train.train_one_epoch(model, optimizer, batches, lambda step: 0.01, 1.0, precision)
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["lenet", "alexnet", "vggnet", "resnet", "spinalnet"],
        choices=sorted(MODELS),
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in flags.splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    isa = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "avx2"
    result = {
        "cpu": cpu,
        "isa": isa,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "batch_size": 64,
        "images_per_second": {},
    }
    for name in args.models:
        result["images_per_second"][name] = {
            p: round(images_per_second(name, p, args.steps)) for p in ("fp32", "bf16")
        }
        print(name, result["images_per_second"][name], flush=True)
    output = Path(args.output or Path(__file__).parent / "results" / f"throughput-{isa}.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
