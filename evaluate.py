"""Metrics, pictures, the comparison across networks, an ensemble, and predictions on your images.

    python evaluate.py --model vggnet            # fine-tuned checkpoint if present, else pre-trained
    python evaluate.py --model all               # every checkpoint found + comparison table + ensemble
    python evaluate.py --model lenet --ckpt model_hub/pre_trained/lenet.pth --split test
    python evaluate.py --model vggnet --image my_letter.png my_digit.jpg

Writes outputs/eval/{model}.json, {model}_cm_test.png, {model}_predictions.png,
{model}_augment.png, and with several networks comparison.md and comparison.json.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from data import CLASSES, DataError, augment, get_device, iterate_batches, load_images, normalize
from models import count_parameters
from train import (TrainingError, common_parser, load_checkpoint, model_from_checkpoint, model_names,
                   write_json)

CASE_ALIKE = "cijklmopsuvwxyz"  # letters whose upper and lower case look alike in handwriting
EVAL_BATCH = 2048
CONFUSED_PAIRS = 15  # most-confused pairs listed in the JSON
GRID_SIDE = 10  # the prediction grid shows GRID_SIDE x GRID_SIDE test images


# ----------------------------------------------------------------------------- checkpoints

def find_checkpoint(hub, name, ckpt=None):
    """--ckpt, else the fine-tuned checkpoint, else the pre-trained one."""
    if ckpt:
        return Path(ckpt)
    for path in (Path(hub) / "fine_tuned" / f"{name}_tuned.pth", Path(hub) / "pre_trained" / f"{name}.pth"):
        if path.is_file():
            return path
    raise TrainingError(f"no checkpoint for {name} in {Path(hub) / 'fine_tuned'} or {Path(hub) / 'pre_trained'}: "
                        f"make one with `python train.py --model {name}`")


# ----------------------------------------------------------------------------- predictions and metrics

@torch.inference_mode()
def predict_probabilities(model, images, mean, std, device, batch_size=EVAL_BATCH):
    """Softmax probabilities [N, C] as float32 on the CPU, computed batch by batch."""
    model.eval()
    labels = torch.zeros(len(images), dtype=torch.int64)
    parts = [torch.softmax(model(normalize(batch.to(device), mean, std)).float(), dim=1).cpu()
             for batch, _ in iterate_batches(images, labels, batch_size)]
    return torch.cat(parts)


def case_merged_accuracy(labels, predictions, classes):
    """Accuracy when each case-alike lower-case letter counts as its upper-case twin."""
    merge = np.arange(len(classes))
    for letter in CASE_ALIKE:
        merge[classes.index(letter)] = classes.index(letter.upper())
    return float(np.mean(merge[np.asarray(labels)] == merge[np.asarray(predictions)]))


def most_confused(matrix, classes, count=CONFUSED_PAIRS):
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(off_diagonal, axis=None)[::-1][:count]
    pairs = [np.unravel_index(flat, matrix.shape) for flat in order]
    return [{"true": classes[t], "predicted": classes[p], "count": int(matrix[t, p]),
             "share_of_true": float(matrix[t, p] / max(matrix[t].sum(), 1))} for t, p in pairs if matrix[t, p] > 0]


def compute_metrics(labels, probabilities, classes, dataset):
    """The study's weighted metrics plus macro F1, top-5, per-class accuracy and confusions."""
    labels = np.asarray(labels)
    predictions = probabilities.argmax(1).numpy()
    every_class = np.arange(len(classes))
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, labels=every_class,
                                                               average="weighted", zero_division=0)
    top = min(5, len(classes))
    top5 = probabilities.topk(top, dim=1).indices.numpy()
    matrix = confusion_matrix(labels, predictions, labels=every_class)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    result = {
        "count": int(len(labels)), "accuracy": float(np.mean(predictions == labels)),
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "macro_f1": float(f1_score(labels, predictions, labels=every_class, average="macro", zero_division=0)),
        "top5_accuracy": float(np.mean((top5 == labels[:, None]).any(1))),
        "per_class": {str(name): float(value) for name, value in zip(classes, per_class)},
        "most_confused": most_confused(matrix, classes),
        "confusion_matrix": matrix.tolist(),
    }
    if dataset == "emnist-byclass":
        result["case_merged_accuracy"] = case_merged_accuracy(labels, predictions, classes)
    return result


