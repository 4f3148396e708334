"""Datasets, IDX reading, orientation, splits, device-resident batches and batched augmentation.

    from data import load_images, CLASSES
    images, labels = load_images("emnist-byclass", train=True, data_dir="data")
    # images: uint8 [697932, 28, 28], every character upright as in MNIST; labels: int64 0..61

Every image in the project passes through here, so the two classic EMNIST traps are
handled once: the official files store images transposed, and Letters labels start at 1.
"""
import gzip
import hashlib
import math
import os
import random
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGITS = "0123456789"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CLASSES = {
    "emnist-byclass": DIGITS + UPPER + UPPER.lower(),
    "emnist-bymerge": DIGITS + UPPER + "abdefghnqrt",  # the 15 look-alike lowercase letters merged
    "emnist-balanced": DIGITS + UPPER + "abdefghnqrt",
    "emnist-letters": UPPER,  # each class holds both cases
    "emnist-digits": DIGITS,
    "emnist-mnist": DIGITS,
    "mnist": DIGITS,
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
    "sklearn-digits": DIGITS,
}
DATASETS = sorted(CLASSES)

# The study's augmentation: random affine with independent parameters per image.
AUGMENT = {"degrees": 15.0, "translate": 0.1, "scale": (0.9, 1.1), "shear": 3.0}

# Split fractions: pre-training validates on 10 % of the training split; the search
# "mini" subset is 10 % of the training split, itself split 80/20.
VAL_FRACTION = 0.1
MINI_FRACTION = 0.1
MINI_VAL_FRACTION = 0.2
SKLEARN_TEST_FRACTION = 0.2

EMNIST_ZIP = "gzip.zip"  # the official archive's name; torchvision downloads the same file
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emnist-cnn"


class DataError(Exception):
    """A problem with the user's data files: the message says what to do."""


# ----------------------------------------------------------------------------- IDX files

