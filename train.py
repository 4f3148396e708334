"""SGD pre-training (stage 2 of the study); owns the training loop the other scripts import.

    python train.py --model alexnet                           # EMNIST ByClass, 90 % train / 10 % val
    python train.py --model lenet --dataset sklearn-digits --epochs 3   # offline, seconds
    python train.py --model lenet --dataset sklearn-digits --dry-run    # one batch (CI smoke test)
    python train.py --model alexnet --resume                  # continue an interrupted run
    torchrun --nproc_per_node=2 train.py --model resnet       # data parallel

Writes model_hub/pre_trained/{model}.pth (best val loss), {model}_last.pth (resumable),
outputs/train/{model}.json (history) and outputs/train/{model}.png (curves).
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import (CLASSES, DATASETS, VAL_FRACTION, DataError, augment, get_device, iterate_batches, load_images,
                  mean_std, mini_split, normalize, set_seed, stratified_split, stratified_subset)
from models import MODELS, build_model

# Used when neither the command line nor outputs/search/{model}.json sets them.
DEFAULTS = {
    "learning_rate": 0.01,  # the study's grid: 1e-3, 1e-2, 1e-1; 1e-2 is the usual SGD sweet spot
    "batch_size": 64,  # the study's largest; smaller batches only cost time on a GPU
    "momentum": 0.9,
    "weight_decay": 1e-4,
}
EPOCHS = 20
PATIENCE = 10  # epochs without a better validation loss before stopping
CLIP_NORM = 1.0  # the study's gradient clipping
EVAL_BATCH = 1024  # evaluation needs no gradients, so larger batches are free
NAN_CHECK_EVERY = 100  # batches between checks for a diverged loss (each check syncs the GPU)


class TrainingError(Exception):
    """Something the user can fix (bad checkpoint, diverged loss): the message says what to do."""


# ----------------------------------------------------------------------------- command line

def common_parser(description, epochs=EPOCHS, several_models=False):
    """The flags every script shares (DESIGN.md: common command-line flags)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if several_models:
        parser.add_argument("--model", nargs="+", default=["alexnet"], choices=sorted(MODELS) + ["all"],
                            help="one or more networks, or all")
    else:
        parser.add_argument("--model", default="alexnet", choices=sorted(MODELS), help="network")
    parser.add_argument("--dataset", default="emnist-byclass", choices=DATASETS, help="dataset")
    parser.add_argument("--data-dir", default="data", help="folder with the dataset files")
    parser.add_argument("--subset", type=int, default=None, help="train on a stratified sample of N images")
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits, shuffling, augmentation, init")
    parser.add_argument("--hub", default="model_hub", help="checkpoint folder")
    parser.add_argument("--outputs", default="outputs", help="folder for JSON and plots")
    parser.add_argument("--no-download", action="store_true", help="never download missing data")
    parser.add_argument("--dry-run", action="store_true", help="one training and one validation batch, then exit")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser


def model_names(args):
    """The networks named by a several-models --model flag, with 'all' for the six."""
    return list(MODELS) if "all" in args.model else list(dict.fromkeys(args.model))  # the study's order


def plain_args(args):
    """argparse values as JSON- and weights_only-safe plain types."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


# ----------------------------------------------------------------------------- distributed

def setup_distributed(device_name):
    """(rank, world_size, device): torchrun's environment if present, else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = get_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def reduce_sums(values, device, world_size):
    """Sum a list of numbers over all ranks."""
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world_size > 1:
        totals = totals.to(device)  # nccl reduces GPU tensors only
        dist.all_reduce(totals)
    return totals.tolist()


