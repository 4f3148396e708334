"""Wall-clock seconds of training until a target test accuracy: original pipeline against ours.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data        # LeNet, MNIST sample, 97 %
    python benchmarks/time_to_accuracy.py --dataset fashion-mnist --target 0.85

Both runs use the same network, initialisation, SGD settings, augmentation recipe and batch
size; only the input pipeline differs (see benchmarks/throughput.py). The test split is
evaluated after every epoch, outside the timed part. This is a benchmark, not a model
selection: nothing here feeds back into training.
Writes outputs/bench/time_to_accuracy.json.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.original_pipeline import original_loader  # noqa: E402
from benchmarks.throughput import step, sync  # noqa: E402
from data import get_device, load_images, mean_std, set_seed  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from train import DEFAULTS, epoch_seed, evaluate_loss_acc, train_one_epoch  # noqa: E402


def our_epoch(model, optimizer, train_set, stats, args, epoch):
    generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
    train_one_epoch(model, optimizer, *train_set, *stats, batch_size=args.batch_size, generator=generator)


def original_epoch(model, optimizer, loader, device):
    model.train()
    for images, labels in loader:
        step(model, optimizer, images.to(device), labels.to(device))


def race(pipeline, train_set, test_set, stats, device, args):
    """Train until the test accuracy reaches the target: (seconds, epochs, accuracy per epoch)."""
    set_seed(args.seed)
    model = build_model(args.model, int(train_set[1].max()) + 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=DEFAULTS["momentum"],
                                weight_decay=DEFAULTS["weight_decay"])
    loader = original_loader(train_set[0].cpu(), train_set[1].cpu(), *stats, args.batch_size, args.workers,
                             args.seed) if pipeline == "original" else None
    seconds, accuracies = 0.0, []
    for epoch in range(1, args.max_epochs + 1):
        sync(device)
        started = time.perf_counter()
        if loader is not None:
            original_epoch(model, optimizer, loader, device)
        else:
            our_epoch(model, optimizer, train_set, stats, args, epoch)
        sync(device)
        seconds += time.perf_counter() - started
        accuracies.append(evaluate_loss_acc(model, *test_set, *stats)["acc"])
        print(f"{pipeline:8} epoch {epoch:2d}: test accuracy {100 * accuracies[-1]:.2f}% after {seconds:.1f}s",
              flush=True)
        if accuracies[-1] >= args.target:
            return {"pipeline": pipeline, "seconds": seconds, "epochs": epoch, "reached": True, "accuracy": accuracies}
    return {"pipeline": pipeline, "seconds": seconds, "epochs": args.max_epochs, "reached": False,
            "accuracy": accuracies}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="lenet", choices=sorted(MODELS))
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "emnist-digits"])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--target", type=float, default=0.97, help="test accuracy to reach")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--outputs", default="outputs")
    args = parser.parse_args(argv)

    device = get_device(args.device)
    train_images, train_labels = load_images(args.dataset, train=True, data_dir=args.data_dir)
    test_images, test_labels = load_images(args.dataset, train=False, data_dir=args.data_dir)
    stats = mean_std(train_images)
    train_set = (train_images.to(device), train_labels.to(device))
    test_set = (test_images.to(device), test_labels.to(device))
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} on {args.dataset} ({len(train_labels):,} train / {len(test_labels):,} test), "
          f"target {100 * args.target:.1f}% test accuracy, {device} ({machine})")
    results = [race(pipeline, train_set, test_set, stats, device, args) for pipeline in ("original", "ours")]
    for result in results:
        status = f"{result['seconds']:.1f}s in {result['epochs']} epochs" if result["reached"] else \
            f"not reached in {result['epochs']} epochs ({result['seconds']:.1f}s)"
        print(f"{result['pipeline']:8}: {status}")
    path = Path(args.outputs) / "bench" / "time_to_accuracy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "device": str(device), "machine": machine,
                                "torch": torch.__version__, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