def parse_idx(raw, name):
    """Decode the bytes of an IDX file (gzipped or not) into a numpy array."""
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{name} is corrupt or truncated ({err}): delete it and download it again")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name} is not an unsigned-byte IDX file: delete it and download it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is truncated inside its header: delete it and download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) if ndim else 0
    if len(raw) - header != expected:
        raise DataError(f"{name} is corrupt or truncated: {len(raw) - header} data bytes, header says "
                        f"{expected} for shape {shape}; delete it and download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_source(source):
    """Bytes of a source: a path, or (zip path, member name)."""
    if isinstance(source, tuple):
        archive, member = source
        try:
            with zipfile.ZipFile(archive) as zipped:
                return zipped.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{archive} is corrupt or truncated ({err}): delete it and download it again")
    return Path(source).read_bytes()


def source_name(source):
    return f"{source[0]}!{source[1]}" if isinstance(source, tuple) else str(source)


def writable(folder):
    """Writable by us, not marked read-only, not a system folder: root could write anywhere, but should not."""
    system = Path(folder).resolve().is_relative_to("/usr")  # e.g. Debian's /usr/share/datasets
    return not system and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def cache_file(source, transpose):
    """Where the decoded array of `source` is cached: beside it, or in CACHE_DIR if that is read-only."""
    path = Path(source[0] if isinstance(source, tuple) else source)
    member = Path(source[1]).name if isinstance(source, tuple) else path.name
    name = member.removesuffix(".gz") + (".upright" if transpose else "") + ".npy"
    if writable(path.parent):
        return path.parent / name
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return CACHE_DIR / digest / name


def atomic_save_npy(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        np.save(handle, array)
    os.chmod(handle.name, 0o644)  # mkstemp's 0600 would hide the cache from other users of a shared folder
    os.replace(handle.name, path)


def load_idx(source, transpose=False):
    """Decode an IDX source once; later calls read the cached .npy (well under a second for ByClass)."""
    origin = Path(source[0] if isinstance(source, tuple) else source)
    cache = cache_file(source, transpose)
    if cache.exists() and cache.stat().st_mtime >= origin.stat().st_mtime:
        try:
            return np.load(cache)
        except (ValueError, OSError, EOFError):
            pass  # a damaged cache is rebuilt from the source below
    array = parse_idx(read_source(source), source_name(source))
    if transpose:  # EMNIST stores every image transposed; make it upright like MNIST
        array = array.transpose(0, 2, 1)
    array = np.array(array, order="C")  # writable and contiguous (frombuffer's is neither)
    try:
        atomic_save_npy(cache, array)
    except OSError:
        pass  # caching is an optimisation: a read-only place must not break loading
    return array


# ----------------------------------------------------------------------------- finding files

def split_files(dataset, train):
    """The official (images, labels) file names of a split, without .gz."""
    part = "train" if train else ("test" if dataset.startswith("emnist") else "t10k")
    prefix = f"{dataset}-{part}" if dataset.startswith("emnist") else part
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def search_folders(dataset, data_dir):
    data_dir = Path(data_dir)
    if dataset.startswith("emnist"):
        return [data_dir, data_dir / "gzip", data_dir / "EMNIST" / "raw", data_dir / "emnist"]
    if dataset == "mnist":
        return [data_dir / "MNIST" / "raw", data_dir, data_dir / "mnist"]
    return [data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist", data_dir, Path(DEBIAN_FASHION_DIR)]


def find_file(name, folders):
    """A plain or gzipped file in one of the folders, or a member of a gzip.zip there."""
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    for folder in folders:
        archive = folder / EMNIST_ZIP
        if archive.is_file():
            try:
                with zipfile.ZipFile(archive) as zipped:
                    members = zipped.namelist()
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(f"{archive} is corrupt or truncated ({err}): delete it and download it again")
            for member in members:
                if Path(member).name in (name, f"{name}.gz"):
                    return (archive, member)
    return None


def missing_data_error(dataset, names, folders, reason=""):
    wanted = " and ".join(f"{name}.gz" for name in names)
    searched = ", ".join(str(folder) for folder in folders)
    hint = f" ({reason})" if reason else ""
    source = "gzip.zip from " + emnist_url() + " (or its files)" if dataset.startswith("emnist") else "the files"
    return DataError(f"{dataset}: could not find {wanted} (or {EMNIST_ZIP} holding them) in {searched}{hint}; "
                     f"put {source} in {folders[0]}, or run offline with --dataset sklearn-digits")


def emnist_url():
    from torchvision.datasets import EMNIST

    return EMNIST.url


# ----------------------------------------------------------------------------- downloads

def download_emnist(data_dir):
    """Fetch EMNIST's official gzip.zip through torchvision (its url and md5) into data_dir.

    The archive lands in a temporary folder and is moved into place only once it is
    complete and verified, so a failed download never leaves files that look like data.
    """
    from torchvision.datasets import EMNIST
    from torchvision.datasets.utils import download_url

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".emnist-download-", dir=data_dir))
    try:
        download_url(EMNIST.url, str(staging), EMNIST_ZIP, EMNIST.md5)
        archive = staging / EMNIST_ZIP
        if not archive.is_file():
            raise RuntimeError("the download produced no file")
        with zipfile.ZipFile(archive) as zipped:
            if zipped.testzip() is not None:
                raise RuntimeError("the downloaded archive is damaged")
        os.replace(archive, data_dir / EMNIST_ZIP)
    except Exception as err:  # network errors come in many types; each becomes the one-line error
        raise RuntimeError(f"{type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_torchvision(dataset, data_dir):
    from torchvision import datasets

    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    for train in (True, False):
        cls(root=str(data_dir), train=train, download=True)


# ----------------------------------------------------------------------------- datasets

def load_sklearn_digits(train):
    """scikit-learn's 1,797 real 8x8 digits, scaled to 20x20 and centred in 28x28 like MNIST."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False, antialias=True)
    images = F.pad(big, (4, 4, 4, 4)).squeeze(1).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=SKLEARN_TEST_FRACTION,
                                           stratify=digits.target, random_state=0)
    chosen = torch.from_numpy(np.sort(train_idx if train else test_idx))
    return images[chosen].contiguous(), labels[chosen]


def load_idx_pair(dataset, train, data_dir, download):
    names = split_files(dataset, train)
    folders = search_folders(dataset, data_dir)
    sources = [find_file(name, folders) for name in names]
    if None in sources and download:
        try:
            if dataset.startswith("emnist"):
                download_emnist(data_dir)
            else:
                download_torchvision(dataset, data_dir)
        except Exception as err:
            raise missing_data_error(dataset, names, folders, f"download failed: {err}") from None
        sources = [find_file(name, folders) for name in names]
    if None in sources:
        raise missing_data_error(dataset, names, folders, "" if download else "download disabled")
    images = load_idx(sources[0], transpose=dataset.startswith("emnist"))
    labels = load_idx(sources[1]).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{source_name(sources[0])} and {source_name(sources[1])} do not match: "
                        f"images {images.shape}, labels {labels.shape}")
    if dataset == "emnist-letters":
        labels = labels - 1  # official Letters labels run 1..26
    if labels.min() < 0 or labels.max() >= len(CLASSES[dataset]):
        raise DataError(f"{source_name(sources[1])} has labels {labels.min()}..{labels.max()}, "
                        f"expected 0..{len(CLASSES[dataset]) - 1} for {dataset}: is it the right file?")
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_images(dataset="emnist-byclass", train=True, data_dir="data", download=True):
    """(uint8 images [N, 28, 28] upright, int64 labels 0..C-1) of one split of a dataset."""
    if dataset not in CLASSES:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if dataset == "sklearn-digits":
        return load_sklearn_digits(train)
    return load_idx_pair(dataset, train, data_dir, download)


# ----------------------------------------------------------------------------- splits

def stratified_counts(labels, size):
    """How many items of each class a stratified sample of `size` items takes (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (size / len(labels))
    taken = np.floor(exact).astype(np.int64)
    leftover = np.argsort(-(exact - taken), kind="stable")[: size - taken.sum()]
    taken[leftover] += 1
    return classes, taken


def stratified_split(labels, held_out, seed=0):
    """(kept, held) sorted index tensors; `held_out` is a fraction (< 1) or a count of items."""
    labels = np.asarray(labels)
    size = int(round(held_out * len(labels))) if held_out < 1 else int(held_out)
    size = min(size, len(labels))
    rng = np.random.default_rng(seed)
    held = []
    for cls, count in zip(*stratified_counts(labels, size)):
        members = np.flatnonzero(labels == cls)
        held.append(rng.permutation(members)[:count])
    held = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(labels)), held, assume_unique=True)
    return torch.from_numpy(kept), torch.from_numpy(held)


def stratified_subset(labels, size, seed=0):
    """Indices of a stratified sample of `size` items (the study's 100k-image runs)."""
    return stratified_split(labels, size, seed)[1]


def mini_split(labels, seed=0):
    """The search's mini subset: (train indices, val indices), 10 % of the split, 80/20."""
    mini = stratified_subset(labels, MINI_FRACTION, seed)
    train, val = stratified_split(np.asarray(labels)[mini.numpy()], MINI_VAL_FRACTION, seed)
    return mini[train], mini[val]


def mean_std(images, chunk=65536):
    """Pixel mean and std (in [0, 1] units) of uint8 images, without a float copy of the set."""
    total, total_sq, count = 0.0, 0.0, images.numel()
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].double() / 255.0
        total += part.sum().item()
        total_sq += (part * part).sum().item()
    mean = total / count
    return mean, max(total_sq / count - mean * mean, 1e-12) ** 0.5


