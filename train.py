"""SGD pre-training (stage 2 of the study); its loop is the one every training script uses.

finetune.py, transfer_mnist.py and search.py call fit() below with their own values.

    python train.py --model alexnet                                      # EMNIST ByClass, 90 % train / 10 % val
    python train.py --model alexnet --params outputs/search/alexnet.json # with the search's best values
    python train.py --model lenet --dataset sklearn-digits --epochs 3    # offline, seconds
    python train.py --model lenet --dataset sklearn-digits --dry-run     # one batch, writes nothing
    python train.py --model alexnet --resume                             # continue an interrupted run
    torchrun --nproc_per_node=2 train.py --model resnet                  # data parallel

Writes model_hub/pre_trained/{model}.pth (best validation loss), {model}_last.pth (to train on
with --resume --epochs N), outputs/train/{model}.json (history) and .png (curves). Until a run
finishes, its checkpoints are {model}_unfinished.pth and {model}_unfinished_last.pth, so a
cancelled or failed run never replaces a finished one.
"""
import runs

if __name__ == "__main__":
    runs.interrupt_quietly()  # Ctrl-C while torch loads: one line and exit 130

import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (AUGMENTS, CLASSES, DATASETS, EVAL_BATCH, VAL_FRACTION, add_data_flags, augment_recipe,
                  iterate_batches, load_training_data, model_batch, training_batches)
from models import MODELS, build_model, forward, load_checkpoint, read_checkpoint, save_checkpoint, unwrap
from runs import (Parser, UserError, add_run_flags, all_or_nothing, check_outputs, check_value, checked, choose_precision, fraction,
                  is_int, is_number, is_terminal, log_for, momentum, non_negative_float, one_line_errors, one_of,
                  output_lock, path_value, positive_float, positive_int, pyplot, read_json, resolve_settings,
                  save_figure, seed_value, set_seed, setup_distributed, write_json)

batch_size = checked("a whole number", int, lambda v: v >= 2, "at least 2 (BatchNorm cannot train on one image)")
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("sgd", "adam")  # build_optimizer below makes them


@dataclass(frozen=True)
class Setting:
    """One row of SETTINGS: everything the scripts derive about one setting."""
    default: object
    flag: str  # None: no flag (set by a stage's DEFAULTS only)
    check: object  # argparse type and the check of the same value read from --params or a checkpoint
    help: str
    defines_run: bool = True  # --resume refuses a flag that contradicts the run's value
    grid: list = None  # the study's search grid (search.py tries these values)


# Pre-training's values, one row each and written only here: the defaults, the flags and their help, the
# types, the --params and checkpoint checks, the resume check and the search grid all come from this table.
# Fine-tuning, transfer and the search state only what they change. A flag, --params FILE or the run being
# resumed overrides a default; every run prints each value with its source before it starts.
SETTINGS = {
    "dataset": Setting("emnist-byclass", "--dataset", one_of(sorted(DATASETS), "a dataset name"),
                       f"dataset: {', '.join(sorted(DATASETS))}"),
    "subset": Setting(None, "--subset", positive_int, "train on N stratified training images"),
    "seed": Setting(0, "--seed", seed_value, "seed of splits, shuffling, augmentation"),
    "optimizer": Setting("sgd", None, one_of(OPTIMIZERS, "an optimizer name"), "sgd (the study's pre-training) or adam"),
    "learning_rate": Setting(0.01, "--lr", positive_float, "learning rate", grid=[1e-3, 1e-2, 1e-1]),
    "batch_size": Setting(64, "--batch-size", batch_size, "batch size", grid=[16, 32, 64]),  # the study's largest
    "momentum": Setting(0.9, "--momentum", momentum, "SGD momentum", grid=[0.0, 0.85, 0.9, 0.95]),
    "weight_decay": Setting(1e-4, "--weight-decay", non_negative_float, "weight decay", grid=[0.0, 1e-2, 1e-3, 1e-4]),
    "epochs": Setting(20, "--epochs", positive_int, "epochs in all, resumed ones included", defines_run=False),
    "patience": Setting(10, "--patience", positive_int, "early stop after N epochs without a better validation "
                                                        "loss (constant schedule)", defines_run=False),
    "clip": Setting(1.0, "--clip", non_negative_float, "the study's gradient-norm clip, 0: off"),
    "augment": Setting("study", "--augment", one_of(AUGMENTS, "a recipe name"),
                       f"{', '.join(AUGMENTS)} (data.AUGMENTS; study: the study's random affine)"),
    "schedule": Setting("constant", "--schedule", one_of(SCHEDULES, "a schedule name"),
                        "constant (the study's) or cosine (to 0 over --epochs)"),
    "val_fraction": Setting(VAL_FRACTION, "--val-fraction", fraction, "hold out this fraction for validation, 0: none"),
}
DEFAULTS = {key: row.default for key, row in SETTINGS.items()}  # pre-training's values
GRID = {key: row.grid for key, row in SETTINGS.items() if row.grid}  # the study's grid, searched by search.py
NAN_CHECK_EVERY = 100  # batches between checks for a diverged loss (each check syncs the GPU)
DIVERGED = 10.0  # a mean training loss above DIVERGED x ln(classes) (chance is 1 x) means divergence


