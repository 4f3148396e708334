"""SGD pre-training (stage 2 of the study); owns the training loop the other scripts import.

    python train.py --model alexnet                           # EMNIST ByClass, 90 % train / 10 % val
    python train.py --model lenet --dataset sklearn-digits --epochs 3   # offline, seconds
    python train.py --model lenet --dataset sklearn-digits --dry-run    # one batch (CI smoke test)
    python train.py --model alexnet --resume                  # continue an interrupted run
    torchrun --nproc_per_node=2 train.py --model resnet       # data parallel

Writes model_hub/pre_trained/{model}.pth (best val loss), {model}_last.pth (resumable),
outputs/train/{model}.json (history) and outputs/train/{model}.png (curves).
Every value the run uses is printed once at the start with its source: a flag, the run
being resumed, a complete search result (outputs/search/{model}.json), or DEFAULTS below.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and exit 130, not a traceback
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import (AUGMENTS, CLASSES, EVAL_BATCH, VAL_FRACTION, Parser, Precision, UserError, add_flags, augment,
                  augment_recipe, batch_sizes, check_writable, choose_precision, epoch_affines, get_device,
                  iterate_batches, load_images, mean_std, mini_split, normalize, output_lock, positive_float,
                  positive_int, pyplot, read_json, run_script, save_figure, set_seed, shard_length, stratified_split,
                  stratified_subset, non_negative_float, write_json)
from models import MODELS, build_model, load_checkpoint, save_checkpoint, unwrap

# The one place pre-training's defaults live; used when neither a flag, the resumed run nor
# a complete search result sets a value.
DEFAULTS = {
    "dataset": "emnist-byclass",  # the study's
    "subset": None,  # the whole training split
    "seed": 0,
    "learning_rate": 0.01,  # the study's grid: 1e-3, 1e-2, 1e-1; 1e-2 is the usual SGD sweet spot
    "batch_size": 64,  # the study's largest; smaller batches only cost time on a GPU
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 20,
    "patience": 10,  # epochs without a better validation loss before stopping
    "clip": 1.0,  # the study's gradient clipping (0: off)
    "augment": "study",  # the study's random affine (data.AUGMENTS holds the recipes)
    "schedule": "constant",  # the study's: one learning rate throughout (SCHEDULES below)
}
SEARCHED = ("learning_rate", "batch_size", "momentum", "weight_decay")  # what search.py chooses
RUN_KEYS = ("dataset", "subset", "seed", "learning_rate", "batch_size", "momentum", "weight_decay", "clip",
            "augment", "schedule", "val_fraction")  # what defines a run: --resume refuses flags that contradict them
NAN_CHECK_EVERY = 100  # batches between checks for a diverged loss (each check syncs the GPU)
DIVERGED = 10.0  # a mean training loss above DIVERGED x ln(classes) (chance is 1 x) means divergence
# --schedule: the learning rate over a run. constant: --lr throughout (the study's); cosine: from --lr
# down to 0 along half a cosine over all --epochs, set before every step.
SCHEDULES = ("constant", "cosine")


class TrainingError(UserError):
    """A run that cannot go on (diverged loss, nothing to train): the message says what to do."""


# ----------------------------------------------------------------------------- settings

def batch_size(text):
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2: BatchNorm cannot train on one image")
    return value


def add_training_flags(parser, defaults, learning_rate_help, searched=False):
    """The flags of the three training scripts; None means 'not given': the source is resolved later."""
    prefix = "search result, else " if searched else ""
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"epochs in all, counting resumed ones (default: {defaults['epochs']})")
    parser.add_argument("--batch-size", type=batch_size, default=None,
                        help=f"batch size (default: {prefix}{defaults['batch_size']})")
    parser.add_argument("--lr", dest="learning_rate", type=positive_float, default=None,
                        help=f"{learning_rate_help} (default: {prefix}{defaults['learning_rate']})")
    parser.add_argument("--patience", type=positive_int, default=None,
                        help=f"early-stopping patience in epochs (default: {defaults['patience']}); a cosine "
                             f"schedule runs all --epochs and keeps the best epoch, so it takes none")
    parser.add_argument("--clip", type=non_negative_float, default=None,
                        help=f"gradient-norm clipping, 0 turns it off (default: {defaults['clip']})")
    parser.add_argument("--augment", choices=list(AUGMENTS), default=None,
                        help="training augmentation: study (the study's random affine: rotation, shift, scale, "
                             "shear), shift-flip (shifts and left-right mirrors: for garments, not characters) "
                             f"or none (default: {defaults['augment']})")
    parser.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                        help="the same as --augment none")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None,
                        help="learning rate over the run: constant (--lr throughout) or cosine (from --lr down to 0 "
                             f"over all --epochs, step by step) (default: {defaults['schedule']})")
    parser.add_argument("--resume", action="store_true", help="continue the run from its _last.pth checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="one training and one validation batch; "
                                                               "writes nothing")
    add_flags(parser, "subset", "device", "seed", "hub", "outputs", "no-download", "precision", "compile")


def valid_search_params(params):
    """Why a search result's best_params cannot be used, or '' when they can."""
    if not isinstance(params, dict) or set(params) != set(SEARCHED):
        return f"its best_params do not hold exactly {', '.join(SEARCHED)}"
    checks = {"learning_rate": lambda v: v > 0, "batch_size": lambda v: v >= 2 and float(v).is_integer(),
              "momentum": lambda v: 0 <= v < 1, "weight_decay": lambda v: v >= 0}
    for key, check in checks.items():
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                not check(value):
            return f"its {key} {value!r} is not a usable value"
    return ""


