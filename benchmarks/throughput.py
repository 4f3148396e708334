"""Training and evaluation images per second against the study's pipeline and the hardware's peak.

    python benchmarks/throughput.py                        # the five smaller networks (EnsNet: --models ensnet)
    python benchmarks/throughput.py --models lenet vggnet --seconds 5

For each network, side by side in one run, same model, batch size (64) and device, after warm-up:
  study  the study's pipeline: PIL images, per-sample RandomAffine, DataLoader with one worker
         per core, fp32;
  fp32   ours: uint8 images on the device, gathered and augmented a batch at a time, fp32;
  bf16   ours with bf16 autocast and channels_last (what --precision bf16 runs);
  auto   what --precision auto picks on this device (one of the two above; the log says why).
Evaluation images/s (batch EVAL_BATCH, inference mode) for fp32 and bf16. GFLOP/s achieved
is the counted FLOPs per image (torch.utils.flop_counter, forward + backward for training)
times images/s; the machine's own limit is measured in the same run: the best GFLOP/s of a
large matmul in fp32 and in bf16. "Ours" is train.py's own epoch (train.train_one_epoch) and
evaluation (train.evaluate_loss_acc), with train.py's defaults. Writes outputs/benchmarks/throughput.json (--out).
"""
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from train import batch_size as train_batch_size  # noqa: E402
from benchmarks.original_pipeline import original_loader, study_epoch  # noqa: E402
from data import DATASETS, EVAL_BATCH, load_images, mean_std  # noqa: E402
from models import build_model  # noqa: E402
from runs import (Parser, Precision, check_outputs, choose_precision, get_device, one_line_errors, positive_float,  # noqa: E402
                  positive_int, write_json)

FIVE = ["lenet", "alexnet", "vggnet", "resnet", "spinalnet"]
FP32, BF16 = Precision(False, False, "fp32"), Precision(True, True, "bf16 + channels_last")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, sizes=(512, 1024, 2048, 4096), budget=1.0):
    """Best GFLOP/s of square matmuls: the arithmetic limit this device reaches in practice.

    Sizes grow until one product takes longer than `budget` seconds (bf16 emulated on a CPU
    without native support runs about 100x slower than fp32: a 4096 product would take minutes).
    """
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b  # warm-up
        fastest = float("inf")
        for _ in range(3):
            sync(device)
            started = time.perf_counter()
            a @ b
            sync(device)
            fastest = min(fastest, time.perf_counter() - started)
        best = max(best, 2 * size ** 3 / fastest / 1e9)
        if fastest > budget:
            break
    return best


def flops_per_image(name, classes, device, batch_size):
    """(training, evaluation) FLOPs per image, counted on one batch."""
    model = build_model(name, classes).to(device)
    inputs = torch.randn(batch_size, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(inputs), torch.zeros(batch_size, dtype=torch.long, device=device)).backward()
    training = counter.get_total_flops() / batch_size
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(inputs)
    return training, counter.get_total_flops() / batch_size


def timed(work, device, warmup, seconds, max_batches):
    """Images per second of work(batches) -> images, called until `seconds` or `max_batches` have
    passed, after one untimed call of `warmup` batches."""
    work(warmup)
    sync(device)
    images, batches, started = 0, 0, time.perf_counter()
    while batches < max_batches and time.perf_counter() - started < seconds:
        count = work(max_batches - batches)
        images += count[0]
        batches += count[1]
    sync(device)
    return images / (time.perf_counter() - started)


def endless(loader):
    while True:
        yield from loader


def fresh_model(name, classes, device, precision):
    torch.manual_seed(0)
    model = build_model(name, classes)
    optimizer = train.build_optimizer(model, train.DEFAULTS)
    return train.prepare_model(model, device, precision), optimizer


