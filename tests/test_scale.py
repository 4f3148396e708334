"""The data layer at real scale and through its real download path, with stand-ins."""
import gzip
import hashlib
import http.server
import io
import socket
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import data
import train
from conftest import fake_split, idx_bytes
from data import EVAL_BATCH, load_images
from runs import DataError, Precision
from evaluate import predict_probabilities
from models import build_model

NAMES = {"images": "emnist-byclass-{split}-images-idx3-ubyte", "labels": "emnist-byclass-{split}-labels-idx1-ubyte"}


def official_zip(splits):
    """gzip.zip laid out as NIST's: gzip/emnist-*-ubyte.gz plus the mapping files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for split, (stored, labels) in splits.items():
            archive.writestr("gzip/" + NAMES["images"].format(split=split) + ".gz", gzip.compress(idx_bytes(stored)))
            archive.writestr("gzip/" + NAMES["labels"].format(split=split) + ".gz", gzip.compress(idx_bytes(labels)))
        archive.writestr("gzip/emnist-byclass-mapping.txt", "\n".join(f"{i} {ord(c)}" for i, c in enumerate(
            "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")) + "\n")
    return buffer.getvalue()


@pytest.fixture
def server(monkeypatch):
    """An HTTP server on 127.0.0.1 serving `.body` (None: 404) with Range support; `.mode` breaks it:
    "stall" sends half and then nothing, "drop" sends half and closes, each on the first request only."""
    class Handler(http.server.BaseHTTPRequestHandler):
        body, mode, requests = None, None, []

        def do_GET(self):
            Handler.requests.append(self.headers.get("Range"))
            if Handler.body is None:
                self.send_error(404)
                return
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(Handler.body) - start))
            self.end_headers()
            first = len(Handler.requests) == 1
            if first and Handler.mode in ("stall", "drop"):
                self.wfile.write(Handler.body[: len(Handler.body) // 2])
                self.wfile.flush()
                if Handler.mode == "stall":
                    time.sleep(3)  # longer than the test's timeout
                self.close_connection = True
                return
            self.wfile.write(Handler.body[start:])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(data, "DOWNLOAD_BACKOFF", 0.0)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/gzip.zip"
    monkeypatch.setattr(data, "EMNIST_URL", url)
    yield Handler, url
    httpd.shutdown()
    httpd.server_close()


def serve_fake_emnist(handler, monkeypatch):
    train_upright, train_labels, train_stored = fake_split(200, seed=1)
    test_upright, test_labels, test_stored = fake_split(70, seed=2)
    handler.body = official_zip({"train": (train_stored, train_labels), "test": (test_stored, test_labels)})
    monkeypatch.setattr(data, "EMNIST_MD5", hashlib.md5(handler.body).hexdigest())
    return (train_upright, train_labels), (test_upright, test_labels)


@pytest.mark.parametrize("mode", [None, pytest.param("stall", marks=pytest.mark.slow), "drop"])
def test_download_resumes_after_a_stall_or_a_dropped_connection(server, tmp_path, monkeypatch, mode):
    handler, url = server
    handler.mode = mode
    (train_upright, train_labels), (test_upright, test_labels) = serve_fake_emnist(handler, monkeypatch)
    images, labels = load_images("emnist-byclass", train=True, data_dir=tmp_path / "data", download=True)
    assert np.array_equal(images.numpy(), train_upright) and np.array_equal(labels.numpy(), train_labels)
    images, labels = load_images("emnist-byclass", train=False, data_dir=tmp_path / "data", download=True)
    assert np.array_equal(images.numpy(), test_upright) and np.array_equal(labels.numpy(), test_labels)
    assert (tmp_path / "data" / "gzip.zip").read_bytes() == handler.body
    assert not list((tmp_path / "data").glob("*.part"))
    if mode:  # the second request asked only for the bytes the first did not deliver
        assert handler.requests[:2] == [None, f"bytes={len(handler.body) // 2}-"]
    else:
        assert handler.requests == [None]


def test_a_partial_download_left_by_an_earlier_run_is_resumed(server, tmp_path, monkeypatch):
    handler, url = server
    serve_fake_emnist(handler, monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gzip.zip.part").write_bytes(handler.body[:1000])
    load_images("emnist-byclass", train=True, data_dir=tmp_path / "data", download=True)
    assert handler.requests == ["bytes=1000-"]
    assert (tmp_path / "data" / "gzip.zip").read_bytes() == handler.body


def assert_one_line_error_and_nothing_left(tmp_path, reason):
    with pytest.raises(DataError) as error:
        load_images("emnist-byclass", train=True, data_dir=tmp_path / "data", download=True)
    message = str(error.value)
    assert "\n" not in message and reason in message
    assert NAMES["images"].format(split="train") + ".gz" in message and str(tmp_path / "data") in message
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


def test_download_404_gives_the_one_line_error(server, tmp_path):
    assert_one_line_error_and_nothing_left(tmp_path, "404")  # body None: every request is answered 404


def test_refused_connection_gives_the_one_line_error(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(data, "EMNIST_URL", f"http://127.0.0.1:{port}/gzip.zip")
    monkeypatch.setattr(data, "DOWNLOAD_BACKOFF", 0.0)
    assert_one_line_error_and_nothing_left(tmp_path, "refused")


def test_download_with_a_wrong_checksum_is_refused(server, tmp_path, monkeypatch):
    handler, url = server
    _, labels, stored = fake_split(62)
    handler.body = official_zip({"train": (stored, labels)})
    monkeypatch.setattr(data, "EMNIST_MD5", "0" * 32)
    assert_one_line_error_and_nothing_left(tmp_path, "MD5")


def test_mnist_missing_offline_is_one_line_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    from torchvision import datasets

    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens on port 9
    monkeypatch.setattr(data, "DOWNLOAD_BACKOFF", 0.0)
    with pytest.raises(DataError) as error:
        load_images("mnist", train=True, data_dir=tmp_path / "data", download=True)
    assert "\n" not in str(error.value) and "train-images-idx3-ubyte.gz" in str(error.value)
    assert not (tmp_path / "data").exists()


class LargestTensors(TorchDispatchMode):
    """Records the size in bytes and dtype of every tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.created.append((tensor.numel() * tensor.element_size(), tensor.dtype, str(func)))
        return out