def search_result(args, dataset, log):
    """best_params of outputs/search/{model}.json when it is usable, else {} with the reason printed."""
    path = Path(args.outputs) / "search" / f"{args.model}.json"
    if not path.is_file():
        return path, {}
    try:
        result = read_json(path, "search")
    except UserError as err:
        log(f"ignoring {path}: {err}")
        return path, {}
    expected = {"model": args.model, "dataset": dataset, "num_classes": len(CLASSES[dataset])}
    reasons = [f"it is for {key} {result.get(key)!r}, not {value!r}" for key, value in expected.items()
               if result.get(key) != value]
    if result.get("dry_run") is not False:
        reasons.append("it does not say it is from a real (not dry) run")
    if result.get("complete") is not True:
        reasons.append("the search is not complete (run search.py again to finish it)")
    if result.get("best_params") is None and not reasons:
        reasons.append("every trial diverged")
    reasons = reasons or [reason for reason in [valid_search_params(result.get("best_params"))] if reason]
    if reasons:
        log(f"ignoring {path}: {'; '.join(reasons)}")
        return path, {}
    return path, {key: (int(value) if key == "batch_size" else value) for key, value in result["best_params"].items()}


def resolve_settings(args, defaults, layers, log=print):
    """Fill each unset value from the first layer that has it; print every value with its source once.

    layers: [(source, {key: value})] in order of precedence, after the command line.
    """
    sources = {}
    for key in defaults:
        if getattr(args, key, None) is not None:
            sources[key] = "flag"
            continue
        for source, values in layers + [("default", defaults)]:
            if key in values:
                setattr(args, key, values[key])
                sources[key] = source
                break
    if getattr(args, "schedule", None) == "cosine" and "patience" in sources:
        # stopping while the rate is still high would leave the annealing undone
        if sources["patience"] == "flag":
            raise TrainingError(f"--patience {args.patience} stops constant-rate runs early; a cosine schedule runs "
                                f"all its --epochs and keeps the best epoch: leave --patience out, or give fewer "
                                f"--epochs")
        sources["patience"] += "; unused: a cosine schedule runs all its epochs"
    log("settings (value: source):")
    for key in defaults:
        log(f"  {key:14} {getattr(args, key)!s:16} {sources[key]}")
    return sources


