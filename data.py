"""Datasets, IDX reading, orientation, splits, device-resident batches and batched augmentation.

    from data import load_images, CLASSES
    images, labels = load_images("emnist-byclass", train=True, data_dir="data")
    # images: uint8 [697932, 28, 28], every character upright as in MNIST; labels: int64 0..61

Every image in the project passes through here, so the two classic EMNIST traps are
handled once: the official files store images transposed, and Letters labels start at 1.
Also here, because every script needs them: atomic file writes, the output lock,
device and precision choice, and the one-line handling of user errors.
"""
import argparse
import contextlib
import errno
import gzip
import hashlib
import http.client
import json
import math
import os
import random
import re
import signal
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGITS = "0123456789"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FASHION = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
EMNIST_ZIP = "gzip.zip"  # the official archive's name; torchvision downloads the same file
EMNIST_FOLDERS = (".", "gzip", "EMNIST/raw", "emnist")


@dataclass(frozen=True)
class Dataset:
    """How to find and read one dataset: adding a dataset is one entry in DATASETS."""
    classes: tuple  # label i means classes[i]
    files: tuple = ()  # (train prefix, test prefix) of the IDX file names; () for sklearn-digits
    folders: tuple = ()  # searched in order, relative to --data-dir (absolute paths as they are)
    download: str = ""  # "emnist", or the torchvision dataset class whose mirrors and MD5s are used
    transposed: bool = False  # EMNIST stores every image transposed
    first_label: int = 0  # EMNIST Letters labels start at 1


def emnist(split, classes, first_label=0):
    return Dataset(tuple(classes), (f"emnist-{split}-train", f"emnist-{split}-test"), EMNIST_FOLDERS, "emnist",
                   transposed=True, first_label=first_label)


DATASETS = {
    "emnist-byclass": emnist("byclass", DIGITS + UPPER + UPPER.lower()),
    "emnist-bymerge": emnist("bymerge", DIGITS + UPPER + "abdefghnqrt"),  # 15 look-alike lowercase merged
    "emnist-balanced": emnist("balanced", DIGITS + UPPER + "abdefghnqrt"),
    "emnist-letters": emnist("letters", UPPER, first_label=1),  # each class holds both cases
    "emnist-digits": emnist("digits", DIGITS),
    "emnist-mnist": emnist("mnist", DIGITS),
    "mnist": Dataset(tuple(DIGITS), ("train", "t10k"), ("MNIST/raw", ".", "mnist"), "MNIST"),
    "fashion-mnist": Dataset(FASHION, ("train", "t10k"), ("FashionMNIST/raw", "fashion-mnist", ".",
                                                          DEBIAN_FASHION_DIR), "FashionMNIST"),
    "sklearn-digits": Dataset(tuple(DIGITS)),  # ships with scikit-learn: works offline
}
CLASSES = {name: dataset.classes for name, dataset in DATASETS.items()}

# The study's augmentation: random affine with independent parameters per image.
AUGMENT = {"degrees": 15.0, "translate": 0.1, "scale": (0.9, 1.1), "shear": 3.0}
# --augment: the training scripts' recipes, each a set of affine_matrices ranges (None: no augmentation).
# shift-flip suits pictures whose left-right mirror is the same class (garments, not characters):
# a mirror on half the images and the study's shifts, without rotation, scaling or shear.
AUGMENTS = {
    "study": AUGMENT,
    "shift-flip": {"degrees": 0.0, "translate": 0.1, "scale": (1.0, 1.0), "shear": 0.0, "flip": True},
    "none": None,
}


def augment_recipe(value):
    """A checkpoint's or flag's augment value as an AUGMENTS name (checkpoints before --augment NAME
    stored True for the study's affine and False for none)."""
    if value is True:
        return "study"
    if value is False:
        return "none"
    return value

# Split fractions: pre-training validates on 10 % of the training split; the search
# "mini" subset is 10 % of the training split, itself split 80/20.
VAL_FRACTION = 0.1
MINI_FRACTION = 0.1
MINI_VAL_FRACTION = 0.2
SKLEARN_TEST_FRACTION = 0.2
EVAL_BATCH = 1024  # evaluation needs no gradients: larger batches are free (the only eval batch size)

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emnist-cnn"
DOWNLOAD_TIMEOUT = 30  # seconds without a byte before a download attempt is given up
DOWNLOAD_RETRIES = 4  # further attempts, each resuming where the last one stopped
DOWNLOAD_BACKOFF = 1.0  # seconds before the second attempt, doubled after each further one (at most 10x)


