"""Datasets, orientation, splits, and device-resident uint8 batches with batched augmentation.

    from data import load_images
    images, labels = load_images("emnist-byclass", train=True, data_dir="data")
    # uint8 [N, 28, 28], every character upright as in MNIST; int64 labels from 0

EMNIST's files store every image transposed and Letters' labels start at 1: both are undone here,
once. Files are read from a flat folder of the official .gz files or from torchvision's layout;
missing ones are downloaded (and checked) by torchvision's dataset classes.
"""
import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runs import UserError

DIGITS, UPPER = "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEBIAN_FASHION = ("/usr/share/datasets/fashion-mnist",)  # apt-get install dataset-fashion-mnist
FASHION = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Boot")


@dataclass(frozen=True)
class Dataset:
    classes: tuple  # label i means classes[i]
    torchvision: str = ""  # the torchvision.datasets class that downloads it ("": scikit-learn's)
    prefixes: tuple = ("train", "t10k")  # official names: {prefix}-images-idx3-ubyte[.gz]
    split: str = None  # EMNIST's split argument
    transposed: bool = False  # EMNIST stores every image transposed
    first_label: int = 0  # EMNIST Letters' labels start at 1
    folders: tuple = ()  # more places to look, e.g. where Debian installs Fashion-MNIST


def emnist(split, classes, first_label=0):
    prefixes = (f"emnist-{split}-train", f"emnist-{split}-test")
    return Dataset(tuple(classes), "EMNIST", prefixes, split, True, first_label)


DATASETS = {
    "emnist-byclass": emnist("byclass", DIGITS + UPPER + UPPER.lower()),
    "emnist-bymerge": emnist("bymerge", DIGITS + UPPER + "abdefghnqrt"),
    "emnist-balanced": emnist("balanced", DIGITS + UPPER + "abdefghnqrt"),
    "emnist-letters": emnist("letters", UPPER, first_label=1),  # each class holds both cases
    "emnist-digits": emnist("digits", DIGITS),
    "emnist-mnist": emnist("mnist", DIGITS),
    "mnist": Dataset(tuple(DIGITS), "MNIST"),
    "fashion-mnist": Dataset(FASHION, "FashionMNIST", folders=(DEBIAN_FASHION)),
    "sklearn-digits": Dataset(tuple(DIGITS)),  # 1,797 real digits in scikit-learn: works offline
}
# The study's augmentation, a random affine per image: rotation, shift (a fraction of the side),
# zoom, shear along x. "study-nearest" draws it as torchvision's RandomAffine does (whole-pixel
# shifts, nearest sampling); "shift-flip" suits pictures whose mirror image is the same class.
STUDY_AFFINE = {"degrees": 15.0, "translate": 0.1, "scale": (0.9, 1.1), "shear": 3.0}
AUGMENTS = {
    "study": STUDY_AFFINE,
    "study-nearest": {**STUDY_AFFINE, "mode": "nearest", "whole_pixels": True},
    "shift-flip": dict(degrees=0.0, translate=0.1, scale=(1.0, 1.0), shear=0.0, flip=True),
    "none": None,
}
VAL_FRACTION = 0.1  # pre-training validates on 10 % of the training split
MINI_FRACTION, MINI_VAL_FRACTION = 0.1, 0.2  # the search's mini subset: 10 % of the split, 80/20
EVAL_BATCH = 1024


def read_idx(path):
    """An official IDX file (gzipped or not) as a uint8 numpy array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        shape = struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(shape)
    except (OSError, EOFError, IndexError, ValueError, struct.error) as err:
        raise UserError(f"{path} is not a readable IDX file ({err}): get it again") from None


def find_file(name, folders):
    candidates = (folder / file for folder in folders for file in (name, f"{name}.gz"))
    return next((path for path in candidates if path.is_file()), None)


def download(dataset, train, root):
    """torchvision's dataset class fetches the official files and checks their MD5."""
    import torchvision

    info = DATASETS[dataset]
    source = getattr(torchvision.datasets, info.torchvision)
    try:
        extra = {"split": info.split} if info.split else {}
        source(root=root, train=train, download=True, **extra)
    except Exception as err:  # no network, a refused mirror, a damaged archive: all the same here
        url = getattr(source, "url", None) or source.mirrors[0]
        return f"downloading from {url} failed: {type(err).__name__}"
    return None