def resumed_run(args, best_path, log, json_path):
    """(state, model, settings layers) of the run being resumed, or (None, None, []) without --resume.

    Flags that contradict the run, or leave it nothing to train, are refused first.
    """
    if not args.resume:
        return None, None, []
    last_path = last_checkpoint_path(best_path)
    state, model = load_checkpoint(last_path, args.model,
                                   hint=f"python {Path(sys.argv[0]).name} --model {args.model} (without --resume)")
    saved = state.get("args", {})
    if "augment" in saved:  # a recipe name, also from checkpoints that stored True/False
        saved = {**saved, "augment": augment_recipe(saved["augment"])}
    for key in RUN_KEYS:
        given = getattr(args, key, None)
        if given is not None and key in saved and given != saved[key]:
            flag = "--" + key.replace("_", "-").replace("learning-rate", "lr")
            raise TrainingError(f"{flag} {given} contradicts the run in {last_path} ({saved[key]}): leave the "
                                f"flag out to resume that run, or start a new run without --resume")
    if saved.get("schedule") == "cosine" and args.epochs is not None and args.epochs != saved.get("epochs"):
        raise TrainingError(f"--epochs {args.epochs} contradicts the run in {last_path}: its cosine schedule was "
                            f"planned over {saved.get('epochs')} epochs; leave --epochs out to resume it, or start "
                            f"a new run without --resume")
    done = state.get("epoch", 0)
    wanted = args.epochs if args.epochs is not None else saved.get("epochs")
    if wanted == done and not Path(json_path).exists() and Path(best_path).exists():
        # interrupted after its last epoch was saved, before its JSON: nothing to train, the JSON to write
        log(f"the run in {last_path} has trained all its {done} epochs but has no {json_path}: resuming writes it")
    elif wanted is not None and wanted <= done:
        raise TrainingError(f"the run in {last_path} has already trained {done} epochs, --epochs is {wanted}: "
                            f"pass --epochs above {done} to train more; nothing was written")
    log(f"resuming {last_path} after epoch {done}")
    return state, model, [(f"resumed run {last_path}", {key: saved[key] for key in RUN_KEYS + ("epochs", "patience")
                                                        if key in saved})]


def plain_args(args):
    """argparse values as JSON- and weights_only-safe plain types."""
    return {key: (str(value) if isinstance(value, Path) else value.name if isinstance(value, Precision) else value)
            for key, value in vars(args).items()}


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
        if args.subset > len(labels):
            raise UserError(f"--subset {args.subset} is larger than the {len(labels):,} training images of "
                            f"{args.dataset}: give a smaller one or leave it out")
        chosen = stratified_subset(labels, args.subset, args.seed)
        images, labels = images[chosen], labels[chosen]
    val = None
    if mini or val_fraction:
        train_index, val_index = mini_split(labels, args.seed) if mini else \
            stratified_split(labels, val_fraction, args.seed)
        classes = len(CLASSES[args.dataset])
        if len(val_index) < classes or len(train_index) < 2 * classes:
            raise UserError(f"{len(labels):,} training images are too few to hold out a validation set "
                            f"({len(train_index)} train / {len(val_index)} val for {classes} classes): "
                            f"use a larger --subset")
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


def scheduled_lr(args, epoch, step, steps):
    """The learning rate of step `step` (of `steps`) in epoch `epoch` (from 1) under args.schedule."""
    if args.schedule == "constant":
        return args.learning_rate
    progress = (epoch - 1 + step / steps) / args.epochs
    return args.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def train_one_epoch(model, optimizer, data, args, generator, *, epoch=1, rank=0, world_size=1, max_batches=None,
                    progress=False):
    """One pass over this rank's shard: {"loss", "acc", "images"} summed over all ranks.

    Stops early (loss inf) when the mean loss so far shows divergence, finite or not.
    """
    model.train()
    images, labels = data["train"]
    device = images.device
    limit = DIVERGED * math.log(max(int(labels.max()) + 1, 2))
    loss_sum = torch.zeros((), device=device)  # float32: MPS has no float64
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    batches = iterate_batches(images, labels, args.batch_size, shuffle=True, generator=generator,
                              rank=rank, world_size=world_size)
    sizes = batch_sizes(shard_length(len(labels), world_size), args.batch_size)
    affines, recipe = None, AUGMENTS[augment_recipe(args.augment)]
    for step, (batch, target) in enumerate(progress_bar(batches, len(sizes), progress)):
        if max_batches is not None and step >= max_batches:
            break
        if len(target) < 2:  # BatchNorm cannot train on a single image (a last batch of one)
            continue
        if recipe and affines is None:  # drawn after the shuffle, as one draw per step would be
            affines = epoch_affines(sizes, generator, device, recipe)
        inputs = augment(batch, data["mean"], data["std"], theta=next(affines)) if recipe else \
            normalize(batch, data["mean"], data["std"])
        if args.precision.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), target)
        if args.schedule != "constant":  # constant: the optimizer keeps the --lr it was built with
            rate = scheduled_lr(args, epoch, step, len(sizes))
            for group in optimizer.param_groups:
                group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        loss_sum += loss.detach() * len(target)
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
        if (step + 1) % NAN_CHECK_EVERY == 0 and not loss_sum / seen < limit:
            break
    loss_total, correct_total, seen_total = reduce_sums([loss_sum, correct, seen], device, world_size)
    mean_loss = loss_total / max(seen_total, 1)
    return {"loss": mean_loss if mean_loss < limit else math.inf, "raw_loss": mean_loss,
            "acc": correct_total / max(seen_total, 1), "images": seen_total}


