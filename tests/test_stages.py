"""The other stages as a user runs them: search, fine-tuning, evaluation, transfer to MNIST, hub."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import finetune
import search
import transfer_mnist
from conftest import ROOT, one_line_error, real_data, refused, run, train_args


def test_search_ranks_its_trials_and_resumes_where_it_stopped(tmp_path):
    args = [
        "--model",
        "lenet",
        "--dataset",
        "sklearn-digits",
        "--epochs",
        "1",
        "--outputs",
        str(tmp_path),
    ]
    search.main(args + ["--n-iter", "2"])
    result = json.loads((tmp_path / "search" / "lenet.json").read_text())
    assert len(result["trials"]) == 2 and result["complete"]
    assert result["best_val_loss"] == min(
        t["val_loss"] for t in result["trials"] if t["val_loss"] is not None
    )
    assert "settings" in refused(search.main, args + ["--n-iter", "3", "--epochs", "2"])
    first = result["trials"][0]["seconds"]
    search.main(args + ["--n-iter", "2"])  # nothing left: the trials are kept as they were
    assert (
        json.loads((tmp_path / "search" / "lenet.json").read_text())["trials"][0]["seconds"]
        == first
    )


def test_fine_tuning_continues_the_pretrained_network_with_adam(trained_lenet, tmp_path):
    tmp, path = trained_lenet
    finetune.main(
        ["--ckpt", str(path), "--epochs", "2", "--hub", str(tmp_path), "--outputs", str(tmp_path)]
    )
    ckpt = torch.load(tmp_path / "fine_tuned" / "lenet_tuned.pth", weights_only=True)
    pretrained = torch.load(path, weights_only=True)
    assert (
        ckpt["args"]["optimizer"] == "adam"
        and ckpt["args"]["batch_size"] == pretrained["args"]["batch_size"]
    )
    assert ckpt["dataset"] == "sklearn-digits" and ckpt["mean"] == pretrained["mean"]
    assert (
        ckpt["history"][0]["train_acc"] > 0.5
    )  # it started from the pre-trained weights, not from scratch
    assert "held out" in refused(
        finetune.main, ["--ckpt", str(path), "--val-fraction", "0.2", "--hub", str(tmp_path)]
    )
    assert "not a checkpoint" in refused(
        finetune.main, ["--ckpt", str(tmp / "out" / "train" / "lenet.json")]
    )


def test_evaluation_reports_the_studys_metrics_and_an_ensemble(trained_lenet, tmp_path):
    tmp, _ = trained_lenet
    finetune.main(
        [
            "--model",
            "lenet",
            "--epochs",
            "1",
            "--hub",
            str(tmp_path / "hub"),
            "--outputs",
            str(tmp_path),
            "--ckpt",
            str(tmp / "hub" / "pre_trained" / "lenet.pth"),
        ]
    )
    (tmp_path / "hub" / "pre_trained").mkdir()
    (tmp_path / "hub" / "pre_trained" / "spinalnet.pth").write_bytes(
        (tmp / "hub" / "pre_trained" / "lenet.pth").read_bytes()
    )
    assert "holds lenet" in refused(
        evaluate.main, ["--model", "all", "--hub", str(tmp_path / "hub")]
    )
    evaluate.main(
        ["--model", "lenet", "--hub", str(tmp_path / "hub"), "--outputs", str(tmp_path / "out")]
    )
    result = json.loads((tmp_path / "out" / "eval" / "lenet.json").read_text())
    test = result["test"]
    assert (
        test["count"] == 360
        and 0.5 < test["accuracy"] <= 1
        and test["recall"] == pytest.approx(test["accuracy"])
    )
    assert (
        np.array(test["confusion_matrix"]).sum() == 360
        and test["top5_accuracy"] >= test["accuracy"]
    )
    assert (tmp_path / "out" / "eval" / "lenet_cm_test.png").exists()
    assert (tmp_path / "out" / "eval" / "lenet_curves.png").stat().st_size > 1000


def test_the_case_merged_accuracy_counts_c_and_C_as_one():
    classes = list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    labels = np.array([classes.index("C"), classes.index("a")])
    probs = torch.zeros(2, 62)
    probs[0, classes.index("c")] = probs[1, classes.index("A")] = 1
    result = evaluate.metrics(labels, probs, classes)
    assert (
        result["accuracy"] == 0 and result["case_merged_accuracy"] == 0.5
    )  # a/A differ in shape: not merged


def test_a_picture_is_read_as_emnist_was_made_and_a_broken_one_is_one_line(tmp_path, capsys):
    canvas = np.full((300, 200), 255, np.uint8)  # dark ink on white paper, off centre
    canvas[40:160, 20:40] = 0
    Image.fromarray(canvas).save(tmp_path / "stroke.png")
    image = evaluate.prepare_picture(tmp_path / "stroke.png")
    assert (
        image.shape == (28, 28)
        and image.max() == 255
        and image[0].max() == 0
        and image[:, 0].max() == 0
    )
    rows, cols = np.nonzero(image.numpy() > 127)
    assert abs(rows.mean() - 13.5) < 2 and abs(cols.mean() - 13.5) < 2  # centred, light on dark
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(evaluate.UserError, match="not a picture"):
        evaluate.prepare_picture(tmp_path / "broken.png")


def test_transfer_to_mnist_scores_zero_shot_then_after(trained_lenet, tmp_path):
    _, path = trained_lenet
    transfer_mnist.main(
        [
            "--ckpt",
            str(path),
            "--data-dir",
            str(real_data()),
            "--no-download",
            "--epochs",
            "1",
            "--subset",
            "1000",
            "--hub",
            str(tmp_path),
            "--outputs",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "transfer" / "lenet.json").read_text())
    assert result["before"]["test"]["count"] == 10_000 and result["after"]["test"]["accuracy"] > 0.3
    assert (
        result["before"]["test"]["accuracy"] > 0.15
    )  # sklearn's digits read MNIST better than chance


def test_torch_hub_serves_the_published_networks():
    root = str(evaluate.Path(__file__).parents[1])
    fresh = torch.hub.load(root, "resnet", source="local", pretrained=False)
    assert fresh(torch.zeros(1, 1, 28, 28)).shape == (1, 62) and len(fresh.classes) == 62
    published = torch.hub.load(root, "resnet", source="local")
    assert not published.training and 0 < published.mean < 1 and published.classes[10] == "A"
    state = torch.load(evaluate.PUBLISHED / "resnet.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(value, state[key]) for key, value in published.state_dict().items())


def test_validation_scores_are_reproduced_and_tta_averages_shifted_views(trained_lenet, tmp_path):
    tmp, path = trained_lenet
    evaluate.main(["--ckpt", str(path), "--split", "val", "--outputs", str(tmp_path)])
    kept = json.loads((tmp / "out" / "train" / "lenet.json").read_text())["best_val_acc"]
    assert json.loads((tmp_path / "eval" / "lenet.json").read_text())["val"]["accuracy"] == kept
    ckpt, model = evaluate.load_checkpoint(path)
    images = evaluate.data.load_images("sklearn-digits", False)[0][:50]
    plain = evaluate.probabilities(model, images, ckpt["mean"], ckpt["std"], torch.device("cpu"))
    shifted = evaluate.probabilities(model, images, ckpt["mean"], ckpt["std"], torch.device("cpu"),
                                     shifts=evaluate.TTA)
    assert torch.allclose(shifted.sum(1), torch.ones(50)) and not torch.allclose(plain, shifted)


def test_recalibrated_batchnorm_statistics_are_those_of_the_clean_images(tmp_path):
    import train

    train.main(train_args(tmp_path, "--model", "resnet", "--recalibrate-bn", model="resnet",
                          epochs=1))
    result = json.loads((tmp_path / "out" / "train" / "resnet.json").read_text())
    assert "recalibrated_val_acc" in result
    ckpt, model = evaluate.load_checkpoint(tmp_path / "hub" / "pre_trained" / "resnet.pth")
    images = train.data.training_data("sklearn-digits", "data", "cpu")["train"][0]
    inputs = train.data.normalize(images, ckpt["mean"], ckpt["std"])
    first = model.stem[0](inputs)  # the first BatchNorm sees the first convolution's output
    assert torch.allclose(model.stem[1].running_mean, first.mean((0, 2, 3)), atol=1e-4)


def test_publishing_keeps_the_kept_weights_without_the_optimizer_state(trained_lenet, tmp_path):
    _, path = trained_lenet
    publish = ROOT / "results" / "emnist-byclass" / "publish.py"
    as_trained = run(publish, path, "--as-trained", "--out", tmp_path)
    assert "did not keep its last epoch" in one_line_error(as_trained)
    published = run(publish, path, "--out", tmp_path)
    assert published.returncode == 0, published.stderr
    ours, theirs = (torch.load(file, weights_only=True) for file in (path, tmp_path / "lenet.pth"))
    assert "last" not in theirs and theirs["classes"] == ours["classes"]
    assert all(torch.equal(ours["state_dict"][key], theirs["state_dict"][key])
               for key in ours["state_dict"])


def test_averaging_publishes_one_network_with_the_mean_of_the_weights(trained_lenet, tmp_path):
    _, path = trained_lenet
    ckpt = torch.load(path, weights_only=True)
    convolutions = [key for key, value in ckpt["state_dict"].items() if value.dim() == 4]
    moved = {key: value + 1 if key in convolutions else value
             for key, value in ckpt["state_dict"].items()}
    torch.save(dict(ckpt, state_dict=moved), tmp_path / "moved.pth")
    publish = ROOT / "results" / "emnist-byclass" / "publish.py"
    refused = run(publish, path, tmp_path / "moved.pth", "--average", "--out", tmp_path)
    assert "--recalibrate" in one_line_error(refused)
    averaged = run(publish, path, tmp_path / "moved.pth", "--average", "--recalibrate",
                   "--out", tmp_path)
    assert averaged.returncode == 0, averaged.stderr
    mean = torch.load(tmp_path / "lenet.pth", weights_only=True)["state_dict"]
    assert convolutions and all(torch.allclose(mean[key], ckpt["state_dict"][key] + 0.5)
                                for key in convolutions)
