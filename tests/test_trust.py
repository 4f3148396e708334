"""Every value has one visible source, every flag does what it says, bad input gets one line, nothing is lost."""
import argparse
import errno
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import demo
import evaluate
import finetune
import search
import train
import runs
import transfer_mnist
from conftest import ROOT, exit_message, one_line_error, refused, run, signal_at_epoch, write_idx
from data import DATASETS, load_images
from models import CheckpointError, load_checkpoint
from runs import DataError, UserError, atomic_path, output_lock, write_json

DIGITS = ["--model", "lenet", "--dataset", "sklearn-digits"]
SCRIPTS = ["train.py", "search.py", "finetune.py", "evaluate.py", "transfer_mnist.py"]


def dirs(tmp_path):
    return ["--hub", str(tmp_path / "model_hub"), "--outputs", str(tmp_path / "outputs")]


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()) \
        if folder.exists() else []


# ----------------------------------------------------------------------------- search results and settings

def search_file(tmp_path, **fields):
    payload = {"model": "lenet", "dataset": "sklearn-digits", "num_classes": 10, "complete": True, "dry_run": False,
               "best_params": {"learning_rate": 0.05, "batch_size": 32, "momentum": 0.85, "weight_decay": 0.0},
               "trials": []}
    payload.update(fields)
    path = tmp_path / "outputs" / "search" / "lenet.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) if fields.get("raw") is None else fields["raw"])
    return path


def test_search_dry_run_writes_nothing_and_a_later_search_runs_every_trial(tmp_path, capsys):
    search.main(DIGITS + ["--dry-run", "--outputs", str(tmp_path / "outputs")])
    assert files_under(tmp_path) == []
    search.main(DIGITS + ["--n-iter", "2", "--epochs", "1", "--outputs", str(tmp_path / "outputs")])
    result = json.loads((tmp_path / "outputs" / "search" / "lenet.json").read_text())
    assert len(result["trials"]) == 2 and result["complete"] is True and result["dry_run"] is False
    assert result["model"] == "lenet" and result["dataset"] == "sklearn-digits" and result["num_classes"] == 10


def test_a_search_result_on_disk_changes_nothing_unless_asked_for(tmp_path, capsys):
    search_file(tmp_path)
    train.main(DIGITS + ["--epochs", "1", "--dry-run"] + dirs(tmp_path))
    out = capsys.readouterr().out
    for key in ("learning_rate", "batch_size"):
        assert f"{key:14} {train.DEFAULTS[key]!s:16} default" in out


@pytest.mark.parametrize("fields, reason", [
    ({"complete": False}, "not a finished search"),
    ({"dry_run": True}, "not a finished search"),
    ({"dataset": "mnist"}, "searched on 'mnist'"),
    ({"model": "resnet"}, "search for 'resnet', not lenet"),
    ({"best_params": None}, "every trial diverged"),
    ({"best_params": {"learning_rate": "fast", "batch_size": 32, "momentum": 0.9, "weight_decay": 0}}, "learning_rate"),
    ({"best_params": {"learning_rate": 0.1, "batch_size": None, "momentum": 0.9, "weight_decay": 0}}, "batch_size"),
    ({"best_params": {"learning_rate": 0.1, "batch_size": 16.0, "momentum": 0.9, "weight_decay": 0}}, "batch_size"),
    ({"best_params": {"learning_rate": 1e300, "batch_size": 16, "momentum": 0.9, "weight_decay": 0}}, "learning_rate"),
    ({"best_params": {"learning_rate": 0.1, "batch_size": 16, "momentum": 0.9, "weight_decay": 1e300}}, "weight_decay"),
    ({"best_params": {"learning_rate": 0.1, "batch_size": 16, "momentum": 1.5, "weight_decay": 0}}, "momentum"),
    ({"raw": ""}, "not readable JSON"),
    ({"raw": "[1, 2"}, "not readable JSON"),
    ({"raw": "[1, 2]"}, "JSON object"),
    ({"raw": "[" * 5000 + "]" * 5000}, "JSON"),
    ({"raw": '{"a":' * 5000 + "1" + "}" * 5000}, "JSON"),
])
def test_an_unusable_params_file_is_one_line_before_any_work(tmp_path, capsys, fields, reason):
    path = search_file(tmp_path, **fields)
    line = refused(train.main, DIGITS + ["--params", str(path)] + dirs(tmp_path), capsys)
    assert reason in line and str(path) in line
    assert not (tmp_path / "model_hub").exists()