@torch.inference_mode()
def evaluate_loss_acc(model, images, labels, mean, std, precision, *, rank=0, world_size=1, max_batches=None):
    """Mean cross-entropy and accuracy over (this rank's shard of) a split, summed over ranks."""
    model = unwrap(model) if world_size > 1 else model  # no DDP collectives in evaluation
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)  # float32: MPS has no float64
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    batches = iterate_batches(images, labels, EVAL_BATCH, rank=rank, world_size=world_size)
    for step, (batch, target) in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        inputs = normalize(batch, mean, std)
        if precision.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.bf16):
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


def fit(model, optimizer, data, args, *, history=(), best_path=None, meta=None, rank=0, world_size=1,
        log=print):
    """Train up to args.epochs (resuming after `history`); keep the best and last checkpoints.

    Every epoch reseeds shuffling, augmentation and dropout from (seed, epoch), so a
    resumed run repeats exactly what an uninterrupted one would have done.
    Returns the history: one dict per epoch.
    """
    history = list(history)
    last_path = last_checkpoint_path(best_path) if best_path else None
    limit = dict(max_batches=1 if args.dry_run else None, rank=rank, world_size=world_size)
    generator = torch.Generator()
    started = time.time() - (history[-1]["elapsed"] if history else 0.0)
    for epoch in range(len(history) + 1, args.epochs + 1):
        generator.manual_seed(epoch_seed(args.seed, epoch))
        torch.manual_seed(epoch_seed(args.seed, epoch))
        epoch_start = time.time()
        train = train_one_epoch(model, optimizer, data, args, generator, epoch=epoch,
                                progress=rank == 0 and sys.stdout.isatty() and not args.dry_run, **limit)
        train_seconds = time.time() - epoch_start
        if not math.isfinite(train["loss"]):
            raise TrainingError(f"the training loss diverged ({train['raw_loss']:.3g}) in epoch {epoch}: stopped "
                                f"without saving it (last good checkpoint: {last_path}); try a lower --lr")
        val = evaluate_loss_acc(model, *data["val"], data["mean"], data["std"], args.precision, **limit) \
            if data["val"] else None
        row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
               "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
               "seconds": time.time() - epoch_start, "images": int(train["images"]),
               "images_per_sec": train["images"] / max(train_seconds, 1e-9), "elapsed": time.time() - started,
               "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        best = best_row(history)
        if rank == 0 and best_path:  # saved before the epoch's line is printed
            state = dict(meta or {}, epoch=epoch, history=history, best_val_loss=best["val_loss"])
            if best["epoch"] == epoch:
                save_checkpoint(best_path, model, optimizer, **state)
            save_checkpoint(last_path, model, optimizer, **state)
        log(epoch_line(row, args.epochs))
        if args.dry_run:
            break
        if data["val"] and best["val_loss"] is not None and epoch - best["epoch"] >= args.patience \
                and args.schedule != "cosine":
            log(f"early stop: no better validation loss for {args.patience} epochs (best: epoch {best['epoch']})")
            break
    return history


# ----------------------------------------------------------------------------- results files

def history_summary(args, history, checkpoint):
    best = best_row(history)
    return {"args": plain_args(args), "history": history, "best_epoch": best["epoch"] if best else None,
            "best_val_loss": best["val_loss"] if best else None, "best_val_acc": best["val_acc"] if best else None,
            "checkpoint": str(checkpoint)}


def plot_history(history, path, title):
    """Loss and accuracy curves, train and validation, both panels labelled."""
    plt = pyplot()
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
    save_figure(figure, path)


# ----------------------------------------------------------------------------- wiring