@pytest.mark.slow
def test_a_training_epoch_never_copies_the_training_set():
    count, batch_size = 50_000, 256
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8))
    labels = torch.arange(count) % 62
    model = build_model("lenet", 62)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with LargestTensors() as recorder:
        result = train.train_one_epoch(model, optimizer, {"train": (images, labels), "mean": 0.17, "std": 0.33,
                                                          "classes": 62}, dict(train.DEFAULTS, batch_size=batch_size),
                                       Precision(False, False, "test"), torch.Generator().manual_seed(0), 1)
    assert result["images"] == count  # a whole epoch ran
    largest = max(size for size, _, _ in recorder.created)
    float_batch = batch_size * 28 * 28 * 4
    float_copy = count * 28 * 28 * 4  # what a float copy of the set would cost: 157 MB
    # the biggest thing made is the epoch's shuffled index (8 bytes an image) or one batch's activations
    assert largest <= max(8 * count, 8 * float_batch * 6) < float_copy / 4


def test_evaluating_a_large_split_holds_no_float64_logits():
    count = 30_000
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8))
    model = build_model("lenet", 62)
    with LargestTensors() as recorder:
        probabilities = predict_probabilities(model, images, 0.17, 0.33, torch.device("cpu"))
    assert probabilities.shape == (count, 62) and probabilities.dtype == torch.float32
    float64 = [size for size, dtype, _ in recorder.created if dtype == torch.float64]
    assert not float64 or max(float64) < EVAL_BATCH * 62 * 8
    # nothing bigger than the float32 result itself or one batch's first activations (6 x 24 x 24)
    assert max(size for size, _, _ in recorder.created) <= max(count * 62 * 4, EVAL_BATCH * 6 * 24 * 24 * 4)