class TrainingError(UserError):
    """A run that cannot go on (diverged loss, nothing to train): the message says what to do."""


# ----------------------------------------------------------------------------- the loop

def scheduled_lr(settings, epoch, step, steps):
    """The learning rate of step `step` (of `steps`) in epoch `epoch` (from 1)."""
    if settings["schedule"] == "constant":
        return settings["learning_rate"]
    progress = (epoch - 1 + step / steps) / settings["epochs"]
    return settings["learning_rate"] * 0.5 * (1 + math.cos(math.pi * progress))


def train_one_epoch(model, optimizer, data, settings, precision, generator, epoch, *, rank=0, world_size=1,
                    max_batches=None, progress=False):
    """One pass over this rank's shard: {"loss", "acc", "images"} summed over all ranks.

    Stops early (loss inf) when the mean loss so far shows divergence, finite or not.
    """
    model.train()
    steps, batches = training_batches(data, settings["batch_size"], AUGMENTS[settings["augment"]], generator, rank,
                                      world_size, precision.channels_last)
    device = data["train"][1].device
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device), 0
    bound = DIVERGED * math.log(max(data["classes"], 2))  # float32 sums: MPS has no float64
    for step, (inputs, target) in enumerate(progress_bar(batches, steps) if progress else batches):
        if max_batches is not None and step >= max_batches:  # --dry-run: one batch
            break
        logits = forward(model, inputs, precision)
        loss = F.cross_entropy(logits.float(), target)
        if settings["schedule"] != "constant":  # constant: the optimizer keeps the rate it was built with
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(settings, epoch, step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["clip"])
        optimizer.step()
        loss_sum += loss.detach() * len(target)
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
        if (step + 1) % NAN_CHECK_EVERY == 0 and not loss_sum / seen < bound:  # diverged: stop the epoch
            break
    loss_total, correct_total, seen_total = reduce_sums([loss_sum, correct, seen], device, world_size)
    mean_loss = loss_total / max(seen_total, 1)
    return {"loss": mean_loss if mean_loss < bound else math.inf, "raw_loss": mean_loss,
            "acc": correct_total / max(seen_total, 1), "images": seen_total}


def progress_bar(batches, steps):
    from tqdm import tqdm

    return tqdm(batches, total=steps, leave=False, unit="batch")


