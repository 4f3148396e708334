"""Metrics, pictures, the comparison across networks, an ensemble, and predictions on your images.

    python evaluate.py --model vggnet            # fine-tuned checkpoint if present, else pre-trained
    python evaluate.py --model all               # every checkpoint found + comparison table + ensemble
    python evaluate.py --model lenet --ckpt model_hub/pre_trained/lenet.pth --split test
    python evaluate.py --model vggnet --image my_letter.png my_digit.jpg
    python evaluate.py --model all --ensemble-from-validation model_hub   # members chosen on validation

Writes outputs/eval/{model}.json, {model}_cm_test.png, {model}_predictions.png,
{model}_augment.png, and with several networks comparison.md and comparison.json.
Computes in fp32 unless --precision says otherwise, so its numbers are the same on any CPU.
"""
import runs

if __name__ == "__main__":
    runs.interrupt_quietly()  # Ctrl-C while torch loads: one line and exit 130

import io
import sys
import time
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from data import (AUGMENTS, CLASSES, DATASETS, EVAL_BATCH, add_data_flags, augment, augment_recipe, held_out_by,
                  iterate_batches, load_images, load_training_data, model_batch)
from models import MODELS, count_parameters, forward, load_checkpoint, published_checkpoint, training_args
from runs import (DataError, Parser, UserError, add_run_flags, atomic_path, check_outputs, choose_precision,
                  get_device, is_int, is_number, one_line_errors, output_lock, path_value, pyplot, read_json,
                  save_figure, seed_value, write_json)

CASE_ALIKE = "cijklmopsuvwxyz"  # letters whose upper and lower case look alike in handwriting
MAX_PIXELS = 40_000_000  # a bigger picture is refused: decoding it could exhaust memory (PIL's bomb guard)
MIN_SIDE = 8  # a picture narrower or lower than this cannot hold a readable character (nor can ink of less)
MIN_INK = 0.04  # ink spanning less than this fraction of the picture's longer side is a speck, not a character
CONFUSED_PAIRS = 15  # most-confused pairs listed in the JSON
GRID_SIDE = 10  # the prediction grid shows GRID_SIDE x GRID_SIDE test images


# ----------------------------------------------------------------------------- checkpoints

PUBLISHED_NETWORK = "vggnet"  # for --image without --model: the published network whose pre-training validated best


def find_checkpoint(hub, name, ckpt=None, published=False):
    """--ckpt, else the fine-tuned checkpoint, else the pre-trained one; with `published`, else the
    published ByClass network of that name."""
    if ckpt:
        return Path(ckpt)
    candidates = [Path(hub) / "fine_tuned" / f"{name}_tuned.pth", Path(hub) / "pre_trained" / f"{name}.pth"]
    for path in candidates + ([published_checkpoint(name)] if published else []):
        if path is not None and path.is_file():
            return path
    raise UserError(f"no checkpoint for {name} in {Path(hub) / 'fine_tuned'} or {Path(hub) / 'pre_trained'}: "
                        f"make one with `python train.py --model {name}`")