class UserError(Exception):
    """Something the user can fix: the message says what to do; scripts print it as one line."""


class DataError(UserError):
    """A problem with the user's data files."""


def dataset_info(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


# ----------------------------------------------------------------------------- files written atomically

@contextlib.contextmanager
def atomic_path(path):
    """Yield a unique temporary path beside `path`; it replaces `path` only if the block succeeds.

    Whatever stops the block (an error, Ctrl-C, a full disk), the temporary file is removed
    and the previous `path` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(partial)
        os.chmod(partial, 0o644)  # mkstemp's 0600 would hide results from the other users of a folder
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def write_json(path, payload):
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(payload, indent=2) + "\n")


def read_json(path, what):
    """A JSON object from a file the user may have emptied or edited: one-line errors."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not readable JSON ({type(err).__name__}): delete it or redo the {what}")
    if not isinstance(payload, dict):
        raise DataError(f"{path} does not hold a JSON object: delete it or redo the {what}")
    return payload


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, whatever MPLBACKEND says."""
    os.environ.pop("MPLBACKEND", None)  # an unusable value would break the import itself
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path, dpi=100):
    """Save a matplotlib figure atomically (never a half-written PNG) and close it."""
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    pyplot().close(figure)


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
    try:
        if isinstance(source, tuple):
            archive, member = source
            with zipfile.ZipFile(archive) as zipped:
                return zipped.read(member)
        return Path(source).read_bytes()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{source_name(source)} cannot be read ({err}): check it, or delete it and download it "
                        f"again") from None


def source_name(source):
    return f"{source[0]}!{source[1]}" if isinstance(source, tuple) else str(source)


def writable(folder):
    """Writable by us, not marked read-only, not a system folder: root could write anywhere, but should not."""
    system = Path(folder).resolve().is_relative_to("/usr")  # e.g. Debian's /usr/share/datasets
    return not system and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


SIGNATURE_SAMPLES = 64  # 4 KiB blocks spread over the file: about 1 ms, whatever its size


def source_signature(source):
    """Size, modification time and sampled content of a data file, as 16 hex digits.

    A changed file changes its signature even when its mtime went backwards (`cp -p`, an
    extracted archive): a gzip file ends with the CRC and length of its whole content, and
    the sampled blocks catch an uncompressed file rewritten in place.
    """
    path = Path(source[0] if isinstance(source, tuple) else source)
    stat = path.stat()
    digest = hashlib.sha1(f"{stat.st_size}:{stat.st_mtime_ns}:{source_name(source)}".encode())
    with open(path, "rb") as handle:
        for block in range(SIGNATURE_SAMPLES + 1):
            handle.seek(max(0, (stat.st_size - 4096) * block // SIGNATURE_SAMPLES))
            digest.update(handle.read(4096))
    return digest.hexdigest()[:16]


def cache_file(source, transpose):
    """Where the decoded array of `source` is cached: beside it, or in CACHE_DIR if that is read-only.

    The name holds the source's signature, so a changed source never meets its old cache.
    """
    path = Path(source[0] if isinstance(source, tuple) else source)
    member = Path(source[1]).name if isinstance(source, tuple) else path.name
    name = member.removesuffix(".gz") + (".upright" if transpose else "") + f".{source_signature(source)}.npy"
    if writable(path.parent):
        return path.parent / name
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return CACHE_DIR / digest / name


def load_idx(source, transpose=False):
    """Decode an IDX source once; later calls read the cached .npy (well under a second for ByClass)."""
    cache = cache_file(source, transpose)
    if cache.exists():
        try:
            return np.load(cache)
        except (ValueError, OSError, EOFError):
            pass  # a damaged cache is rebuilt from the source below
    array = parse_idx(read_source(source), source_name(source))
    if transpose:  # EMNIST stores every image transposed; make it upright like MNIST
        array = array.transpose(0, 2, 1)
    array = np.array(array, order="C")  # writable and contiguous (frombuffer's is neither)
    try:
        with atomic_path(cache) as partial:
            with open(partial, "wb") as handle:
                np.save(handle, array)
        stale = re.compile(re.escape(cache.name.rsplit(".", 2)[0]) + r"\.[0-9a-f]{16}\.npy")
        for old in cache.parent.iterdir():  # caches of earlier versions of the source
            if old != cache and stale.fullmatch(old.name):
                old.unlink(missing_ok=True)
    except OSError:
        pass  # caching is an optimisation: a read-only place or a full disk must not break loading
    return array


# ----------------------------------------------------------------------------- finding files

def split_files(dataset, train):
    """The official (images, labels) file names of a split, without .gz."""
    prefix = dataset_info(dataset).files[0 if train else 1]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def search_folders(dataset, data_dir):
    return [Path(data_dir) / folder for folder in dataset_info(dataset).folders]


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


def missing_data_error(dataset, names, folders, reason="", offline_hint=True):
    wanted = " and ".join(f"{name}.gz" for name in names)
    searched = ", ".join(str(folder) for folder in folders)
    hint = f" ({reason})" if reason else ""
    if dataset.startswith("emnist"):
        source = f"{EMNIST_ZIP} from {EMNIST_URL} (or its files)"
    elif dataset == "fashion-mnist":
        source = "the files (Debian: apt-get install dataset-fashion-mnist)"
    else:
        source = "the files"
    offline = ", or run offline with --dataset sklearn-digits" if offline_hint else ""
    return DataError(f"{dataset}: could not find {wanted} (or {EMNIST_ZIP} holding them) in {searched}{hint}; "
                     f"put {source} in {folders[0]}{offline}")


# ----------------------------------------------------------------------------- downloads

EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
EMNIST_MD5 = "58c8d27c78d21e728a6bc7b3cc06412e"  # torchvision's EMNIST.md5


def fetch(url, path, md5, timeout=DOWNLOAD_TIMEOUT, retries=DOWNLOAD_RETRIES):
    """Download url to path: resumes after a stall or a dropped connection, checks the MD5.

    The bytes go to `path.part` (kept between runs, so a later run resumes it instead of
    starting over) and become `path` only once complete and verified.
    """
    partial = path.with_name(path.name + ".part")
    for attempt in range(retries + 1):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:  # the server ignored the range: start again
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length else None
                with open(partial, "ab" if have else "wb") as out, progress(total, have, path.name) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            if total is None or partial.stat().st_size >= total:
                break
            raise http.client.IncompleteRead(b"", total - partial.stat().st_size)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # nothing left to fetch: the part is complete
                break
            raise DataError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            if attempt == retries:
                raise DataError(f"download of {url} failed after {retries + 1} attempts ({reason}); "
                                f"run the command again to resume it") from None
            time.sleep(min(2 ** attempt, 10) * DOWNLOAD_BACKOFF)
    digest = hashlib.md5()
    with open(partial, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != md5:
        partial.unlink()
        raise DataError(f"download of {url} failed: its MD5 is {digest.hexdigest()}, expected {md5} "
                        f"(a wrong or damaged file was served; it was deleted)")
    os.replace(partial, path)



def progress(total, initial, name):
    """A tqdm bar with size and speed on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not sys.stderr.isatty(), leave=False)