def load_images(dataset="emnist-byclass", train=True, data_dir="data", download_missing=True):
    """(uint8 images [N, 28, 28] upright, int64 labels from 0) of one split of a dataset."""
    info = DATASETS[dataset]
    if not info.torchvision:
        return sklearn_digits(train)
    root = Path(data_dir)
    folders = [root, root / info.torchvision / "raw", *map(Path, info.folders)]
    prefix = info.prefixes[0 if train else 1]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths, why = [find_file(name, folders) for name in names], "download disabled"
    if None in paths and download_missing:
        why = download(dataset, train, root) or why
        paths = [find_file(name, folders) for name in names]
    if None in paths:
        raise UserError(f"{dataset}: no {names[0]}[.gz] in {', '.join(map(str, folders))} ({why}); "
                        f"put the official files in {root}, or offline: --dataset sklearn-digits")
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64) - info.first_label
    if images.ndim != 3 or len(images) != len(labels) or not 0 <= labels.min() <= labels.max() < \
            len(info.classes):
        raise UserError(f"{paths[0]} and {paths[1]} are not the {dataset} files: check the folder")
    if info.transposed:  # EMNIST stores every image transposed: make it upright like MNIST
        images = images.transpose(0, 2, 1)
    return torch.from_numpy(np.array(images, order="C")), torch.from_numpy(labels)


def sklearn_digits(train):
    """scikit-learn's 1,797 real 8x8 digits, scaled to 20x20, centred in 28x28 as MNIST; 80/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False, antialias=True)
    images = F.pad(big, (4, 4, 4, 4)).squeeze(1).round().clamp(0, 255).to(torch.uint8)
    parts = train_test_split(np.arange(len(images)), test_size=0.2, stratify=digits.target,
                             random_state=0)
    chosen = torch.from_numpy(np.sort(parts[0 if train else 1]))
    return images[chosen].contiguous(), torch.from_numpy(digits.target).long()[chosen]


def stratified_split(labels, held_out, seed=0):
    """(kept, held) sorted index tensors; `held_out` is a fraction (< 1) or a count.

    Each class gives its share (largest remainder) of a seeded permutation. Kept rather than
    sklearn's train_test_split because the carve and every committed run's held-out images are
    defined by it: another split would move every number.
    """
    labels = np.asarray(labels)
    size = min(int(round(held_out * len(labels))) if held_out < 1 else int(held_out), len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (size / len(labels))
    taken = np.floor(exact).astype(np.int64)
    taken[np.argsort(-(exact - taken), kind="stable")[: size - taken.sum()]] += 1
    rng = np.random.default_rng(seed)
    held = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == cls))[:count]
                                   for cls, count in zip(classes, taken)]))
    kept = np.setdiff1d(np.arange(len(labels)), held, assume_unique=True)
    return torch.from_numpy(kept), torch.from_numpy(held)


def training_data(dataset, data_dir, device, seed=0, val_fraction=VAL_FRACTION, subset=None,
                  mini=False, download_missing=True, stats=None):
    """The training split on the device as uint8: {"train": (images, labels), "val": (...) or None,
    "mean", "std", "classes"}. Validation: a stratified `val_fraction`, or the search's mini subset
    (80/20). The normalisation is measured on the training part only, unless `stats` gives it."""
    images, labels = load_images(dataset, True, data_dir, download_missing)
    classes = len(DATASETS[dataset].classes)
    if subset:  # a stratified sample of the training split, as the study's 100,000-image runs
        if not 2 * classes <= subset <= len(labels):
            raise UserError(f"--subset {subset}: give {2 * classes} to {len(labels):,}")
        images, labels = (t[stratified_split(labels, subset, seed)[1]] for t in (images, labels))
    val = None
    if mini:
        index = stratified_split(labels, MINI_FRACTION, seed)[1]
        parts = stratified_split(labels[index], MINI_VAL_FRACTION, seed)
        train_index, val_index = index[parts[0]], index[parts[1]]
    elif val_fraction:
        train_index, val_index = stratified_split(labels, val_fraction, seed)
    if mini or val_fraction:
        val = (images[val_index].to(device), labels[val_index].to(device))
        images, labels = images[train_index], labels[train_index]
    mean, std = stats or mean_std(images)
    return {"train": (images.to(device), labels.to(device)), "val": val, "mean": mean, "std": std,
            "classes": classes}


def mean_std(images, chunk=65536):
    """Pixel mean and std in [0, 1] units, summed in chunks (no float copy of the whole set)."""
    total, total_sq = 0.0, 0.0
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].double() / 255.0
        total, total_sq = total + part.sum().item(), total_sq + (part * part).sum().item()
    mean = total / images.numel()
    return mean, max(total_sq / images.numel() - mean * mean, 1e-12) ** 0.5


def normalize(batch, mean, std):
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28], (x / 255 - mean) / std."""
    return batch.unsqueeze(1).float().mul_(1.0 / (255.0 * std)).sub_(mean / std)