def written_at(path):
    """When a checkpoint file was written, as every line that names the checkpoint shows it."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(path).stat().st_mtime))


# ----------------------------------------------------------------------------- predictions and metrics

@torch.inference_mode()
def predict_probabilities(model, images, mean, std, device, precision=None, max_batches=None):
    """Softmax probabilities [N, C] as float32 on the CPU, computed batch by batch."""
    model.eval()
    precision = precision or choose_precision("fp32", device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    labels = torch.zeros(len(images), dtype=torch.int64)
    parts = []
    for step, (batch, _) in enumerate(iterate_batches(images, labels, EVAL_BATCH)):
        if max_batches is not None and step >= max_batches:
            break
        logits = forward(model, model_batch(batch.to(device), mean, std, precision.channels_last), precision)
        parts.append(torch.softmax(logits.float(), dim=1).cpu())
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
             "share_of_true": float(matrix[t, p] / max(matrix[t].sum(), 1))}
            for t, p in pairs if off_diagonal[t, p] > 0]


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
    save_figure(figure, path, dpi=110)


def plot_grid(images, captions, path, title, colors=None):
    """Images in a square mosaic, each captioned above: one axes, so a hundred draw in a fraction of a second."""
    plt = pyplot()
    side = int(np.ceil(np.sqrt(len(images))))
    height, width = np.asarray(images[0]).shape
    lines = max(caption.count("\n") + 1 for caption in captions)
    pad = 12 * lines  # pixels of paper above each image for its caption
    mosaic = np.full((side * (height + pad), side * (width + 2)), 255.0, dtype=np.float32)
    figure, axis = plt.subplots(figsize=(1.2 * side, (1.0 + 0.35 * lines) * side))
    for index, (image, caption) in enumerate(zip(images, captions)):
        top, left = (index // side) * (height + pad) + pad, (index % side) * (width + 2) + 1
        mosaic[top : top + height, left : left + width] = image
        axis.text(left + width / 2, top - 1, caption, ha="center", va="bottom", fontsize=8,
                  color=colors[index] if colors else "black")
    axis.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_predictions(images, labels, probabilities, classes, path, seed=0):
    """GRID_SIDE^2 random test images, 'true>predicted', mistakes in red."""
    chosen = np.random.default_rng(seed).choice(len(labels), size=min(GRID_SIDE ** 2, len(labels)), replace=False)
    predictions = probabilities.argmax(1)
    joint = ">" if max(len(str(name)) for name in classes) <= 2 else "\n>"  # long names: one line each
    captions = [f"{classes[labels[i]]}{joint}{classes[predictions[i]]}" for i in chosen]
    colors = ["black" if labels[i] == predictions[i] else "red" for i in chosen]
    wrong = sum(color == "red" for color in colors)
    plot_grid(images[chosen].numpy(), captions, path, f"true>predicted, {wrong} mistakes in red", colors)


def plot_confused_pairs(images, labels, probabilities, pairs, classes, path, per_pair=8):
    """A row per most-confused pair (true>predicted, its count), showing test images it confused."""
    predictions = probabilities.argmax(1).numpy()
    labels = np.asarray(labels)
    index = {name: position for position, name in enumerate(classes)}
    shown, captions = [], []
    for pair in pairs[:per_pair]:
        true, predicted = index[pair["true"]], index[pair["predicted"]]
        examples = np.flatnonzero((labels == true) & (predictions == predicted))[:per_pair]
        for column in range(per_pair):
            shown.append(images[examples[column]].numpy() if column < len(examples) else np.zeros((28, 28)))
            captions.append(f"{pair['true']}>{pair['predicted']} {pair['count']}" if column == 0 else "")
    if shown:
        plot_grid(np.stack(shown), captions, path, "the most confused pairs (true>predicted, count), one per row")


def plot_augmentation(images, labels, classes, mean, std, path, seed=0, recipe="study"):
    """Training images as the network saw them in training, after its --augment recipe."""
    chosen = torch.from_numpy(np.random.default_rng(seed).choice(len(labels), size=min(50, len(labels)),
                                                                 replace=False))
    originals = images[chosen]
    warped = augment(originals, mean, std, torch.Generator().manual_seed(seed), **AUGMENTS[recipe])[:, 0] * std + mean
    pairs, captions = [], []
    for original, moved, label in zip(originals, warped, labels[chosen]):
        pairs += [original.numpy(), (moved.clamp(0, 1) * 255).numpy()]
        captions += [f"{classes[label]}", f"{classes[label]} aug."]
    plot_grid(pairs, captions, path, f"training images: original, then augmented (--augment {recipe})")


# ----------------------------------------------------------------------------- your own images

def background_level(pixels):
    """The median of the picture's outermost pixels: the paper (or screen) it was drawn on."""
    return np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]))


