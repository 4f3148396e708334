"""Does bf16 + channels_last cost accuracy? Test accuracy of fp32 and bf16 runs over several seeds.

    python benchmarks/precision_accuracy.py --dataset mnist --data-dir data --epochs 10 --lr 0.05
    python benchmarks/precision_accuracy.py --dataset fashion-mnist --epochs 5 --seeds 0 1 2

Trains the same network with `train.py --precision fp32` and `--precision bf16` (what
`--precision auto` picks where bf16 is native) for each seed, evaluates the best checkpoint
on the official test split in the same precision, and reports mean +- std per precision.
Writes outputs/benchmarks/precision_accuracy_{dataset}.json (--out).
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from data import DATASETS, load_images  # noqa: E402
from runs import (Parser, check_outputs, choose_precision, one_line_errors, positive_float, positive_int, seed_value,  # noqa: E402
                  write_json)
from evaluate import predict_probabilities  # noqa: E402
from models import MODELS, load_checkpoint  # noqa: E402


def run_one(args, precision, seed, folder):
    started = time.time()
    train.main(["--model", args.model, "--dataset", args.dataset, "--data-dir", args.data_dir, "--no-download",
                "--epochs", str(args.epochs), "--seed", str(seed), "--precision", precision, "--lr", str(args.lr),
                "--hub", str(folder / "hub"), "--outputs", str(folder / "out")])
    seconds = time.time() - started
    state, model = load_checkpoint(folder / "hub" / "pre_trained" / f"{args.model}.pth")
    images, labels = load_images(args.dataset, train=False, data_dir=args.data_dir, download=False)
    cpu = torch.device("cpu")
    probabilities = predict_probabilities(model, images, state["mean"], state["std"], cpu,
                                          choose_precision(precision, cpu))
    return {"seed": seed, "test_accuracy": float((probabilities.argmax(1) == labels).float().mean()),
            "seconds": seconds}


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet", choices=sorted(MODELS), metavar="NAME",
                        help=f"network: {', '.join(sorted(MODELS))} (default: %(default)s)")
    parser.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), metavar="NAME",
                        help=f"dataset: {', '.join(sorted(DATASETS))} (default: %(default)s)")
    parser.add_argument("--data-dir", default="data", metavar="DIR", help="folder with the dataset files (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=10, metavar="N",
                        help="training epochs per run (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=train.DEFAULTS["learning_rate"], metavar="X",
                        help="SGD learning rate (default: train.py's, %(default)s)")
    parser.add_argument("--seeds", type=seed_value, nargs="+", default=[0, 1, 2], metavar="N", help="seeds (default: 0 1 2)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="result JSON (default: outputs/benchmarks/precision_accuracy_DATASET.json)")
    return parser.parse_args(argv)


def one_run(args, precision, seed):
    with tempfile.TemporaryDirectory() as folder:
        return run_one(args, precision, seed, Path(folder))


def run(args):
    out = args.out or Path("outputs") / "benchmarks" / f"precision_accuracy_{args.dataset}.json"
    check_outputs(out)
    results = {}
    for precision in ["fp32", "bf16"]:
        runs = [one_run(args, precision, seed) for seed in args.seeds]
        accuracies = [run["test_accuracy"] for run in runs]
        results[precision] = {"runs": runs, "mean": statistics.mean(accuracies),
                              "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}
    for precision, result in results.items():
        print(f"{precision}: test accuracy {100 * result['mean']:.2f} +- {100 * result['std']:.2f} % "
              f"over seeds {args.seeds} ({args.model}, {args.dataset}, {args.epochs} epochs)")
    write_json(out, {"args": vars(args), "results": results})
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
