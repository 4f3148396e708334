"""Datasets, IDX reading, orientation, splits, device-resident batches and batched augmentation.

    from data import load_images, CLASSES
    images, labels = load_images("emnist-byclass", train=True, data_dir="data")
    # images: uint8 [697932, 28, 28], every character upright as in MNIST; labels: int64 0..61

Every image in the project passes through here, so the two classic EMNIST traps are
handled once: the official files store images transposed, and Letters labels start at 1.
To add a dataset, add one entry to DATASETS; to add an augmentation, one entry to AUGMENTS.
"""
import glob
import gzip
import hashlib
import http.client
import math
import os
import re
import socket
import struct
import sys
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

from runs import DataError, UserError, atomic_path, is_terminal, path_value

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

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emnist-cnn"  # empty: unset
DOWNLOAD_TIMEOUT = 30  # seconds without a byte before a download attempt is given up
DOWNLOAD_RETRIES = 4  # further attempts, each resuming where the last one stopped
DOWNLOAD_BACKOFF = 1.0  # seconds before the second attempt, doubled after each further one (at most 10x)


def dataset_info(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def add_data_flags(parser, *names, dataset_help="dataset"):
    """The dataset flags a script uses: --dataset, --data-dir, --no-download (the training scripts'
    --dataset and --subset are settings: rows of train.SETTINGS)."""
    flags = {
        "dataset": dict(default=None, choices=sorted(DATASETS), metavar="NAME", help=dataset_help),
        "data-dir": dict(default="data", type=path_value, metavar="DIR",
                         help="folder of the dataset files (default: %(default)s)"),
        "no-download": dict(action="store_true", help="never download missing data"),
    }
    for name in names:
        parser.add_argument(f"--{name}", **flags[name])
    return parser


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
        raise unreadable(source, err) from None


def unreadable(source, err):
    return DataError(f"{source_name(source)} cannot be read ({err}): check it, or delete it and download it again")


def source_name(source):
    return f"{source[0]}!{source[1]}" if isinstance(source, tuple) else str(source)


def writable(folder):
    """Writable by us, not marked read-only, not a system folder: root could write anywhere, but should not."""
    system = Path(folder).resolve().is_relative_to("/usr")  # e.g. Debian's /usr/share/datasets
    return not system and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def source_signature(source):
    """SHA-1 of the bytes a source is decoded from (the file; a zip member's compressed bytes), as 16 hex digits.

    Any change to those bytes changes the signature, whatever happened to the file's size and time.
    Hashing runs at about 1.5 GB/s: 0.02 s for the 29 MB of ByClass's test images.
    """
    path = Path(source[0] if isinstance(source, tuple) else source)
    digest = hashlib.sha1(source_name(source).encode())
    try:
        with open(path, "rb") as handle:
            start, length = 0, os.fstat(handle.fileno()).st_size
            if isinstance(source, tuple):
                with zipfile.ZipFile(handle) as archive:
                    member = archive.getinfo(source[1])
                handle.seek(member.header_offset + 26)  # the local header: 30 bytes, then its name and extra field
                names = int.from_bytes(handle.read(2), "little") + int.from_bytes(handle.read(2), "little")
                start, length = member.header_offset + 30 + names, member.compress_size
            handle.seek(start)
            while length > 0 and (block := handle.read(min(length, 1 << 20))):
                digest.update(block)
                length -= len(block)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise unreadable(source, err) from None
    return digest.hexdigest()[:16]


def cache_file(source, transpose):
    """Where the decoded array of `source` is cached, without the content's CRC: beside the source,
    or in CACHE_DIR if that is read-only.

    The name holds the source's signature, so a changed source never meets its old cache.
    """
    path = Path(source[0] if isinstance(source, tuple) else source)
    member = Path(source[1]).name if isinstance(source, tuple) else path.name
    name = member.removesuffix(".gz") + (".upright" if transpose else "") + f".{source_signature(source)}"
    if writable(path.parent):
        return path.parent / name
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return CACHE_DIR / digest / name


def read_cache(stem):
    """The cached array whose content matches the CRC in its name, else None (a cache damaged in place
    is decoded again, and the new cache replaces it)."""
    for cache in stem.parent.glob(f"{glob.escape(stem.name)}.*.npy") if stem.parent.is_dir() else ():
        if cache.is_symlink() or not cache.is_file():  # a FIFO or device would block or mislead the reader
            continue
        try:
            array = np.load(cache)
            if array.dtype == np.uint8 and f"{zlib.crc32(array):08x}" == cache.name.rsplit(".", 2)[1]:
                return array
        except (ValueError, OSError, EOFError):
            pass
    return None


def decoded_size(source):
    """The bytes of a source's uncompressed contents (its gzip trailer; the file's size when not gzipped)."""
    path = Path(source[0] if isinstance(source, tuple) else source)
    try:
        if isinstance(source, tuple):
            with zipfile.ZipFile(path) as archive:
                return archive.getinfo(source[1]).file_size
        if path.suffix == ".gz":
            with open(path, "rb") as handle:
                handle.seek(-4, os.SEEK_END)
                return int.from_bytes(handle.read(4), "little")
        return path.stat().st_size
    except (OSError, KeyError, zipfile.BadZipFile):
        return 0


def load_idx(source, transpose=False, cache=True):
    """Decode an IDX source once; later calls read the cached .npy (well under a second for ByClass)."""
    stem = cache_file(source, transpose)
    array = read_cache(stem)
    if array is not None:
        return array
    try:
        array = parse_idx(read_source(source), source_name(source))
        if transpose:  # EMNIST stores every image transposed; make it upright like MNIST
            array = array.transpose(0, 2, 1)
        array = np.array(array, order="C")  # writable and contiguous (frombuffer's is neither)
    except MemoryError:
        raise DataError(f"out of memory decoding {source_name(source)}: decoding needs about "
                        f"{3 * decoded_size(source) / 2 ** 30:.1f} GiB at once (the file, its array and an upright "
                        f"copy), whatever --subset says (it is taken after the decode); free memory or raise the "
                        f"limit (ulimit -v); once decoded, later loads read the cache beside the file") from None
    if not cache:  # a dry run writes nothing
        return array
    cache = stem.with_name(f"{stem.name}.{zlib.crc32(array):08x}.npy")
    try:
        with atomic_path(cache) as partial:
            with open(partial, "wb") as handle:
                np.save(handle, array)
        stale = re.compile(re.escape(stem.name.rsplit(".", 1)[0]) + r"\.[0-9a-f]{16}\.[0-9a-f]{8}\.npy")
        for old in cache.parent.iterdir():  # caches of earlier versions of the source
            if old != cache and stale.fullmatch(old.name):
                old.unlink(missing_ok=True)
    except (OSError, UserError):  # caching is an optimisation: a read-only place or a full disk must not break loading
        pass
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
    archive = f" (or {EMNIST_ZIP} holding them)" if dataset.startswith("emnist") else ""
    return DataError(f"{dataset}: could not find {wanted}{archive} in {searched}{hint}; "
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
            if isinstance(reason, socket.gaierror):  # the name does not resolve: retrying cannot help
                raise DataError(f"download of {url} failed: {url.split('/')[2]} cannot be resolved (no network, "
                                f"or no name service)") from None
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
                disable=not is_terminal(sys.stderr), leave=False)


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
    except (DataError, OSError) as err:  # OSError: the folder cannot be made there
        raise missing_data_error(dataset, names, folders, str(err)) from None
    finally:
        for folder in created:  # e.g. MNIST/raw/ made for a download that failed
            while folder != Path(data_dir).parent and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


def load_idx_pair(dataset, train, data_dir, download, offline_hint=True, cache=True):
    info = dataset_info(dataset)
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder: give the folder that holds the {dataset} files")
    names = split_files(dataset, train)
    folders = search_folders(dataset, data_dir)
    sources = [find_file(name, folders) for name in names]
    if None in sources and download:
        download_missing(dataset, data_dir, names, folders)
        sources = [find_file(name, folders) for name in names]
    if None in sources:
        raise missing_data_error(dataset, names, folders, "" if download else "download disabled", offline_hint)
    images = load_idx(sources[0], transpose=info.transposed, cache=cache)
    labels = load_idx(sources[1], cache=cache).astype(np.int64)
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


def load_images(dataset="emnist-byclass", train=True, data_dir="data", download=True, offline_hint=True, cache=True):
    """(uint8 images [N, 28, 28] upright, int64 labels 0..C-1) of one split of a dataset.

    download: fetch missing files; cache: write the decoded arrays beside them (both off in dry runs).
    """
    if not dataset_info(dataset).files:
        return load_sklearn_digits(train)
    return load_idx_pair(dataset, train, data_dir, download, offline_hint, cache)


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


def load_training_data(settings, device, data_dir, download, stats=None, mini=False, dry_run=False):
    """Training (and validation) images on the device as uint8, plus normalisation stats.

    Validation is a stratified settings["val_fraction"] of the training split (none for 0; VAL_FRACTION
    when the settings have none), or with `mini`
    the search's mini subset (10 % of the split, 80/20). `stats` (mean, std) reuses a checkpoint's
    normalisation; otherwise it is measured on the training part only, so nothing about the
    validation or test images leaks in.
    """
    dataset, seed, val_fraction = settings["dataset"], settings["seed"], settings.get("val_fraction", VAL_FRACTION)
    images, labels = take_subset(*load_images(dataset, train=True, data_dir=data_dir, download=download and not
                                              dry_run, cache=not dry_run), settings.get("subset"), seed, dataset)
    classes = len(CLASSES[dataset])
    val = None
    if mini or val_fraction:
        train_index, val_index = mini_split(labels, seed) if mini else stratified_split(labels, val_fraction, seed)
        if len(val_index) < classes or len(train_index) < 2 * classes:
            hint = "use a larger --subset" if settings.get("subset") else "use a lower --val-fraction" if \
                len(val_index) >= classes and not mini else f"{dataset} has too few images for it"
            raise UserError(f"{len(labels):,} training images are too few to hold out a validation set "
                            f"({len(train_index)} train / {len(val_index)} val for {classes} classes): {hint}")
        val = (images[val_index].to(device), labels[val_index].to(device))
        images, labels = images[train_index], labels[train_index]
    mean, std = stats if stats is not None else mean_std(images)
    return {"train": (images.to(device), labels.to(device)), "val": val, "mean": mean, "std": std,
            "classes": classes}


def held_out_by(pretraining):
    """What made a pre-training's held-out split, from its checkpoint's args: seed, subset and fraction
    (runs before val_fraction was saved always held out VAL_FRACTION)."""
    return {"seed": pretraining.get("seed"), "subset": pretraining.get("subset"),
            "val_fraction": pretraining.get("val_fraction", VAL_FRACTION)}


def take_subset(images, labels, subset, seed, dataset):
    """--subset: a stratified sample of `subset` training images (None: all of them)."""
    if not subset:
        return images, labels
    classes = len(CLASSES[dataset])
    if subset > len(labels):
        raise UserError(f"--subset {subset} is larger than the {len(labels):,} training images of {dataset}: "
                        f"give a smaller one or leave it out")
    if subset < 2 * classes:
        raise UserError(f"--subset {subset} is too small to train on {classes} classes: give at least {2 * classes}")
    chosen = stratified_subset(labels, subset, seed)
    return images[chosen], labels[chosen]


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


def model_batch(batch, mean, std, channels_last=False, theta=None):
    """uint8 [B, 28, 28] -> what the network takes: normalised float [B, 1, 28, 28], moved by the affine
    matrices `theta` first when given (augmentation), in channels_last memory format when asked."""
    inputs = normalize(batch, mean, std) if theta is None else augment(batch, mean, std, theta=theta)
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


def training_batches(data, batch_size, recipe, generator, rank=0, world_size=1, channels_last=False):
    """One epoch of training batches, model-ready: (number of steps, iterator of (inputs, labels)).

    This rank's shard of data["train"] is shuffled by `generator`; each image goes through the
    `recipe`'s random affine (an AUGMENTS entry; None: none), drawn after the shuffle, as one draw per
    step would be; a last batch of one image is left out (BatchNorm cannot train on it).
    """
    images, labels = data["train"]
    sizes = batch_sizes(shard_length(len(labels), world_size), batch_size)

    def batches():
        affines = None
        for batch, target in iterate_batches(images, labels, batch_size, shuffle=True, generator=generator,
                                             rank=rank, world_size=world_size):
            if len(target) < 2:
                continue
            if recipe and affines is None:
                affines = epoch_affines(sizes, generator, images.device, recipe)
            yield model_batch(batch, data["mean"], data["std"], channels_last, next(affines) if recipe else None), \
                target
    return len(sizes), batches()


def standardize(pixels, mean, std):
    """Float pixels in 0..255 -> (x / 255 - mean) / std, in place."""
    return pixels.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def normalize(batch, mean, std):
    """uint8 [B, 28, 28] -> normalised float [B, 1, 28, 28]."""
    return standardize(batch.unsqueeze(1).float(), mean, std)


def affine_matrices(count, generator=None, flip=False, **ranges):
    """Per-image inverse affine matrices [count, 2, 3] in affine_grid's normalised coordinates; the
    `ranges` (degrees, translate, scale, shear) not given are the study's (AUGMENT).

    The forward map (optionally mirrors left-right, with probability 1/2, first) rotates, shears
    along x, scales and shifts; grid_sample needs where each output pixel comes from, so the
    inverse is built directly (a 2x2 inverse in closed form). Without flip the draws are the
    study's, number for number.
    """
    ranges = {**AUGMENT, **ranges}
    degrees, translate, scale, shear = (ranges[key] for key in ("degrees", "translate", "scale", "shear"))
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


def epoch_affines(sizes, generator, device, recipe):
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
        theta = affine_matrices(len(batch), generator, **recipe).to(batch.device)
    pixels = batch.unsqueeze(1).float()
    grid = sampling_grid(theta, batch.shape[-2], batch.shape[-1])
    moved = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return standardize(moved, mean, std)