def download(dataset, data_dir):
    """Fetch a dataset's official files into the first folder searched for them."""
    info = dataset_info(dataset)
    target = search_folders(dataset, data_dir)[0]
    target.mkdir(parents=True, exist_ok=True)
    if info.download == "emnist":
        fetch(EMNIST_URL, target / EMNIST_ZIP, EMNIST_MD5)
        with zipfile.ZipFile(target / EMNIST_ZIP) as zipped:
            if zipped.testzip() is not None:
                (target / EMNIST_ZIP).unlink()
                raise DataError(f"the downloaded {EMNIST_ZIP} is damaged and was deleted: run again")
        return
    from torchvision import datasets

    source = getattr(datasets, info.download)
    for filename, md5 in source.resources:
        if not (target / filename).exists():
            mirrors, last = source.mirrors, None
            for mirror in mirrors:
                try:
                    fetch(mirror + filename, target / filename, md5)
                    break
                except DataError as err:
                    last = err
            else:
                raise last


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


def download_missing(dataset, data_dir, names, folders):
    """Download, or one line that names the files; never leaves an empty folder behind."""
    created = [folder for folder in folders[:1] if not folder.exists()]
    try:
        download(dataset, data_dir)
    except DataError as err:
        raise missing_data_error(dataset, names, folders, str(err)) from None
    finally:
        for folder in created:  # e.g. MNIST/raw/ made for a download that failed
            while folder != Path(data_dir).parent and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