def test_a_finished_search_is_used_with_params_and_flags_win_over_it(tmp_path, capsys):
    path = search_file(tmp_path)
    train.main(["--model", "lenet", "--params", str(path), "--epochs", "1", "--lr", "0.02"] + dirs(tmp_path))
    out = capsys.readouterr().out
    assert "learning_rate  0.02             flag" in out and f"dataset        sklearn-digits   {path}" in out
    assert f"batch_size     32               {path}" in out and f"momentum       0.85             {path}" in out
    args = torch.load(tmp_path / "model_hub" / "pre_trained" / "lenet.pth", weights_only=True)["args"]
    assert args["learning_rate"] == 0.02 and args["batch_size"] == 32 and args["momentum"] == 0.85


def test_a_partial_grid_overrides_only_its_keys(tmp_path):
    search.main(DIGITS + ["--n-iter", "3", "--epochs", "1", "--grid", '{"learning_rate": [0.05]}',
                          "--outputs", str(tmp_path / "outputs")])
    result = json.loads((tmp_path / "outputs" / "search" / "lenet.json").read_text())
    assert result["settings"]["grid"] == {**search.GRID, "learning_rate": [0.05]}
    assert {trial["params"]["learning_rate"] for trial in result["trials"]} == {0.05}
    assert all(trial["params"]["momentum"] in search.GRID["momentum"] for trial in result["trials"])


# ----------------------------------------------------------------------------- resume