@torch.inference_mode()
def evaluate_loss_acc(model, images, labels, mean, std, precision, *, rank=0, world_size=1, max_batches=None):
    """Mean cross-entropy and accuracy over (this rank's shard of) a split, summed over ranks."""
    model = unwrap(model) if world_size > 1 else model  # no DDP collectives in evaluation
    model.eval()
    device = images.device
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device), 0
    for step, (batch, target) in enumerate(iterate_batches(images, labels, EVAL_BATCH, rank=rank,
                                                           world_size=world_size)):
        if max_batches is not None and step >= max_batches:
            break
        logits = forward(model, model_batch(batch, mean, std, precision.channels_last), precision)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
    loss_total, correct_total, seen_total = reduce_sums([loss_sum, correct, seen], device, world_size)
    return {"loss": loss_total / max(seen_total, 1), "acc": correct_total / max(seen_total, 1)}


def fit(model, optimizer, data, settings, precision, *, history=(), files=None, meta=None, rank=0, world_size=1,
        dry_run=False, log=print):
    """Train up to settings["epochs"] (resuming after `history`), keeping the best and last epochs
    in files["unfinished"] and files["unfinished_last"] when `files` is given. Returns the history.

    Every epoch reseeds shuffling, augmentation and dropout from (seed, epoch), so a resumed
    run repeats exactly what an uninterrupted one would have done.
    """
    history = list(history)
    shard = dict(max_batches=1 if dry_run else None, rank=rank, world_size=world_size)
    generator = torch.Generator()
    started = time.time() - (history[-1]["elapsed"] if history else 0.0)
    validate = data["val"] is not None
    saved_last = bool(history)  # whether files["unfinished_last"] holds this run (a resumed one: yes)
    try:
        for epoch in range(len(history) + 1, settings["epochs"] + 1):
            generator.manual_seed(epoch_seed(settings["seed"], epoch))
            torch.manual_seed(epoch_seed(settings["seed"], epoch))
            epoch_start = time.time()
            train = train_one_epoch(model, optimizer, data, settings, precision, generator, epoch,
                                    progress=rank == 0 and is_terminal() and not dry_run, **shard)
            train_seconds = time.time() - epoch_start
            if not train["images"]:
                raise TrainingError("no batch of two or more images to train on: " + (
                    "use a larger --subset" if settings.get("subset") else f"{settings['dataset']} is too small"))
            if not math.isfinite(train["loss"]):
                raise TrainingError(f"the training loss diverged ({train['raw_loss']:.3g}) in epoch {epoch}: stopped "
                                    f"without saving it; try a lower --lr"
                                    + (" or --weight-decay" if settings["weight_decay"] else ""))
            val = evaluate_loss_acc(model, *data["val"], data["mean"], data["std"], precision, **shard) \
                if validate else None
            history.append({"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
                            "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
                            "seconds": time.time() - epoch_start, "images": int(train["images"]),
                            "images_per_sec": train["images"] / max(train_seconds, 1e-9),
                            "elapsed": time.time() - started, "lr": optimizer.param_groups[0]["lr"]})
            best = best_row(history)
            if rank == 0 and files:  # saved before the epoch's line is printed
                state = dict(meta, epoch=epoch, history=history, best_val_loss=best["val_loss"])
                if best["epoch"] == epoch:
                    save_checkpoint(files["unfinished"], model, optimizer, **state)
                save_checkpoint(files["unfinished_last"], model, optimizer, **state)
                saved_last = True
            log(epoch_line(history[-1], settings["epochs"]))
            if dry_run:
                log("dry run finished: one training and one validation batch ran, nothing was written")
                break
            if stops_early(history, settings):
                log(f"early stop: no better validation loss for {settings['patience']} epochs (best: epoch "
                    f"{best['epoch']})")
                break
    except KeyboardInterrupt:
        if files and saved_last and files["unfinished_last"].is_file():
            log(f"\ninterrupted: the finished epochs are in {files['unfinished_last']}; continue with --resume "
                f"({files['best']} is untouched)")
        raise
    return history


def reduce_sums(values, device, world_size):
    """Sum a list of numbers over all ranks."""
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        totals = totals.to(device)  # nccl reduces GPU tensors only
        dist.all_reduce(totals)
    return totals.tolist()


def epoch_seed(seed, epoch):
    return seed * 1_000_003 + epoch