def load_idx_pair(dataset, train, data_dir, download, offline_hint=True):
    info = dataset_info(dataset)
    names = split_files(dataset, train)
    folders = search_folders(dataset, data_dir)
    sources = [find_file(name, folders) for name in names]
    if None in sources and download:
        download_missing(dataset, data_dir, names, folders)
        sources = [find_file(name, folders) for name in names]
    if None in sources:
        raise missing_data_error(dataset, names, folders, "" if download else "download disabled", offline_hint)
    images = load_idx(sources[0], transpose=info.transposed)
    labels = load_idx(sources[1]).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{source_name(sources[0])} and {source_name(sources[1])} do not match: "
                        f"images {images.shape}, labels {labels.shape}")
    if len(labels) == 0:
        raise DataError(f"{source_name(sources[0])} holds no images: it is not the {dataset} file")
    labels = labels - info.first_label
    if labels.min() < 0 or labels.max() >= len(info.classes):
        raise DataError(f"{source_name(sources[1])} has labels {labels.min() + info.first_label}.."
                        f"{labels.max() + info.first_label}, expected {info.first_label}.."
                        f"{len(info.classes) - 1 + info.first_label} for {dataset}: is it the right file?")
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_images(dataset="emnist-byclass", train=True, data_dir="data", download=True, offline_hint=True):
    """(uint8 images [N, 28, 28] upright, int64 labels 0..C-1) of one split of a dataset."""
    if not dataset_info(dataset).files:
        return load_sklearn_digits(train)
    return load_idx_pair(dataset, train, data_dir, download, offline_hint)


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
            order = order[: shard_length(count, world_size) * world_size]
        order = order[rank::world_size]
    order = order.to(images.device)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


def shard_length(count, world_size=1):
    """How many items one rank's shuffled (training) order from iterate_batches holds."""
    return count // world_size


def batch_sizes(count, batch_size):
    """The sizes of iterate_batches' batches over `count` items, the last partial one included."""
    return [min(batch_size, count - start) for start in range(0, count, batch_size)]


def standardize(pixels, mean, std):
    """Float pixels in 0..255 -> (x / 255 - mean) / std, in place."""
    return pixels.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def normalize(batch, mean, std):
    """uint8 [B, 28, 28] -> normalised float [B, 1, 28, 28]."""
    return standardize(batch.unsqueeze(1).float(), mean, std)