def metrics_table(rows):
    """rows: [(label, metrics)] -> fixed-width text table in percent."""
    keys = ["accuracy", "precision", "recall", "f1", "macro_f1", "top5_accuracy", "case_merged_accuracy"]
    shown = [key for key in keys if any(key in metrics for _, metrics in rows)]
    lines = [f"{'':14}" + "".join(f"{key:>14}" for key in shown)]
    for label, metrics in rows:
        lines.append(f"{label:14}" + "".join(
            f"{100 * metrics[key]:13.2f}%" if key in metrics else f"{'-':>14}" for key in shown))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pictures

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix, classes, path, title):
    """Row-normalised confusion matrix with the label characters on both axes."""
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(6, 0.22 * len(classes))
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    shown = axis.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), [str(c) for c in classes], fontsize=7 if len(classes) > 20 else 9,
                    rotation=90 if len(classes) <= 20 and max(len(str(c)) for c in classes) > 1 else 0)
    axis.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=7 if len(classes) > 20 else 9)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(classes) <= 20:  # numbers in the cells only where they stay readable
        for true in range(len(classes)):
            for predicted in range(len(classes)):
                if matrix[true, predicted]:
                    axis.text(predicted, true, f"{normalised[true, predicted]:.2f}", ha="center", va="center",
                              fontsize=6, color="white" if normalised[true, predicted] < 0.5 else "black")
    figure.colorbar(shown, fraction=0.046, label="share of the true class")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_grid(images, captions, path, title, colors=None):
    plt = pyplot()
    side = int(np.ceil(np.sqrt(len(images))))
    figure, axes = plt.subplots(side, side, figsize=(1.2 * side, 1.35 * side))
    for index, axis in enumerate(np.asarray(axes).flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index], cmap="gray", vmin=0, vmax=255)
            axis.set_title(captions[index], fontsize=8, color=(colors or ["black"] * len(images))[index])
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_predictions(images, labels, probabilities, classes, path, seed=0):
    """GRID_SIDE^2 random test images, 'true>predicted', mistakes in red."""
    chosen = np.random.default_rng(seed).choice(len(labels), size=min(GRID_SIDE ** 2, len(labels)), replace=False)
    predictions = probabilities.argmax(1)
    captions = [f"{classes[labels[i]]}>{classes[predictions[i]]}" for i in chosen]
    colors = ["black" if labels[i] == predictions[i] else "red" for i in chosen]
    wrong = sum(color == "red" for color in colors)
    plot_grid(images[chosen].numpy(), captions, path, f"true>predicted, {wrong} mistakes in red", colors)


def plot_augmentation(images, labels, classes, mean, std, path, seed=0):
    """Training images as the network sees them after the study's random affine."""
    chosen = torch.from_numpy(np.random.default_rng(seed).choice(len(labels), size=min(50, len(labels)),
                                                                 replace=False))
    originals = images[chosen]
    warped = augment(originals, mean, std, torch.Generator().manual_seed(seed))[:, 0] * std + mean
    pairs, captions = [], []
    for original, moved, label in zip(originals, warped, labels[chosen]):
        pairs += [original.numpy(), (moved.clamp(0, 1) * 255).numpy()]
        captions += [f"{classes[label]}", f"{classes[label]} aug."]
    plot_grid(pairs, captions, path, "training images: original, then augmented")


# ----------------------------------------------------------------------------- your own images

def background_level(pixels):
    """The median of the picture's outermost pixels: the paper (or screen) it was drawn on."""
    return np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]))


