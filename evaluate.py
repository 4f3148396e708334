"""Evaluation (stage 4 of the study): metrics, pictures, a comparison and ensemble, your pictures.

    python evaluate.py --model alexnet          # HUB/fine_tuned/alexnet_tuned.pth, else pre_trained
    python evaluate.py --model all              # every network in the hub, compared; their ensemble
    python evaluate.py --ckpt some.pth --split test
    python evaluate.py --image my_letter.png    # top 3; the published network if the hub has none

Writes outputs/eval/{model}.json (accuracy, weighted precision / recall / F1 as the study reports
them, macro F1, top-5, per-class accuracy, the most-confused pairs, and for ByClass the accuracy
with the 15 case-alike letters merged), {model}_cm_test.png, {model}_predictions.png and the
training curves {model}_curves.png; with
several networks comparison.md and .json. It computes in fp32 unless --precision says otherwise,
so its numbers are the same on any CPU. The test split only ever reports: it chooses nothing.
"""
import io
import sys
from pathlib import Path

import numpy as np
import torch

import data
from models import MODELS, load_checkpoint
from runs import (Parser, UserError, atomic_write, autocast, get_device, one_line_errors,
                  parse_settings, save_json)

CASE_ALIKE = "cijklmopsuvwxyz"  # letters whose two cases differ mostly in size
TTA = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # --tta: the image and its 1-pixel shifts
PUBLISHED_DEFAULT = "vggnet"  # what --image uses when no network is named
# The networks the repository publishes (results/emnist-byclass/README.md): what hubconf.py,
# demo.py and --image serve when the hub holds none of the user's own.
PUBLISHED = Path(__file__).resolve().parent / "results" / "emnist-byclass" / "published"


def published_checkpoint(name):
    path = PUBLISHED / f"{name}.pth"
    return path if path.is_file() else None


def prepare_picture(source, name=None):
    """A photo, scan or drawing of one character (a path or bytes) -> uint8 [28, 28], light on
    dark, upright, as EMNIST was made: read as a viewer shows it, inverted if the paper is light,
    cropped to the ink, centred with a 2-pixel border, resized with antialiasing, stretched."""
    from PIL import Image, ImageOps

    name = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            picture = ImageOps.exif_transpose(opened).convert("RGBA")  # palette, CMYK, 16-bit...
            paper = Image.new("RGBA", picture.size, (255, 255, 255, 255))
            pixels = np.asarray(Image.alpha_composite(paper, picture).convert("L"), np.float32)
    except Exception as err:  # Pillow raises many kinds for a file it cannot decode
        kind = type(err).__name__
        raise UserError(f"{name} is not a picture this can read ({kind}): give a PNG or JPEG") \
            from None
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:  # dark ink on light paper
        pixels, border = 255.0 - pixels, 255.0 - border
    pixels = np.clip(pixels - np.median(border), 0, None)
    ink = pixels > 0.25 * pixels.max()
    if pixels.max() == 0 or not ink.any():
        raise UserError(f"{name} has no visible ink: give a picture of one handwritten character")
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(int(max(crop.shape) * 28 / 24), 1)  # 2 pixels of border on each side at 28x28
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    small = np.clip(np.asarray(Image.fromarray(square).resize((28, 28), Image.BICUBIC)), 0, None)
    return torch.from_numpy(np.round(small * (255.0 / max(small.max(), 1e-6))).astype(np.uint8))


def find_checkpoint(hub, name, published_fallback=False):
    """HUB/fine_tuned/NAME_tuned.pth, else HUB/pre_trained/NAME.pth, else (if asked) published."""
    hub = Path(hub)
    for path in (hub / "fine_tuned" / f"{name}_tuned.pth", hub / "pre_trained" / f"{name}.pth"):
        if path.is_file():
            return path
    if published_fallback and published_checkpoint(name):
        return published_checkpoint(name)
    raise UserError(f"no {name} checkpoint in {hub}/fine_tuned or pre_trained: train one first")


@torch.no_grad()
def probabilities(model, images, mean, std, device, precision="fp32", shifts=((0, 0),)):
    """Softmax probabilities [N, classes] of uint8 images [N, 28, 28], on the CPU; averaged over
    the images moved by each (down, right) pixel shift of `shifts` (shifts only, never flips)."""
    model.eval().to(device)
    out, padded = [], torch.nn.functional.pad(images, (2, 2, 2, 2))
    for start in range(0, len(images), data.EVAL_BATCH):
        total = 0
        for down, right in shifts:
            batch = padded[start:start + data.EVAL_BATCH, 2 - down:30 - down, 2 - right:30 - right]
            with autocast(precision, device):
                logits = model(data.normalize(batch.to(device), mean, std))
            total = total + logits.float().softmax(1).cpu()
        out.append(total / len(shifts))
    return torch.cat(out)