def read_picture(source, name):
    """Grayscale float pixels of a picture file or bytes, as an image viewer shows it.

    The stored EXIF orientation is applied; transparent areas are shown over white paper;
    palette, bilevel, CMYK, RGB(A) and 16-bit grayscale pictures all end as 0..255 gray.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(source, bytes):
        if not Path(source).exists():
            raise DataError(f"{name} does not exist: check the path")
        if not Path(source).is_file():
            raise DataError(f"{name} is not a regular file (a folder, FIFO or device): give a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{opened.width}x{opened.height}")
                if min(opened.width, opened.height) < MIN_SIDE:
                    raise DataError(f"{name} is {opened.width}x{opened.height} pixels, too small to hold a "
                                    f"character: give a picture at least {MIN_SIDE} pixels on each side")
                picture = ImageOps.exif_transpose(opened)
                if picture.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit (or float) gray
                    pixels = np.asarray(picture, dtype=np.float32)
                    return pixels * (255.0 / (65535.0 if pixels.max() > 255 or "16" in picture.mode else 255.0))
                rgba = picture.convert("RGBA")  # palette transparency, LA, bilevel, CMYK all land here
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(paper, rgba).convert("L"), dtype=np.float32)
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"{name} has too many pixels to decode safely: give a picture under "
                        f"{MAX_PIXELS // 1_000_000} megapixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{name} is not an image this can read ({type(err).__name__}): give a PNG or JPEG")


def prepare_user_image(source, name=None):
    """A photo, scan or drawing of one character -> uint8 [28, 28], light on dark, the way EMNIST was made.

    Read as a viewer shows it; inverted if the background is light; cropped to the ink;
    centred in a square with a border (EMNIST pads its region of interest by 2 pixels of
    28); resized with antialiasing; stretched to the full 0..255 range. Used by
    `evaluate.py --image` and demo.py alike.
    """
    from PIL import Image

    name = name or str(source)
    pixels = read_picture(source, name)
    if background_level(pixels) > 127:  # dark ink on light paper
        pixels = 255.0 - pixels
    pixels = np.clip(pixels - background_level(pixels), 0, None)
    ink = pixels > 0.25 * pixels.max()
    if pixels.max() == 0 or not ink.any():
        raise DataError(f"{name} has no visible ink: give a picture of one handwritten character")
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if max(crop.shape) < max(MIN_SIDE, MIN_INK * max(pixels.shape)):  # a dot or a speck, scaled up, is no character
        raise DataError(f"{name} holds only a speck of ink ({crop.shape[1]}x{crop.shape[0]} of "
                        f"{pixels.shape[1]}x{pixels.shape[0]} pixels): give a picture of one handwritten character "
                        f"that fills a good part of it")
    side = int(max(crop.shape) * 28 / 24)  # 2 pixels of border on each side after resizing
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    small = Image.fromarray(square).resize((28, 28), Image.BICUBIC)  # PIL antialiases when shrinking
    small = np.clip(np.asarray(small), 0, None)
    return torch.from_numpy(np.round(small * (255.0 / max(small.max(), 1e-6))).astype(np.uint8))


def top_predictions(model, state, image, device, count=5, precision=None):
    """[(label, probability)] of the `count` likeliest classes for one uint8 [28, 28] image."""
    probabilities = predict_probabilities(model, image[None], state["mean"], state["std"], device, precision)[0]
    top = probabilities.topk(min(count, len(state["classes"])))
    return [(str(state["classes"][index]), float(p)) for p, index in zip(top.values.tolist(), top.indices.tolist())]


def classify_files(paths, args, device):
    """Top-3 characters for each file; a file that cannot be read gets a one-line error, the others answers."""
    name = args.model[0] if args.model else None if args.ckpt else PUBLISHED_NETWORK
    path = find_checkpoint(args.hub, name, args.ckpt, published=True)
    state, model = load_checkpoint(path, name, datasets=DATASETS)
    print(f"network: {path} ({state['model']}, trained on {state['dataset']}, written {written_at(path)})")
    model = model.to(device)
    failures = 0
    for file in paths:
        try:
            image = prepare_user_image(file)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
            continue
        answers = ", ".join(f"{label} {100 * p:.1f}%" for label, p in top_predictions(model, state, image, device, 3))
        print(f"{file}: {answers}")
    return failures


# ----------------------------------------------------------------------------- one network

def check_dataset(state, dataset, path, other_dataset=False):
    """The checkpoint's own dataset; another only with --other-dataset, and with the same classes."""
    dataset = dataset or state["dataset"]
    if dataset != state["dataset"] and not other_dataset:
        raise UserError(f"{path} was trained on {state['dataset']}, not {dataset}: leave --dataset out, or pass "
                        f"--other-dataset if evaluating it on {dataset} is meant")
    if len(CLASSES[dataset]) != state["num_classes"]:
        raise UserError(f"{path} predicts {state['num_classes']} classes ({state['dataset']}) but {dataset} has "
                        f"{len(CLASSES[dataset])}: leave --dataset out, or pass --dataset {state['dataset']}")
    return dataset