def unwrap(model):
    """The plain nn.Module under DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, optimizer=None, /, **fields):
    """Write atomically: a crash mid-write never leaves a broken checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**fields, "state_dict": unwrap(model).state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path, model_name=None, num_classes=None, hint="python train.py --model MODEL"):
    """Read a checkpoint with weights_only=True; one-line errors for what a user can get wrong."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}: make one with `{hint}` or pass --ckpt PATH")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle, random bytes: all mean the same to the user
        raise TrainingError(f"{path} is not a readable checkpoint ({type(err).__name__}): "
                            f"it is corrupt or truncated; delete it and train again") from None
    if not isinstance(state, dict) or "state_dict" not in state or state.get("model") not in MODELS:
        raise TrainingError(f"{path} is not a checkpoint of this project (no model name and state_dict)")
    if model_name is not None and state["model"] != model_name:
        raise TrainingError(f"{path} holds a {state['model']} checkpoint, not {model_name}: "
                            f"pass --model {state['model']} or another --ckpt")
    if num_classes is not None and state["num_classes"] != num_classes:
        raise TrainingError(f"{path} was trained for {state['num_classes']} classes ({state.get('dataset')}), "
                            f"not {num_classes}")
    return state


def model_from_checkpoint(state, device="cpu"):
    model = build_model(state["model"], state["num_classes"])
    model.load_state_dict(state["state_dict"])
    return model.to(device)


# ----------------------------------------------------------------------------- data

def load_training_data(args, device, val_fraction=VAL_FRACTION, stats=None, mini=False):
    """Training (and validation) images on the device as uint8, plus normalisation stats.

    Validation is a stratified `val_fraction` of the training split, or with `mini` the
    search's mini subset (10 % of the split, 80/20). `stats` (mean, std) reuses a
    checkpoint's normalisation; otherwise it is measured on the training part only, so
    nothing about the validation or test images leaks in.
    """
    images, labels = load_images(args.dataset, train=True, data_dir=args.data_dir, download=not args.no_download)
    if args.subset:
        chosen = stratified_subset(labels, args.subset, args.seed)
        images, labels = images[chosen], labels[chosen]
    val = None
    if mini or val_fraction:
        train_index, val_index = mini_split(labels, args.seed) if mini else \
            stratified_split(labels, val_fraction, args.seed)
        val = (images[val_index].to(device), labels[val_index].to(device))
        images, labels = images[train_index], labels[train_index]
    mean, std = stats if stats is not None else mean_std(images)
    return {"train": (images.to(device), labels.to(device)), "val": val, "mean": mean, "std": std}


# ----------------------------------------------------------------------------- the loop

def progress_bar(batches, total, enabled):
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, leave=False, unit="batch")


def train_one_epoch(model, optimizer, images, labels, mean, std, *, batch_size, generator, augment_batches=True,
                    clip=CLIP_NORM, amp=False, channels_last=False, rank=0, world_size=1, max_batches=None,
                    progress=False):
    """One pass over this rank's shard: {"loss", "acc", "images"} summed over all ranks."""
    model.train()
    device = images.device
    loss_sum = torch.zeros((), device=device)  # float32: MPS has no float64
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    batches = iterate_batches(images, labels, batch_size, shuffle=True, generator=generator,
                              rank=rank, world_size=world_size)
    total = math.ceil(len(labels) / world_size / batch_size)
    for step, (batch, target) in enumerate(progress_bar(batches, total, progress)):
        if max_batches is not None and step >= max_batches:
            break
        if len(target) < 2:  # BatchNorm cannot train on a single image
            continue
        inputs = augment(batch, mean, std, generator) if augment_batches else normalize(batch, mean, std)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        loss_sum += loss.detach() * len(target)
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
        if (step + 1) % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            break
    loss_total, correct_total, seen_total = reduce_sums([loss_sum, correct, seen], device, world_size)
    return {"loss": loss_total / max(seen_total, 1), "acc": correct_total / max(seen_total, 1), "images": seen_total}


@torch.inference_mode()
def evaluate_loss_acc(model, images, labels, mean, std, *, batch_size=EVAL_BATCH, amp=False, channels_last=False,
                      rank=0, world_size=1, max_batches=None):
    """Mean cross-entropy and accuracy over (this rank's shard of) a split, summed over ranks."""
    model = unwrap(model) if world_size > 1 else model  # no DDP collectives in evaluation
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)  # float32: MPS has no float64
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    batches = iterate_batches(images, labels, batch_size, rank=rank, world_size=world_size)
    for step, (batch, target) in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        inputs = normalize(batch, mean, std)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
    loss_total, correct_total, seen_total = reduce_sums([loss_sum, correct, seen], device, world_size)
    return {"loss": loss_total / max(seen_total, 1), "acc": correct_total / max(seen_total, 1)}


def epoch_line(row, epochs):
    val = (f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:6.2f}%" if row["val_loss"] is not None
           else "val -")
    return (f"epoch {row['epoch']:3d}/{epochs} | train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_acc']:6.2f}% | {val} | {row['images_per_sec']:9,.0f} img/s | "
            f"{row['elapsed']:7.1f}s")