def prepare_model(model, device, args, world_size, optimizer=None):
    """Move to the device, then the memory format, DDP and compile wrappers.

    A resumed run's optimizer state was loaded while the model was still on the CPU: loading it
    again after the move makes torch cast each state tensor to its parameter's device (without
    it, the first step on a GPU fails with tensors on two devices).
    """
    model = model.to(device)
    if args.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer.state_dict())
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    return model


def checkpoint_meta(args, data):
    return {"model": args.model, "num_classes": len(CLASSES[args.dataset]), "dataset": args.dataset,
            "classes": CLASSES[args.dataset], "mean": data["mean"], "std": data["std"], "args": plain_args(args)}


def last_checkpoint_path(best_path):
    return Path(best_path).with_name(Path(best_path).stem + "_last.pth")


def run_stage(args, model, optimizer, data, *, json_path, title, best_path, meta, rank, world_size, device,
              history=(), log=print):
    """fit() under a lock on its outputs, then the history JSON and curves.

    Shared by train.py, finetune.py and transfer_mnist.py: one loop, one set of files.
    """
    json_path, last_path = Path(json_path), last_checkpoint_path(best_path)
    log(f"precision: {args.precision.name} ({args.precision.reason})")
    model = prepare_model(model, device, args, world_size, optimizer)
    if args.dry_run:
        history = fit(model, optimizer, data, args, history=history, rank=rank, world_size=world_size, log=log)
        log("dry run finished: one training and one validation batch ran, nothing was written")
        return history
    try:
        history = fit(model, optimizer, data, args, history=history, best_path=best_path, meta=meta, rank=rank,
                      world_size=world_size, log=log)
    except KeyboardInterrupt:
        log(f"\ninterrupted: the last finished epoch is saved in {last_path}; continue with --resume")
        raise SystemExit(130)
    if rank == 0:
        write_json(json_path, history_summary(args, history, best_path))
        plot_history(history, json_path.with_suffix(".png"), title)
        log(f"wrote {best_path}, {last_path}, {json_path} and {json_path.with_suffix('.png')}")
    return history


def locked_outputs(args, best_path, json_path, rank):
    """The lock a writing run holds on its files (none for dry runs and ranks other than 0)."""
    if args.dry_run or rank != 0:
        return output_lock()
    check_writable(Path(best_path).parent, Path(json_path).parent)
    return output_lock(best_path, json_path)


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet", choices=sorted(MODELS), help="network (default: alexnet)")
    add_flags(parser, "dataset", "data-dir")
    add_training_flags(parser, DEFAULTS, "SGD learning rate", searched=True)
    parser.add_argument("--momentum", type=non_negative_float, default=None,
                        help=f"SGD momentum (default: search result, else {DEFAULTS['momentum']})")
    parser.add_argument("--weight-decay", type=non_negative_float, default=None,
                        help=f"weight decay (default: search result, else {DEFAULTS['weight_decay']})")
    return parser.parse_args(argv)


def run(args):
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *_: None)
    best_path = Path(args.hub) / "pre_trained" / f"{args.model}.pth"
    json_path = Path(args.outputs) / "train" / f"{args.model}.json"
    with locked_outputs(args, best_path, json_path, rank):
        resumed, model, layers = resumed_run(args, best_path, log, json_path)
        if not resumed:
            search_path, searched = search_result(args, args.dataset or DEFAULTS["dataset"], log)
            layers.append((str(search_path), searched))
        resolve_settings(args, DEFAULTS, layers, log)
        args.precision = choose_precision(args.precision, device)
        set_seed(args.seed)
        data = load_training_data(args, device)
        if not resumed:
            model = build_model(args.model, len(CLASSES[args.dataset]))
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        if resumed:
            optimizer.load_state_dict(resumed["optimizer"])
        history = resumed["history"] if resumed else []
        log(f"{args.model} on {args.dataset}: {len(data['train'][1]):,} train / {len(data['val'][1]):,} val images, "
            f"device {device}, world size {world_size}")
        return run_stage(args, model, optimizer, data, json_path=json_path, best_path=best_path,
                         title=f"{args.model} pre-training on {args.dataset}", meta=checkpoint_meta(args, data),
                         rank=rank, world_size=world_size, device=device, history=history, log=log)


def main(argv=None):
    return run_script(run, parse_args(argv))


if __name__ == "__main__":
    main()
