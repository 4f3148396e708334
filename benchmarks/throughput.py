"""Training images per second: the study's original input pipeline against this project's.

    python benchmarks/throughput.py                       # all six networks, CPU or GPU
    python benchmarks/throughput.py --models lenet resnet --seconds 5

For each network, side by side in one run, same model, batch size and device, after warm-up:
(a) original: PIL images, per-sample RandomAffine + ToTensor + Normalize, DataLoader with 2 workers;
(b) ours: uint8 images on the device, gathered and augmented a whole batch at a time.
Also measures what share of our training step the gathering + augmentation takes.
Writes outputs/bench/throughput.json.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.original_pipeline import original_loader  # noqa: E402
from data import augment, get_device, iterate_batches, load_images, mean_std  # noqa: E402
from models import MODELS, build_model  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, optimizer, inputs, target):
    loss = F.cross_entropy(model(inputs), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def timed(batches, work, device, warmup, seconds, max_batches):
    """Images per second of work(batch) over batches, after `warmup` untimed batches."""
    count, images, started = 0, 0, None
    for batch in batches:
        if count == warmup:
            sync(device)
            started = time.perf_counter()
        work(batch)
        count += 1
        if count > warmup:
            images += len(batch[1])
            if time.perf_counter() - started > seconds or count - warmup >= max_batches:
                break
    sync(device)
    return images / (time.perf_counter() - started)


def endless(make_batches):
    while True:
        yield from make_batches()


def measure(name, images, labels, mean, std, device, args):
    torch.manual_seed(0)
    model = build_model(name, int(labels.max()) + 1).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    on_device = images.to(device), labels.to(device)

    def ours():
        return iterate_batches(*on_device, args.batch_size, shuffle=True, generator=generator)

    def our_step(batch):
        step(model, optimizer, augment(batch[0], mean, std, generator), batch[1])

    def their_step(batch):
        step(model, optimizer, batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))

    def augment_only(batch):
        augment(batch[0], mean, std, generator)

    limits = dict(device=device, warmup=args.warmup, seconds=args.seconds, max_batches=args.max_batches)
    loader = original_loader(images, labels, mean, std, args.batch_size, args.workers)
    original = timed(endless(lambda: loader), their_step, **limits)
    our = timed(endless(ours), our_step, **limits)
    augment_rate = timed(endless(ours), augment_only, **dict(limits, max_batches=10 * args.max_batches))
    return {"model": name, "original_images_per_sec": original, "ours_images_per_sec": our,
            "speedup": our / original, "augment_share_of_step": our / augment_rate}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--dataset", default="sklearn-digits", help="real images to feed (speed only)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=64, help="the study's batch size")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the original pipeline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per measurement")
    parser.add_argument("--max-batches", type=int, default=200, help="most timed batches per measurement")
    parser.add_argument("--outputs", default="outputs")
    args = parser.parse_args(argv)

    device = get_device(args.device)
    images, labels = load_images(args.dataset, train=True, data_dir=args.data_dir)
    mean, std = mean_std(images)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"throughput on {device} ({machine}), batch {args.batch_size}, {args.dataset} images")
    print(f"{'model':10} {'original img/s':>15} {'ours img/s':>12} {'speedup':>8} {'augment share':>14}")
    rows = []
    for name in args.models:
        row = measure(name, images, labels, mean, std, device, args)
        rows.append(row)
        print(f"{name:10} {row['original_images_per_sec']:15,.0f} {row['ours_images_per_sec']:12,.0f} "
              f"{row['speedup']:7.1f}x {100 * row['augment_share_of_step']:13.1f}%", flush=True)
    path = Path(args.outputs) / "bench" / "throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": str(device), "machine": machine, "torch": torch.__version__,
                                "batch_size": args.batch_size, "dataset": args.dataset, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