def seconds_per_epoch(outputs, name):
    """Mean seconds per pre-training epoch from outputs/train/{name}.json, when it is there and readable."""
    path = Path(outputs) / "train" / f"{name}.json"
    try:
        history = read_json(path, "training")["history"] if path.is_file() else None
        return sum(row["seconds"] for row in history) / len(history) if history else None
    except (UserError, KeyError, TypeError):
        return None


def split_images(dataset, split, args):
    """A split's images; a missing training split suggests --split test rather than another dataset."""
    try:
        return load_images(dataset, train=split == "train", data_dir=args.data_dir, offline_hint=False,
                           download=not (args.no_download or args.dry_run), cache=not args.dry_run)
    except DataError as err:
        if split == "train":
            raise DataError(f"{err}; to evaluate on the test split alone, pass --split test") from None
        raise


def evaluate_model(name, args, device):
    """Metrics and pictures for one network: (result dict, {split: (probabilities, labels)}).

    Holds the lock on outputs/eval/{network}.json while it works (the network named by the
    checkpoint, so that --ckpt alone locks the right file).
    """
    path = find_checkpoint(args.hub, name, args.ckpt)
    state, model = load_checkpoint(path, name, datasets=DATASETS)
    with output_lock(*([] if args.dry_run else [Path(args.outputs) / "eval" / f"{state['model']}.json"])):
        return measure(state, model.to(device), path, args, device)


def measure(state, model, path, args, device):
    """evaluate_model's work on a loaded checkpoint."""
    name = state["model"]
    dataset = check_dataset(state, args.dataset, path, args.other_dataset)
    classes = CLASSES[dataset]
    folder = Path(args.outputs) / "eval"
    result = {"model": name, "checkpoint": str(path), "dataset": dataset, "epochs": state.get("epoch"),
              "parameters": count_parameters(model), "seconds_per_epoch": seconds_per_epoch(args.outputs, name),
              "precision": args.precision.name}
    recipe = augment_recipe(training_args(state).get("augment", "study"))  # what its training saw
    recipe = recipe if isinstance(recipe, str) and recipe in AUGMENTS else "none"  # unknown: show none
    outputs = {}
    for split in ["train", "test"] if args.split == "both" else [args.split]:
        images, labels = split_images(dataset, split, args)
        probabilities = predict_probabilities(model, images, state["mean"], state["std"], device, args.precision,
                                              max_batches=1 if args.dry_run else None)
        labels = labels[: len(probabilities)]
        result[split] = compute_metrics(labels, probabilities, classes, dataset)
        outputs[split] = (probabilities, labels)
        if args.dry_run:
            continue
        plot_confusion(result[split]["confusion_matrix"], classes, folder / f"{name}_cm_{split}.png",
                       f"{name} on the {dataset} {split} split ({len(labels):,} images)")
        if split == "test":
            plot_predictions(images, labels, probabilities, classes, folder / f"{name}_predictions.png", args.seed)
            plot_confused_pairs(images, labels, probabilities, result[split]["most_confused"], classes,
                                folder / f"{name}_confused.png")
        if (split == args.split or split == "train") and AUGMENTS.get(recipe):  # none: nothing to show
            plot_augmentation(images, labels, classes, state["mean"], state["std"], folder / f"{name}_augment.png",
                              args.seed, recipe)
    dry = ", one batch per split: dry run" if args.dry_run else ""
    print(f"\n{name} ({path}, written {written_at(path)}, {dataset}{dry})")
    print(metrics_table([(split, result[split]) for split in outputs]))
    for split in outputs:
        pairs = ", ".join(f"{p['true']}->{p['predicted']} {p['count']}" for p in result[split]["most_confused"][:8])
        print(f"most confused ({split}): {pairs}")
    if not args.dry_run:
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


