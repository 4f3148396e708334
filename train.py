"""SGD pre-training (stage 2 of the study); its loop is the one every stage uses.

    python train.py --model alexnet                                 # ByClass: 90 % train, 10 % val
    python train.py --model alexnet --params outputs/search/alexnet.json  # a search's best values
    python train.py --model lenet --dataset sklearn-digits --epochs 3     # offline, seconds
    python train.py --model lenet --dataset sklearn-digits --dry-run      # one batch, no files
    python train.py --model alexnet --resume                        # go on after Ctrl-C or a crash

Writes model_hub/pre_trained/{model}.pth after every epoch: the kept epoch's weights (the best
validation loss), and the last epoch's with its optimizer state, which --resume continues; at the
end outputs/train/{model}.json (settings, history; evaluate.py draws the curves).
"""
import argparse
import copy
import itertools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from models import MODELS, build_model, load_checkpoint, save_checkpoint
from runs import (Parser, UserError, autocast, choose_precision, get_device, one_line_errors,
                  parse_settings, save_json, set_seed)

# The study's pre-training. --params FILE (a search's result) replaces the SEARCHED ones.
DEFAULTS = dict(
    dataset="emnist-byclass",
    optimizer="sgd",  # OPTIMIZERS below
    learning_rate=0.01,
    batch_size=64,
    momentum=0.9,
    weight_decay=1e-4,
    epochs=20,
    patience=10,  # stop after this many epochs without a better validation loss (constant rate)
    clip=1.0,  # the study's gradient-norm clip (0: none)
    label_smoothing=0.0,  # the study's plain cross-entropy
    dropout=None,  # the rate of every Dropout layer while training (None: the network's own)
    augment="study",  # data.AUGMENTS: the study's random affine
    schedule="constant",  # or cosine: the rate falls to 0 over --epochs
    keep="best",  # the epoch with the lowest validation loss, or the last
    recalibrate_bn=False,  # recompute BatchNorm statistics on unaugmented images at the end
    val_fraction=data.VAL_FRACTION,
)
SEARCHED = ("learning_rate", "batch_size", "momentum", "weight_decay")
OPTIMIZERS = {  # every stage makes its optimizer here: a new one is one line
    "sgd": lambda params, lr, momentum, decay: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=decay),
    "adam": lambda params, lr, momentum, decay: torch.optim.Adam(params, lr=lr, weight_decay=decay),
}
FORMATS = {"fp32": torch.contiguous_format, "bf16": torch.channels_last}  # measured fastest
NOT_THE_RUN = {"resume", "overwrite", "epochs", "patience", "device", "data_dir", "no_download",
               "hub", "outputs", "compile", "dry_run", "recalibrate_bn"}  # may change on resume