def metrics(labels, probs, classes):
    """The study's metrics and more, as fractions."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    labels, predictions = np.asarray(labels), probs.argmax(1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="weighted", zero_division=0)
    matrix = confusion_matrix(labels, predictions, labels=range(len(classes)))
    off = matrix - np.diag(np.diag(matrix))
    pairs = np.dstack(np.unravel_index(np.argsort(-off, axis=None)[:10], off.shape))[0]
    top5 = probs.topk(min(5, len(classes))).indices.numpy() == labels[:, None]
    result = {"count": len(labels), "accuracy": float((predictions == labels).mean()),
              "precision": precision, "recall": recall, "f1": f1,
              "macro_f1": f1_score(labels, predictions, average="macro", zero_division=0),
              "top5_accuracy": float(top5.any(1).mean()),
              "per_class": {c: float(matrix[i, i] / max(matrix[i].sum(), 1))
                            for i, c in enumerate(classes)},
              "most_confused": [[classes[t], classes[p], int(off[t, p])]
                                for t, p in pairs if off[t, p]],
              "confusion_matrix": matrix.tolist()}
    if classes == list(data.DATASETS["emnist-byclass"].classes):
        merged = np.array([classes.index(c.lower()) if c.lower() in CASE_ALIKE else i
                           for i, c in enumerate(classes)])
        result["case_merged_accuracy"] = float((merged[predictions] == merged[labels]).mean())
    return result


def save_figure(figure, path):
    import matplotlib.pyplot as plt

    atomic_write(path, lambda partial: figure.savefig(partial, format="png", dpi=100))
    plt.close(figure)


def plot_history(history, path, title):
    """The training curves of a checkpoint's run: loss and accuracy, train and validation."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, scale in [(axes[0], "loss", 1), (axes[1], "acc", 100)]:
        for split, style in (("train", "o-"), ("val", "s-")):
            if history[0][f"{split}_loss"] is not None:
                values = [scale * row[f"{split}_{key}"] for row in history]
                axis.plot([row["epoch"] for row in history], values, style, label=split)
        axis.set(xlabel="epoch", ylabel=key)
        axis.legend()
    figure.suptitle(title)
    save_figure(figure, path)


def plot(images, labels, probs, classes, matrix, name, folder, count=32):
    """{name}_cm_test.png (the confusion matrix, rows normalised) and {name}_predictions.png."""
    import matplotlib.pyplot as plt

    matrix, size = np.asarray(matrix, dtype=float), max(6, len(classes) * 0.2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix / np.maximum(matrix.sum(1, keepdims=True), 1), cmap="Blues")
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted",
             ylabel="true", title=f"{name}: test")
    axis.set_xticklabels(classes, fontsize=6)
    axis.set_yticklabels(classes, fontsize=6)
    save_figure(figure, folder / f"{name}_cm_test.png")
    figure, axes = plt.subplots(4, count // 4, figsize=(count // 4 * 1.1, 5))
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:count]
    for axis, i in zip(axes.flat, index.tolist()):
        guess = int(probs[i].argmax())
        axis.imshow(images[i], cmap="gray")
        axis.set_title(f"{classes[guess]} ({classes[labels[i]]})", fontsize=8,
                       color="green" if guess == labels[i] else "red")
        axis.axis("off")
    figure.suptitle("predicted (true)")
    save_figure(figure, folder / f"{name}_predictions.png")


def evaluate_checkpoint(path, args, device, name):
    """Metrics of one checkpoint on the splits asked for: (result, last split's probs, labels)."""
    ckpt, model = load_checkpoint(path, None if args.ckpt else name)
    result = {"model": ckpt["model"], "checkpoint": str(path), "dataset": ckpt["dataset"],
              "parameters": sum(p.numel() for p in model.parameters()), "precision": args.precision}
    for split in ("train", "test") if args.split == "both" else (args.split,):
        if split == "val":  # the images its pre-training held out (the same seed, subset, fraction)
            run = ckpt["args"]
            images, labels = data.training_data(ckpt["dataset"], args.data_dir, "cpu", run["seed"],
                                                run["val_fraction"], run["subset"])["val"]
        else:
            images, labels = data.load_images(ckpt["dataset"], split == "train", args.data_dir,
                                              not args.no_download)
        probs = probabilities(model, images, ckpt["mean"], ckpt["std"], device, args.precision,
                              TTA if args.tta else ((0, 0),))
        result[split] = metrics(labels, probs, ckpt["classes"])
        print(f"{name} {split}: accuracy {100 * result[split]['accuracy']:.2f}%, weighted F1 "
              f"{100 * result[split]['f1']:.2f}% ({len(labels):,} images)")
    folder = Path(args.outputs) / "eval"
    if ckpt.get("history"):
        plot_history(ckpt["history"], folder / f"{name}_curves.png", f"{name}: {path}")
    if "test" in result:
        matrix = result["test"]["confusion_matrix"]
        plot(images, labels, probs, ckpt["classes"], matrix, name, folder)
    save_json(folder / f"{name}.json", result)
    return result, probs, labels, ckpt["classes"]