def best_row(history):
    """The epoch with the lowest validation loss (the last epoch when there is no validation)."""
    scored = [row for row in history if row["val_loss"] is not None]
    return min(scored, key=lambda row: row["val_loss"]) if scored else (history[-1] if history else None)


def stops_early(history, settings):
    """Whether a constant-rate run with validation has gone --patience epochs without a better validation
    loss (a cosine schedule runs all its epochs): where fit stops, and a resumed rate choice leaves a rate."""
    best = best_row(history)
    return history[-1]["val_loss"] is not None and settings["schedule"] == "constant" and \
        len(history) - best["epoch"] >= (settings.get("patience") or math.inf)


def epoch_line(row, epochs):
    val = (f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:6.2f}%" if row["val_loss"] is not None
           else "val -")
    return (f"epoch {row['epoch']:3d}/{epochs} | train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_acc']:6.2f}% | {val} | {row['images_per_sec']:9,.0f} img/s | "
            f"{row['elapsed']:7.1f}s")


# ----------------------------------------------------------------------------- data and model

def build_optimizer(model, settings):
    """The one place an optimizer is made (pre-training, the search, fine-tuning, transfer, the benchmarks):
    settings["optimizer"] names it, the other settings give its values."""
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings["learning_rate"])
    return torch.optim.SGD(model.parameters(), lr=settings["learning_rate"], momentum=settings["momentum"],
                           weight_decay=settings["weight_decay"])


def prepare_model(model, device, precision, world_size=1, compile_model=False, optimizer=None):
    """Move to the device, then the memory format, DDP and compile wrappers.

    A resumed run's optimizer state was loaded while the model was still on the CPU: loading it
    again after the move makes torch cast each state tensor to its parameter's device.
    """
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer.state_dict())
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


# ----------------------------------------------------------------------------- settings and files

def add_setting_flags(parser, defaults, skip=()):
    """One flag per setting of the stage, its help showing the stage's default; None means 'not given'."""
    for key in (key for key in defaults if key not in skip and SETTINGS[key].flag):
        row, shown = SETTINGS[key], "all" if defaults[key] is None else defaults[key]
        names = getattr(row.check, "names", None)  # argparse's own choices: "invalid choice" and the list
        kind = dict(choices=names, metavar="NAME") if names else dict(type=row.check, metavar="N" if row.check.kind
                                                                            is int else "X")
        parser.add_argument(row.flag, dest=key, default=None, help=f"{row.help} (default: {shown})", **kind)


def check_setting(key, value, where):
    """A setting read from a file, held to its flag's rules (None only where the default is None)."""
    if value is None and SETTINGS[key].default is None:
        return value
    return check_value(SETTINGS[key].check, value, f"{where}: {key}")


def check_settings(settings, args):
    """Settings that cannot work together are refused in one line before any work."""
    if settings.get("schedule") == "cosine" and getattr(args, "patience", None) is not None:
        raise TrainingError(f"--patience {args.patience} stops constant-rate runs early; a cosine schedule runs all "
                            f"its --epochs and keeps the best epoch: leave --patience out")
    if "val_fraction" in settings and not settings["val_fraction"] and getattr(args, "patience", None) is not None:
        raise TrainingError("--patience needs a validation set to stop on: add --val-fraction 0.1, or leave "
                            "--patience out")


def check_params(params, where):
    """Searched values (GRID's keys) as train.py takes them."""
    if not isinstance(params, dict) or set(params) != set(GRID):
        raise UserError(f"{where}: best_params must hold exactly {', '.join(GRID)}")
    for key, value in params.items():
        check_setting(key, value, where)
    return params