def fraction(text):
    """An argparse type: a number from 0 up to, not including, 1."""
    if not 0 <= float(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not from 0 up to 1")
    return float(text)


def add_flags(parser, defaults):
    """The flags of every training stage, their defaults the stage's DEFAULTS (shown by --help)."""
    parser.set_defaults(**defaults)
    add = parser.add_argument
    add("--dataset", choices=sorted(data.DATASETS), metavar="NAME", help="(default: %(default)s)")
    add("--subset", type=int, metavar="N", help="train on N stratified images (default: all)")
    add("--optimizer", choices=sorted(OPTIMIZERS), help="(default: %(default)s)")
    add("--lr", dest="learning_rate", type=float, metavar="X", help="(default: %(default)s)")
    add("--batch-size", type=int, metavar="N", help="(default: %(default)s)")
    add("--momentum", type=float, metavar="X", help="SGD momentum (default: %(default)s)")
    add("--weight-decay", type=float, metavar="X", help="(default: %(default)s)")
    add("--epochs", type=int, metavar="N", help="epochs in all (default: %(default)s)")
    add("--patience", type=int, metavar="N",
        help="stop after N epochs with no better validation loss, 0: never (default: %(default)s)")
    add("--clip", type=float, metavar="X", help="gradient-norm clip, 0: off (default: %(default)s)")
    add("--label-smoothing", type=fraction, metavar="X", help="(default: %(default)s)")
    add("--dropout", type=fraction, metavar="X", help="while training (default: the network's own)")
    add("--augment", choices=list(data.AUGMENTS), help="(default: %(default)s)")
    add("--schedule", choices=["constant", "cosine"], help="(default: %(default)s)")
    add("--keep", choices=["best", "last"], help="the epoch kept (default: %(default)s)")
    add("--recalibrate-bn", action="store_true",
        help="at the end, measure BatchNorm statistics again on the unaugmented training images")
    add("--val-fraction", type=fraction, metavar="X",
        help="held out, 0: none (default: %(default)s)")
    add("--seed", type=int, default=0, help="of split, init, order, augmentation (default: 0)")
    add("--data-dir", default="data", metavar="DIR", help="dataset files (default: %(default)s)")
    add("--no-download", action="store_true", help="never download missing data")
    add("--hub", default="model_hub", metavar="DIR", help="checkpoints (default: %(default)s)")
    add("--outputs", default="outputs", metavar="DIR", help="JSON, pictures (default: %(default)s)")
    add("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda:N... (default: auto)")
    add("--precision", default="auto", choices=["auto", "fp32", "bf16"],
        help="auto: bf16 where the hardware does it natively, else fp32 (default: auto)")
    add("--compile", action="store_true", help="torch.compile the network")
    add("--resume", action="store_true", help="continue the run in the checkpoint")
    add("--overwrite", action="store_true", help="start over, replacing the checkpoint")
    add("--dry-run", action="store_true", help="one batch, then exit; writes nothing")
    return parser


# ----------------------------------------------------------------------------- the loop

def forward(model, inputs, precision):
    """The network's logits in the run's precision and memory format."""
    with autocast(precision, inputs.device):
        return model(inputs.contiguous(memory_format=FORMATS[precision]))


def epoch_batches(train_data, batch_size, augment, seed, epoch):
    """One epoch's batches, with shuffling, augmentation and dropout seeded from (seed, epoch):
    a resumed run repeats exactly what an uninterrupted one would have done."""
    torch.manual_seed(seed * 1_000_003 + epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    (images, labels), mean, std = train_data["train"], train_data["mean"], train_data["std"]
    recipe = data.AUGMENTS[augment]
    return data.train_batches(images, labels, mean, std, batch_size, generator, recipe)


def train_one_epoch(model, optimizer, batches, lr_at, clip, precision="fp32", smoothing=0.0):
    """One pass over `batches`; returns (mean loss, accuracy, images seen)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for step, (inputs, target) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        logits = forward(model, inputs, precision)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        loss_sum += loss.detach() * len(target)
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen


@torch.no_grad()
def evaluate(model, images, labels, mean, std, precision="fp32"):
    """(mean cross-entropy, accuracy) over uint8 images."""
    model.eval()
    loss_sum, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for inputs, target in data.eval_batches(images, labels, mean, std):
        logits = forward(model, inputs, precision)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    return loss_sum.item() / max(len(labels), 1), correct.item() / max(len(labels), 1)


def learning_rate(args, epoch, step, steps):
    """The rate of a step: constant, or a cosine from --lr to 0 over --epochs."""
    if args.schedule == "constant":
        return args.learning_rate
    progress = (epoch - 1 + step / steps) / args.epochs
    return args.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def fit(model, optimizer, train_data, args, precision, history=(), kept=None, save=None, log=print):
    """Train to args.epochs after `history`; after each epoch `save(kept weights, history)`.
    Returns (history, kept weights)."""
    history, val = list(history), train_data["val"]
    mean, std = train_data["mean"], train_data["std"]
    steps = math.ceil(len(train_data["train"][1]) / args.batch_size)
    for epoch in range(len(history) + 1, args.epochs + 1):
        best = kept_epoch(history, "best") if history else 0
        if val and args.schedule == "constant" and 0 < args.patience <= epoch - 1 - best:
            log(f"early stop: no better validation loss for {args.patience} epochs (best: {best})")
            break
        start = time.time()
        batches = epoch_batches(train_data, args.batch_size, args.augment, args.seed, epoch)
        batches = itertools.islice(batches, 1) if args.dry_run else progress(batches, steps, log)
        loss, acc, seen = train_one_epoch(model, optimizer, batches, lambda step: learning_rate(
            args, epoch, step, steps), args.clip, precision, args.label_smoothing)
        if not math.isfinite(loss):
            raise UserError(f"the training loss diverged in epoch {epoch} (not saved): lower --lr")
        seconds = time.time() - start
        val_loss, val_acc = (None, None) if not val else evaluate(
            model, *(t[:data.EVAL_BATCH] if args.dry_run else t for t in val), mean, std, precision)
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_loss": val_loss,
                        "val_acc": val_acc, "seconds": time.time() - start,
                        "images_per_sec": seen / seconds, "lr": optimizer.param_groups[0]["lr"]})
        if kept is None or epoch == kept_epoch(history, args.keep):
            kept = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        log(f"epoch {epoch:3d}/{args.epochs} | train loss {loss:.4f} acc {100 * acc:6.2f}% | val " +
            (f"loss {val_loss:.4f} acc {100 * val_acc:6.2f}%" if val else "-") +
            f" | {seen / seconds:7,.0f} img/s | {history[-1]['seconds']:6.1f}s")
        if args.dry_run:
            log("dry run: one training batch ran; nothing was written")
            break
        save(kept, history)
    return history, kept


@torch.no_grad()
def recalibrate_bn(model, images, labels, mean, std, precision, batch_size=256):
    """BatchNorm statistics measured again, dropout off, averaged over the unaugmented training
    images: those gathered under augmentation do not match clean images (results/emnist-byclass)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()  # dropout off, as when the network is used
    for norm in norms:
        norm.reset_running_stats()
        norm.train()
    seen = 0
    for inputs, _ in data.train_batches(images, labels, mean, std, batch_size, torch.Generator()):
        for norm in norms:  # each batch weighted by its size: the mean of every image
            norm.momentum = len(inputs) / (seen + len(inputs))
        forward(model, inputs, precision)
        seen += len(inputs)
    for norm in norms:
        norm.momentum = 0.1


def kept_epoch(history, keep):
    """The epoch whose weights are kept: the lowest validation loss (no validation: the last)."""
    scored = [row for row in history if row["val_loss"] is not None]
    return min(scored, key=lambda row: row["val_loss"])["epoch"] if keep == "best" and scored \
        else history[-1]["epoch"]


def progress(batches, steps, log, every=60.0):
    """A tqdm bar on a terminal, else a line every `every` seconds: logs show long epochs move."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        yield from tqdm(batches, total=steps, leave=False, unit="batch")
        return
    last = time.time()
    for step, batch in enumerate(batches):
        if time.time() - last > every:
            log(f"  batch {step}/{steps}")
            last = time.time()
        yield batch


# ----------------------------------------------------------------------------- a stage's files

def run_stage(model, train_data, args, device, path, json_path, meta):
    """What every training stage does around fit(): refuse or resume, train, save, report."""
    precision, why = choose_precision(args.precision, device)
    print(f"precision: {precision} ({why})")
    model = model.to(device, memory_format=FORMATS[precision])
    if args.dropout is not None:  # the training rate; evaluation never drops
        for layer in model.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = args.dropout
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), args.learning_rate, args.momentum,
                                           args.weight_decay)
    history, kept = [], None
    if args.resume and not path.exists():
        raise UserError(f"nothing to resume at {path}: leave --resume out")
    if path.exists() and not args.dry_run and not args.overwrite:
        if not args.resume:
            raise UserError(f"{path} exists: --resume continues it, --overwrite starts over")
        ckpt, _ = load_checkpoint(path, meta["model"])
        other = [f"{key} {ckpt['args'][key]}" for key, value in vars(args).items()
                 if key not in NOT_THE_RUN and ckpt.get("args", {}).get(key, value) != value]
        if "last" not in ckpt or other:
            raise UserError(f"{path} is not a run of these flags ({', '.join(other) or 'published'}"
                            f"): give the run's own flags to resume it, or --overwrite")
        model.load_state_dict(ckpt["last"]["state_dict"])
        optimizer.load_state_dict(ckpt["last"]["optimizer"])
        history, kept = ckpt["history"], ckpt["state_dict"]
        print(f"resuming {path} after epoch {len(history)}")
    meta = dict(meta, args=vars(args).copy(), precision=precision)
    val = len(train_data["val"][1]) if train_data["val"] else 0
    print(f"{meta['model']} on {args.dataset}: {len(train_data['train'][1]):,} train / {val:,} "
          f"val images, {device}")

    def save(kept, history):
        last = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": len(history)}
        save_checkpoint(path, dict(meta, state_dict=kept, last=last, history=history))

    compiled = torch.compile(model) if args.compile else model
    history, kept = fit(compiled, optimizer, train_data, args, precision, history, kept, save)
    if not args.dry_run:
        best, result = history[kept_epoch(history, args.keep) - 1], {}
        if args.recalibrate_bn:
            kept_model = copy.deepcopy(model)
            kept_model.load_state_dict(kept)
            recalibrate_bn(kept_model, *train_data["train"], train_data["mean"], train_data["std"],
                           precision)
            kept = {name: tensor.clone() for name, tensor in kept_model.state_dict().items()}
            save(kept, history)
            if train_data["val"]:
                loss, acc = evaluate(kept_model, *train_data["val"], train_data["mean"],
                                     train_data["std"], precision)
                result.update(recalibrated_val_loss=loss, recalibrated_val_acc=acc)
                print(f"BatchNorm recalibrated: val acc {100 * acc:.2f}%")
        save_json(json_path, {"args": meta["args"], "history": history, "kept_epoch": best["epoch"],
                              "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"],
                              **result, "checkpoint": str(path)})
        print(f"wrote {path} and {json_path}")


# ----------------------------------------------------------------------------- the script

def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet", choices=sorted(MODELS),
                        help="(default: %(default)s)")
    parser.add_argument("--params", metavar="FILE", help="a search's JSON: its best values for lr, "
                                                         "batch size, momentum, weight decay")
    args = parse_settings(add_flags(parser, DEFAULTS), argv, SEARCHED)
    with one_line_errors():
        device = get_device(args.device)
        set_seed(args.seed)
        train_data = data.training_data(args.dataset, args.data_dir, device, args.seed,
                                        args.val_fraction, args.subset,
                                        download_missing=not (args.no_download or args.dry_run))
        model = build_model(args.model, train_data["classes"])
        meta = {"model": args.model, "num_classes": train_data["classes"], "dataset": args.dataset,
                "classes": list(data.DATASETS[args.dataset].classes), "mean": train_data["mean"],
                "std": train_data["std"]}
        path = Path(args.hub) / "pre_trained" / f"{args.model}.pth"
        run_stage(model, train_data, args, device, path,
                  Path(args.outputs) / "train" / f"{args.model}.json", meta)


if __name__ == "__main__":
    main()
