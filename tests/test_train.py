"""train.py as a user runs it: learning, files, resume bit for bit, refusals, one-line mistakes."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, one_line_error, refused, run, train_args


def weights(path, part=None):
    ckpt = torch.load(path, weights_only=True)
    return (ckpt["last"] if part == "last" else ckpt)["state_dict"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_the_loss_falls_and_the_stage_writes_its_checkpoint_json_and_curves(trained_lenet):
    tmp, path = trained_lenet
    result = json.loads((tmp / "out" / "train" / "lenet.json").read_text())
    history = result["history"]
    assert len(history) == 8 and history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.5
    ckpt = torch.load(path, weights_only=True)
    assert (
        ckpt["model"] == "lenet"
        and ckpt["classes"] == list("0123456789")
        and ckpt["history"] == history
    )
    best = min(history, key=lambda row: row["val_loss"])["epoch"]
    assert result["kept_epoch"] == best and ckpt["last"]["epoch"] == 8
    assert not (tmp / "out" / "train" / "lenet.png").exists()  # evaluate.py draws the curves


def test_resuming_gives_the_weights_of_a_run_never_stopped(tmp_path):
    train.main(train_args(tmp_path / "straight", epochs=4))
    train.main(train_args(tmp_path / "stopped", epochs=2))
    train.main(train_args(tmp_path / "stopped", "--resume", epochs=4))
    a, b = (tmp_path / run / "hub" / "pre_trained" / "lenet.pth" for run in ("straight", "stopped"))
    assert same(weights(a), weights(b)) and same(weights(a, "last"), weights(b, "last"))


def test_dropout_sets_the_training_rate_and_its_default_is_the_networks_own(tmp_path):
    for name, extra in [("own", []), ("half", ["--dropout", "0.5"]), ("none", ["--dropout", "0"])]:
        train.main(train_args(tmp_path / name, *extra, epochs=2))
    own, half, none = (weights(tmp_path / name / "hub" / "pre_trained" / "lenet.pth", "last")
                       for name in ("own", "half", "none"))
    assert same(own, half) and not same(own, none)  # LeNet's Dropout layers drop half


@pytest.mark.slow
def test_ctrl_c_then_resume_ends_with_the_same_weights_as_a_run_never_stopped(tmp_path):
    args = train_args(
        tmp_path / "stopped", "--model", "resnet", "--batch-size", "32", model="resnet", epochs=4
    )
    process = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoint = tmp_path / "stopped" / "hub" / "pre_trained" / "resnet.pth"
    for _ in range(600):
        if checkpoint.exists() or process.poll() is not None:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.strip().splitlines() == ["interrupted"], err
    assert run("train.py", *args, "--resume").returncode == 0
    assert (
        run(
            "train.py",
            *train_args(tmp_path / "straight", "--batch-size", "32", model="resnet", epochs=4),
        ).returncode
        == 0
    )
    assert same(
        weights(checkpoint, "last"),
        weights(tmp_path / "straight" / "hub" / "pre_trained" / "resnet.pth", "last"),
    )


def test_a_finished_run_is_never_replaced_unless_asked(trained_lenet, tmp_path):
    tmp, path = trained_lenet
    before = path.read_bytes()
    line = one_line_error(run("train.py", *train_args(tmp, epochs=8)))
    assert "--resume" in line and "--overwrite" in line and path.read_bytes() == before
    train.main(train_args(tmp_path, epochs=1))
    first = (tmp_path / "hub" / "pre_trained" / "lenet.pth").read_bytes()
    train.main(train_args(tmp_path, "--overwrite", "--seed", "1", epochs=1))
    assert (tmp_path / "hub" / "pre_trained" / "lenet.pth").read_bytes() != first


@pytest.mark.slow
def test_a_kill_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "hub" / "pre_trained" / "lenet.pth"
    for delay in (0.0, 0.13, 0.37):
        process = subprocess.Popen(
            [sys.executable, "train.py", *train_args(tmp_path, "--overwrite", epochs=40)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not path.exists() and process.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        process.kill()
        process.wait()
        assert torch.load(path, weights_only=True)["model"] == "lenet"


def test_dry_run_writes_nothing(tmp_path):
    result = run("train.py", *train_args(tmp_path, "--dry-run"))
    assert result.returncode == 0 and "nothing was written" in result.stdout
    assert not (tmp_path / "hub").exists() and not (tmp_path / "out").exists()


def test_every_value_is_printed_once_with_its_source(tmp_path):
    search = tmp_path / "search.json"
    search.write_text(
        json.dumps(
            {
                "best_params": {
                    "learning_rate": 0.02,
                    "batch_size": 16,
                    "momentum": 0.5,
                    "weight_decay": 0.0,
                }
            }
        )
    )
    out = run(
        "train.py", *train_args(tmp_path, "--params", search, "--dry-run", "--momentum", "0.8")
    ).stdout
    assert f"batch_size      16                       (--params {search})" in out
    assert "learning_rate   0.05                     (flag)" in out  # a flag beats the file
    assert "momentum        0.8                      (flag)" in out
    assert "clip            1.0                      (default)" in out
    assert out.count("learning_rate ") == 1


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--optimizer", "lion"], "invalid choice"),
        (
            ["--dataset", "emnist-balanced", "--data-dir", "/nowhere", "--no-download"],
            "--dataset sklearn-digits",
        ),
        (["--resume"], "nothing to resume"),
        (["--hub", "README.md/hub"], "README.md"),
        (["--params", "missing.json"], "not a finished search"),
        (["--lr", "1e6", "--clip", "0"], "diverged"),
        (["--dropout", "2"], "not from 0 up to 1"),
    ],
)
def test_a_users_mistake_is_one_line_and_a_non_zero_exit(tmp_path, extra, expected):
    args = train_args(tmp_path, epochs=1)
    args[args.index("--hub") + 1 : args.index("--hub") + 2] = (
        [extra[1]] if extra[0] == "--hub" else [str(tmp_path)]
    )
    extra = [] if extra[0] == "--hub" else extra
    assert expected in refused(train.main, args + extra)