def compare(results, ensemble, folder):
    """comparison.md and .json: a column per network and the ensemble."""
    columns = dict(results, ensemble=ensemble)
    lines = [f"Dataset: {next(iter(results.values()))['dataset']}. Percent. Ensemble: the mean "
             f"probability of {', '.join(results)}.", "", "| | " + " | ".join(columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    table = {}
    for split in ("train", "val", "test"):
        for key in ("accuracy", "precision", "recall", "f1"):
            if all(split in result for result in columns.values()):
                row = [100 * result[split][key] for result in columns.values()]
                cells = " | ".join(f"{value:.2f}" for value in row)
                lines.append(f"| {split} {key} | {cells} |")
                table[f"{split} {key}"] = dict(zip(columns, row))
    save_json(folder / "comparison.json", table)
    (folder / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def read_pictures(args, device):
    """Top 3 characters of each picture; one that cannot be read is one line. Exit status."""
    name = (args.model or [PUBLISHED_DEFAULT])[0]
    path = Path(args.ckpt) if args.ckpt else find_checkpoint(args.hub, name, True)
    ckpt, model = load_checkpoint(path)
    print(f"network: {path} ({ckpt['model']}, trained on {ckpt['dataset']})")
    failures = 0
    for file in args.image:
        try:
            image = prepare_picture(file)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
            continue
        top = probabilities(model, image[None], ckpt["mean"], ckpt["std"], device)[0].topk(3)
        answers = zip(top.values.tolist(), top.indices.tolist())
        print(f"{file}: " + ", ".join(f"{ckpt['classes'][i]} {100 * p:.1f}%" for p, i in answers))
    return 1 if failures else 0


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", nargs="+", choices=sorted(MODELS) + ["all"], help="networks in the hub")
    add("--ckpt", metavar="FILE", help="a checkpoint instead of --model")
    add("--image", nargs="+", metavar="FILE", help="pictures to read (top 3 characters each)")
    add("--split", default="both", choices=["train", "test", "both", "val"],
        help="val: the images a pre-training held out (default: %(default)s)")
    add("--tta", action="store_true", help="average over 1-pixel shifts (never flips)")
    add("--data-dir", default="data", help="(default: %(default)s)")
    add("--no-download", action="store_true", help="never download missing data")
    add("--hub", default="model_hub", help="(default: %(default)s)")
    add("--outputs", default="outputs", help="(default: %(default)s)")
    add("--device", default="auto", help="(default: %(default)s)")
    add("--precision", default="fp32", choices=["fp32", "bf16"], help="(default: %(default)s)")
    args = parse_settings(parser, argv)
    with one_line_errors():
        device = get_device(args.device)
        if args.image:
            sys.exit(read_pictures(args, device))
        names = args.model or []
        if names == ["all"]:
            names = [name for name in MODELS if any((Path(args.hub) / f).is_file() for f in (
                f"fine_tuned/{name}_tuned.pth", f"pre_trained/{name}.pth"))]
        paths = {name: find_checkpoint(args.hub, name) for name in names}
        if args.ckpt:
            paths = {Path(args.ckpt).stem: Path(args.ckpt)}
        if not paths:
            parser.error("give --model NAME (or all), --ckpt FILE or --image FILE")
        results, probs = {}, {}
        for name, path in paths.items():
            result = evaluate_checkpoint(path, args, device, name)
            results[name], probs[name], labels, classes = result
        if len(results) > 1 and args.split != "train":
            split = "val" if args.split == "val" else "test"
            ensemble = {split: metrics(labels, sum(probs.values()) / len(probs), classes)}
            compare(results, ensemble, Path(args.outputs) / "eval")


if __name__ == "__main__":
    main()
