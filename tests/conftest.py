"""Shared fixtures: the real samples in ../shared/data, IDX writers, briefly trained checkpoints, the slow marker."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real EMNIST and MNIST samples live outside the tree, beside the checkout (read-only in CI; see
# ../shared/data/README.md); REAL_DATA names another folder of the same layout.
REAL_DATA = Path(os.environ.get("REAL_DATA") or ROOT.parent / "shared" / "data")
# .ci/run sets this, so that a missing sample fails there instead of skipping
REQUIRE_REAL_DATA = os.environ.get("REQUIRE_REAL_DATA") == "1"
REAL_FOLDERS = ("emnist", "MNIST/raw")


def real_data(*parts):
    """A path in the real-sample folder (emnist/, MNIST/raw/ below it); a test that needs it skips in
    one line when it is absent (fails under REQUIRE_REAL_DATA=1). The folder is never written to: the
    loaders cache what they decode from it in the per-test folder of `private_cache`."""
    wanted = REAL_DATA.joinpath(*parts)
    missing = [folder for folder in REAL_FOLDERS if not (REAL_DATA / folder).is_dir()]
    if missing or not wanted.exists():
        message = (f"real samples missing: {REAL_DATA}/{{{','.join(REAL_FOLDERS)}}} (the EMNIST and MNIST "
                   f"samples go in shared/data beside the checkout, or set REAL_DATA)")
        if REQUIRE_REAL_DATA:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return wanted


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path, array, compress=True):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def fake_split(count, num_classes=62, seed=0):
    """Distinct random uint8 images with labels, stored as EMNIST stores them (transposed)."""
    rng = np.random.default_rng(seed)
    upright = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % num_classes
    return upright, labels, np.ascontiguousarray(upright.transpose(0, 2, 1))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (long training runs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test; runs only with --slow (CI runs it as a second command)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        skip = pytest.mark.skip(reason="slow: run with --slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Decoded-array caches for read-only folders (the real samples among them, even where this machine
    would let us write there) go to a per-test folder, not ~/.cache."""
    import data

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    writable = data.writable
    monkeypatch.setattr(data, "writable", lambda folder: writable(folder) and not
                        Path(folder).resolve().is_relative_to(REAL_DATA.resolve()))


@pytest.fixture(scope="session")
def mnist_sample(tmp_path_factory):
    """A folder holding a cut of the real MNIST files in torchvision's layout (MNIST/raw/): the first 2,000
    training and the first 1,000 official test images, so that tests that train or transfer stay quick."""
    from data import load_images

    folder = tmp_path_factory.mktemp("mnist-sample")
    for split, prefix, count in ((True, "train", 2000), (False, "t10k", 1000)):
        images, labels = load_images("mnist", train=split, data_dir=real_data(), download=False, cache=False)
        write_idx(folder / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz", images[:count].numpy())
        write_idx(folder / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz", labels[:count].numpy())
    return folder


@pytest.fixture(scope="session")
def trained_lenet(tmp_path_factory):
    """A LeNet trained for a few epochs on sklearn-digits: (workdir, checkpoint path)."""
    import train

    workdir = tmp_path_factory.mktemp("trained")
    train.main(["--model", "lenet", "--dataset", "sklearn-digits", "--epochs", "8", "--lr", "0.05",
                "--hub", str(workdir / "model_hub"), "--outputs", str(workdir / "outputs")])
    return workdir, workdir / "model_hub" / "pre_trained" / "lenet.pth"


@pytest.fixture(scope="session")
def trained_spinalnet(tmp_path_factory):
    """A SpinalNet trained for 2 epochs on sklearn-digits: its checkpoint (outputs/ beside model_hub/)."""
    import train

    workdir = tmp_path_factory.mktemp("spinalnet")
    train.main(["--model", "spinalnet", "--dataset", "sklearn-digits", "--epochs", "2", "--lr", "0.05",
                "--hub", str(workdir / "model_hub"), "--outputs", str(workdir / "outputs")])
    return workdir / "model_hub" / "pre_trained" / "spinalnet.pth"


def run(*args, cwd, env=None, timeout=240, shell=False):
    """Run a Python script (or, with shell, a command line after the interpreter) in a child process."""
    command = " ".join([sys.executable, *map(str, args)]) if shell else [sys.executable, *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=shell,
                          env={**os.environ, **(env or {})})


def one_line_error(result):
    """A finished child process refused its input: non-zero, no traceback, exactly one line on stderr."""
    assert result.returncode not in (0, None), result.stdout[-500:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def exit_message(function, argv):
    """The message a script's main() exits with (non-zero)."""
    with pytest.raises(SystemExit) as exit_info:
        function(argv)
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code)


def refused(function, argv, capsys):
    """Run a script's main() in this process: it must exit non-zero with exactly one line, from
    one_line_errors (the SystemExit's message) or from argparse (stderr). Returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        function(argv)
    code = exit_info.value.code
    assert code not in (0, None)
    message = code if isinstance(code, str) else capsys.readouterr().err
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1, message
    return lines[0]


def signal_at_epoch(command, cwd, signum, epoch=2):
    """Run a training command, send it `signum` once it prints epoch `epoch`: (returncode, stdout, stderr)."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith(f"epoch {epoch:3d}/"):
            process.send_signal(signum)
            break
    output, errors = process.communicate(timeout=120)
    return process.returncode, output, errors