# ----------------------------------------------------------------------------- batches

def iterate_batches(images, labels, batch_size, shuffle=False, generator=None, rank=0, world_size=1):
    """Yield (uint8 images, labels) batches gathered on the tensors' device.

    With world_size > 1 each rank takes every world_size-th item of the (shared,
    seeded) order; shuffled (training) orders are first cut to equal lengths so every
    rank runs the same number of steps, while evaluation covers every item.
    The last partial batch is kept.
    """
    count = len(labels)
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    if world_size > 1:
        if shuffle:  # training: DDP needs the same number of steps on every rank
            order = order[: count - count % world_size]
        order = order[rank::world_size]
    order = order.to(images.device)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


def standardize(pixels, mean, std):
    """Float pixels in 0..255 -> (x / 255 - mean) / std, in place."""
    return pixels.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def normalize(batch, mean, std):
    """uint8 [B, 28, 28] -> normalised float [B, 1, 28, 28]."""
    return standardize(batch.unsqueeze(1).float(), mean, std)


def affine_matrices(count, generator=None, degrees=15.0, translate=0.1, scale=(0.9, 1.1), shear=3.0):
    """Per-image inverse affine matrices [count, 2, 3] in affine_grid's normalised coordinates.

    The forward map rotates, shears along x, scales and shifts; grid_sample needs where each
    output pixel comes from, so the inverse is built directly (a 2x2 inverse in closed form).
    """
    draws = torch.rand(5, count, generator=generator).mul_(2).sub_(1)  # uniform in [-1, 1]
    angle = draws[0] * math.radians(degrees)
    tan = torch.tan(draws[1] * math.radians(shear))
    zoom = (scale[0] + scale[1]) / 2 + draws[2] * ((scale[1] - scale[0]) / 2)
    shift_x, shift_y = draws[3] * (2 * translate), draws[4] * (2 * translate)  # [-1, 1] spans 2 widths
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward = zoom * shear @ rotation = zoom * [[cos + tan sin, tan cos - sin], [sin, cos]], det = zoom^2
    inv_zoom = 1.0 / zoom
    a, b = cos * inv_zoom, (sin - tan * cos) * inv_zoom
    c, d = -sin * inv_zoom, (cos + tan * sin) * inv_zoom
    return torch.stack([a, b, -(a * shift_x + b * shift_y), c, d, -(c * shift_x + d * shift_y)], 1).view(count, 2, 3)


_BASE_GRIDS = {}


def sampling_grid(theta, height, width):
    """affine_grid(theta, align_corners=False), computed elementwise: several times faster on a CPU."""
    key = (height, width, theta.device, theta.dtype)
    if key not in _BASE_GRIDS:
        ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
        xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
        _BASE_GRIDS[key] = (xs.view(1, 1, width), ys.view(1, height, 1))
    xs, ys = _BASE_GRIDS[key]
    t = theta.view(-1, 6, 1, 1).unbind(1)
    grid_x = t[0] * xs + t[1] * ys + t[2]
    grid_y = t[3] * xs + t[4] * ys + t[5]
    return torch.stack([grid_x, grid_y], dim=-1)


def augment(batch, mean, std, generator=None, **recipe):
    """The study's random affine on a whole uint8 batch at once, returned normalised.

    Parameters are drawn independently per image (on the CPU generator, so runs are
    reproducible on any device) and applied with one grid_sample call on the batch's
    device. Areas moved in from outside are background (0).
    """
    recipe = {**AUGMENT, **recipe}
    theta = affine_matrices(len(batch), generator, **recipe).to(batch.device)
    pixels = batch.unsqueeze(1).float()
    grid = sampling_grid(theta, batch.shape[-2], batch.shape[-1])
    moved = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return standardize(moved, mean, std)


# ----------------------------------------------------------------------------- seeds, devices

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