def eval_batches(images, labels, mean, std, size=EVAL_BATCH):
    for start in range(0, len(labels), size):
        yield normalize(images[start:start + size], mean, std), labels[start:start + size]


def train_batches(images, labels, mean, std, batch_size, generator, recipe=None):
    """One epoch, shuffled by `generator`, each image moved by its own random affine (an AUGMENTS
    entry) drawn from the same generator; a last batch of one image is left out (BatchNorm)."""
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        if len(index) < 2:
            continue
        if recipe is None:
            yield normalize(images[index], mean, std), labels[index]
        else:
            theta = affine_matrices(len(index), generator, **recipe).to(images.device)
            mode = recipe.get("mode", "bilinear")
            yield augment(images[index], theta, mean, std, mode), labels[index]


def affine_matrices(count, generator=None, degrees=15.0, translate=0.1, scale=(0.9, 1.1), shear=3.0,
                    flip=False, whole_pixels=False, mode=None, side=28):
    """Per-image inverse affine matrices [count, 2, 3] in affine_grid's coordinates: each image is
    (mirrored,) rotated, sheared along x, zoomed and shifted by parameters drawn uniformly."""
    draws = torch.rand(5, count, generator=generator).mul_(2).sub_(1)  # uniform in [-1, 1]
    angle = draws[0] * math.radians(degrees)
    tan = torch.tan(draws[1] * math.radians(shear))
    zoom = (scale[0] + scale[1]) / 2 + draws[2] * ((scale[1] - scale[0]) / 2)
    shift_x, shift_y = draws[3] * (2 * translate), draws[4] * (2 * translate)  # [-1, 1]: 2 sides
    if whole_pixels:  # as torchvision's RandomAffine: shifts rounded to whole pixels
        shift_x, shift_y = ((shift * side / 2).round() * 2 / side for shift in (shift_x, shift_y))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward = zoom * shear @ rotation; grid_sample needs the inverse (closed form, det = zoom^2)
    inv_zoom = 1.0 / zoom
    a, b = cos * inv_zoom, (sin - tan * cos) * inv_zoom
    c, d = -sin * inv_zoom, (cos + tan * sin) * inv_zoom
    theta = torch.stack([a, b, -(a * shift_x + b * shift_y), c, d, -(c * shift_x + d * shift_y)], 1)
    theta = theta.view(count, 2, 3)
    if flip:  # a mirror first: negate the inverse's x row
        theta[torch.rand(count, generator=generator) < 0.5, 0] *= -1
    return theta


def augment(batch, theta, mean, std, mode="bilinear"):
    """Move a whole uint8 batch by per-image affine matrices in one grid_sample, then normalise.
    The grid is affine_grid's (align_corners=False), computed elementwise: faster on a CPU."""
    height, width = batch.shape[-2:]
    arange = torch.arange(max(height, width), device=theta.device, dtype=theta.dtype)
    ys = ((arange[:height] * 2 + 1) / height - 1).view(1, height, 1)
    xs = ((arange[:width] * 2 + 1) / width - 1).view(1, 1, width)
    t = theta.view(-1, 6, 1, 1).unbind(1)
    grid = torch.stack([t[0] * xs + t[1] * ys + t[2], t[3] * xs + t[4] * ys + t[5]], dim=-1)
    moved = F.grid_sample(batch.unsqueeze(1).float(), grid, mode=mode, padding_mode="zeros",
                          align_corners=False)
    return moved.mul_(1.0 / (255.0 * std)).sub_(mean / std)
