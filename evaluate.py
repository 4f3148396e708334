"""Evaluation (stage 4 of the study): metrics, pictures, a comparison with an ensemble, and your own pictures.

    python evaluate.py --model alexnet                  # HUB/fine_tuned/alexnet_tuned.pth, else pre_trained/
    python evaluate.py --model all                      # every network in the hub, compared, with their ensemble
    python evaluate.py --ckpt some.pth --split test
    python evaluate.py --image my_letter.png            # top 3 characters; the published network if the hub has none

Writes outputs/eval/{model}.json (accuracy, weighted precision / recall / F1 as the study reports them,
macro F1, top-5, per-class accuracy, the most-confused pairs, and for ByClass the accuracy with the
15 case-alike letters merged), {model}_cm_test.png and {model}_predictions.png; with several
networks, comparison.md and comparison.json. It computes in fp32 unless --precision says otherwise,
so its numbers are the same on any CPU. The test split only ever reports: it chooses nothing.
"""
import io
import sys
from pathlib import Path

import numpy as np
import torch

import data
from models import MODELS, load_checkpoint, published_checkpoint
from runs import (Parser, UserError, autocast, get_device, one_line_errors, parse_settings, save_figure, save_json)

CASE_ALIKE = "cijklmopsuvwxyz"  # letters whose two cases differ mostly in size
PUBLISHED_DEFAULT = "vggnet"  # what --image and the page use when no network is named


# ----------------------------------------------------------------------------- pictures

def prepare_picture(source, name=None):
    """A photo, scan or drawing of one character (a path or bytes) -> uint8 [28, 28], light on dark,
    upright, the way EMNIST was made: read as a viewer shows it, inverted if the paper is light,
    cropped to the ink, centred with a 2-pixel border, resized with antialiasing, stretched to 0..255."""
    from PIL import Image, ImageOps

    name = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            picture = ImageOps.exif_transpose(opened).convert("RGBA")  # palette, CMYK, 16-bit, alpha alike
            paper = Image.new("RGBA", picture.size, (255, 255, 255, 255))
            pixels = np.asarray(Image.alpha_composite(paper, picture).convert("L"), dtype=np.float32)
    except Exception as err:  # Pillow raises many kinds for a file it cannot decode
        raise UserError(f"{name} is not a picture this can read ({type(err).__name__}): give a PNG or JPEG") from None
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:  # dark ink on light paper
        pixels, border = 255.0 - pixels, 255.0 - border
    pixels = np.clip(pixels - np.median(border), 0, None)
    ink = pixels > 0.25 * pixels.max()
    if pixels.max() == 0 or not ink.any():
        raise UserError(f"{name} has no visible ink: give a picture of one handwritten character")
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(int(max(crop.shape) * 28 / 24), 1)  # 2 pixels of border on each side after resizing
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    small = np.clip(np.asarray(Image.fromarray(square).resize((28, 28), Image.BICUBIC)), 0, None)
    return torch.from_numpy(np.round(small * (255.0 / max(small.max(), 1e-6))).astype(np.uint8))


def find_checkpoint(hub, name, published_fallback=False):
    """HUB/fine_tuned/NAME_tuned.pth, else HUB/pre_trained/NAME.pth, else (if asked) the published one."""
    for path in (Path(hub) / "fine_tuned" / f"{name}_tuned.pth", Path(hub) / "pre_trained" / f"{name}.pth"):
        if path.is_file():
            return path
    if published_fallback and published_checkpoint(name):
        return published_checkpoint(name)
    raise UserError(f"no {name} checkpoint in {hub}/fine_tuned or {hub}/pre_trained: train one, or give --ckpt")


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def probabilities(model, images, mean, std, device, precision="fp32"):
    """Softmax probabilities [N, classes] of uint8 images [N, 28, 28], on the CPU."""
    model.eval().to(device)
    out = []
    for inputs, _ in data.eval_batches(images, torch.zeros(len(images)), mean, std):
        with autocast(precision, device):
            out.append(model(inputs.to(device)).float().softmax(1).cpu())
    return torch.cat(out)


