"""The study on real EMNIST ByClass: the full official test split in ../shared/data and carve.py's
training and test sets cut from it (results/emnist-byclass/)."""
import gzip
import json
import importlib.util
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, one_line_error, real_data, run
from data import CLASSES, load_images
from models import PUBLISHED_HUBS, published_checkpoint

CARVE = ROOT / "results" / "emnist-byclass" / "carve.py"
spec = importlib.util.spec_from_file_location("carve", CARVE)
carve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carve)
# The class counts of the official ByClass test split, as ../shared/data/README.md lists them.
README_COUNTS = ("5778 6330 5869 5969 5619 5190 5705 6139 5633 5686 1062 648 1739 779 851 1440 447 521 2048 626 "
                 "382 810 1485 1351 4156 1397 413 809 3508 1576 2002 796 806 432 798 464 1644 853 432 1683 4092 "
                 "400 589 1479 427 317 466 2535 464 1898 466 368 505 2320 437 2965 482 468 467 470 381 451")


@pytest.fixture(scope="module")
def byclass():
    """(upright images, labels) of the real, complete ByClass test split."""
    return load_images("emnist-byclass", train=False, data_dir=real_data("emnist"), download=False, cache=False)


@pytest.fixture(scope="module")
def carved(tmp_path_factory):
    """The carve of the real test split, written once: its folder and carve.py's output."""
    source = real_data("emnist")
    out = tmp_path_factory.mktemp("carve") / "byclass"
    result = run(CARVE, source, out, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_the_real_byclass_test_split_is_whole_upright_and_labelled_as_glyphs(byclass):
    images, labels = byclass
    assert images.shape == (116_323, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=62).tolist() == [int(count) for count in README_COUNTS.split()]
    assert "".join(CLASSES["emnist-byclass"][label] for label in labels[:12].tolist()) == "Ia03XUOe5824"
    # upright: the real Digits samples (read upright by the same loader) occur in it pixel for pixel,
    # with the same labels; transposed they would not
    digits, digit_labels = load_images("emnist-digits", train=False, data_dir=real_data("emnist"), download=False)
    index = {image.tobytes(): label for image, label in zip(images.numpy(), labels.tolist())}
    found = [(index[image.tobytes()], label) for image, label in zip(digits.numpy(), digit_labels.tolist())
             if image.tobytes() in index]
    assert len(found) >= 50 and all(byclass_label == label for byclass_label, label in found)
    assert not any(image.T.tobytes() in index for image in digits.numpy() if not np.array_equal(image, image.T))


def test_loading_the_real_samples_writes_nothing_beside_them():
    folder = real_data("emnist")
    before = sorted(os.listdir(folder))
    load_images("emnist-digits", train=False, data_dir=folder, download=False)
    assert sorted(os.listdir(folder)) == before


@pytest.mark.slow
def test_the_carve_is_disjoint_stratified_and_in_the_official_layout(byclass, carved):
    out, stdout = carved
    images, labels = byclass
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"emnist-byclass-{split}-{kind}-ubyte.gz" for split in ("train", "test") for kind in ("images-idx3",
                                                                                              "labels-idx1"))
    train_images, train_labels = load_images("emnist-byclass", train=True, data_dir=out, download=False, cache=False)
    test_images, test_labels = load_images("emnist-byclass", train=False, data_dir=out, download=False, cache=False)
    assert len(train_labels) == 96_323 and len(test_labels) == 20_000
    # every image exactly once, with its label, upright through the unchanged loader (so stored raw)
    original = sorted(zip(map(bytes, images.numpy().reshape(len(images), -1)), labels.tolist()))
    both = torch.cat([train_images, test_images]).numpy()
    assert sorted(zip(map(bytes, both.reshape(len(both), -1)), torch.cat([train_labels, test_labels]).tolist())) \
        == original
    share = torch.bincount(test_labels, minlength=62) / torch.bincount(labels, minlength=62)
    assert share.min() > 0.16 and share.max() < 0.18  # stratified: 20,000 / 116,323 = 17.2 % of every class
    raw = gzip.decompress((out / "emnist-byclass-train-images-idx3-ubyte.gz").read_bytes())
    assert raw[:4] == b"\x00\x00\x08\x03" and np.array_equal(
        np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[0], train_images[0].numpy().T)
    assert "train 96,323, test 20,000" in stdout and "sha256" in stdout