def search_params(path, model, dataset):
    """The settings layer of --params FILE: a finished search's best values (and its dataset)."""
    result = read_json(path, "search")
    where = f"--params {path}"
    if not isinstance(result.get("model"), str) or result["model"] != model:
        raise UserError(f"{where} is a search for {result.get('model')!r}, not {model}: give that network's file")
    if dataset is not None and result.get("dataset") != dataset:
        raise UserError(f"{where} was searched on {result.get('dataset')!r}, not --dataset {dataset}")
    if not isinstance(result.get("dataset"), str) or result["dataset"] not in DATASETS:
        raise UserError(f"{where} names no known dataset ({result.get('dataset')!r}): redo the search")
    if result.get("complete") is not True or result.get("dry_run") is not False:
        raise UserError(f"{where} is not a finished search: run search.py again to finish it")
    if result.get("best_params") is None:
        raise UserError(f"{where}: every trial diverged; search again with lower learning rates")
    return (str(path), {"dataset": result["dataset"], **check_params(result["best_params"], where)})


def stage_files(best_path, json_path):
    """A stage's files: the finished run's, and the unfinished run's checkpoints until it finishes."""
    best, json_path = Path(best_path), Path(json_path)
    return {"best": best, "last": best.with_name(best.stem + "_last.pth"),
            "unfinished": best.with_name(best.stem + "_unfinished.pth"),
            "unfinished_last": best.with_name(best.stem + "_unfinished_last.pth"),
            "json": json_path, "png": json_path.with_suffix(".png")}


def locked(files, dry_run, rank):
    """Check every output before any work, then hold their lock (nothing for dry runs and ranks above 0)."""
    if dry_run or rank != 0:
        return output_lock()
    check_outputs(*files.values())
    return output_lock(files["best"], files["json"])


def resumed_run(args, files, defaults, log):
    """(state, model, settings layer) of the run --resume continues: the unfinished one, else the
    finished one's last epoch. Flags that contradict it, or leave it nothing to train, are refused.
    """
    path = files["unfinished_last"] if files["unfinished_last"].is_file() else files["last"]
    state, model = load_checkpoint(path, args.model, datasets=DATASETS,
                                   hint="nothing to resume: start the run without --resume")
    saved = run_state(state, path, model)
    if path == files["unfinished_last"] and files["unfinished"].is_file():
        best = read_checkpoint(files["unfinished"], "")
        if best.get("run") != state.get("run"):
            raise TrainingError(f"{files['unfinished']} and {path} belong to two different runs (one was stopped "
                                f"before it saved both): neither can be resumed; start a new run without --resume")
    for key, row in SETTINGS.items():
        given = getattr(args, key, None)
        if row.defines_run and given is not None and key in saved and given != saved[key]:
            raise TrainingError(f"{row.flag} {given} contradicts the run in {path} ({saved[key]}): leave the "
                                f"flag out to resume that run, or start a new run without --resume")
    done, wanted = state["epoch"], args.epochs if args.epochs is not None else saved.get("epochs")
    if saved.get("schedule") == "cosine" and wanted != saved.get("epochs"):
        raise TrainingError(f"--epochs {args.epochs} contradicts the run in {path}: its cosine schedule was planned "
                            f"over {saved.get('epochs')} epochs; leave --epochs out, or start a new run")
    if wanted is not None and wanted <= done:
        if wanted < done or not needs_finishing(path, files, done):
            raise TrainingError(f"the run in {path} has already trained {done} epochs, --epochs is {wanted}: "
                                f"pass --epochs above {done} to train more; nothing was written")
        log(f"the run in {path} has trained all its {done} epochs: resuming writes its files")
    log(f"resuming {path} after epoch {done}")
    state["path"] = path
    return state, model, (f"resumed run {path}", {key: saved[key] for key in defaults if key in saved})


HISTORY_FIELDS = {"epoch": is_int, "train_loss": is_number, "train_acc": is_number, "seconds": is_number,
                  "images": is_int, "images_per_sec": is_number, "elapsed": is_number, "lr": is_number,
                  "val_loss": lambda v: v is None or is_number(v), "val_acc": lambda v: v is None or is_number(v)}