def best_row(history):
    """The epoch with the lowest validation loss (the last epoch when there is no validation)."""
    scored = [row for row in history if row["val_loss"] is not None]
    return min(scored, key=lambda row: row["val_loss"]) if scored else (history[-1] if history else None)


def epoch_seed(seed, epoch):
    return seed * 1_000_003 + epoch


def fit(model, optimizer, data, *, epochs, batch_size, seed=0, patience=None, clip=CLIP_NORM, augment_batches=True,
        amp=False, channels_last=False, rank=0, world_size=1, best_path=None, last_path=None, meta=None,
        history=None, dry_run=False, log=print):
    """Train for `epochs` (resuming after `history`); keep the best and last checkpoints.

    Every epoch reseeds shuffling, augmentation and dropout from (seed, epoch), so a
    resumed run repeats exactly what an uninterrupted one would have done.
    Returns the history: one dict per epoch.
    """
    history = list(history or [])
    train_images, train_labels = data["train"]
    common = dict(amp=amp, channels_last=channels_last, rank=rank, world_size=world_size,
                  max_batches=1 if dry_run else None)
    generator = torch.Generator()
    started = time.time() - (history[-1]["elapsed"] if history else 0.0)
    for epoch in range(len(history) + 1, epochs + 1):
        generator.manual_seed(epoch_seed(seed, epoch))
        torch.manual_seed(epoch_seed(seed, epoch))
        epoch_start = time.time()
        train = train_one_epoch(model, optimizer, train_images, train_labels, data["mean"], data["std"],
                                batch_size=batch_size, generator=generator, augment_batches=augment_batches,
                                clip=clip, progress=rank == 0 and sys.stdout.isatty() and not dry_run, **common)
        train_seconds = time.time() - epoch_start
        if not math.isfinite(train["loss"]):
            raise TrainingError(f"the training loss became {train['loss']} in epoch {epoch}: stopped without "
                                f"saving it (last good checkpoint: {last_path}); try a lower --lr")
        val = evaluate_loss_acc(model, *data["val"], data["mean"], data["std"], **common) if data["val"] else None
        row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
               "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
               "seconds": time.time() - epoch_start, "images": int(train["images"]),
               "images_per_sec": train["images"] / max(train_seconds, 1e-9), "elapsed": time.time() - started}
        history.append(row)
        best = best_row(history)
        if rank == 0 and not dry_run:  # saved before the epoch's line is printed
            state = dict(meta or {}, epoch=epoch, history=history, best_val_loss=best["val_loss"])
            if best_path and best["epoch"] == epoch:
                save_checkpoint(best_path, model, optimizer, **state)
            if last_path:
                save_checkpoint(last_path, model, optimizer, **state)
        if rank == 0:
            log(epoch_line(row, epochs))
        if dry_run:
            return history
        if patience and best["val_loss"] is not None and epoch - best["epoch"] >= patience:
            if rank == 0:
                log(f"early stop: no better validation loss for {patience} epochs (best: epoch {best['epoch']})")
            break
    return history


# ----------------------------------------------------------------------------- results files

def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)


def history_summary(args, history, checkpoint):
    best = best_row(history)
    return {"args": plain_args(args), "history": history, "best_epoch": best["epoch"] if best else None,
            "best_val_loss": best["val_loss"] if best else None, "best_val_acc": best["val_acc"] if best else None,
            "checkpoint": str(checkpoint)}


