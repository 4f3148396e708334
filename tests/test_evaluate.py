import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from models import load_checkpoint
import train
import transfer_mnist
from conftest import real_data
from data import CLASSES, load_images
from evaluate import case_merged_accuracy, compute_metrics, prepare_user_image


def dirs(folder):
    return ["--hub", str(folder / "model_hub"), "--outputs", str(folder / "outputs")]


def test_evaluate_writes_consistent_metrics_and_pictures(trained_lenet):
    workdir, checkpoint = trained_lenet
    evaluate.main(["--model", "lenet"] + dirs(workdir))
    result = json.loads((workdir / "outputs" / "eval" / "lenet.json").read_text())
    assert result["checkpoint"] == str(checkpoint) and result["dataset"] == "sklearn-digits"
    for split, count in [("train", 1437), ("test", 360)]:
        metrics = result[split]
        for key in ["accuracy", "precision", "recall", "f1", "macro_f1", "top5_accuracy"]:
            assert 0 <= metrics[key] <= 1
        matrix = np.array(metrics["confusion_matrix"])
        assert matrix.sum() == count == metrics["count"]
        assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
        assert metrics["recall"] == pytest.approx(metrics["accuracy"])  # weighted recall is accuracy
        assert metrics["top5_accuracy"] >= metrics["accuracy"]
        per_class = matrix.diagonal() / matrix.sum(1)
        assert list(metrics["per_class"].values()) == pytest.approx(per_class.tolist())
        if metrics["most_confused"]:
            worst = metrics["most_confused"][0]
            off = matrix.copy()
            np.fill_diagonal(off, 0)
            assert worst["count"] == off.max()
    assert result["test"]["accuracy"] > 0.7
    for picture in ["lenet_cm_test.png", "lenet_cm_train.png", "lenet_predictions.png", "lenet_augment.png"]:
        assert (workdir / "outputs" / "eval" / picture).stat().st_size > 10_000


def test_case_merged_accuracy_by_hand():
    classes = CLASSES["emnist-byclass"]
    index = classes.index
    labels = [index("c"), index("C"), index("o"), index("a"), index("7"), index("s")]
    predictions = [index("C"), index("c"), index("0"), index("A"), index("7"), index("S")]
    # exact: only 7 is right (1/6); merged: c/C, C/c and s/S also count (4/6); o->0 and a->A stay wrong
    assert case_merged_accuracy(labels, predictions, classes) == pytest.approx(4 / 6)
    probabilities = torch.nn.functional.one_hot(torch.tensor(predictions), 62).float()
    metrics = compute_metrics(labels, probabilities, classes, "emnist-byclass")
    assert metrics["accuracy"] == pytest.approx(1 / 6)
    assert metrics["case_merged_accuracy"] == pytest.approx(4 / 6)


def test_own_images_dark_on_light_and_light_on_dark_agree(trained_lenet, tmp_path, capsys):
    workdir, checkpoint = trained_lenet
    images, labels = load_images("mnist", train=False, data_dir=real_data(), download=False)
    digit = images[0].numpy()  # a real handwritten 7
    big = np.kron(digit, np.ones((5, 5), dtype=np.uint8))  # 140x140, like a photo crop
    padded = np.pad(big, 40)
    Image.fromarray(255 - padded).save(tmp_path / "dark_on_light.png")
    Image.fromarray(padded).convert("RGB").save(tmp_path / "light_on_dark.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("not a picture")
    upright = prepare_user_image(tmp_path / "dark_on_light.png")
    assert upright.shape == (28, 28) and upright.dtype == torch.uint8 and upright.max() == 255
    # a 5x larger photo of the digit gives nearly the same 28x28 as the digit itself
    Image.fromarray(digit).save(tmp_path / "small.png")
    small = prepare_user_image(tmp_path / "small.png")
    assert torch.corrcoef(torch.stack([upright.double().flatten(), small.double().flatten()]))[0, 1] > 0.75
    # and dark-on-light is read exactly as its light-on-dark negative
    Image.fromarray(padded).save(tmp_path / "negative.png")
    assert torch.equal(prepare_user_image(tmp_path / "negative.png"), upright)
    with pytest.raises(SystemExit):  # the text file fails, so the exit status says so
        evaluate.main(["--model", "lenet", "--ckpt", str(checkpoint), "--image", str(tmp_path / "dark_on_light.png"),
                       str(tmp_path / "notes.txt"), str(tmp_path / "light_on_dark.jpg")] + dirs(workdir))
    captured = capsys.readouterr()
    answers = {line.split(":")[0]: line.split(": ")[1].split(" ")[0]
               for line in captured.out.splitlines() if line.startswith(str(tmp_path))}
    assert answers[str(tmp_path / "dark_on_light.png")] == answers[str(tmp_path / "light_on_dark.jpg")]
    assert "notes.txt is not an image" in captured.err
    Image.fromarray(np.full((50, 50), 255, dtype=np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(evaluate.DataError, match="no visible ink"):
        prepare_user_image(tmp_path / "blank.png")


def test_mismatched_dataset_and_missing_checkpoint_errors(trained_lenet, tmp_path):
    workdir, _ = trained_lenet
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "lenet", "--dataset", "mnist"] + dirs(workdir))
    assert "was trained on sklearn-digits, not mnist" in str(exit_info.value)
    assert "--other-dataset" in str(exit_info.value)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "lenet", "--dataset", "emnist-byclass", "--other-dataset"] + dirs(workdir))
    assert "predicts 10 classes" in str(exit_info.value)
    evaluate.main(["--model", "lenet", "--dataset", "mnist", "--other-dataset", "--data-dir", str(real_data()),
                   "--split", "test", "--no-download", "--hub", str(workdir / "model_hub"),
                   "--outputs", str(tmp_path / "outputs")])
    result = json.loads((tmp_path / "outputs" / "eval" / "lenet.json").read_text())
    assert result["dataset"] == "mnist" and result["test"]["count"] == 10_000
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "vggnet"] + dirs(tmp_path))
    assert "python train.py --model vggnet" in str(exit_info.value)


