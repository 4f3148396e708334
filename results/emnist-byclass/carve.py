"""Carve the official EMNIST ByClass test split into this study's training and test sets.

    python results/emnist-byclass/carve.py SOURCE_DIR data/emnist-byclass-carved
    python train.py --data-dir data/emnist-byclass-carved ...     # every script reads it unchanged

SOURCE_DIR holds the official emnist-byclass-test-{images-idx3,labels-idx1}-ubyte[.gz] (from
gzip.zip), whose contents must match the official files' SHA-256. The carve is a stratified, seeded
split (data.stratified_split) into 96,323 training and 20,000 test images, written in the official
layout and orientation. Its folder is written whole (a temporary folder renamed) or not at all,
and never over another.
"""

import gzip
import hashlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402
from runs import Parser, UserError, one_line_errors  # noqa: E402

OFFICIAL_SHA256 = {  # of the uncompressed official test files
    "emnist-byclass-test-images-idx3-ubyte":
        "385559d7d5c96f49cd6b55b3e9e76d7ecbf568897b6067e8cac8f1ffc2f50f81",
    "emnist-byclass-test-labels-idx1-ubyte":
        "842d01413932b3ce7afbc9990376a16f8880a212bb42d66fa2922b4218cf300a",
}
CARVE_SHA256 = (
    "b7bf6a4c71086b8394afccf8e930732c4ca1f2b6f6763dd2c1646b83f11cdd22"  # of what it writes
)
SEED, TEST_COUNT = 0, 20_000


def read_official(source_dir):
    files = {}
    for name, expected in OFFICIAL_SHA256.items():
        path = data.find_file(name, [Path(source_dir)])
        if path is None:
            raise UserError(
                f"no {name}[.gz] in {source_dir}: give the official ByClass test files' folder"
            )
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != expected:
            raise UserError(f"{path} is not the official ByClass test file (its SHA-256 differs)")
        files[name] = raw
    return files


def carve(files):
    """{file name: uncompressed IDX bytes} of the carve's training and test splits."""
    images = files["emnist-byclass-test-images-idx3-ubyte"]
    labels = files["emnist-byclass-test-labels-idx1-ubyte"]
    count = len(labels) - 8
    train, test = data.stratified_split(list(labels[8:]), TEST_COUNT, seed=SEED)
    out = {}
    for split, index in (("train", train.tolist()), ("test", test.tolist())):
        out[f"emnist-byclass-{split}-images-idx3-ubyte.gz"] = (
            images[:4]
            + len(index).to_bytes(4, "big")
            + images[8:16]
            + b"".join(images[16 + 784 * i : 16 + 784 * (i + 1)] for i in index)
        )
        out[f"emnist-byclass-{split}-labels-idx1-ubyte.gz"] = (
            labels[:4] + len(index).to_bytes(4, "big") + bytes(labels[8 + i] for i in index)
        )
    assert count == len(train) + len(test)
    return out


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", help="folder of the official ByClass test files")
    parser.add_argument("out_dir", help="folder to create for the carve")
    args = parser.parse_args(argv)
    with one_line_errors():
        out = Path(args.out_dir)
        if out.exists():
            raise UserError(f"{out} exists: give a new folder (a carve is never written over)")
        files = carve(read_official(args.source_dir))
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        assert digest.hexdigest() == CARVE_SHA256, digest.hexdigest()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        for name, raw in files.items():
            (partial / name).write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
        os.chmod(partial, 0o755)
        os.rename(partial, out)
        print(
            f"carved the official ByClass test split into {out}: 96,323 training, 20,000 test "
            f"(sha256 {CARVE_SHA256})"
        )


if __name__ == "__main__":
    main()
