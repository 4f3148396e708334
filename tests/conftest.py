"""Shared helpers: real samples in ../shared/data, briefly trained checkpoints, the slow marker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real EMNIST and MNIST files live beside the checkout, never in it (../shared/data/README.md);
# REAL_DATA names another folder of that layout. .ci/run sets REQUIRE_REAL_DATA=1: none may skip.
REAL_DATA = Path(os.environ.get("REAL_DATA") or ROOT.parent / "shared" / "data")


def real_data(*parts):
    path = REAL_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real samples missing: {path} (put ../shared/data beside the checkout)"
        if os.environ.get("REQUIRE_REAL_DATA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test; runs only with --slow")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="slow: run with --slow"))


def run(*args, cwd=ROOT, timeout=300):
    """A script in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(result):
    """The child refused: non-zero, no traceback, exactly one line on stderr. Returns the line."""
    assert result.returncode != 0, result.stdout[-500:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def refused(main, argv):
    """main(argv) in this process exits non-zero with one line (what a user sees); returns it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None) and len(message.strip().splitlines()) == 1, message
    return message


def train_args(tmp, *extra, model="lenet", epochs=3):
    return [
        "--model",
        model,
        "--dataset",
        "sklearn-digits",
        "--epochs",
        str(epochs),
        "--lr",
        "0.05",
        "--hub",
        str(tmp / "hub"),
        "--outputs",
        str(tmp / "out"),
        *map(str, extra),
    ]


@pytest.fixture(scope="session")
def trained_lenet(tmp_path_factory):
    """A LeNet pre-trained for 8 epochs on sklearn-digits: (folder, checkpoint)."""
    import train

    tmp = tmp_path_factory.mktemp("trained")
    train.main(train_args(tmp, epochs=8))
    return tmp, tmp / "hub" / "pre_trained" / "lenet.pth"