def metrics(labels, probs, classes):
    """The study's metrics and more, as fractions."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    labels, predictions = np.asarray(labels), probs.argmax(1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="weighted",
                                                               zero_division=0)
    matrix = confusion_matrix(labels, predictions, labels=range(len(classes)))
    off = matrix - np.diag(np.diag(matrix))
    pairs = np.dstack(np.unravel_index(np.argsort(-off, axis=None)[:10], off.shape))[0]
    result = {"count": len(labels), "accuracy": float((predictions == labels).mean()), "precision": precision,
              "recall": recall, "f1": f1, "macro_f1": f1_score(labels, predictions, average="macro", zero_division=0),
              "top5_accuracy": float((probs.topk(min(5, len(classes))).indices.numpy() == labels[:, None]).any(1).mean()),
              "per_class": {c: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, c in enumerate(classes)},
              "most_confused": [[classes[t], classes[p], int(off[t, p])] for t, p in pairs if off[t, p]],
              "confusion_matrix": matrix.tolist()}
    if "".join(classes) == "".join(data.DATASETS["emnist-byclass"].classes):
        merged = np.array([classes.index(c.lower()) if c.lower() in CASE_ALIKE else i for i, c in enumerate(classes)])
        result["case_merged_accuracy"] = float((merged[predictions] == merged[labels]).mean())
    return result


def plot_confusion(matrix, classes, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, dtype=float)
    size = max(6, len(classes) * 0.2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix / np.maximum(matrix.sum(1, keepdims=True), 1), cmap="Blues")
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    axis.set_xticklabels(classes, fontsize=6)
    axis.set_yticklabels(classes, fontsize=6)
    save_figure(figure, path)


def plot_predictions(images, labels, probs, classes, path, count=32):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(4, count // 4, figsize=(count // 4 * 1.1, 5))
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:count]
    for axis, i in zip(axes.flat, index.tolist()):
        guess = int(probs[i].argmax())
        axis.imshow(images[i], cmap="gray")
        axis.set_title(f"{classes[guess]} ({classes[labels[i]]})", color="green" if guess == labels[i] else "red",
                       fontsize=8)
        axis.axis("off")
    figure.suptitle("predicted (true)")
    save_figure(figure, path)


def evaluate_checkpoint(path, args, device, name):
    """Metrics of one checkpoint on the splits asked for; (result, test probabilities, test labels)."""
    ckpt, model = load_checkpoint(path, None if args.ckpt else name)
    result = {"model": ckpt["model"], "checkpoint": str(path), "dataset": ckpt["dataset"],
              "parameters": sum(p.numel() for p in model.parameters()), "precision": args.precision}
    classes = ckpt["classes"]
    for split in ("train", "test") if args.split == "both" else (args.split,):
        images, labels = data.load_images(ckpt["dataset"], split == "train", args.data_dir, not args.no_download)
        probs = probabilities(model, images, ckpt["mean"], ckpt["std"], device, args.precision)
        result[split] = metrics(labels, probs, classes)
        print(f"{name} {split}: accuracy {100 * result[split]['accuracy']:.2f}%, weighted F1 "
              f"{100 * result[split]['f1']:.2f}% ({len(labels):,} images)")
    out = Path(args.outputs) / "eval"
    if "test" in result:
        plot_confusion(result["test"]["confusion_matrix"], classes, out / f"{name}_cm_test.png", f"{name}: test")
        plot_predictions(images, labels, probs, classes, out / f"{name}_predictions.png")
    save_json(out / f"{name}.json", result)
    return result, probs, labels, classes


def compare(results, ensemble, folder):
    """comparison.md and .json: one column per network and the ensemble."""
    rows = [(f"{split} {key}", key, split) for split in ("train", "test") for key in ("accuracy", "precision",
                                                                                      "recall", "f1")]
    columns = {**{name: result for name, result in results.items()}, "ensemble": ensemble}
    lines = [f"Dataset: {next(iter(results.values()))['dataset']}. Percent. Ensemble: the mean probability of "
             f"{', '.join(results)}.", "", "| | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for label, key, split in rows:
        if split in ensemble:
            lines.append(f"| {label} | " + " | ".join(f"{100 * r[split][key]:.2f}" for r in columns.values()) + " |")
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_json(Path(folder) / "comparison.json", {name: {s: {k: r[s][k] for k in ("accuracy", "precision", "recall",
                                                                              "f1")} for s in ("train", "test")
                                                         if s in r} for name, r in columns.items()})
    (Path(folder) / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS) + ["all"], help="networks in the hub")
    parser.add_argument("--ckpt", metavar="FILE", help="a checkpoint instead of --model")
    parser.add_argument("--image", nargs="+", metavar="FILE", help="pictures to read (top 3 characters each)")
    parser.add_argument("--split", default="both", choices=["train", "test", "both"], help="(default: %(default)s)")
    parser.add_argument("--data-dir", default="data", help="(default: %(default)s)")
    parser.add_argument("--no-download", action="store_true", help="never download missing data")
    parser.add_argument("--hub", default="model_hub", help="(default: %(default)s)")
    parser.add_argument("--outputs", default="outputs", help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="(default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="(default: %(default)s)")
    args = parse_settings(parser, argv)
    with one_line_errors():
        device = get_device(args.device)
        if args.image:
            sys.exit(read_pictures(args, device))
        names = sorted(MODELS) if args.model == ["all"] else args.model or []
        if args.model == ["all"]:
            names = [name for name in MODELS if any((Path(args.hub) / f).is_file() for f in (
                f"fine_tuned/{name}_tuned.pth", f"pre_trained/{name}.pth"))]
        paths = {name: find_checkpoint(args.hub, name) for name in names}
        if args.ckpt:
            paths = {Path(args.ckpt).stem: Path(args.ckpt)}
        if not paths:
            parser.error("give --model NAME (or all), --ckpt FILE or --image FILE")
        results, probs = {}, {}
        for name, path in paths.items():
            results[name], probs[name], labels, classes = evaluate_checkpoint(path, args, device, name)
        if len(results) > 1 and args.split != "train":
            ensemble = {"test": metrics(labels, sum(probs.values()) / len(probs), classes)}
            compare(results, ensemble, Path(args.outputs) / "eval")


def read_pictures(args, device):
    """Top 3 characters of each picture; one that cannot be read is one line. Returns the failures."""
    name = (args.model or [PUBLISHED_DEFAULT])[0]
    path = Path(args.ckpt) if args.ckpt else find_checkpoint(args.hub, name, published_fallback=True)
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
        print(f"{file}: " + ", ".join(f"{ckpt['classes'][i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(),
                                                                                             top.indices.tolist())))
    return 1 if failures else 0


if __name__ == "__main__":
    main()