def test_resume_restores_the_run_and_refuses_contradicting_flags(tmp_path, capsys):
    train.main(DIGITS + ["--epochs", "2", "--batch-size", "32", "--lr", "0.05"] + dirs(tmp_path))
    search_file(tmp_path)  # appears after the run started: must not change the resumed run
    last = tmp_path / "model_hub" / "pre_trained" / "lenet_last.pth"
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "model_hub").rglob("*.pth")}
    for flags, wanted in [(["--dataset", "mnist"], "--dataset mnist contradicts"),
                          (["--lr", "0.1"], "--lr 0.1 contradicts"),
                          (["--batch-size", "64"], "--batch-size 64 contradicts"),
                          (["--seed", "3"], "--seed 3 contradicts"),
                          (["--augment", "none"], "--augment none contradicts"),
                          (["--augment", "shift-flip"], "--augment shift-flip contradicts"),
                          (["--augment", "study", "--epochs", "2"], "already trained 2 epochs"),
                          (["--epochs", "2"], "already trained 2 epochs"),
                          ([], "already trained 2 epochs")]:
        message = exit_message(train.main, ["--model", "lenet", "--resume"] + flags + dirs(tmp_path))
        assert wanted in message
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "model_hub").rglob("*.pth")} == before
    summary_path = tmp_path / "outputs" / "train" / "lenet.json"
    finished = json.loads(summary_path.read_text())
    summary_path.unlink()  # interrupted after its last epoch's checkpoint, before its JSON: resume writes the JSON
    capsys.readouterr()
    train.main(["--model", "lenet", "--resume"] + dirs(tmp_path))
    assert "has trained all its 2 epochs: resuming writes its files" in capsys.readouterr().out
    assert json.loads(summary_path.read_text())["history"] == finished["history"]
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "model_hub").rglob("*.pth")} == before
    train.main(["--model", "lenet", "--resume", "--epochs", "3"] + dirs(tmp_path))
    out = capsys.readouterr().out
    assert f"batch_size     32               resumed run {last}" in out
    assert f"dataset        sklearn-digits   resumed run {last}" in out
    assert f"augment        study            resumed run {last}" in out
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 3 and state["args"]["batch_size"] == 32 and state["args"]["learning_rate"] == 0.05
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.05
    summary = json.loads((tmp_path / "outputs" / "train" / "lenet.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [1, 2, 3] and summary["args"]["batch_size"] == 32


# ----------------------------------------------------------------------------- checkpoints name their network

@pytest.mark.slow
def test_ckpt_alone_names_the_network_in_every_script(trained_lenet, mnist_sample, tmp_path, capsys):
    _, checkpoint = trained_lenet
    evaluate.main(["--ckpt", str(checkpoint), "--split", "test"] + dirs(tmp_path))
    assert json.loads((tmp_path / "outputs" / "eval" / "lenet.json").read_text())["model"] == "lenet"
    finetune.main(["--ckpt", str(checkpoint), "--epochs", "1"] + dirs(tmp_path))
    assert (tmp_path / "model_hub" / "fine_tuned" / "lenet_tuned.pth").is_file()
    transfer_mnist.main(["--ckpt", str(checkpoint), "--epochs", "1", "--data-dir", str(mnist_sample),
                         "--no-download"] + dirs(tmp_path))
    assert (tmp_path / "model_hub" / "transfer" / "lenet_mnist.pth").is_file()
    transfer_mnist.main(["--model", "lenet", "--from-scratch", "--epochs", "1", "--data-dir", str(mnist_sample),
                         "--no-download"] + dirs(tmp_path))
    assert (tmp_path / "model_hub" / "transfer" / "lenet_mnist_scratch.pth").is_file()
    message = exit_message(evaluate.main, ["--model", "alexnet", "--ckpt", str(checkpoint)] + dirs(tmp_path))
    assert "holds a lenet checkpoint, not alexnet" in message


# ----------------------------------------------------------------------------- flags

def help_text(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_each_script_accepts_only_its_flags_and_help_shows_real_defaults(tmp_path, capsys):
    modules = {"train.py": train, "search.py": search, "finetune.py": finetune, "evaluate.py": evaluate,
               "transfer_mnist.py": transfer_mnist, "demo.py": demo}
    helps = {script: help_text(module, capsys) for script, module in modules.items()}
    for script, text in helps.items():
        assert "default: None" not in text, script
        assert "--dry-run" in text or script == "demo.py", script
    for flag in ["--epochs", "--subset", "--batch-size", "--lr", "--resume", "--compile"]:
        assert flag not in helps["evaluate.py"], flag
    assert "--hub" not in helps["search.py"] and "--resume" not in helps["search.py"]
    pre_training, fine_tuning = (f"(default: {module.DEFAULTS['learning_rate']})" for module in (train, finetune))
    assert pre_training not in helps["finetune.py"] and fine_tuning in helps["finetune.py"]
    assert pre_training in helps["train.py"] and "--no-augment " not in helps["train.py"]
    for flag in ["--resume", "--dataset", "--patience", "--momentum"]:
        assert flag not in helps["transfer_mnist.py"], flag
    assert "--patience" not in helps["search.py"] and "--val-fraction" not in helps["train.py"]
    for script, text in helps.items():  # --help fits a screen
        assert len(text.splitlines()) <= 45, (script, len(text.splitlines()))
    line = one_line_error(run(ROOT / "search.py", *DIGITS, "--hub", "x", cwd=tmp_path))
    assert "unrecognized arguments: --hub" in line


SCRIPTS = ["train.py", "search.py", "finetune.py", "evaluate.py", "transfer_mnist.py", "demo.py",
           "results/emnist-byclass/carve.py", "benchmarks/throughput.py", "benchmarks/time_to_accuracy.py",
           "benchmarks/load_data.py", "benchmarks/demo_latency.py", "benchmarks/precision_accuracy.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_help_line_a_metavar_and_its_default_once_from_one_source(script, monkeypatch):
    class Captured(Exception):
        pass

    def capture(parser, *args, **kwargs):
        raise Captured(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(Captured) as captured:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    parser = captured.value.args[0]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        flag, raw = action.option_strings[0], action.help or ""
        assert raw.strip(), f"{script} {flag}: no help line"
        shown = formatter._expand_help(action)
        assert shown.count("default") <= 1, f"{script} {flag}: {shown}"
        if action.nargs != 0:  # a flag that takes a value names it: NAME, N, X, DIR, FILE
            assert action.metavar and action.metavar.isupper(), f"{script} {flag}: no metavar"
        if isinstance(action.default, (str, int, float)) and not isinstance(action.default, bool):
            assert f"(default: {action.default})" not in raw, f"{script} {flag}: write %(default)s, not the value again"
    assert "{" not in parser.format_usage(), f"{script}: choices belong in the help line, not the usage"


def test_evaluate_dry_run_writes_nothing(trained_lenet, tmp_path, capsys):
    _, checkpoint = trained_lenet
    evaluate.main(["--ckpt", str(checkpoint), "--dry-run"] + dirs(tmp_path))
    assert "dry run" in capsys.readouterr().out
    assert files_under(tmp_path) == []


def test_epochs_zero_is_refused_and_keeps_the_earlier_history(trained_lenet, capsys):
    workdir, _ = trained_lenet
    history = workdir / "outputs" / "train" / "lenet.json"
    before = history.read_bytes()
    line = refused(train.main, DIGITS + ["--epochs", "0"] + dirs(workdir), capsys)
    assert "--epochs" in line and "at least 1" in line
    assert history.read_bytes() == before


@pytest.mark.parametrize("script, flags, wanted", [
    ("train.py", ["--batch-size", "1"], "--batch-size"),
    ("train.py", ["--epochs", "-3"], "--epochs"),
    ("train.py", ["--lr", "0"], "--lr"),
    ("train.py", ["--lr", "nan"], "--lr"),
    ("train.py", ["--lr", "1e300"], "--lr"),
    ("train.py", ["--weight-decay", "1e300"], "--weight-decay"),
    ("train.py", ["--momentum", "1"], "--momentum"),
    ("evaluate.py", ["--ckpt", "x.pth", "--seed", "-1"], "--seed"),
    ("finetune.py", ["--patience", "3"], "--patience needs a validation set"),
    ("finetune.py", ["--lr", "0.001", "0.0001"], "needs a validation set"),
    ("train.py", ["--resume", "--params", "x.json"], "leave --params out"),
    ("train.py", ["--clip", "-1"], "--clip"),
    ("train.py", ["--seed", "-1"], "--seed"),
    ("train.py", ["--seed", str(2 ** 40)], "--seed"),
    ("train.py", ["--subset", "12"], "too small"),
    ("train.py", ["--subset", "999999"], "larger than"),
    ("train.py", ["--device", "cuda:7"], "--device"),
    ("train.py", ["--device", "toaster"], "--device"),
    ("finetune.py", ["--val-fraction", "1.5"], "--val-fraction"),
    ("search.py", ["--n-iter", "0"], "--n-iter"),
    ("search.py", ["--grid", '{"lr": [1]}'], "unknown keys"),
    ("search.py", ["--grid", "not json"], "not valid JSON"),
    ("evaluate.py", [], "--model"),
    ("evaluate.py", ["--model", "all", "--image", "x.png"], "give one --model"),
])
def test_values_that_cannot_work_are_refused_before_any_work(tmp_path, monkeypatch, capsys, script, flags, wanted):
    monkeypatch.chdir(tmp_path)
    base = DIGITS if script != "evaluate.py" else []
    modules = {"train.py": train, "finetune.py": finetune, "search.py": search, "evaluate.py": evaluate}
    line = refused(modules[script].main, base + flags + ["--no-download"] + dirs(tmp_path), capsys)
    assert wanted in line
    assert files_under(tmp_path) == []


def test_a_diverging_run_with_a_finite_loss_stops_without_saving(tmp_path):
    message = exit_message(train.main, DIGITS + ["--epochs", "3", "--lr", "1e6", "--weight-decay", "0", "--clip",
                                                 "0", "--momentum", "0"] + dirs(tmp_path))
    assert "diverged" in message
    assert not (tmp_path / "model_hub" / "pre_trained" / "lenet.pth").exists()


# ----------------------------------------------------------------------------- datasets

def test_datasets_are_a_registry_and_unknown_names_list_the_known_ones(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown dataset 'kmnist': choose one of .*emnist-byclass.*sklearn-digits"):
        load_images("kmnist", data_dir=tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "kmnist" / "k49-train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "kmnist" / "k49-train-labels-idx1-ubyte.gz", np.arange(30) % 3)
    monkeypatch.setitem(data.DATASETS, "kmnist", data.Dataset(("a", "b", "c"), ("k49-train", "k49-test"),
                                                              ("kmnist",)))
    loaded, labels = load_images("kmnist", data_dir=tmp_path, download=False)
    assert np.array_equal(loaded.numpy(), images) and labels.max() == 2
    with pytest.raises(DataError, match="k49-test-images"):  # its own names, never another dataset's files
        load_images("kmnist", train=False, data_dir=tmp_path, download=False)


def test_an_idx_pair_with_zero_images_is_one_line(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((0,), dtype=np.uint8))
    with pytest.raises(DataError, match="holds no images"):
        load_images("mnist", data_dir=tmp_path, download=False)


def test_a_replaced_data_file_with_an_older_mtime_is_read_again(tmp_path):
    first = np.full((5, 28, 28), 10, dtype=np.uint8)
    second = np.full((5, 28, 28), 200, dtype=np.uint8)
    images = write_idx(tmp_path / "train-images-idx3-ubyte", first, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5))
    old = images.stat().st_mtime
    assert load_images("mnist", data_dir=tmp_path, download=False)[0].max() == 10
    write_idx(images, second, compress=False)  # same size, same name
    os.utime(images, (old - 3600, old - 3600))  # as `cp -p` of an older file would leave it
    assert load_images("mnist", data_dir=tmp_path, download=False)[0].min() == 200
    assert len(list(tmp_path.glob("train-images-idx3-ubyte.*.npy"))) == 1  # the stale cache is gone


# ----------------------------------------------------------------------------- writes: atomic, locked, complete

def test_concurrent_json_writers_never_collide_and_readers_never_see_a_partial_file(tmp_path):
    path, errors = tmp_path / "out.json", []

    def writer(number):
        try:
            for step in range(40):
                write_json(path, {"writer": number, "step": step, "padding": "x" * 20000})
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if path.exists():
            assert json.loads(path.read_text())["padding"]  # never empty, never half
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_intact(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"kept": True})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as partial:
            partial.write_text('{"half": ')
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"kept": True} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_second_run_on_the_same_outputs_stops_with_one_line(tmp_path):
    best = tmp_path / "model_hub" / "pre_trained" / "lenet.pth"
    with output_lock(best):
        message = exit_message(train.main, DIGITS + ["--epochs", "1"] + dirs(tmp_path))
    assert "another run" in message and str(best) in message
    assert not best.exists()
    train.main(DIGITS + ["--epochs", "1"] + dirs(tmp_path))  # the lock is gone with its holder
    assert best.exists() and not list(tmp_path.rglob("*.lock"))


def test_evaluate_with_ckpt_alone_locks_the_networks_own_file(trained_lenet, tmp_path):
    _, checkpoint = trained_lenet
    with output_lock(tmp_path / "outputs" / "eval" / "lenet.json"):
        message = exit_message(evaluate.main, ["--ckpt", str(checkpoint), "--split", "test"] + dirs(tmp_path))
    assert "another run" in message and "lenet.json" in message


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train.main(DIGITS + ["--epochs", "1"] + dirs(tmp_path))
    best = tmp_path / "model_hub" / "pre_trained" / "lenet.pth"
    before = best.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(torch, "save", full)
    message = exit_message(train.main, DIGITS + ["--epochs", "1"] + dirs(tmp_path))
    assert "no space left" in message
    assert best.read_bytes() == before and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_unwritable_outputs_are_found_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    line = one_line_error(run(ROOT / "train.py", *DIGITS, "--outputs", tmp_path / "a_file" / "out",
                              "--hub", tmp_path / "hub", cwd=tmp_path))
    assert "a file in the way" in line
    assert not (tmp_path / "hub" / "pre_trained" / "lenet.pth").exists()


# ----------------------------------------------------------------------------- checkpoints

def damaged(tmp_path, trained_lenet, **changes):
    _, checkpoint = trained_lenet
    state = torch.load(checkpoint, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("changes, wanted", [
    ({"mean": None}, "lacks mean"),
    ({"dataset": "kmnist"}, "unknown dataset 'kmnist'"),
    ({"model": "resnet"}, "weights of another architecture"),
    ({"num_classes": 62, "classes": "0123456789" * 6 + "ab"}, "weights of another architecture"),
    ({"std": 0.0}, "normalisation std"),
])
def test_a_checkpoint_that_cannot_be_used_is_one_line(tmp_path, trained_lenet, changes, wanted):
    with pytest.raises(CheckpointError, match=wanted):
        load_checkpoint(damaged(tmp_path, trained_lenet, **changes), datasets=DATASETS)


@pytest.mark.slow
def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, trained_lenet):
    _, checkpoint = trained_lenet
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["fc.weight"][0, 0] = float("nan")
    path = damaged(tmp_path, trained_lenet, state_dict=state["state_dict"])
    line = one_line_error(run(ROOT / "evaluate.py", "--ckpt", path, *dirs(tmp_path), cwd=tmp_path))
    assert "NaN or infinite" in line


# ----------------------------------------------------------------------------- the process

def test_ctrl_c_while_the_modules_load_is_one_line_and_130(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *DIGITS], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # torch takes seconds to import
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in errors and errors.strip() == "interrupted"


@pytest.mark.slow
def test_ctrl_c_during_a_search_trial_keeps_the_finished_trials(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "search.py"), *DIGITS, "--epochs", "3", "--outputs",
                                str(tmp_path / "outputs")], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if "trial   2/" in line:
            process.send_signal(signal.SIGINT)
            break
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in errors
    saved = json.loads((tmp_path / "outputs" / "search" / "lenet.json").read_text())
    assert len(saved["trials"]) >= 2 and saved["complete"] is False
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.lock"))


@pytest.mark.slow
def test_kill_ends_a_run_like_ctrl_c_with_nothing_partial_left(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), *DIGITS, "--epochs", "200", *dirs(tmp_path)]
    returncode, output, errors = signal_at_epoch(command, tmp_path, signal.SIGTERM)
    assert returncode == 130 and "Traceback" not in errors and "continue with --resume" in output
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob(".*"))
    assert torch.load(tmp_path / "model_hub" / "pre_trained" / "lenet_unfinished_last.pth",
                      weights_only=True)["epoch"] >= 2


@pytest.mark.slow
def test_output_piped_into_head_ends_quietly(tmp_path):
    result = subprocess.run(f"{sys.executable} {ROOT / 'train.py'} {' '.join(DIGITS)} --dry-run | head -1",
                            shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("settings") and "Traceback" not in result.stderr and "Error" not in result.stderr


@pytest.mark.slow
def test_an_unusable_mplbackend_still_writes_the_pictures(tmp_path):
    result = run(ROOT / "train.py", *DIGITS, "--epochs", "1", *dirs(tmp_path), cwd=tmp_path,
                 env={"MPLBACKEND": "no-such-backend"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "outputs" / "train" / "lenet.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- evaluate.py

@pytest.mark.slow
def test_evaluate_all_skips_a_network_it_cannot_evaluate_and_still_compares(trained_lenet, trained_spinalnet,
                                                                            tmp_path, capsys):
    hub = tmp_path / "model_hub" / "pre_trained"
    hub.mkdir(parents=True)
    (hub / "lenet.pth").write_bytes(trained_lenet[1].read_bytes())
    (hub / "spinalnet.pth").write_bytes(trained_spinalnet.read_bytes())
    (hub / "resnet.pth").write_bytes(b"not a checkpoint")
    evaluate.main(["--model", "all", "--split", "test"] + dirs(tmp_path))
    out = capsys.readouterr().out
    assert "skipping resnet" in out and "skipping vggnet: no checkpoint" in out
    comparison = json.loads((tmp_path / "outputs" / "eval" / "comparison.json").read_text())
    assert list(comparison["models"]) == ["lenet", "spinalnet", "ensemble"]


@pytest.mark.slow
def test_evaluate_hints_fit_the_case(tmp_path, trained_lenet):
    _, checkpoint = trained_lenet
    path = damaged(tmp_path, trained_lenet, dataset="emnist-digits")
    line = one_line_error(run(ROOT / "evaluate.py", "--ckpt", path, "--data-dir", tmp_path / "none", "--no-download",
                              *dirs(tmp_path), cwd=tmp_path))
    assert "--split test" in line and "sklearn-digits" not in line


# ----------------------------------------------------------------------------- pictures as a viewer shows them

def drawing():
    """A black 7 on white paper, 120x160, as someone would draw it."""
    picture = Image.new("L", (120, 160), 255)
    pen = ImageDraw.Draw(picture)
    pen.line([(20, 25), (100, 25), (50, 140)], fill=0, width=12)
    return picture


def variants(folder):
    """The same drawing saved the ways real tools save pictures."""
    base, files = drawing(), {}
    inverted = Image.eval(base, lambda v: 255 - v)

    def save(name, picture, **options):
        files[name] = folder / name
        picture.save(files[name], **options)

    save("gray.png", base)
    save("rgb.png", base.convert("RGB"))
    save("quality.jpg", base.convert("RGB"), quality=90)
    save("cmyk.jpg", base.convert("CMYK"))
    save("palette.png", base.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=16))
    save("bilevel.png", base.convert("1"))
    rgba = Image.new("RGBA", base.size, (0, 0, 0, 0))  # ink on a transparent sheet, as drawing apps export
    rgba.putalpha(inverted)
    save("transparent.png", rgba)
    save("gray_alpha.png", Image.merge("LA", [Image.new("L", base.size, 0), inverted]))
    save("sixteen_bit.png", Image.fromarray(np.asarray(base, dtype=np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": the pixels are stored turned the other way
    save("rotated_exif.jpg", base.convert("RGB").transpose(Image.Transpose.ROTATE_90), exif=exif, quality=95)
    return files


def test_every_variant_of_a_picture_is_read_as_a_viewer_shows_it(tmp_path):
    files = variants(tmp_path)
    reference = evaluate.prepare_user_image(files["gray.png"]).float()
    for name, path in files.items():
        prepared = evaluate.prepare_user_image(path).float()
        correlation = torch.corrcoef(torch.stack([reference.flatten(), prepared.flatten()]))[0, 1]
        assert correlation > 0.95, f"{name}: {correlation:.3f}"


def test_the_same_drawing_gets_the_same_answer_in_every_variant(trained_lenet, tmp_path, capsys):
    _, checkpoint = trained_lenet
    files = variants(tmp_path)
    evaluate.main(["--ckpt", str(checkpoint), "--image", *map(str, files.values())])
    answers = [line.split(": ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines()
               if line.startswith(str(tmp_path))]
    assert len(answers) == len(files) and len(set(answers)) == 1


@pytest.mark.slow
def test_a_decompression_bomb_among_pictures_is_one_line_and_the_others_answered(trained_lenet, tmp_path,
                                                                                monkeypatch):
    _, checkpoint = trained_lenet
    files = variants(tmp_path)
    bomb = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000), 255).save(bomb, optimize=True)  # 144 megapixels, a few hundred KB
    result = run(ROOT / "evaluate.py", "--ckpt", checkpoint, "--image", files["gray.png"], bomb, files["rgb.png"],
                 cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "too many pixels to decode safely" in result.stderr
    assert sum(line.startswith(str(tmp_path)) for line in result.stdout.splitlines()) == 2


def test_resume_reads_checkpoints_that_stored_augment_as_true_or_false(tmp_path, capsys):
    """Checkpoints written before --augment took a recipe name hold True (the study's) or False."""
    train.main(DIGITS + ["--epochs", "1", "--batch-size", "32"] + dirs(tmp_path))
    last = tmp_path / "model_hub" / "pre_trained" / "lenet_last.pth"
    state = torch.load(last, weights_only=True)
    state["args"]["augment"] = False
    torch.save(state, last)
    assert "--augment study contradicts" in exit_message(
        train.main, ["--model", "lenet", "--resume", "--augment", "study", "--epochs", "2"] + dirs(tmp_path))
    capsys.readouterr()
    train.main(["--model", "lenet", "--resume", "--augment", "none", "--epochs", "2"] + dirs(tmp_path))
    assert "augment        none             flag" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["args"]["augment"] == "none"


def test_a_lock_taken_on_a_file_its_holder_deleted_meanwhile_is_taken_again_on_the_file_there(tmp_path,
                                                                                                monkeypatch):
    import fcntl

    output = tmp_path / "outputs" / "lenet.json"
    lock = tmp_path / "outputs" / "lenet.json.lock"
    real_flock, newcomer = fcntl.flock, []

    def flock_after_a_handover(handle, flags):
        if not newcomer:  # between our open and our flock: the holder lets go, a newcomer locks a new file
            lock.unlink()
            newcomer.append(os.open(lock, os.O_RDWR | os.O_CREAT))
            real_flock(newcomer[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_flock(handle, flags)

    lock.parent.mkdir()
    lock.touch()
    monkeypatch.setattr(fcntl, "flock", flock_after_a_handover)
    with pytest.raises(UserError, match="another run"):
        with output_lock(output):
            pass  # never reached: the newcomer holds the lock file that is there now
    monkeypatch.setattr(fcntl, "flock", real_flock)
    os.close(newcomer[0])
    with output_lock(output):  # free again: taken
        assert lock.is_file()
    assert not lock.exists()


def test_a_run_that_fails_before_writing_leaves_no_folder_and_no_lock(tmp_path, capsys):
    line = refused(train.main, ["--model", "lenet", "--dataset", "emnist-digits", "--data-dir", str(tmp_path / "no"),
                                "--no-download"] + dirs(tmp_path), capsys)
    assert "could not find" in line and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- publication is all or nothing

def published(folder, model="lenet"):
    """The run id of each published file of a pre-training in `folder`."""
    hub, outputs = folder / "model_hub" / "pre_trained", folder / "outputs" / "train"
    ids = {name: torch.load(hub / name, weights_only=True).get("run") for name in (f"{model}.pth", f"{model}_last.pth")}
    summary = json.loads((outputs / f"{model}.json").read_text())
    ids["json"] = summary["history"][-1]["elapsed"]  # one number per run: the JSON of which run
    return ids, (outputs / f"{model}.png").stat().st_mtime_ns


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace to place a signal at a given rename")
def test_a_signal_at_any_rename_publishes_all_of_the_run_or_none_of_it(tmp_path):
    """strace sends SIGINT at the N-th rename of a run that replaces a finished one, for every N: exit 130
    leaves every file of the old run, exit 0 every file of the new one; never a mixture."""
    command = [sys.executable, "train.py", *DIGITS, "--epochs", "1", "--hub", str(tmp_path / "model_hub"),
               "--outputs", str(tmp_path / "outputs")]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    outcomes = set()
    for n in range(1, 10):  # one epoch: 8 renames (2 checkpoints, JSON, curves, 4 published); 9: none hit
        old = published(tmp_path)
        result = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=rename",
                                 "-e", f"inject=rename:signal=SIGINT:when={n}", *command],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode in (0, 130), result.stderr
        now = published(tmp_path)
        if result.returncode == 130:
            assert now == old, n
        else:
            ids, _ = now
            assert ids["lenet.pth"] == ids["lenet_last.pth"] != old[0]["lenet.pth"] and now[1] != old[1], n
            assert ids["json"] != old[0]["json"], n
        outcomes.add(result.returncode)
        assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]
    assert outcomes == {0, 130}  # the signal landed both before and during publication


def test_committed_results_are_replaced_only_when_asked(trained_lenet, tmp_path, capsys):
    """--hub or --outputs that would replace a committed file under results/ is refused before any work;
    the studies' own scripts pass --update-results."""
    _, checkpoint = trained_lenet
    study = ROOT / "results" / "fashion-mnist" / "study"
    before = subprocess.run(["git", "status", "--porcelain", "--ignored", "results"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    line = refused(finetune.main, ["--ckpt", str(checkpoint), "--epochs", "1", "--hub", str(study / "model_hub"),
                                   "--outputs", str(tmp_path)], capsys)
    assert "is a committed result" in line and "--update-results" in line
    line = refused(evaluate.main, ["--model", "lenet", "--ckpt", str(checkpoint), "--dataset", "sklearn-digits",
                                   "--outputs", str(study / "outputs")], capsys)
    assert "is a committed result" in line
    after = subprocess.run(["git", "status", "--porcelain", "--ignored", "results"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before
    train.main(DIGITS + ["--epochs", "1"] + dirs(tmp_path))  # anywhere else: as before
    assert not runs.UPDATE_RESULTS["given"]