def test_comparison_and_ensemble_across_networks(trained_lenet, trained_spinalnet, tmp_path):
    workdir, _ = trained_lenet
    hub = tmp_path / "model_hub"
    shutil.copytree(workdir / "model_hub", hub)
    shutil.copy(trained_spinalnet, hub / "pre_trained" / "spinalnet.pth")
    shutil.copytree(trained_spinalnet.parents[2] / "outputs", tmp_path / "outputs")  # its seconds per epoch
    evaluate.main(["--model", "all", "--split", "test"] + dirs(tmp_path))
    comparison = json.loads((tmp_path / "outputs" / "eval" / "comparison.json").read_text())
    assert set(comparison["models"]) == {"lenet", "spinalnet", "ensemble"}
    for column in comparison["models"].values():
        assert 0 <= column["test"]["accuracy"] <= 1
    table = (tmp_path / "outputs" / "eval" / "comparison.md").read_text()
    assert "| | lenet | spinalnet | ensemble |" in table and "test f1" in table  # the study's order
    assert comparison["models"]["spinalnet"]["seconds_per_epoch"] > 0


def test_transfer_to_the_mnist_sample(trained_lenet, mnist_sample, tmp_path):
    _, checkpoint = trained_lenet
    transfer_mnist.main(["--model", "lenet", "--ckpt", str(checkpoint), "--data-dir", str(mnist_sample),
                         "--no-download", "--epochs", "1"] + dirs(tmp_path))
    result = json.loads((tmp_path / "outputs" / "transfer" / "lenet.json").read_text())
    assert result["before"]["test"]["count"] == 1_000 and result["after"]["test"]["count"] == 1_000
    assert result["after"]["test"]["accuracy"] > 0.6  # chance is 0.1
    assert result["after"]["train"]["accuracy"] > 0.6
    state = torch.load(tmp_path / "model_hub" / "transfer" / "lenet_mnist.pth", weights_only=True)
    assert state["num_classes"] == 10 and state["dataset"] == "mnist"
    assert (tmp_path / "outputs" / "transfer" / "lenet_cm_test.png").is_file()


def test_emnist_trained_network_reads_upright_mnist_zero_shot(tmp_path):
    """The whole chain on real data: learn digits from real EMNIST files, recognise real MNIST."""
    source = real_data("emnist")
    folder = tmp_path / "emnist"
    folder.mkdir()
    for kind in ["images-idx3", "labels-idx1"]:  # the 600 real test digits stand in for a training split
        shutil.copy(source / f"emnist-digits-test-{kind}-ubyte.gz", folder / f"emnist-digits-train-{kind}-ubyte.gz")
    train.main(["--model", "lenet", "--dataset", "emnist-digits", "--data-dir", str(folder), "--no-download",
                "--epochs", "15", "--lr", "0.05"] + dirs(tmp_path))
    state, model = load_checkpoint(tmp_path / "model_hub" / "pre_trained" / "lenet.pth")
    images, labels = load_images("mnist", train=False, data_dir=real_data(), download=False)
    upright = evaluate.predict_probabilities(model, images, state["mean"], state["std"], torch.device("cpu")).argmax(1)
    flipped = evaluate.predict_probabilities(model, images.transpose(1, 2).contiguous(), state["mean"],
                                             state["std"], torch.device("cpu")).argmax(1)
    upright_accuracy = (upright == labels).float().mean().item()
    assert upright_accuracy > 0.7  # zero-shot on the 10,000 official MNIST test digits after 540 EMNIST ones
    assert upright_accuracy > (flipped == labels).float().mean().item() + 0.3