@pytest.mark.slow
def test_the_carve_is_deterministic_and_a_second_carve_into_it_writes_nothing(carved):
    out, stdout = carved
    digest = stdout.split("sha256 of the uncompressed contents: ")[1].split()[0]
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    again = run(CARVE, real_data("emnist"), out, cwd=ROOT)
    assert again.returncode == 0 and digest in again.stdout and "nothing written" in again.stdout
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps
    images, labels = carve.read_official_test(real_data("emnist"))
    files = carve.contents(images, labels, *carve.carve(labels))
    assert carve.checksum(files) == digest  # the same carve from scratch


@pytest.mark.slow
def test_the_carve_refuses_what_is_not_the_official_test_split(tmp_path):
    from conftest import write_idx

    source = tmp_path / "source"
    for count in (62 * 3, 116_323):  # a wrong count; the right count with the wrong class histogram
        labels = np.arange(count) % 62
        write_idx(source / "emnist-byclass-test-images-idx3-ubyte.gz", np.zeros((count, 28, 28), np.uint8))
        write_idx(source / "emnist-byclass-test-labels-idx1-ubyte.gz", labels)
        line = one_line_error(run(CARVE, source, tmp_path / "out", cwd=ROOT))
        assert "not the official test split" in line and not (tmp_path / "out").exists()
    line = one_line_error(run(CARVE, tmp_path / "nothing", tmp_path / "out", cwd=ROOT))
    assert "emnist-byclass-test-images-idx3-ubyte" in line and "--dataset" not in line
    assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("a user's file")
    line = one_line_error(run(CARVE, real_data("emnist"), tmp_path / "busy", cwd=ROOT))
    assert "already holds other files" in line and (tmp_path / "busy" / "mine.txt").read_text() == "a user's file"


@pytest.mark.slow
def test_an_interrupted_carve_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, runpy; sys.argv = ['carve.py', sys.argv[1], sys.argv[2]]; import gzip; "
        "real = gzip.compress; gzip.compress = lambda *a, **k: (time.sleep(30), real(*a, **k))[1]; "
        f"runpy.run_path({str(CARVE)!r}, run_name='__main__')"), str(real_data("emnist")), str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # wait until it is writing its hidden folder
        if any(path.name.startswith(".out.") for path in tmp_path.iterdir()):
            break
        subprocess.run(["sleep", "0.1"])
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 130 and errors.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the published weights

def carved_test_letters(byclass, count):
    """`count` upright letters of the carve's test set (images the published networks never trained on)."""
    images, labels = byclass
    _, test_index = carve.carve(labels.numpy())
    letters = [index for index in test_index.tolist() if labels[index] >= 10][:count]
    return images[letters], labels[letters]


def pretraining_validation(checkpoint):
    """The best validation accuracy of the pre-training a published checkpoint was fine-tuned from: the study's,
    or for the chosen recipe the best of its tried option sets and the study's (the one it kept)."""
    name, recipe = checkpoint.stem.removesuffix("_tuned"), checkpoint.parents[2]
    study = recipe.parent / "study" / "outputs" / "train" / f"{name}.json"
    runs = [study] + ([] if recipe.name == "study" else sorted(recipe.glob(f"outputs/tried/*/train/{name}.json")))
    return max(json.loads(path.read_text())["best_val_acc"] for path in runs)


def test_the_published_networks_are_each_networks_best_validated_committed_checkpoint():
    import evaluate

    published = {name: published_checkpoint(name) for name in ("lenet", "alexnet", "vggnet", "resnet", "spinalnet")}
    assert all(path is not None and path.is_file() for path in published.values())
    for name, path in published.items():  # no committed checkpoint of the same network validated better
        rivals = [hub / "fine_tuned" / f"{name}_tuned.pth" for hub in PUBLISHED_HUBS]
        assert all(pretraining_validation(path) >= pretraining_validation(rival) for rival in rivals if rival.is_file())
    best = max(published, key=lambda name: pretraining_validation(published[name]))
    assert evaluate.PUBLISHED_NETWORK == best


def test_torch_hub_returns_a_ready_network_that_reads_test_letters(byclass):
    model = torch.hub.load(str(ROOT), "resnet", source="local", pretrained=True)
    assert model.classes == "".join(CLASSES["emnist-byclass"]) and not model.training
    images, labels = carved_test_letters(byclass, 50)
    with torch.no_grad():
        predictions = model((images[:, None].float() / 255 - model.mean) / model.std).argmax(1)
    assert (predictions == labels).float().mean() > 0.6  # chance is 1/62
    assert torch.hub.load(str(ROOT), "lenet", source="local", pretrained=False).fc is not None
    vggnet = torch.hub.load(str(ROOT), "vggnet", source="local", pretrained=True)  # the published one
    published = torch.load(published_checkpoint("vggnet"), map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(value, published[key]) for key, value in vggnet.state_dict().items())