def measure(name, images, labels, mean, std, device, args, auto):
    classes = int(labels.max()) + 1
    settings = dict(train.DEFAULTS, batch_size=args.batch_size)
    data = {"train": (images.to(device), labels.to(device)), "mean": mean, "std": std, "classes": classes}
    limits = dict(device=device, warmup=args.warmup, seconds=args.seconds, max_batches=args.max_batches)
    row = {"model": name}

    model, optimizer = fresh_model(name, classes, device, FP32)
    batches = endless(original_loader(images, labels, mean, std, args.batch_size, args.workers))
    row["study_train"] = timed(lambda most: (study_epoch(model, optimizer, batches, device, settings["clip"], most),
                                             most), **limits)
    for label, precision in [("fp32", FP32), ("bf16", BF16)]:
        model, optimizer = fresh_model(name, classes, device, precision)
        generator = torch.Generator().manual_seed(0)

        def train_batches(most, model=model, optimizer=optimizer, precision=precision):
            seen = train.train_one_epoch(model, optimizer, data, settings, precision, generator, 1,
                                         max_batches=most)["images"]
            return seen, -(-seen // args.batch_size)

        def evaluate_batches(most, model=model, precision=precision):
            train.evaluate_loss_acc(model, *data["train"], mean, std, precision, max_batches=most)
            return min(len(labels), most * EVAL_BATCH), min(most, -(-len(labels) // EVAL_BATCH))

        row[f"{label}_train"] = timed(train_batches, **limits)
        row[f"{label}_eval"] = timed(evaluate_batches, **dict(limits, max_batches=max(5, args.max_batches // 10)))
    chosen = "bf16" if auto.bf16 else "fp32"
    row["auto"] = chosen
    row["auto_train"], row["auto_eval"] = row[f"{chosen}_train"], row[f"{chosen}_eval"]
    row["train_flops"], row["eval_flops"] = flops_per_image(name, classes, device, args.batch_size)
    return row


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FIVE, choices=FIVE + ["ensnet"], metavar="NAME",
                        help=f"networks to measure: {', '.join(FIVE)} or ensnet (default: all but ensnet)")
    parser.add_argument("--dataset", default="sklearn-digits", choices=sorted(DATASETS), metavar="NAME",
                        help=f"real images to feed, for speed only: {', '.join(sorted(DATASETS))} (default: %(default)s)")
    parser.add_argument("--data-dir", default="data", metavar="DIR", help="folder with the dataset files (default: %(default)s)")
    parser.add_argument("--device", default="auto", metavar="NAME", help="auto, cpu, cuda, mps (default: %(default)s)")
    parser.add_argument("--batch-size", type=train_batch_size, default=train.DEFAULTS["batch_size"], metavar="N",
                        help="batch size (default: train.py's, %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count(), metavar="N",
                        help="DataLoader workers of the study's pipeline (default: one per core)")
    parser.add_argument("--warmup", type=positive_int, default=3, metavar="N", help="untimed batches first (default: %(default)s)")
    parser.add_argument("--seconds", type=positive_float, default=6.0, metavar="X",
                        help="time budget per measurement (default: %(default)s)")
    parser.add_argument("--peak-seconds", type=positive_float, default=1.0, metavar="X",
                        help="the matmul peak stops growing the size once one product takes longer (default: %(default)s)")
    parser.add_argument("--max-batches", type=positive_int, default=200, metavar="N",
                        help="most timed batches per measurement (default: %(default)s)")
    parser.add_argument("--out", default="outputs/benchmarks/throughput.json", metavar="FILE",
                        help="result JSON (default: %(default)s)")
    return parser.parse_args(argv)


def run(args):
    check_outputs(args.out)
    device = get_device(args.device)
    auto = choose_precision("auto", device)
    images, labels = load_images(args.dataset, train=True, data_dir=args.data_dir)
    mean, std = mean_std(images)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    peaks = {name: matmul_peak(device, dtype, budget=args.peak_seconds)
             for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]}
    print(f"throughput on {device} ({machine}), batch {args.batch_size}, torch {torch.__version__}")
    print(f"precision auto: {auto.name} ({auto.reason})")
    print(f"matmul peak: fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s")
    header = (f"{'model':10} {'study':>7} {'fp32':>7} {'bf16':>7} {'auto':>7} {'auto/study':>10} "
              f"{'GFLOP/s':>8} {'of peak':>8} | {'eval fp32':>9} {'eval bf16':>9}")
    print("training images/s" + " " * 50 + "| evaluation images/s")
    print(header)
    rows = []
    for name in args.models:
        row = measure(name, images, labels, mean, std, device, args, auto)
        row["auto_train_gflops"] = row["train_flops"] * row["auto_train"] / 1e9
        row["auto_share_of_peak"] = row["auto_train_gflops"] / peaks[row["auto"]]
        row["bf16_share_of_peak"] = row["train_flops"] * row["bf16_train"] / 1e9 / peaks["bf16"]
        row["fp32_share_of_peak"] = row["train_flops"] * row["fp32_train"] / 1e9 / peaks["fp32"]
        rows.append(row)
        print(f"{name:10} {row['study_train']:7,.0f} {row['fp32_train']:7,.0f} {row['bf16_train']:7,.0f} "
              f"{row['auto_train']:7,.0f} {row['auto_train'] / row['study_train']:9.2f}x "
              f"{row['auto_train_gflops']:8.1f} {100 * row['auto_share_of_peak']:7.1f}% | "
              f"{row['fp32_eval']:9,.0f} {row['bf16_eval']:9,.0f}", flush=True)
    write_json(args.out, {"device": str(device), "machine": machine, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "auto": auto.name, "auto_reason": auto.reason,
                          "matmul_peak_gflops": peaks, "batch_size": args.batch_size, "dataset": args.dataset,
                          "workers": args.workers, "rows": rows})
    print(f"wrote {args.out}")


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