def prepare_user_image(path):
    """A photo or scan of one character -> uint8 [28, 28], light on dark, the way EMNIST was made.

    Grayscale; inverted if the background is light; cropped to the ink; centred in a square
    with a border (EMNIST pads its region of interest by 2 pixels of 28); resized with
    antialiasing; stretched to the full 0..255 range.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            pixels = np.asarray(opened.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path} is not an image this can read ({type(err).__name__}): give a PNG or JPEG")
    if background_level(pixels) > 127:  # dark ink on light paper
        pixels = 255.0 - pixels
    pixels = np.clip(pixels - background_level(pixels), 0, None)
    ink = pixels > 0.25 * pixels.max()
    if pixels.max() == 0 or not ink.any():
        raise DataError(f"{path} has no visible ink: give a picture of one handwritten character")
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    side = int(max(crop.shape) * 28 / 24)  # 2 pixels of border on each side after resizing
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    small = Image.fromarray(square).resize((28, 28), Image.BICUBIC)  # PIL antialiases when shrinking
    small = np.clip(np.asarray(small), 0, None)
    return torch.from_numpy(np.round(small * (255.0 / max(small.max(), 1e-6))).astype(np.uint8))


def classify_files(paths, name, args, device):
    """Top-3 characters for each file; a file that cannot be read gets a one-line error."""
    path = find_checkpoint(args.hub, name, args.ckpt)
    state = load_checkpoint(path, name)
    model = model_from_checkpoint(state, device)
    classes = state["classes"]
    failures = 0
    for file in paths:
        try:
            image = prepare_user_image(file)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
            continue
        probabilities = predict_probabilities(model, image[None], state["mean"], state["std"], device)[0]
        top = probabilities.topk(min(3, len(classes)))
        answers = ", ".join(f"{classes[i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{file}: {answers}")
    return failures


# ----------------------------------------------------------------------------- one network

def check_dataset(state, dataset, path):
    """--dataset must have the checkpoint's class count; default: the checkpoint's own dataset."""
    dataset = dataset or state["dataset"]
    if len(CLASSES[dataset]) != state["num_classes"]:
        raise TrainingError(f"{path} predicts {state['num_classes']} classes ({state['dataset']}) but {dataset} has "
                            f"{len(CLASSES[dataset])}: pass --dataset {state['dataset']}")
    return dataset


def seconds_per_epoch(outputs, name):
    path = Path(outputs) / "train" / f"{name}.json"
    if not path.is_file():
        return None
    history = json.loads(path.read_text())["history"]
    return sum(row["seconds"] for row in history) / len(history) if history else None


def evaluate_model(name, args, device):
    """Metrics and pictures for one network: (result dict, {split: (probabilities, labels)})."""
    path = find_checkpoint(args.hub, name, args.ckpt)
    state = load_checkpoint(path, name)
    dataset = check_dataset(state, args.dataset, path)
    model = model_from_checkpoint(state, device)
    classes = CLASSES[dataset]
    folder = Path(args.outputs) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    result = {"model": name, "checkpoint": str(path), "dataset": dataset, "epochs": state.get("epoch"),
              "parameters": count_parameters(model), "seconds_per_epoch": seconds_per_epoch(args.outputs, name)}
    outputs = {}
    for split in ["train", "test"] if args.split == "both" else [args.split]:
        images, labels = load_images(dataset, train=split == "train", data_dir=args.data_dir,
                                     download=not args.no_download)
        probabilities = predict_probabilities(model, images, state["mean"], state["std"], device)
        result[split] = compute_metrics(labels, probabilities, classes, dataset)
        outputs[split] = (probabilities, labels)
        plot_confusion(result[split]["confusion_matrix"], classes, folder / f"{name}_cm_{split}.png",
                       f"{name} on the {dataset} {split} split ({len(labels):,} images)")
        if split == "test":
            plot_predictions(images, labels, probabilities, classes, folder / f"{name}_predictions.png", args.seed)
        if split == args.split or split == "train":
            plot_augmentation(images, labels, classes, state["mean"], state["std"], folder / f"{name}_augment.png",
                              args.seed)
    print(f"\n{name} ({path}, {dataset})")
    print(metrics_table([(split, result[split]) for split in outputs]))
    for split in outputs:
        pairs = ", ".join(f"{p['true']}->{p['predicted']} {p['count']}" for p in result[split]["most_confused"][:8])
        print(f"most confused ({split}): {pairs}")
    write_json(folder / f"{name}.json", result)
    print(f"wrote {folder / f'{name}.json'} and the PNGs beside it")
    return result, outputs


# ----------------------------------------------------------------------------- several networks

STUDY_METRICS = ["accuracy", "precision", "recall", "f1"]


def ensemble_result(outputs_by_model, classes, dataset):
    """The average of the networks' softmax, per split."""
    result = {}
    for split in ["train", "test"]:
        members = [outputs[split] for outputs in outputs_by_model.values() if split in outputs]
        if len(members) == len(outputs_by_model):
            mean_probabilities = torch.stack([probabilities for probabilities, _ in members]).mean(0)
            result[split] = compute_metrics(members[0][1], mean_probabilities, classes, dataset)
    return result


