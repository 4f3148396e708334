"""Bad input and faults a hostile tester tries: each gets one line and a non-zero exit (or the right
result), nothing wrong is reported as right, nothing stored is lost, nothing hangs."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import search
import train
from conftest import ROOT, exit_message, idx_bytes, one_line_error, refused, run, real_data, write_idx
from runs import DataError, output_lock

DIGITS = ["--model", "lenet", "--dataset", "sklearn-digits"]


def dirs(tmp_path):
    return ["--hub", str(tmp_path / "model_hub"), "--outputs", str(tmp_path / "outputs")]


# ----------------------------------------------------------------------------- numbers and JSON

@pytest.mark.parametrize("grid, wanted", [
    ('{"batch_size": [16.0]}', "batch_size is 16.0, not a whole number"),
    ('{"learning_rate": [1e300]}', "learning_rate must be a number above 0"),
    ('{"weight_decay": [1e300]}', "weight_decay must be a number from 0"),
    ('{"momentum": [1]}', "momentum must be at least 0 and below 1"),
    ('{"learning_rate": [true]}', "learning_rate is True, not a number"),
])
def test_grid_values_that_cannot_work_are_refused_before_any_work(tmp_path, capsys, grid, wanted):
    line = refused(search.main, DIGITS + ["--grid", grid, "--outputs", str(tmp_path / "out")], capsys)
    assert wanted in line and not (tmp_path / "out").exists()


def test_more_draws_than_the_grid_holds_is_the_whole_grid():
    grid = {"learning_rate": [0.01, 0.1], "batch_size": [16], "momentum": [0.9], "weight_decay": [0.0, 1e-4]}
    assert len(search.sample_configs(grid, 10 ** 9, 0)) == 4


@pytest.mark.parametrize("trials", [
    [{"params": {"learning_rate": 0.01}, "val_loss": "0.5"}],
    [{"params": [1, 2], "val_loss": 0.5}],
    "all of them",
])
def test_a_damaged_search_file_is_one_line_and_kept(tmp_path, trials):
    search.main(DIGITS + ["--n-iter", "2", "--epochs", "1", "--outputs", str(tmp_path / "out")])
    path = tmp_path / "out" / "search" / "lenet.json"
    damaged = dict(json.loads(path.read_text()), trials=trials)
    path.write_text(json.dumps(damaged))
    message = exit_message(search.main, DIGITS + ["--n-iter", "2", "--epochs", "1", "--outputs",
                                                  str(tmp_path / "out")])
    assert "no readable list of trials" in message and json.loads(path.read_text()) == damaged


@pytest.mark.parametrize("text", ["", '{"trials": [', "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000])
def test_a_truncated_or_absurdly_nested_json_is_one_line(tmp_path, capsys, text):
    path = tmp_path / "out" / "search" / "lenet.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    line = refused(search.main, DIGITS + ["--n-iter", "1", "--epochs", "1", "--outputs", str(tmp_path / "out")],
                   capsys)
    assert str(path) in line and path.read_text() == text


# ----------------------------------------------------------------------------- outputs in the way

@pytest.mark.parametrize("blocker", ["json_is_a_folder", "png_is_a_folder", "pth_is_a_folder", "lock_is_a_folder",
                                     "dangling_lock_link", "outputs_under_a_file"])
def test_anything_in_the_way_of_an_output_is_found_before_any_work(tmp_path, capsys, blocker):
    hub, outputs = tmp_path / "model_hub" / "pre_trained", tmp_path / "outputs" / "train"
    hub.mkdir(parents=True)
    outputs.mkdir(parents=True)
    if blocker == "json_is_a_folder":
        (outputs / "lenet.json").mkdir()
    elif blocker == "png_is_a_folder":
        (outputs / "lenet.png").mkdir()
    elif blocker == "pth_is_a_folder":
        (hub / "lenet.pth").mkdir()
    elif blocker == "lock_is_a_folder":
        (hub / "lenet.pth.lock").mkdir()
    elif blocker == "dangling_lock_link":
        (hub / "lenet.pth.lock").symlink_to(tmp_path / "nowhere")
    extra = ["--outputs", str(tmp_path / "a_file" / "out")] if blocker == "outputs_under_a_file" else []
    (tmp_path / "a_file").write_text("")
    line = refused(train.main, DIGITS + ["--epochs", "1"] + dirs(tmp_path) + extra, capsys)
    assert "move it" in line or "remove it" in line
    assert "epoch   1/" not in capsys.readouterr().out and not list(tmp_path.rglob("*.pth*.tmp"))
    assert not [path for path in hub.iterdir() if path.is_file() and path.suffix == ".pth"]


def test_a_benchmark_checks_its_out_before_measuring(tmp_path, capsys):
    from benchmarks import throughput

    (tmp_path / "result.json").mkdir()
    assert "result.json is a directory" in refused(throughput.main, ["--out", str(tmp_path / "result.json")], capsys)
    assert "matmul" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- the disk and the terminal

def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_finished_run(tmp_path, monkeypatch):
    train.main(DIGITS + ["--epochs", "1"] + dirs(tmp_path))
    finished = {path: path.read_bytes() for path in (tmp_path / "model_hub").rglob("*.pth")}

    def full(*args, **kwargs):  # what torch.save raises when the disk fills up in the middle of a checkpoint
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2240 vs 2136")

    monkeypatch.setattr(torch, "save", full)
    for resume in ([], ["--resume", "--epochs", "2"]):
        message = exit_message(train.main, DIGITS + ["--epochs", "1"][: 0 if resume else 2] + resume
                               + dirs(tmp_path))
        assert "no space left on the device" in message
    assert {path: path.read_bytes() for path in (tmp_path / "model_hub").rglob("*.pth")} == finished
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_a_closed_stdout_and_a_closed_pipe_end_quietly(tmp_path):
    closed = run(ROOT / "train.py", *DIGITS, "--dry-run", ">&-", cwd=tmp_path, shell=True)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr and "Error" not in closed.stderr
    piped = run(ROOT / "evaluate.py", "--help", "| head -1", cwd=tmp_path, shell=True)
    assert piped.stdout.startswith("usage:") and "Traceback" not in piped.stderr


@pytest.mark.slow
def test_two_ctrl_c_in_quick_succession_end_in_one_line(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), *DIGITS, "--epochs", "200", *dirs(tmp_path)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("epoch   2/"):
            process.send_signal(signal.SIGINT)
            time.sleep(0.015)
            process.send_signal(signal.SIGINT)
            break
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 130 and errors.strip() == "interrupted", errors


@pytest.mark.slow
def test_compile_without_a_c_compiler_is_one_line(tmp_path):
    env = {**os.environ, "CC": "/nonexistent/gcc", "CXX": "/nonexistent/g++"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *DIGITS, "--dry-run", "--compile"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert "needs a working C compiler" in one_line_error(result)


# ----------------------------------------------------------------------------- resume and checkpoints

@pytest.mark.parametrize("change", ["published", "epoch_as_text"])
def test_resuming_a_checkpoint_that_cannot_be_resumed_is_one_line(tmp_path, change):
    train.main(DIGITS + ["--epochs", "1"] + dirs(tmp_path))
    last = tmp_path / "model_hub" / "pre_trained" / "lenet_last.pth"
    state = torch.load(last, weights_only=True)
    if change == "published":
        del state["optimizer"]
    else:
        state["epoch"] = "1"
    torch.save(state, last)
    message = exit_message(train.main, DIGITS + ["--resume", "--epochs", "2"] + dirs(tmp_path))
    assert f"{last} cannot be resumed" in message


def test_a_checkpoint_on_another_dataset_is_refused_unless_meant(trained_lenet, tmp_path):
    _, checkpoint = trained_lenet
    message = exit_message(__import__("evaluate").main, ["--ckpt", str(checkpoint), "--dataset", "mnist",
                                                         "--data-dir", str(real_data())] + dirs(tmp_path))
    assert "was trained on sklearn-digits, not mnist" in message
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


# ----------------------------------------------------------------------------- training that trains nothing

def test_a_subset_too_small_to_train_is_refused_and_transfer_takes_its_subset(trained_lenet, mnist_sample, tmp_path):
    _, checkpoint = trained_lenet
    import finetune
    import transfer_mnist

    message = exit_message(finetune.main, ["--ckpt", str(checkpoint), "--subset", "1"] + dirs(tmp_path))
    assert "--subset 1 is too small" in message and not [path for path in tmp_path.rglob("*") if path.is_file()]
    transfer_mnist.main(["--ckpt", str(checkpoint), "--subset", "100", "--epochs", "1", "--data-dir",
                         str(mnist_sample), "--no-download"] + dirs(tmp_path))
    result = json.loads((tmp_path / "outputs" / "transfer" / "lenet.json").read_text())
    history = json.loads((tmp_path / "outputs" / "transfer" / "lenet_history.json").read_text())["history"]
    assert result["train_images"] == 100 and history[0]["images"] == 100


# ----------------------------------------------------------------------------- the data cache

@pytest.mark.parametrize("damage", ["bytes_overwritten", "other_labels"])
def test_a_cache_damaged_in_place_is_decoded_again(tmp_path, damage):
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    loaded, labels = data.load_images("mnist", data_dir=tmp_path, download=False)
    (cached_images,) = tmp_path.glob("train-images-idx3-ubyte.*.npy")
    (cached_labels,) = tmp_path.glob("train-labels-idx1-ubyte.*.npy")
    if damage == "bytes_overwritten":
        raw = bytearray(cached_images.read_bytes())
        raw[-500:-400] = bytes(100)
        cached_images.write_bytes(bytes(raw))
    else:  # a valid .npy, under the same name, holding other labels
        np.save(cached_labels, np.asarray((np.arange(50) + 1) % 10, dtype=np.uint8))
    again, again_labels = data.load_images("mnist", data_dir=tmp_path, download=False)
    assert np.array_equal(again.numpy(), images) and torch.equal(again_labels, labels)


@pytest.mark.parametrize("where", ["raw_file", "zip_member"])
def test_a_source_edited_in_place_with_its_size_and_time_kept_never_meets_its_old_cache(tmp_path, where):
    first = np.random.default_rng(0).integers(0, 256, (400, 28, 28), dtype=np.uint8)
    second = first.copy()
    second[153, 7, 15] ^= 0xFF  # one pixel, between the blocks a sampled signature would read
    if where == "raw_file":
        source = write_idx(tmp_path / "train-images-idx3-ubyte", first, compress=False)
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(400) % 10)
        load = lambda: data.load_images("mnist", data_dir=tmp_path, download=False)[0].numpy()  # noqa: E731
    else:
        source = tmp_path / data.EMNIST_ZIP
        names = [f"gzip/emnist-digits-train-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
        with zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(names[0], idx_bytes(first.transpose(0, 2, 1)))
            archive.writestr(names[1], idx_bytes(np.arange(400) % 10))
        load = lambda: data.load_images("emnist-digits", data_dir=tmp_path, download=False)[0].numpy()  # noqa: E731
    assert np.array_equal(load(), first)
    stat, raw = source.stat(), source.read_bytes()
    offset = raw.index(idx_bytes(first.transpose(0, 2, 1) if where == "zip_member" else first))
    edited = second.transpose(0, 2, 1) if where == "zip_member" else second
    with open(source, "r+b") as handle:  # in place: same inode, same size, then the old times put back
        handle.seek(offset)
        handle.write(idx_bytes(edited))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size and source.stat().st_mtime_ns == stat.st_mtime_ns
    if where == "raw_file":
        assert np.array_equal(load(), second)
    else:  # the member no longer matches the CRC its archive holds: refused, never the old images
        with pytest.raises(DataError, match="cannot be read"):
            load()


# ----------------------------------------------------------------------------- pictures

def test_pictures_that_cannot_hold_a_character_are_refused_in_one_line(trained_lenet, tmp_path):
    _, checkpoint = trained_lenet
    Image.new("L", (3, 3), 0).save(tmp_path / "tiny.png")
    os.mkfifo(tmp_path / "pipe.png")
    result = run(ROOT / "evaluate.py", "--ckpt", checkpoint, "--image", tmp_path / "tiny.png", tmp_path / "pipe.png",
                 tmp_path / "missing.png", cwd=tmp_path, timeout=60)
    errors = result.stderr.splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(errors) == 3
    assert "3x3 pixels, too small" in errors[0] and "not a regular file" in errors[1]
    assert "missing.png does not exist" in errors[2]


# ----------------------------------------------------------------------------- downloads

def test_a_data_dir_that_is_no_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for extra in ([], ["--no-download"]):
        line = refused(train.main, ["--model", "lenet", "--dataset", "mnist", "--data-dir", str(tmp_path / "a_file"),
                                    "--dry-run"] + extra, capsys)
        assert "a_file is not a folder" in line


def test_a_name_that_does_not_resolve_fails_at_once(tmp_path, monkeypatch):
    calls = []

    def unresolvable(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(data.urllib.request, "urlopen", unresolvable)
    monkeypatch.setattr(data, "DOWNLOAD_BACKOFF", 10.0)  # a retry would take seconds
    started = time.time()
    with pytest.raises(DataError, match="cannot be resolved"):
        data.load_images("emnist-digits", data_dir=tmp_path)
    assert len(calls) == 1 and time.time() - started < 5


# ----------------------------------------------------------------------------- several processes

@pytest.mark.slow
def test_torchrun_with_a_bad_setting_prints_one_line_from_one_rank(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29519", str(ROOT / "train.py"), *DIGITS, "--subset", "5", "--device",
                             "cpu", *dirs(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert result.stderr.count("error: --subset 5 is too small") == 1
    assert result.stdout.count("settings (value: source):") == 1
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29520", str(ROOT / "train.py"), *DIGITS, "--lr", "-1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode != 0 and result.stderr.count("argument --lr") == 1


def test_a_lock_held_elsewhere_is_one_line(tmp_path):
    with output_lock(tmp_path / "outputs" / "search" / "lenet.json"):
        message = exit_message(search.main, DIGITS + ["--n-iter", "1", "--outputs", str(tmp_path / "outputs")])
    assert "another run" in message


def test_a_dry_run_writes_no_cache_and_downloads_nothing(mnist_sample, tmp_path, capsys):
    import shutil

    shutil.copytree(mnist_sample / "MNIST", tmp_path / "data" / "MNIST")  # a writable folder: a cache could go there
    before = sorted(path.name for path in (tmp_path / "data").rglob("*"))
    train.main(["--model", "lenet", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--dry-run"]
               + dirs(tmp_path))
    assert sorted(path.name for path in (tmp_path / "data").rglob("*")) == before  # no .npy cache
    assert not (tmp_path / "model_hub").exists() and not (tmp_path / "outputs").exists()
    line = refused(train.main, ["--model", "lenet", "--dataset", "emnist-digits", "--data-dir",
                                str(tmp_path / "none"), "--dry-run"], capsys)
    assert "download disabled" in line and not (tmp_path / "none").exists()


@pytest.mark.parametrize("script, argv", [
    ("train", ["--model", "lenet", "--params", ""]),
    ("train", ["--model", "lenet", "--hub", " "]),
    ("train", ["--model", "lenet", "--outputs", ""]),
    ("train", ["--model", "lenet", "--data-dir", ""]),
    ("evaluate", ["--model", "all", "--ensemble-from-validation", ""]),
    ("evaluate", ["--model", "lenet", "--ensemble-from-validation", "model_hub"]),
    ("finetune", ["--ckpt", ""]),
    ("transfer_mnist", ["--ckpt", ""]),
    ("demo", ["--ckpt", ""]),
])
def test_an_empty_value_is_refused_never_taken_for_the_current_folder(script, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(__import__(script).main, argv, capsys)
    assert "error:" in line and "--help" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["train.py", "--help"]] + [  # a child process each: the others run with --slow
    pytest.param(command, marks=pytest.mark.slow) for command in (["evaluate.py", "--help"], ["demo.py", "--help"],
                                                                  ["results/fashion-mnist/table.py"],
                                                                  ["results/emnist-byclass/table.py"])])
def test_output_that_cannot_be_written_is_one_line_and_a_non_zero_exit(command):
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot write") and "No space left" in line


@pytest.mark.parametrize("key, value", [("std", 1e-300), ("std", 7.0), ("mean", -0.5), ("mean", True)])
def test_a_checkpoint_with_an_unusable_normalisation_is_refused_in_one_line(trained_lenet, tmp_path, key, value,
                                                                             capsys):
    import evaluate
    import torch

    _, checkpoint = trained_lenet
    state = torch.load(checkpoint, weights_only=True)
    state[key] = value
    edited = tmp_path / "lenet.pth"
    torch.save(state, edited)
    line = refused(evaluate.main, ["--ckpt", str(edited), "--split", "test"] + dirs(tmp_path), capsys)
    assert f"unusable normalisation {key}" in line and str(edited) in line


def test_the_demo_never_sends_nan_as_json(tmp_path):
    import threading
    import urllib.error
    import urllib.request

    import demo

    class Broken:
        networks = {}
        sources = {}

        def predict(self, body):
            return {"predictions": [{"label": "A", "probability": float("nan")}]}

    server = demo.make_server(Broken(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/predict", data=b"x", method="POST")
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code == 500 and "not finite" in json.loads(answer.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_path_the_terminal_cannot_show_never_fails_a_finished_run(tmp_path):
    folder = tmp_path / "résultats ✓"
    result = subprocess.run([sys.executable, "train.py", "--model", "lenet", "--dataset", "sklearn-digits", "--epochs",
                             "1", "--hub", str(folder / "hub"), "--outputs", str(folder / "out")], cwd=ROOT,
                            capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr[-500:]
    assert b"wrote" in result.stdout and (folder / "out" / "train" / "lenet.json").is_file()


@pytest.mark.parametrize("fields", [{"dataset": ["sklearn-digits"]}, {"dataset": {"a": 1}}, {"model": ["lenet"]},
                                    {"best_params": [0.1]}, {"best_params": {"learning_rate": "0.1"}},
                                    {"complete": "yes"}])
def test_a_params_file_with_fields_of_the_wrong_type_is_one_line(tmp_path, capsys, fields):
    params = {"learning_rate": 0.01, "batch_size": 16, "momentum": 0.9, "weight_decay": 0.0}
    result = {"model": "lenet", "dataset": "sklearn-digits", "complete": True, "dry_run": False,
              "best_params": {**params, **fields.pop("best_params", {})} if isinstance(fields.get("best_params"),
                                                                                      (dict, type(None))) else
              fields.pop("best_params"), **fields}
    (tmp_path / "search.json").write_text(json.dumps(result))
    line = refused(train.main, ["--model", "lenet", "--params", str(tmp_path / "search.json"), "--dry-run"], capsys)
    assert "--params" in line and "Traceback" not in line


def test_the_study_tables_say_in_one_line_which_file_is_damaged(tmp_path):
    shutil.copy(ROOT / "runs.py", tmp_path)  # what table.py imports, from the repository root above it
    for study in ("emnist-byclass", "fashion-mnist"):
        copy = tmp_path / "results" / study
        shutil.copytree(ROOT / "results" / study, copy)
        evaluated = next((copy / "study" / "outputs" / "eval").glob("*net.json"))
        payload = json.loads(evaluated.read_text())
        payload["test"]["accuracy"] = "high"
        evaluated.write_text(json.dumps(payload))
        result = subprocess.run([sys.executable, str(copy / "table.py")], capture_output=True, text=True)
        assert one_line_error(result).startswith("error: ") and "git checkout" in result.stderr
        evaluated.write_text("[1")
        result = subprocess.run([sys.executable, str(copy / "table.py")], capture_output=True, text=True)
        assert evaluated.name in one_line_error(result)


def test_running_out_of_memory_while_decoding_says_what_it_needs(tmp_path, monkeypatch):
    def exhausted(*_):
        raise MemoryError

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((50, 28, 28), dtype=np.uint8))  # never decoded
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    monkeypatch.setattr(data, "parse_idx", exhausted)
    with pytest.raises(data.DataError) as error:
        data.load_images("mnist", train=True, data_dir=tmp_path, download=False, cache=False)
    message = str(error.value)
    assert "out of memory" in message and "GiB" in message and "--subset" in message and "\n" not in message


def test_a_missing_or_unreadable_params_file_is_not_called_broken(tmp_path, capsys):
    line = refused(train.main, ["--model", "lenet", "--params", str(tmp_path / "none.json"), "--dry-run"], capsys)
    assert "no file" in line and "delete" not in line
    if os.geteuid() != 0:  # root reads any file
        (tmp_path / "locked.json").write_text("{}")
        (tmp_path / "locked.json").chmod(0)
        line = refused(train.main, ["--model", "lenet", "--params", str(tmp_path / "locked.json"), "--dry-run"], capsys)
        assert "cannot be read" in line and "delete" not in line
