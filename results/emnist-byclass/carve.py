"""Carve the official EMNIST ByClass test split into this study's training and test sets.

    python results/emnist-byclass/carve.py SOURCE_DIR OUT_DIR
    python train.py --dataset emnist-byclass --data-dir OUT_DIR ...   # every script, unchanged

SOURCE_DIR holds the official test files (emnist-byclass-test-{images-idx3,labels-idx1}-ubyte[.gz],
or gzip.zip). OUT_DIR receives the official-layout files of a stratified, seeded carve: a training
set of 96,323 images and a test set of the other 20,000, stored raw (transposed) as EMNIST stores
them. This is not the official protocol, which trains on the 697,932 images of the training split.
OUT_DIR appears whole or not at all; carving again into it checks that it holds this very carve.
"""
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402
from runs import DataError, Parser, UserError, one_line_errors  # noqa: E402

SEED = 0
TEST_COUNT = 20_000
# The official ByClass test split: images per class, 0-9, A-Z, a-z (116,323 in all).
OFFICIAL_COUNTS = (
    5778, 6330, 5869, 5969, 5619, 5190, 5705, 6139, 5633, 5686,
    1062, 648, 1739, 779, 851, 1440, 447, 521, 2048, 626, 382, 810, 1485, 1351, 4156, 1397, 413, 809, 3508,
    1576, 2002, 796, 806, 432, 798, 464,
    1644, 853, 432, 1683, 4092, 400, 589, 1479, 427, 317, 466, 2535, 464, 1898, 466, 368, 505, 2320, 437, 2965,
    482, 468, 467, 470, 381, 451)
PREFIX = "emnist-byclass"


def idx_bytes(array):
    """The IDX encoding of a uint8 array (magic 0x08, big-endian sizes)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.tobytes()


def read_official_test(source_dir):
    """The official test split as (raw-orientation images, labels), refused unless it is exactly that."""
    images, labels = data.load_images(PREFIX, train=False, data_dir=source_dir, download=False, offline_hint=False,
                                      cache=False)  # carve.py has no --dataset to offer
    counts = np.bincount(labels.numpy(), minlength=len(OFFICIAL_COUNTS))
    if len(labels) != sum(OFFICIAL_COUNTS) or tuple(counts) != OFFICIAL_COUNTS:
        raise DataError(f"{source_dir} holds {len(labels):,} ByClass test images with another class histogram, "
                        f"not the official test split ({sum(OFFICIAL_COUNTS):,}): give the folder of the "
                        f"official files")
    return images.numpy().transpose(0, 2, 1), labels.numpy()  # back to EMNIST's stored orientation


def carve(labels):
    """(train indices, test indices): a stratified test set of TEST_COUNT images, seeded."""
    train, test = data.stratified_split(labels, TEST_COUNT, seed=SEED)
    return train.numpy(), test.numpy()


def contents(images, labels, train_index, test_index):
    """{file name: uncompressed IDX bytes} of the carve."""
    files = {}
    for split, index in (("train", train_index), ("test", test_index)):
        files[f"{PREFIX}-{split}-images-idx3-ubyte.gz"] = idx_bytes(images[index])
        files[f"{PREFIX}-{split}-labels-idx1-ubyte.gz"] = idx_bytes(labels[index])
    return files


def checksum(files):
    """SHA-256 over the uncompressed contents in name order (independent of the gzip library)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return digest.hexdigest()


def existing_checksum(out_dir, names):
    """The checksum of the carve already in out_dir, or None when it holds anything else."""
    present = sorted(path.name for path in out_dir.iterdir())
    if present != sorted(names):
        return None
    try:
        return checksum({name: gzip.decompress((out_dir / name).read_bytes()) for name in names})
    except (OSError, EOFError):
        return None


def write_folder(out_dir, files):
    """Write every file into a hidden folder beside out_dir, then rename it into place: all or nothing."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        for name, raw in files.items():
            (partial / name).write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
        os.chmod(partial, 0o755)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked by the caller): the rename needs its place
        os.rename(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def main(argv=None):
    parser = Parser(description="Carve the official ByClass test split into 96,323 training and 20,000 test "
                                "images (stratified, seed 0), written in the official layout.")
    parser.add_argument("source_dir", metavar="SOURCE_DIR", help="folder holding the official ByClass test files")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create for the carved files")
    args = parser.parse_args(argv)
    with one_line_errors():
        out_dir = Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"{out_dir} is a file: give a folder to create")
        images, labels = read_official_test(args.source_dir)
        train_index, test_index = carve(labels)
        files = contents(images, labels, train_index, test_index)
        total = checksum(files)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            if existing_checksum(out_dir, files) != total:
                raise UserError(f"{out_dir} already holds other files: give an empty or new folder")
            print(f"{out_dir} already holds this carve (sha256 {total}): nothing written")
            return
        write_folder(out_dir, files)
        print(f"carved {len(labels):,} images of the official ByClass test split (seed {SEED}): "
              f"train {len(train_index):,}, test {len(test_index):,}, {len(OFFICIAL_COUNTS)} classes")
        for name in sorted(files):
            print(f"  {out_dir / name}")
        print(f"sha256 of the uncompressed contents: {total}")


if __name__ == "__main__":
    main()