def affine_matrices(count, generator=None, degrees=15.0, translate=0.1, scale=(0.9, 1.1), shear=3.0, flip=False):
    """Per-image inverse affine matrices [count, 2, 3] in affine_grid's normalised coordinates.

    The forward map (optionally mirrors left-right, with probability 1/2, first) rotates, shears
    along x, scales and shifts; grid_sample needs where each output pixel comes from, so the
    inverse is built directly (a 2x2 inverse in closed form). Without flip the draws are the
    study's, number for number.
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
    theta = torch.stack([a, b, -(a * shift_x + b * shift_y), c, d, -(c * shift_x + d * shift_y)], 1).view(count, 2, 3)
    if flip:  # the inverse of (forward after a mirror) is the mirror after the inverse: negate the x row
        mirrored = torch.rand(count, generator=generator) < 0.5
        theta[mirrored, 0] *= -1
    return theta


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


def epoch_affines(sizes, generator, device, recipe=AUGMENT):
    """One epoch's affine matrices, a [size, 2, 3] view per batch, copied to the device at once.

    Drawn batch by batch on the CPU generator, in order, so they are exactly the numbers
    that one draw per step gives (runs stay reproducible and identical on every device),
    but without a small host-to-device copy every step (on CUDA each one stalls the host).
    Batches of one image get no matrices: training skips them (BatchNorm).
    """
    drawn = [affine_matrices(size, generator, **recipe) for size in sizes if size >= 2]
    if not drawn:
        return iter(())
    return iter(torch.cat(drawn).to(device).split([len(theta) for theta in drawn]))


def augment(batch, mean, std, generator=None, theta=None, **recipe):
    """A random affine (the study's, unless `recipe` changes its ranges) on a whole uint8 batch
    at once, returned normalised.

    Parameters are drawn independently per image (on the CPU generator, so runs are
    reproducible on any device), or given as `theta` (from epoch_affines), and applied with
    one grid_sample call on the batch's device. Areas moved in from outside are background (0).
    """
    if theta is None:
        theta = affine_matrices(len(batch), generator, **{**AUGMENT, **recipe}).to(batch.device)
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
    """A torch.device that exists on this machine: auto is cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s); use --device auto or cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu")
    return device


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: the CPU multiplies bf16 in hardware (Linux reports it in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """How the arithmetic runs: bf16 autocast and/or channels_last, and why."""
    bf16: bool
    channels_last: bool
    reason: str

    @property
    def name(self):
        return "bf16 + channels_last" if self.bf16 and self.channels_last else ("bf16" if self.bf16 else "fp32")


PRECISIONS = ["auto", "fp32", "bf16"]


def choose_precision(choice, device):
    """--precision: auto picks bf16 autocast + channels_last only where bf16 is native and measured faster.

    Measured (benchmarks/throughput.py): on a CPU with AVX512-BF16, bf16 + channels_last trains
    1.1x (LeNet) to 2.2x (VGGNet) faster than fp32; without native bf16, bf16 is emulated and slower.
    """
    if choice == "fp32":
        return Precision(False, False, "asked for with --precision fp32")
    if choice == "bf16":
        return Precision(True, device.type in ("cpu", "cuda"), "asked for with --precision bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision(True, True, f"auto: {torch.cuda.get_device_name(device)} does bf16 natively")
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision(True, True, "auto: this CPU has AVX512-BF16/AMX (native bf16)")
    what = {"cpu": "this CPU has no native bf16 (no AVX512-BF16 or AMX)",
            "cuda": "this GPU has no native bf16"}.get(device.type, f"bf16 is not native on {device.type}")
    return Precision(False, False, f"auto: {what}")


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line that says what to do."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction strictly between 0 and 1, not {text}")
    return value


def seed_value(text):
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, not {value}")
    return value


for _check, _name in [(positive_int, "a whole number"), (positive_float, "a number"),
                      (non_negative_float, "a number"), (fraction, "a number"), (seed_value, "a whole number")]:
    _check.__name__ = _name  # argparse says "invalid a number value: 'x'" for text that is no number


COMMON_FLAGS = {  # each script picks the ones it uses (add_flags)
    "dataset": dict(default=None, choices=sorted(DATASETS),
                    help="dataset (default: emnist-byclass, or the checkpoint's when there is one)"),
    "data-dir": dict(default="data", help="folder with the dataset files (default: %(default)s)"),
    "subset": dict(type=positive_int, default=None,
                   help="train on a stratified sample of N images of the training split (default: all)"),
    "device": dict(default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps (default: auto)"),
    "seed": dict(type=seed_value, default=None, help="seed for splits, shuffling, augmentation, init (default: 0)"),
    "hub": dict(default="model_hub", help="checkpoint folder (default: %(default)s)"),
    "outputs": dict(default="outputs", help="folder for JSON and plots (default: %(default)s)"),
    "no-download": dict(action="store_true", help="never download missing data"),
    "precision": dict(default="auto", choices=PRECISIONS,
                      help="fp32, or bf16 autocast with channels_last; auto picks bf16 where the device does "
                           "it natively (default: auto)"),
    "compile": dict(action="store_true", help="torch.compile the model"),
}


def add_flags(parser, *names, **defaults):
    """Add the named COMMON_FLAGS; keyword arguments override their defaults (help follows)."""
    for name in names:
        options = dict(COMMON_FLAGS[name])
        key = name.replace("-", "_")
        if key in defaults:
            options["default"] = defaults[key]
        parser.add_argument(f"--{name}", **options)
    return parser


# ----------------------------------------------------------------------------- running a script

@contextlib.contextmanager
def output_lock(*paths):
    """Hold PATH.lock for each output path: a second run on the same outputs stops with one line.

    flock is released by the kernel whatever ends the process, so a crashed run never
    leaves a lock that blocks the next one.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no locks, as before
        yield
        return
    held = []
    try:
        for path in paths:
            lock = Path(str(path) + ".lock")
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(handle, 32, 0).decode(errors="replace").strip() or "?"
                os.close(handle)
                raise UserError(f"another run (pid {owner}) is writing {path}: wait for it to finish, or give "
                                f"this run other --hub/--outputs folders") from None
            os.ftruncate(handle, 0)
            os.pwrite(handle, str(os.getpid()).encode(), 0)
            held.append((lock, handle))
        yield
    finally:
        for lock, handle in held:
            lock.unlink(missing_ok=True)
            os.close(handle)


def check_writable(*folders):
    """Fail before any work when an output folder cannot be written."""
    for folder in folders:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise UserError(f"cannot write in {folder} ({err.strerror}): choose another --hub/--outputs "
                            f"or fix its permissions") from None


def run_script(function, args):
    """Run a script's work: user errors, Ctrl-C, a full disk and a closed pipe each end in one line."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` ends a run as Ctrl-C does: files complete
    import torch.distributed as dist

    try:
        result = function(args)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing files: tearing gloo down under it aborts
        return result
    except UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            sys.exit(f"error: no space left on the device ({err.filename or 'while writing'}): free some space "
                     f"and run again; earlier files were left as they were")
        if isinstance(err, PermissionError):
            sys.exit(f"error: {err.strerror}: {err.filename}; fix the permissions or choose another folder")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