def plot_history(history, path, title):
    """Loss and accuracy curves, train and validation, both panels labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in [(loss_axis, "loss", "cross-entropy loss"), (acc_axis, "acc", "accuracy (%)")]:
        scale = 100 if key == "acc" else 1
        axis.plot(epochs, [scale * row[f"train_{key}"] for row in history], "o-", label="train")
        val_rows = [row for row in history if row[f"val_{key}"] is not None]
        if val_rows:
            axis.plot([row["epoch"] for row in val_rows], [scale * row[f"val_{key}"] for row in val_rows],
                      "s-", label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- wiring

def resolve_hyperparameters(args, outputs, log=print):
    """Command-line flags first, then outputs/search/{model}.json, then DEFAULTS."""
    search_file = Path(outputs) / "search" / f"{args.model}.json"
    found = {}
    if search_file.is_file():
        result = json.loads(search_file.read_text())
        if result.get("dataset") == args.dataset:
            found = result["best_params"]
            log(f"hyperparameters from {search_file}: {found} (flags on the command line win)")
        else:
            log(f"ignoring {search_file}: it was searched on {result.get('dataset')}, not {args.dataset}")
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, found.get(key, default))


def prepare_model(model, device, args, world_size):
    """Move to the device, then the optional memory format, DDP and compile wrappers."""
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    return model


def checkpoint_meta(args, data):
    return {"model": args.model, "num_classes": len(CLASSES[args.dataset]), "dataset": args.dataset,
            "classes": CLASSES[args.dataset], "mean": data["mean"], "std": data["std"], "args": plain_args(args)}


def parse_args(argv=None):
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--lr", dest="learning_rate", type=float, default=None,
                        help=f"SGD learning rate (default: search result, else {DEFAULTS['learning_rate']})")
    parser.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: search, else 0.9)")
    parser.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: search, else 1e-4)")
    parser.add_argument("--patience", type=int, default=PATIENCE, help="early-stopping patience in epochs")
    parser.add_argument("--clip", type=float, default=CLIP_NORM, help="gradient-norm clipping (0: off)")
    parser.add_argument("--no-augment", action="store_true", help="train without the random affine")
    parser.add_argument("--resume", action="store_true", help="continue from model_hub/pre_trained/{model}_last.pth")
    return parser.parse_args(argv)


def last_checkpoint_path(best_path):
    return Path(best_path).with_name(Path(best_path).stem + "_last.pth")


def resume_history(args, best_path, model, optimizer, log=print):
    """With --resume, load the last checkpoint into model and optimizer and return its history."""
    if not args.resume:
        return []
    last_path = last_checkpoint_path(best_path)
    state = load_checkpoint(last_path, args.model, len(CLASSES[args.dataset]))
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    log(f"resuming from {last_path} after epoch {state['epoch']}")
    return state["history"]


def run_stage(args, model, optimizer, data, *, json_path, title, best_path, meta, rank, world_size, device,
              patience, history=(), log=print):
    """fit() with best and resumable last checkpoints, then the history JSON and curves.

    Shared by train.py, finetune.py and transfer_mnist.py: one loop, one set of files.
    """
    json_path, last_path = Path(json_path), last_checkpoint_path(best_path)
    model = prepare_model(model, device, args, world_size)
    try:
        history = fit(model, optimizer, data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                      patience=patience, clip=args.clip, augment_batches=not args.no_augment, amp=args.amp,
                      channels_last=args.channels_last, rank=rank, world_size=world_size, best_path=best_path,
                      last_path=last_path, meta=meta, history=history, dry_run=args.dry_run, log=log)
    except KeyboardInterrupt:
        log(f"\ninterrupted: the last finished epoch is saved in {last_path}; continue with --resume")
        raise SystemExit(130)
    if args.dry_run:
        log("dry run finished: one training and one validation batch ran, nothing was written")
        return history
    if rank == 0:
        write_json(json_path, history_summary(args, history, best_path))
        plot_history(history, json_path.with_suffix(".png"), title)
        log(f"wrote {best_path}, {last_path}, {json_path} and {json_path.with_suffix('.png')}")
    return history


def run(args):
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *_: None)
    resolve_hyperparameters(args, args.outputs, log)
    set_seed(args.seed)
    best_path = Path(args.hub) / "pre_trained" / f"{args.model}.pth"
    data = load_training_data(args, device)
    model = build_model(args.model, len(CLASSES[args.dataset]))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    history = resume_history(args, best_path, model, optimizer, log)
    log(f"{args.model} on {args.dataset}: {len(data['train'][1]):,} train / {len(data['val'][1]):,} val images, "
        f"device {device}, world size {world_size}, lr {args.learning_rate}, batch {args.batch_size}, "
        f"momentum {args.momentum}, weight decay {args.weight_decay}")
    return run_stage(args, model, optimizer, data, json_path=Path(args.outputs) / "train" / f"{args.model}.json",
                     title=f"{args.model} pre-training on {args.dataset}", best_path=best_path,
                     meta=checkpoint_meta(args, data), rank=rank, world_size=world_size, device=device,
                     patience=args.patience, history=history, log=log)


def run_script(run, args):
    """Run a script's run(args): user errors become one line and exit 1; the process group closes."""
    try:
        result = run(args)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing files: tearing gloo down under it aborts
        return result
    except (DataError, TrainingError) as err:
        sys.exit(f"error: {err}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    return run_script(run, parse_args(argv))


if __name__ == "__main__":
    main()