def run_state(state, path, model):
    """The settings of a checkpoint that --resume continues, after every field the resumed run uses
    (settings, epoch, history, optimizer state) was checked; one line that names the field if not."""
    def refuse(field, what):
        raise TrainingError(f"{path} cannot be resumed: its {field} {what}; start a new run without --resume")

    saved = state.get("args")
    if not isinstance(saved, dict):
        refuse("args", "are missing (it is not a training run's checkpoint)")
    saved = {**saved, "augment": augment_recipe(saved.get("augment", "study"))}  # older runs stored True/False
    for key in SETTINGS:
        if key in saved:
            try:
                check_setting(key, saved[key], "its args")
            except UserError as err:
                raise TrainingError(f"{path} cannot be resumed: {err}; start a new run without --resume") from None
    epoch, history = state.get("epoch"), state.get("history")
    if not is_int(epoch) or epoch < 1:
        refuse("epoch", f"is {epoch!r}, not a whole number of at least 1")
    if not isinstance(history, list) or len(history) != epoch:
        refuse("history", f"does not list its {epoch} epochs")
    for number, row in enumerate(history, 1):
        bad = [key for key, test in HISTORY_FIELDS.items() if not isinstance(row, dict) or not test(row.get(key))]
        if bad or row["epoch"] != number:
            refuse(f"history row {number}", f"holds no usable {', '.join(bad) or 'epoch number'}")
    optimizer = state.get("optimizer")
    shapes = [tuple(parameter.shape) for parameter in model.parameters()]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict) or \
            not isinstance(optimizer.get("state"), dict) or groups[0].get("params") != list(range(len(shapes))):
        refuse("optimizer state", f"does not match the {len(shapes)} parameters of {state['model']}")
    for index, values in optimizer["state"].items():
        tensors = values.values() if isinstance(values, dict) else [None]
        if index not in range(len(shapes)) or not all(
                value is None or isinstance(value, torch.Tensor) and (value.dim() == 0 or
                                                                      tuple(value.shape) == shapes[index])
                for value in tensors):
            refuse("optimizer state", f"of parameter {index!r} does not match {state['model']}'s parameters")
    return saved


def needs_finishing(path, files, done):
    """An unfinished run that saved its last epoch, or a finished one whose JSON was never written."""
    if path == files["unfinished_last"]:
        return True
    try:
        history = read_json(files["json"], "run").get("history")
    except UserError:
        return True
    return not isinstance(history, list) or len(history) != done


def finish(files, settings, history, title, log, extra=()):
    """Publish the finished run all at once (runs.all_or_nothing): the unfinished run's checkpoints over
    the finished run's, its JSON and curves, and each (path, write) of `extra` (write(temporary) makes it)."""
    best = best_row(history)
    extra = list(extra)
    with all_or_nothing(files["json"], files["png"], *(path for path, _ in extra),
                        renames=[(files["unfinished"], files["best"]), (files["unfinished_last"], files["last"])]) \
            as (json_path, png_path, *others):
        write_json(json_path, {"args": settings, "history": history, "best_epoch": best["epoch"],
                               "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"],
                               "checkpoint": str(files["best"])})
        plot_history(history, png_path, title, kept=best["epoch"], planned=settings["epochs"])
        for (_, write), partial in zip(extra, others):
            write(partial)
    log(f"wrote {files['best']}, {files['last']}, {files['json']} and {files['png']}")