def test_torch_hub_without_a_networks_weights_says_so_in_one_line(tmp_path, monkeypatch):
    import models

    monkeypatch.setattr(models, "PUBLISHED_HUBS", (tmp_path / "model_hub",))  # a copy without committed weights
    with pytest.raises(models.CheckpointError) as refused:
        torch.hub.load(str(ROOT), "alexnet", source="local", pretrained=True)
    message = str(refused.value)
    assert message.startswith("this copy holds no published alexnet weights") and "\n" not in message
    assert str(tmp_path / "model_hub") in message and "pretrained=False" in message
    assert torch.hub.load(str(ROOT), "alexnet", source="local", pretrained=False).classes == \
        "".join(CLASSES["emnist-byclass"])  # a fresh network needs no weights


def test_the_demo_without_flags_serves_the_published_networks_and_reads_a_letter(byclass):
    import threading
    import urllib.request
    from io import BytesIO

    from PIL import Image

    import demo

    args = demo.parse_args([])
    cpu = torch.device("cpu")
    predictor = demo.Predictor(demo.checkpoints_to_serve(args), cpu, demo.choose_precision("fp32", cpu))
    assert set(predictor.networks) == {"lenet", "alexnet", "vggnet", "resnet", "spinalnet"}
    assert [path for path, _ in demo.checkpoints_to_serve(args)] == [published_checkpoint(name) for name in
                                                                     predictor.networks]
    assert all(state["dataset"] == "emnist-byclass" for state, _ in predictor.networks.values())
    server = demo.make_server(predictor, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    images, labels = carved_test_letters(byclass, 10)
    right = 0
    try:
        for image, label in zip(images, labels):
            picture = BytesIO()
            Image.fromarray(255 - image.numpy()).resize((112, 112)).save(picture, format="PNG")  # ink on paper
            request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/predict",
                                             data=picture.getvalue(), method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())["predictions"][0]["label"]
            right += answer == CLASSES["emnist-byclass"][label]
    finally:
        server.shutdown()
        server.server_close()
    assert right >= 6  # ten real test letters, drawn as a user would


def test_image_without_a_network_of_ones_own_uses_the_published_one(byclass, tmp_path, capsys):
    from PIL import Image

    import evaluate

    images, labels = carved_test_letters(byclass, 1)
    picture = tmp_path / "letter.png"
    Image.fromarray(255 - images[0].numpy()).resize((84, 84)).save(picture)
    evaluate.main(["--image", str(picture), "--hub", str(tmp_path / "empty_hub")])
    output = capsys.readouterr().out
    published = published_checkpoint(evaluate.PUBLISHED_NETWORK)
    assert f"network: {published} ({evaluate.PUBLISHED_NETWORK}, trained on emnist-byclass, written " in output
    answer = output.split(f"{picture}: ")[1].split()[0]
    assert answer in CLASSES["emnist-byclass"]


PUBLISHED = sorted((ROOT / "results" / "emnist-byclass").glob("*/model_hub/fine_tuned/*_tuned.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", PUBLISHED, ids=lambda path: f"{path.parents[2].name}-{path.stem}")
def test_a_committed_checkpoint_reproduces_its_committed_test_numbers_exactly_in_fp32(checkpoint, carved, tmp_path):
    folder, _ = carved
    name = checkpoint.stem.removesuffix("_tuned")
    result = run(ROOT / "evaluate.py", "--ckpt", checkpoint, "--dataset", "emnist-byclass", "--data-dir", folder,
                 "--no-download", "--split", "test", "--outputs", tmp_path, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    committed = json.loads((checkpoint.parents[2] / "outputs" / "eval" / f"{name}.json").read_text())["test"]
    measured = json.loads((tmp_path / "eval" / f"{name}.json").read_text())["test"]
    ties = "most_confused"  # pairs of one count: an older evaluate.py listed them in another order
    assert measured["accuracy"] == committed["accuracy"]
    assert {k: v for k, v in measured.items() if k != ties} == {k: v for k, v in committed.items() if k != ties}