def write_comparison(results, ensemble, folder):
    """comparison.json and comparison.md: one column per network, the study's metrics in percent."""
    columns = {name: result for name, result in results.items()}
    if ensemble:
        columns["ensemble"] = dict(ensemble, parameters=sum(r["parameters"] for r in results.values()),
                                   seconds_per_epoch=None)
    table = {name: {"parameters": column["parameters"], "seconds_per_epoch": column["seconds_per_epoch"],
                    **{split: {key: column[split][key] for key in STUDY_METRICS}
                       for split in ["train", "test"] if split in column}}
             for name, column in columns.items()}
    dataset = next(iter(results.values()))["dataset"]
    write_json(folder / "comparison.json", {"dataset": dataset, "models": table})
    lines = [f"Dataset: {dataset}. Accuracy and weighted precision / recall / F1 in percent.", "",
             "| | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for split in ["train", "test"]:
        for key in STUDY_METRICS:
            if all(split in column for column in table.values()):
                values = [f"{100 * table[name][split][key]:.2f}" for name in columns]
                lines.append(f"| {split} {key} | " + " | ".join(values) + " |")
    lines.append("| parameters | " + " | ".join(f"{table[name]['parameters']:,}" for name in columns) + " |")
    lines.append("| seconds / epoch | " + " | ".join(
        "-" if table[name]["seconds_per_epoch"] is None else f"{table[name]['seconds_per_epoch']:.1f}"
        for name in columns) + " |")
    (folder / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"wrote {folder / 'comparison.md'} and {folder / 'comparison.json'}")


def evaluate_several(names, args, device):
    """Every network with a checkpoint, then the comparison and the ensemble."""
    results, outputs_by_model = {}, {}
    for name in names:
        try:
            find_checkpoint(args.hub, name)
        except TrainingError as err:
            print(f"skipping {name}: {err}")
            continue
        results[name], outputs_by_model[name] = evaluate_model(name, args, device)
    if not results:
        raise TrainingError(f"no checkpoints in {args.hub}: train some first, e.g. `python train.py --model lenet`")
    datasets = {result["dataset"] for result in results.values()}
    if len(datasets) > 1:
        raise TrainingError(f"the checkpoints were trained on different datasets ({', '.join(sorted(datasets))}): "
                            f"compare them with --dataset, or evaluate them one at a time")
    dataset = datasets.pop()
    ensemble = ensemble_result(outputs_by_model, CLASSES[dataset], dataset) if len(results) > 1 else None
    if ensemble:
        print("\nensemble (average softmax of " + ", ".join(results) + ")")
        print(metrics_table([(split, metrics) for split, metrics in ensemble.items()]))
    write_comparison(results, ensemble, Path(args.outputs) / "eval")


# ----------------------------------------------------------------------------- wiring

def parse_args(argv=None):
    parser = common_parser(__doc__.splitlines()[0], several_models=True)
    parser.set_defaults(dataset=None)
    parser.add_argument("--ckpt", default=None, help="checkpoint to evaluate (one model only)")
    parser.add_argument("--split", default="both", choices=["train", "test", "both"], help="which split(s)")
    parser.add_argument("--image", nargs="+", default=None, metavar="FILE",
                        help="classify your own pictures of handwritten characters")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = model_names(args)
    device = get_device(args.device)
    try:
        if args.ckpt and len(names) > 1:
            raise TrainingError("--ckpt names one checkpoint: give one --model with it")
        if args.image:
            failures = classify_files(args.image, names[0], args, device)
            if failures:
                sys.exit(1)
        elif len(names) == 1:
            evaluate_model(names[0], args, device)
        else:
            evaluate_several(names, args, device)
    except (DataError, TrainingError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