def plot_history(history, path, title, kept=None, planned=None):
    """Loss and accuracy curves, train and validation, on whole epochs; the kept epoch marked, and an
    early stop (fewer epochs than the `planned`)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in [(loss_axis, "loss", "cross-entropy loss"), (acc_axis, "acc", "accuracy (%)")]:
        scale = 100 if key == "acc" else 1
        axis.plot(epochs, [scale * row[f"train_{key}"] for row in history], "o-", label="train")
        val_rows = [row for row in history if row[f"val_{key}"] is not None]
        if val_rows:
            axis.plot([row["epoch"] for row in val_rows], [scale * row[f"val_{key}"] for row in val_rows],
                      "s-", label="validation")
        if kept is not None:
            axis.axvline(kept, color="green", alpha=0.6, label=f"kept: epoch {kept}")
        if planned and epochs and epochs[-1] < planned:
            axis.axvline(epochs[-1], color="red", linestyle="--", alpha=0.6,
                         label=f"early stop ({epochs[-1]} of {planned})")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def checkpoint_meta(model_name, settings, data, precision, resumed=None, **extra):
    """What a checkpoint says of itself besides its weights: enough for any script to rebuild and use it,
    and the id of its run (a resumed run's own), so that a best and a last of two runs are never taken
    for one."""
    dataset = settings["dataset"]
    return {"model": model_name, "num_classes": len(CLASSES[dataset]), "dataset": dataset,
            "classes": CLASSES[dataset], "mean": data["mean"], "std": data["std"],
            "args": dict(settings, precision=precision.name),
            "run": resumed.get("run") if resumed else uuid.uuid4().hex, **extra}


def discard_unfinished(files, resumed_path, dry_run):
    """A run resumed from the finished run's last epoch must not publish an older run's unfinished best.

    A new run needs no such care: its first epoch is its best so far and replaces that file (a run
    cancelled before its first epoch leaves the earlier unfinished run as it was).
    """
    if not dry_run and resumed_path == files["last"]:
        files["unfinished"].unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the script

def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet", choices=sorted(MODELS), metavar="NAME",
                        help=f"network: {', '.join(sorted(MODELS))} (default: %(default)s)")
    parser.add_argument("--params", default=None, type=path_value, metavar="FILE",
                        help="lr, batch size, momentum, weight decay and dataset of a finished search")
    add_setting_flags(parser, DEFAULTS, skip=("val_fraction",))  # pre-training holds out the study's 10 %
    add_data_flags(parser, "data-dir", "no-download")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run, or the finished one")
    add_run_flags(parser, "device", "hub", "outputs", "precision", "compile", "dry-run", "update-results")
    args = parser.parse_args(argv)
    if args.resume and args.params:
        parser.error("--resume continues a run with its own values: leave --params out")
    return args


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        rank, world_size, device = setup_distributed(args.device)
        log = log_for(rank)
        files = stage_files(Path(args.hub) / "pre_trained" / f"{args.model}.pth",
                            Path(args.outputs) / "train" / f"{args.model}.json")
        layer = search_params(args.params, args.model, args.dataset) if args.params else None
        with locked(files, args.dry_run, rank):
            resumed, model, layer = resumed_run(args, files, DEFAULTS, log) if args.resume else (None, None, layer)
            settings = resolve_settings(args, DEFAULTS, [layer] if layer else [], log)
            check_settings(settings, args)
            precision = choose_precision(args.precision, device)
            log(f"precision: {precision.name} ({precision.reason})")
            set_seed(settings["seed"])
            data = load_training_data(settings, device, args.data_dir, not args.no_download, dry_run=args.dry_run)
            model = model or build_model(args.model, data["classes"])
            optimizer = build_optimizer(model, settings)
            if resumed:
                optimizer.load_state_dict(resumed["optimizer"])
            model = prepare_model(model, device, precision, world_size, args.compile, optimizer)
            log(f"{args.model} on {settings['dataset']}: {len(data['train'][1]):,} train / {len(data['val'][1]):,} "
                f"val images, device {device}, world size {world_size}")
            discard_unfinished(files, resumed and resumed["path"], args.dry_run)
            history = fit(model, optimizer, data, settings, precision, history=resumed["history"] if resumed else (),
                          files=None if args.dry_run else files,
                          meta=checkpoint_meta(args.model, settings, data, precision, resumed),
                          rank=rank, world_size=world_size, dry_run=args.dry_run, log=log)
            if rank == 0 and not args.dry_run:
                finish(files, settings, history, f"{args.model} pre-training on {settings['dataset']}", log)


if __name__ == "__main__":
    main()
