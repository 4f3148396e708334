"""Wall-clock seconds of training until a target test accuracy: the study's pipeline against ours.

    python benchmarks/time_to_accuracy.py --data-dir data --lr 0.05 --target 0.9   # LeNet, data/MNIST/raw/
    python benchmarks/time_to_accuracy.py --dataset fashion-mnist --target 0.85

Both runs use the same network, initialisation, SGD settings, gradient clipping, augmentation
recipe and batch size; only the input pipeline and the arithmetic differ: the study's is PIL
images, per-image RandomAffine and a DataLoader in fp32 (benchmarks/original_pipeline.py);
ours is train.py's own epoch (train.train_one_epoch) with --precision (default auto, as train.py). The test
split is evaluated after every epoch, outside the timed part. This is a benchmark, not a model
selection: nothing here feeds back into training.
Writes outputs/benchmarks/time_to_accuracy.json (--out).
"""
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.original_pipeline import original_loader, study_epoch  # noqa: E402
from benchmarks.throughput import FP32, sync  # noqa: E402
from data import DATASETS, load_images, mean_std  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from runs import (Parser, check_outputs, choose_precision, fraction, get_device, one_line_errors, positive_float,  # noqa: E402
                  positive_int, seed_value, set_seed, write_json)
from train import batch_size as train_batch_size  # noqa: E402
from train import (DEFAULTS, build_optimizer, epoch_seed, evaluate_loss_acc, prepare_model,  # noqa: E402
                   train_one_epoch)


def race(pipeline, data, test_set, device, args):
    """Train until the test accuracy reaches the target: seconds, epochs and accuracy per epoch."""
    precision = args.precision if pipeline == "ours" else FP32
    set_seed(args.seed)
    settings = dict(DEFAULTS, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed)
    model = build_model(args.model, args.classes)
    optimizer = build_optimizer(model, settings)
    model = prepare_model(model, device, precision)
    images, labels = data["train"]
    loader = original_loader(images.cpu(), labels.cpu(), data["mean"], data["std"], args.batch_size, args.workers,
                             args.seed) if pipeline == "study" else None
    seconds, accuracies = 0.0, []
    for epoch in range(1, args.max_epochs + 1):
        model.train()
        sync(device)
        started = time.perf_counter()
        if loader is not None:
            study_epoch(model, optimizer, loader, device, settings["clip"])
        else:
            generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
            train_one_epoch(model, optimizer, data, settings, precision, generator, epoch)
        sync(device)
        seconds += time.perf_counter() - started
        accuracies.append(float(evaluate_loss_acc(model, *test_set, data["mean"], data["std"], precision)["acc"]))
        print(f"{pipeline:6} epoch {epoch:2d}: test accuracy {100 * accuracies[-1]:.2f}% after {seconds:.1f}s",
              flush=True)
        if accuracies[-1] >= args.target:
            break
    return {"pipeline": pipeline, "precision": precision.name, "seconds": seconds, "epochs": len(accuracies),
            "reached": accuracies[-1] >= args.target, "accuracy": accuracies}


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet", choices=sorted(MODELS), metavar="NAME",
                        help=f"network: {', '.join(sorted(MODELS))} (default: %(default)s)")
    parser.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), metavar="NAME",
                        help=f"dataset: {', '.join(sorted(DATASETS))} (default: %(default)s)")
    parser.add_argument("--data-dir", default="data", metavar="DIR", help="folder with the dataset files (default: %(default)s)")
    parser.add_argument("--device", default="auto", metavar="NAME", help="auto, cpu, cuda, mps (default: %(default)s)")
    parser.add_argument("--target", type=fraction, default=0.97, metavar="X",
                        help="test accuracy to reach (default: %(default)s)")
    parser.add_argument("--max-epochs", type=positive_int, default=20, metavar="N",
                        help="give up after N epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=train_batch_size, default=DEFAULTS["batch_size"], metavar="N",
                        help="batch size (default: train.py's, %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS["learning_rate"], metavar="X",
                        help="SGD learning rate (default: train.py's, %(default)s)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="DataLoader workers of the study's pipeline (default: %(default)s)")
    parser.add_argument("--seed", type=seed_value, default=0, metavar="N", help="seed (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], metavar="NAME",
                        help="arithmetic of our run: auto, fp32, bf16 (default: %(default)s, as train.py; the study's runs fp32)")
    parser.add_argument("--out", default="outputs/benchmarks/time_to_accuracy.json", metavar="FILE",
                        help="result JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"argument --workers: must be 0 or more, not {args.workers}")
    return args


def run(args):
    check_outputs(args.out)
    device = get_device(args.device)
    args.precision = choose_precision(args.precision, device)
    train_images, train_labels = load_images(args.dataset, train=True, data_dir=args.data_dir, download=False)
    test_images, test_labels = load_images(args.dataset, train=False, data_dir=args.data_dir, download=False)
    mean, std = mean_std(train_images)
    args.classes = len(DATASETS[args.dataset].classes)
    data = {"train": (train_images.to(device), train_labels.to(device)), "mean": mean, "std": std,
            "classes": args.classes}
    test_set = (test_images.to(device), test_labels.to(device))
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} on {args.dataset} ({len(train_labels):,} train / {len(test_labels):,} test), "
          f"target {100 * args.target:.1f}% test accuracy, {device} ({machine}); "
          f"ours in {args.precision.name} ({args.precision.reason})")
    results = [race(pipeline, data, test_set, device, args) for pipeline in ("study", "ours")]
    for result in results:
        status = f"{result['seconds']:.1f}s in {result['epochs']} epochs" if result["reached"] else \
            f"not reached in {result['epochs']} epochs ({result['seconds']:.1f}s)"
        print(f"{result['pipeline']:6}: {status}")
    if all(result["reached"] for result in results):
        print(f"ours / study: {results[1]['seconds'] / results[0]['seconds']:.2f} of the time")
    settings = {key: value for key, value in vars(args).items() if key not in ("precision", "classes")}
    write_json(args.out, {"args": settings, "precision": args.precision.name, "device": str(device),
                          "machine": machine, "torch": torch.__version__, "results": results})
    print(f"wrote {args.out}")


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
