"""Transfer a network pre-trained on EMNIST to MNIST (stage 5 of the study).

    python transfer_mnist.py --model vggnet                  # EMNIST checkpoint -> MNIST, 5 epochs
    python transfer_mnist.py --model vggnet --from-scratch   # the same network from random weights
    python transfer_mnist.py --model lenet --data-dir ../shared/data --epochs 1

Evaluates the EMNIST checkpoint (fine-tuned if present, else pre-trained, or --ckpt) zero-shot
on MNIST, its logits restricted to the digits 0-9; gives it a 10-class head initialised from
the old head's digit rows; fine-tunes it with Adam on the MNIST training set with the shared
training loop; reports train and test metrics before and after. Both datasets are upright
(data.py turns EMNIST's transposed files upright), which is what makes the transfer work.
Writes model_hub/transfer/{model}_mnist.pth, outputs/transfer/{model}.json and
outputs/transfer/{model}_cm_test.png ({model}_scratch... with --from-scratch).
"""
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and exit 130, not a traceback
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import torch

from data import (CLASSES, DIGITS, Parser, UserError, add_flags, choose_precision, load_images, mean_std, run_script,
                  set_seed, write_json)
from evaluate import compute_metrics, find_checkpoint, metrics_table, plot_confusion, predict_probabilities
from models import MODELS, build_model, load_checkpoint, replace_head, unwrap
from train import (add_training_flags, checkpoint_meta, locked_outputs, resolve_settings, run_stage,
                   setup_distributed)

DEFAULTS = {  # the one place transfer's defaults live
    "dataset": "mnist",
    "subset": None,
    "seed": 0,
    "learning_rate": 1e-3,  # Adam
    "batch_size": 64,
    "epochs": 5,  # as the study
    "patience": 5,  # unused: transfer keeps the last epoch (no validation set)
    "clip": 1.0,
    "augment": "study",
    "schedule": "constant",
}


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=sorted(MODELS),
                        help="network (default: the --ckpt's; checked against it when both are given)")
    parser.add_argument("--ckpt", default=None, help="EMNIST checkpoint (default: HUB/fine_tuned/MODEL_tuned.pth, "
                                                     "else HUB/pre_trained/MODEL.pth)")
    parser.add_argument("--dataset", default=None, choices=["mnist"], help="target dataset (default: mnist)")
    add_flags(parser, "data-dir")
    add_training_flags(parser, DEFAULTS, "Adam learning rate")
    parser.add_argument("--from-scratch", action="store_true", help="train the same network from random weights")
    args = parser.parse_args(argv)
    if not args.model and not args.ckpt:
        parser.error("give --model NAME or --ckpt PATH")
    if args.resume:
        parser.error("transfer runs are short: --resume is not supported, run it again")
    return args


def digit_rows(classes):
    """Where the digits 0-9 sit among a checkpoint's classes, or None if it has no digits."""
    classes = list(classes)
    return [classes.index(digit) for digit in DIGITS] if all(digit in classes for digit in DIGITS) else None


def split_metrics(model, splits, mean, std, device, precision, rows=None):
    """Metrics on each split; with `rows`, only those logits count (zero-shot digits)."""
    result = {}
    for split, (images, labels) in splits.items():
        probabilities = predict_probabilities(model, images, mean, std, device, precision)
        if rows is not None:
            probabilities = probabilities[:, rows]
        result[split] = compute_metrics(labels, probabilities, DIGITS, "mnist")
    return result


def starting_model(args, device):
    """(model, mean, std, source, digit rows) for pre-trained transfer or --from-scratch."""
    path = find_checkpoint(args.hub, args.model, args.ckpt) if args.ckpt or not args.from_scratch else None
    state, model = load_checkpoint(path, args.model) if path else (None, None)
    args.model = state["model"] if state else args.model
    if args.from_scratch:
        set_seed(args.seed)
        return build_model(args.model, 10).to(device), None, None, "random weights", None
    rows = digit_rows(state["classes"])
    if rows is None:
        raise UserError(f"{path} has no digit classes ({state['dataset']}): transfer to MNIST needs a network "
                        f"that reads digits, e.g. one trained on emnist-byclass or emnist-digits")
    return model.to(device), state["mean"], state["std"], str(path), rows


def run(args):
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *_: None)
    resolve_settings(args, DEFAULTS, [], log)
    model, mean, std, source, rows = starting_model(args, device)
    args.precision = choose_precision(args.precision, device)
    suffix = "_scratch" if args.from_scratch else ""
    best_path = Path(args.hub) / "transfer" / f"{args.model}_mnist{suffix}.pth"
    folder = Path(args.outputs) / "transfer"
    with locked_outputs(args, best_path, folder / f"{args.model}{suffix}.json", rank):
        return transfer(args, model, mean, std, source, rows, best_path, folder, suffix, rank, world_size, device,
                        log)


def transfer(args, model, mean, std, source, rows, best_path, folder, suffix, rank, world_size, device, log):
    """Zero-shot metrics, the new head, fine-tuning, metrics after."""
    splits = {split: load_images(args.dataset, train=split == "train", data_dir=args.data_dir,
                                 download=not args.no_download) for split in ("train", "test")}
    if mean is None:
        mean, std = mean_std(splits["train"][0])
    before = split_metrics(model, splits, mean, std, device, args.precision, rows) if rows is not None else None
    if before and rank == 0:
        log(f"zero-shot on {args.dataset} ({source}, logits restricted to 0-9):")
        log(metrics_table(list(before.items())))
    if not args.from_scratch:
        replace_head(model, 10, keep_rows=rows)
    set_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    data = {"train": tuple(tensor.to(device) for tensor in splits["train"]), "val": None, "mean": mean, "std": std}
    meta = dict(checkpoint_meta(args, data), source=source)
    log(f"{'training' if args.from_scratch else 'transferring'} {args.model} ({source}) on {args.dataset}: "
        f"{len(splits['train'][1]):,} images, {args.epochs} epochs, Adam lr {args.learning_rate}, device {device}")
    history = run_stage(args, model, optimizer, data, json_path=folder / f"{args.model}{suffix}_history.json",
                        title=f"{args.model} on {args.dataset} ({source})", best_path=best_path, meta=meta,
                        rank=rank, world_size=world_size, device=device, log=log)
    if args.dry_run or rank != 0:
        return None
    after = split_metrics(unwrap(model), splits, mean, std, device, args.precision)
    log(f"after {len(history)} epochs:")
    log(metrics_table(list(after.items())))
    plot_confusion(after["test"]["confusion_matrix"], CLASSES[args.dataset], folder / f"{args.model}{suffix}_cm_test.png",
                   f"{args.model} on the {args.dataset} test split after transfer")
    result = {"model": args.model, "source": source, "from_scratch": args.from_scratch, "dataset": args.dataset,
              "epochs": len(history), "checkpoint": str(best_path), "before": before, "after": after}
    write_json(folder / f"{args.model}{suffix}.json", result)
    log(f"wrote {folder / f'{args.model}{suffix}.json'} and {folder / f'{args.model}{suffix}_cm_test.png'}")
    return result


def main(argv=None):
    return run_script(run, parse_args(argv))


if __name__ == "__main__":
    main()