def choose_members(names, args, device, dataset):
    """The ensemble's members, chosen without the test split: each network's pre-trained checkpoint in
    --ensemble-from-validation DIR predicts the images its pre-training held out (the same for all, and
    never trained on); the subset of two or more whose mean probability is most accurate there wins
    (ties: fewer networks). Pre-trainings of another dataset than the evaluated networks' are refused."""
    held_out, probabilities = None, {}
    for name in names:
        path = Path(args.ensemble_from_validation) / "pre_trained" / f"{name}.pth"
        state, model = load_checkpoint(path, name, hint=f"pre-train {name} there with `python train.py --model "
                                                         f"{name} --hub {args.ensemble_from_validation}`",
                                       datasets=DATASETS)
        if state["dataset"] != dataset:
            raise UserError(f"{path} was pre-trained on {state['dataset']}, not {dataset} like the networks "
                            f"evaluated: give --ensemble-from-validation the hub of their own pre-trainings")
        settings = training_args(state)
        split = {"dataset": dataset, **held_out_by(settings)}
        if not (split["subset"] is None or is_int(split["subset"])) or not is_int(split["seed"]) or \
                not is_number(split["val_fraction"]) or not 0 < split["val_fraction"] < 1:
            raise UserError(f"{path} does not say which subset, seed and validation fraction its pre-training "
                            f"used: it cannot tell which images it held out")
        if held_out is not None and split != held_out[0]:
            raise UserError(f"{path} held out other images ({split}) than the others ({held_out[0]}): the ensemble "
                            f"can be chosen only among pre-trainings of one dataset, subset, seed and fraction")
        if held_out is None:
            data = load_training_data(split, torch.device("cpu"), args.data_dir, not args.no_download,
                                      dry_run=args.dry_run)
            held_out = (split, *data["val"])
        probabilities[name] = predict_probabilities(model.to(device), held_out[1], state["mean"], state["std"],
                                                    device, args.precision)
    members, scores = best_subset(probabilities, held_out[2])
    print(f"ensemble chosen on {len(held_out[2]):,} validation images: {' + '.join(members)} "
          f"({100 * max(scores.values()):.2f} %; all {len(names)}: {100 * scores[' + '.join(names)]:.2f} %)")
    return members, {"validation_images": len(held_out[2]), "validation_accuracy": scores}


def best_subset(probabilities, labels):
    """(members, {subset: accuracy}): the subset of two or more networks whose mean probability is the
    most accurate; ties go to fewer networks, then to the first in order."""
    names, scores = list(probabilities), {}
    for size in range(2, len(names) + 1):
        for subset in combinations(names, size):
            mean = torch.stack([probabilities[name] for name in subset]).mean(0)
            scores[" + ".join(subset)] = float((mean.argmax(1) == labels).float().mean())
    best = max(scores, key=lambda key: (scores[key], -key.count("+")))  # max keeps the first of equals
    return best.split(" + "), scores


def write_comparison(results, ensemble, folder):
    """comparison.json and comparison.md: one column per network, the study's metrics in percent."""
    columns = {name: result for name, result in results.items()}
    if ensemble:
        columns["ensemble"] = dict(ensemble, parameters=sum(results[name]["parameters"] for name in
                                                            ensemble["members"]), seconds_per_epoch=None)
    table = {name: {"parameters": column["parameters"], "seconds_per_epoch": column["seconds_per_epoch"],
                    **{split: {key: column[split][key] for key in STUDY_METRICS}
                       for split in ["train", "test"] if split in column}}
             for name, column in columns.items()}
    dataset = next(iter(results.values()))["dataset"]
    members = ensemble["members"] if ensemble else []
    write_json(folder / "comparison.json", {"dataset": dataset, "models": table, "ensemble_members": members,
                                            "ensemble_choice": ensemble["choice"] if ensemble else None})
    chosen = " (chosen on validation)" if ensemble and ensemble["choice"] else ""
    lines = [f"Dataset: {dataset}. Accuracy and weighted precision / recall / F1 in percent. Ensemble: the mean "
             f"probability of {', '.join(members) or 'none'}{chosen}.", "",
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
    with atomic_path(folder / "comparison.md") as partial:
        partial.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"wrote {folder / 'comparison.md'} and {folder / 'comparison.json'}")


