"""Transfer a network pre-trained on EMNIST to MNIST (stage 5 of the study), with train.py's loop.

    python transfer_mnist.py --model vggnet                  # EMNIST checkpoint -> MNIST, 5 epochs
    python transfer_mnist.py --model vggnet --from-scratch   # the same network from random weights
    python transfer_mnist.py --model lenet --data-dir data --epochs 1       # data/MNIST/raw/

Evaluates the EMNIST checkpoint (fine-tuned if present, else pre-trained, or --ckpt) zero-shot
on MNIST, its logits restricted to the digits 0-9; gives it a 10-class head initialised from
the old head's digit rows; fine-tunes it with Adam on the MNIST training set; reports train and
test metrics before and after. Both datasets are upright (data.py turns EMNIST's transposed
files upright), which is what makes the transfer work. Writes model_hub/transfer/{model}_mnist.pth,
outputs/transfer/{model}.json, {model}_history.json/.png and {model}_cm_test.png
({model}_scratch... with --from-scratch).
"""
import runs

if __name__ == "__main__":
    runs.interrupt_quietly()  # Ctrl-C while torch loads: one line and exit 130

from pathlib import Path

import train
from data import CLASSES, DATASETS, DIGITS, add_data_flags, load_images, mean_std, take_subset
from evaluate import compute_metrics, find_checkpoint, metrics_table, plot_confusion, predict_probabilities
from models import MODELS, build_model, load_checkpoint, replace_head, unwrap
from runs import (Parser, UserError, add_run_flags, check_outputs, choose_precision, log_for, one_line_errors,
                  path_value, resolve_settings, set_seed, setup_distributed, write_json)

TARGET = "mnist"
# What transfer changes in pre-training's values (train.SETTINGS): the study's Adam at 1e-3 for 5 epochs, on
# every MNIST training image (no validation, so no early stop); the dataset is MNIST.
DEFAULTS = {**{key: value for key, value in train.DEFAULTS.items()
               if key not in ("dataset", "momentum", "weight_decay", "patience", "val_fraction")},
            "optimizer": "adam", "learning_rate": 1e-3, "epochs": 5}


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=sorted(MODELS), metavar="NAME",
                        help="network (default: the --ckpt's; checked against it when both are given)")
    parser.add_argument("--ckpt", default=None, type=path_value, metavar="FILE",
                        help="EMNIST checkpoint (default: HUB/fine_tuned/MODEL_tuned.pth, else "
                             "HUB/pre_trained/MODEL.pth)")
    parser.add_argument("--from-scratch", action="store_true", help="train the same network from random weights")
    train.add_setting_flags(parser, DEFAULTS)
    add_data_flags(parser, "data-dir", "no-download")
    add_run_flags(parser, "device", "hub", "outputs", "precision", "compile", "dry-run", "update-results")
    args = parser.parse_args(argv)
    if not args.model and not args.ckpt:
        parser.error("give --model NAME or --ckpt PATH")
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
        result[split] = compute_metrics(labels, probabilities, DIGITS, TARGET)
    return result


def starting_model(args):
    """(model, mean, std, source, digit rows) for pre-trained transfer or --from-scratch."""
    path = find_checkpoint(args.hub, args.model, args.ckpt) if args.ckpt or not args.from_scratch else None
    state, model = load_checkpoint(path, args.model, datasets=DATASETS) if path else (None, None)
    args.model = state["model"] if state else args.model
    if args.from_scratch:
        return build_model(args.model, 10), None, None, "random weights", None
    rows = digit_rows(state["classes"])
    if rows is None:
        raise UserError(f"{path} has no digit classes ({state['dataset']}): transfer to MNIST needs a network "
                        f"that reads digits, e.g. one trained on emnist-byclass or emnist-digits")
    return model, state["mean"], state["std"], str(path), rows


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        rank, world_size, device = setup_distributed(args.device)
        log = log_for(rank)
        settings = dict(resolve_settings(args, DEFAULTS, [], log), dataset=TARGET)
        precision = choose_precision(args.precision, device)
        log(f"precision: {precision.name} ({precision.reason})")
        set_seed(settings["seed"])
        model, mean, std, source, rows = starting_model(args)
        name = f"{args.model}{'_scratch' if args.from_scratch else ''}"
        folder = Path(args.outputs) / "transfer"
        files = train.stage_files(Path(args.hub) / "transfer" / f"{args.model}_mnist{name[len(args.model):]}.pth",
                                  folder / f"{name}_history.json")
        with train.locked(files, args.dry_run, rank):
            if not args.dry_run:
                check_outputs(folder / f"{name}.json", folder / f"{name}_cm_test.png")
            splits = {split: load_images(TARGET, train=split == "train", data_dir=args.data_dir,
                                         download=not (args.no_download or args.dry_run), cache=not args.dry_run)
                      for split in ("train", "test")}
            splits["train"] = take_subset(*splits["train"], settings["subset"], settings["seed"], TARGET)
            if mean is None:
                mean, std = mean_std(splits["train"][0])
            before = split_metrics(model.to(device), splits, mean, std, device, precision, rows) if rows else None
            if before:
                log(f"zero-shot on {TARGET} ({source}, logits restricted to 0-9):")
                log(metrics_table(list(before.items())))
            if not args.from_scratch:
                replace_head(model, 10, keep_rows=rows)
            set_seed(settings["seed"])
            optimizer = train.build_optimizer(model, settings)
            model = train.prepare_model(model, device, precision, world_size, args.compile, optimizer)
            data = {"train": tuple(tensor.to(device) for tensor in splits["train"]), "val": None, "mean": mean,
                    "std": std, "classes": 10}
            log(f"{'training' if args.from_scratch else 'transferring'} {args.model} ({source}) on {TARGET}: "
                f"{len(splits['train'][1]):,} images, {settings['epochs']} epochs, device {device}")
            history = train.fit(model, optimizer, data, settings, precision, files=None if args.dry_run else files,
                                meta=train.checkpoint_meta(args.model, settings, data, precision, source=source),
                                rank=rank, world_size=world_size, dry_run=args.dry_run, log=log)
            if rank == 0 and not args.dry_run:
                train.finish(files, settings, history, f"{args.model} on {TARGET} ({source})", log,
                             extra=report(unwrap(model), splits, mean, std, device, precision, before, history, args,
                                          settings, source, folder / name, files["best"], log))


def report(model, splits, mean, std, device, precision, before, history, args, settings, source, stem, checkpoint,
           log):
    """Metrics after the transfer; the test confusion matrix and the transfer's JSON as (path, write) pairs,
    published with the run's checkpoints by train.finish()."""
    after = split_metrics(model, splits, mean, std, device, precision)
    log(f"after {len(history)} epochs:")
    log(metrics_table(list(after.items())))
    log(f"writing {stem.with_suffix('.json')} and {stem.with_name(f'{stem.name}_cm_test.png')}")
    return [(stem.with_name(f"{stem.name}_cm_test.png"), lambda partial: plot_confusion(
                after["test"]["confusion_matrix"], CLASSES[TARGET], partial,
                f"{args.model} on the {TARGET} test split after transfer")),
            (stem.with_suffix(".json"), lambda partial: write_json(partial, {
                "model": args.model, "source": source, "from_scratch": args.from_scratch, "dataset": TARGET,
                "settings": settings, "train_images": len(splits["train"][1]), "epochs": len(history),
                "checkpoint": str(checkpoint), "before": before, "after": after}))]


if __name__ == "__main__":
    main()
