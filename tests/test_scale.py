"""The data layer at real scale and through its real download path, with stand-ins."""
import gzip
import hashlib
import http.server
import io
import socket
import threading
import zipfile

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.datasets import EMNIST

import train
from conftest import fake_split, idx_bytes
from data import DataError, load_images
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
def server():
    """An HTTP server on 127.0.0.1 in this process; set `.body` (bytes) or leave None for 404."""
    class Handler(http.server.BaseHTTPRequestHandler):
        body = None

        def do_GET(self):
            if Handler.body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(Handler.body)))
            self.end_headers()
            self.wfile.write(Handler.body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Handler, f"http://127.0.0.1:{httpd.server_address[1]}/gzip.zip"
    httpd.shutdown()
    httpd.server_close()


def test_download_through_torchvision_from_a_local_server(server, tmp_path, monkeypatch):
    handler, url = server
    train_upright, train_labels, train_stored = fake_split(200, seed=1)
    test_upright, test_labels, test_stored = fake_split(70, seed=2)
    handler.body = official_zip({"train": (train_stored, train_labels), "test": (test_stored, test_labels)})
    monkeypatch.setattr(EMNIST, "url", url)
    monkeypatch.setattr(EMNIST, "md5", hashlib.md5(handler.body).hexdigest())
    images, labels = load_images("emnist-byclass", train=True, data_dir=tmp_path / "data", download=True)
    assert np.array_equal(images.numpy(), train_upright) and np.array_equal(labels.numpy(), train_labels)
    images, labels = load_images("emnist-byclass", train=False, data_dir=tmp_path / "data", download=True)
    assert np.array_equal(images.numpy(), test_upright) and np.array_equal(labels.numpy(), test_labels)
    assert (tmp_path / "data" / "gzip.zip").read_bytes() == handler.body
    assert not [path for path in (tmp_path / "data").iterdir() if path.name.startswith(".emnist-download")]


def assert_one_line_error_and_nothing_left(tmp_path, reason):
    with pytest.raises(DataError) as error:
        load_images("emnist-byclass", train=True, data_dir=tmp_path / "data", download=True)
    message = str(error.value)
    assert "\n" not in message and reason in message
    assert NAMES["images"].format(split="train") + ".gz" in message and str(tmp_path / "data") in message
    assert list((tmp_path / "data").iterdir()) == []  # nothing that would look like data next time


def test_download_404_gives_the_one_line_error(server, tmp_path, monkeypatch):
    _, url = server  # body None: every request is answered 404
    monkeypatch.setattr(EMNIST, "url", url)
    assert_one_line_error_and_nothing_left(tmp_path, "404")


def test_refused_connection_gives_the_one_line_error(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(EMNIST, "url", f"http://127.0.0.1:{port}/gzip.zip")
    assert_one_line_error_and_nothing_left(tmp_path, "refused")


def test_download_with_a_wrong_checksum_is_refused(server, tmp_path, monkeypatch):
    handler, url = server
    _, labels, stored = fake_split(62)
    handler.body = official_zip({"train": (stored, labels)})
    monkeypatch.setattr(EMNIST, "url", url)
    monkeypatch.setattr(EMNIST, "md5", "0" * 32)
    assert_one_line_error_and_nothing_left(tmp_path, "download failed")


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


def test_a_training_epoch_never_copies_the_training_set():
    count, batch_size = 50_000, 256
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8))
    labels = torch.arange(count) % 62
    model = build_model("lenet", 62)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with LargestTensors() as recorder:
        result = train.train_one_epoch(model, optimizer, images, labels, 0.17, 0.33, batch_size=batch_size,
                                       generator=torch.Generator().manual_seed(0))
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
        probabilities = predict_probabilities(model, images, 0.17, 0.33, "cpu", batch_size=2048)
    assert probabilities.shape == (count, 62) and probabilities.dtype == torch.float32
    float64 = [size for size, dtype, _ in recorder.created if dtype == torch.float64]
    assert not float64 or max(float64) < 2048 * 62 * 8
    # nothing bigger than the float32 result itself or one batch's first activations (6 x 24 x 24)
    assert max(size for size, _, _ in recorder.created) <= max(count * 62 * 4, 2048 * 6 * 24 * 24 * 4)