def evaluate_several(names, args, device):
    """Every network that can be evaluated, then the comparison and the ensemble; the others are skipped."""
    results, outputs_by_model = {}, {}
    for name in names:
        try:
            results[name], outputs_by_model[name] = evaluate_model(name, args, device)
        except UserError as err:
            print(f"skipping {name}: {err}")
    if not results:
        raise UserError(f"no network could be evaluated from {args.hub} (reasons above): train some first, "
                        f"e.g. `python train.py --model lenet`")
    datasets = {result["dataset"] for result in results.values()}
    if len(datasets) > 1:
        raise UserError(f"the checkpoints were trained on different datasets ({', '.join(sorted(datasets))}): "
                        f"compare them with --dataset, or evaluate them one at a time")
    dataset = datasets.pop()
    members, choice = list(results), None
    if args.ensemble_from_validation and len(results) > 1:
        members, choice = choose_members(list(results), args, device, dataset)
    ensemble = ensemble_result({name: outputs_by_model[name] for name in members}, CLASSES[dataset], dataset) \
        if len(members) > 1 else None
    if ensemble:
        ensemble["members"], ensemble["choice"] = members, choice
        print("\nensemble (average softmax of " + ", ".join(members) + ")")
        print(metrics_table([(split, ensemble[split]) for split in ("train", "test") if split in ensemble]))
    if not args.dry_run:
        folder = Path(args.outputs) / "eval"
        with output_lock(folder / "comparison.json"):
            write_comparison(results, ensemble, folder)


# ----------------------------------------------------------------------------- wiring

def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=None, choices=sorted(MODELS) + ["all"], metavar="NAME",
                        help=f"networks ({', '.join(sorted(MODELS))}) or all (default: the --ckpt's)")
    parser.add_argument("--ckpt", default=None, type=path_value, metavar="FILE",
                        help="checkpoint (default: HUB/fine_tuned/MODEL_tuned.pth, else HUB/pre_trained/MODEL.pth)")
    add_data_flags(parser, "dataset", "data-dir", "no-download", dataset_help="dataset (default: the checkpoint's)")
    parser.add_argument("--other-dataset", action="store_true", help="allow a --dataset other than the checkpoint's")
    parser.add_argument("--split", default="both", choices=["train", "test", "both"], metavar="NAME",
                        help="train, test or both (default: %(default)s)")
    parser.add_argument("--seed", type=seed_value, default=0, metavar="N",
                        help="which test images the picture shows (default: %(default)s)")
    parser.add_argument("--ensemble-from-validation", default=None, type=path_value, metavar="HUB",
                        help="choose the ensemble on what HUB/pre_trained held out (default: all networks)")
    parser.add_argument("--image", nargs="+", default=None, metavar="FILE",
                        help=f"classify your own pictures of handwritten characters (default network: "
                             f"--hub's, else the published ByClass {PUBLISHED_NETWORK})")
    add_run_flags(parser, "device", "hub", "outputs", "precision", "dry-run", "update-results", precision="fp32")
    args = parser.parse_args(argv)
    if not args.model and not args.ckpt and not args.image:
        parser.error("give --model NAME (or all) or --ckpt PATH")
    if args.ckpt and args.model and (len(args.model) > 1 or "all" in args.model):
        parser.error("--ckpt names one checkpoint: give at most one --model with it")
    if args.ensemble_from_validation and not (args.model and ("all" in args.model or len(set(args.model)) > 1)):
        parser.error("--ensemble-from-validation chooses among several networks: give --model all or two or more")
    if args.image and args.model and (len(args.model) > 1 or "all" in args.model):
        parser.error("--image is read by one network: give one --model (or --ckpt)")
    return args


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        device = get_device(args.device)
        args.precision = choose_precision(args.precision, device, default="fp32")
        print(f"precision: {args.precision.name} ({args.precision.reason})")
        if args.image:
            if classify_files(args.image, args, device):
                raise SystemExit(1)
            return
        names = (list(MODELS) if "all" in args.model else list(dict.fromkeys(args.model))) if args.model else [None]
        if not args.dry_run:
            check_outputs(*[Path(args.outputs) / "eval" / f"{name}{suffix}" for name in names if name
                            for suffix in (".json", "_cm_test.png", "_cm_train.png", "_predictions.png", "_augment.png",
                                           "_confused.png")],
                          *([Path(args.outputs) / "eval" / name for name in ("comparison.json", "comparison.md")]
                            if len(names) > 1 else []))
        if len(names) == 1:
            evaluate_model(names[0], args, device)
        else:
            evaluate_several(names, args, device)


if __name__ == "__main__":
    main()