def test_the_ensemble_is_the_most_accurate_subset_on_validation_ties_to_fewer_networks():
    labels = torch.tensor([0, 1, 0, 1])
    sure = {0: [0.9, 0.1], 1: [0.1, 0.9]}
    a = torch.tensor([sure[0], sure[1], sure[0], [0.6, 0.4]])  # right on 3
    b = torch.tensor([sure[0], [0.6, 0.4], sure[0], sure[1]])  # right on 3, wrong elsewhere
    c = torch.tensor([[0.6, 0.4], sure[1], [0.45, 0.55], sure[1]])  # right on 3
    members, scores = evaluate.best_subset({"a": a, "b": b, "c": c}, labels)
    assert set(scores) == {"a + b", "a + c", "b + c", "a + b + c"}
    assert scores["a + b"] == 1.0 and scores["a + b + c"] == 1.0 and members == ["a", "b"]  # the tie: fewer


def test_evaluate_chooses_the_ensemble_on_the_images_pre_training_held_out(trained_lenet, trained_spinalnet,
                                                                            tmp_path):
    hub = tmp_path / "model_hub" / "pre_trained"
    hub.mkdir(parents=True)
    shutil.copy(trained_lenet[1], hub / "lenet.pth")
    shutil.copy(trained_spinalnet, hub / "spinalnet.pth")
    evaluate.main(["--model", "all", "--split", "test", "--ensemble-from-validation", str(tmp_path / "model_hub")]
                  + dirs(tmp_path))
    comparison = json.loads((tmp_path / "outputs" / "eval" / "comparison.json").read_text())
    assert comparison["ensemble_members"] == ["lenet", "spinalnet"]
    choice = comparison["ensemble_choice"]
    assert choice["validation_images"] == 144 and set(choice["validation_accuracy"]) == {"lenet + spinalnet"}
    state = torch.load(hub / "spinalnet.pth", weights_only=True)
    state["args"]["seed"] = 3  # held out other images: the choice cannot compare them
    torch.save(state, hub / "spinalnet.pth")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "all", "--split", "test", "--dry-run", "--ensemble-from-validation",
                       str(tmp_path / "model_hub")] + dirs(tmp_path))
    assert "held out other images" in str(exit_info.value)


def test_most_confused_lists_only_mistakes_even_for_a_nearly_perfect_network():
    matrix = np.diag([35, 35, 40, 30]).astype(np.int64)  # a network that makes one mistake
    matrix[3, 1] = 1
    pairs = evaluate.most_confused(matrix, "abcd")
    assert pairs == [{"true": "d", "predicted": "b", "count": 1, "share_of_true": 1 / 31}]
    assert evaluate.most_confused(np.diag([5, 5]), "ab") == []  # a perfect one: nothing confused


def test_the_confused_pairs_picture_shows_each_pair_s_own_mistakes_and_long_names_never_run_together(
        tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(evaluate, "plot_grid", lambda images, captions, path, title, colors=None:
                        drawn.append((images, captions)))
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1).expand(6, 28, 28).contiguous()  # image i is all i
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    probabilities = torch.nn.functional.one_hot(torch.tensor([1, 0, 0, 0, 1, 2]), 3).float()
    matrix = evaluate.compute_metrics(labels, probabilities, "abc", "x")["confusion_matrix"]
    pairs = evaluate.most_confused(np.asarray(matrix), "abc")
    evaluate.plot_confused_pairs(images, labels, probabilities, pairs, "abc", tmp_path / "c.png", per_pair=3)
    shown, captions = drawn[0]
    assert captions[0] == "b>a 2" and [int(image[0, 0]) for image in shown[:2]] == [2, 3]  # b read as a: 2, 3
    assert captions[3] == "a>b 1" and int(shown[3][0, 0]) == 0
    evaluate.plot_predictions(images, labels, probabilities, ("Trouser", "Sneaker", "Bag"), tmp_path / "p.png")
    assert all("\n>" in caption for caption in drawn[1][1])  # one name a line
