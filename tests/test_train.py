import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import finetune
import search
import train
from conftest import ROOT, refused, signal_at_epoch
from models import CheckpointError, build_model, load_checkpoint

DIGITS = ["--model", "lenet", "--dataset", "sklearn-digits"]


def dirs(tmp_path):
    return ["--hub", str(tmp_path / "model_hub"), "--outputs", str(tmp_path / "outputs")]


def test_short_real_run_writes_a_reloadable_checkpoint_and_history(trained_lenet):
    workdir, checkpoint = trained_lenet
    state = torch.load(checkpoint, weights_only=True)
    assert state["model"] == "lenet" and state["num_classes"] == 10 and state["dataset"] == "sklearn-digits"
    assert 0 < state["mean"] < 1 and 0 < state["std"] < 1
    model = build_model(state["model"], state["num_classes"])
    model.load_state_dict(state["state_dict"])  # no module./_orig_mod. prefixes
    summary = json.loads((workdir / "outputs" / "train" / "lenet.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == list(range(1, 9))
    assert summary["best_val_acc"] > 0.8  # chance is 0.1
    assert summary["best_val_loss"] == min(row["val_loss"] for row in summary["history"])
    assert state["epoch"] == summary["best_epoch"]
    assert (workdir / "outputs" / "train" / "lenet.png").stat().st_size > 10_000
    assert (workdir / "model_hub" / "pre_trained" / "lenet_last.pth").is_file()


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.main(DIGITS + ["--epochs", "3"] + dirs(straight))
    train.main(DIGITS + ["--epochs", "2"] + dirs(stopped))  # as if stopped after epoch 2
    train.main(DIGITS + ["--epochs", "3", "--resume"] + dirs(stopped))
    rows = [json.loads((folder / "outputs" / "train" / "lenet.json").read_text())["history"]
            for folder in (straight, stopped)]
    assert [row["epoch"] for row in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    torch.load(stopped / "model_hub" / "pre_trained" / "lenet_last.pth", weights_only=True)


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, capsys):
    last = tmp_path / "model_hub" / "pre_trained" / "lenet_last.pth"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        train.main(DIGITS + ["--epochs", "2", "--resume"] + dirs(tmp_path))
    assert "lenet_last.pth is not a readable checkpoint" in str(exit_info.value)
    assert "\n" not in str(exit_info.value)


def test_checkpoint_of_another_model_is_refused(trained_lenet):
    _, checkpoint = trained_lenet
    with pytest.raises(CheckpointError, match="holds a lenet checkpoint, not vggnet"):
        load_checkpoint(checkpoint, "vggnet")


def test_diverging_loss_stops_without_saving(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(DIGITS + ["--epochs", "2", "--lr", "1e6", "--clip", "0"] + dirs(tmp_path))
    assert "training loss diverged" in str(exit_info.value)
    assert not (tmp_path / "model_hub" / "pre_trained" / "lenet.pth").exists()


def test_search_writes_best_params_from_the_grid_and_train_uses_them(tmp_path, capsys):
    search.main(DIGITS + ["--n-iter", "2", "--epochs", "1", "--outputs", str(tmp_path / "outputs")])
    path = tmp_path / "outputs" / "search" / "lenet.json"
    result = json.loads(path.read_text())
    assert len(result["trials"]) == 2
    assert result["best_val_loss"] == min(trial["val_loss"] for trial in result["trials"])
    for key, value in result["best_params"].items():
        assert value in search.GRID[key]
    assert f"python train.py --model lenet --params {path}" in capsys.readouterr().out
    train.main(["--model", "lenet", "--params", str(path), "--epochs", "1"] + dirs(tmp_path))
    args = torch.load(tmp_path / "model_hub" / "pre_trained" / "lenet.pth", weights_only=True)["args"]
    for key, value in result["best_params"].items():
        assert args[key] == value
    out = capsys.readouterr().out
    assert "learning_rate  " in out and str(tmp_path / "outputs" / "search" / "lenet.json") in out


def test_search_resumes_after_an_interruption(tmp_path):
    search.main(DIGITS + ["--n-iter", "3", "--epochs", "1", "--outputs", str(tmp_path / "outputs")])
    path = tmp_path / "outputs" / "search" / "lenet.json"
    complete = json.loads(path.read_text())
    partial = dict(complete, trials=complete["trials"][:1], complete=False)
    path.write_text(json.dumps(partial))
    search.main(DIGITS + ["--n-iter", "3", "--epochs", "1", "--outputs", str(tmp_path / "outputs")])
    resumed = json.loads(path.read_text())
    assert [t["params"] for t in resumed["trials"]] == [t["params"] for t in complete["trials"]]
    assert resumed["trials"][0] == complete["trials"][0]  # kept, not re-run


def test_finetune_writes_the_tuned_checkpoint_and_refuses_other_data(trained_lenet, tmp_path):
    workdir, checkpoint = trained_lenet
    finetune.main(["--model", "lenet", "--ckpt", str(checkpoint), "--epochs", "2"] + dirs(tmp_path))
    tuned = torch.load(tmp_path / "model_hub" / "fine_tuned" / "lenet_tuned.pth", weights_only=True)
    pretrained = torch.load(checkpoint, weights_only=True)
    assert tuned["dataset"] == "sklearn-digits" and tuned["epoch"] == 2
    assert tuned["mean"] == pretrained["mean"]  # the checkpoint's normalisation is kept
    assert not torch.equal(tuned["state_dict"]["fc.weight"], pretrained["state_dict"]["fc.weight"])
    history = json.loads((tmp_path / "outputs" / "finetune" / "lenet.json").read_text())["history"]
    assert len(history) == 2 and history[0]["val_loss"] is None
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--model", "lenet", "--ckpt", str(checkpoint), "--dataset", "emnist-byclass"] + dirs(tmp_path))
    assert "--replace-head" in str(exit_info.value)


def run_script(*args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_dry_run_smoke_test(tmp_path):
    result = run_script(str(ROOT / "train.py"), *DIGITS, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epoch   1/" in result.stdout and "dry run finished" in result.stdout
    assert not (tmp_path / "model_hub").exists()


@pytest.mark.slow
def test_missing_emnist_gives_one_line_without_traceback(tmp_path):
    result = run_script(str(ROOT / "train.py"), "--model", "alexnet", "--data-dir", str(tmp_path / "data"),
                        "--no-download", "--dry-run", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "emnist-byclass-train-images-idx3-ubyte.gz" in result.stderr and "sklearn-digits" in result.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        str(ROOT / "train.py"), *DIGITS, "--epochs", "1", "--device", "cpu", *dirs(tmp_path),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 2" in result.stdout
    assert result.stdout.count("epoch   1/1") == 1  # rank 0 alone logs
    state = torch.load(tmp_path / "model_hub" / "pre_trained" / "lenet.pth", weights_only=True)
    build_model("lenet", 10).load_state_dict(state["state_dict"])
    # each rank trained on its own half: together they covered the 1,293 training images once
    history = json.loads((tmp_path / "outputs" / "train" / "lenet.json").read_text())["history"]
    assert history[0]["images"] == 1292  # cut to an even count so both ranks take the same steps


def test_amp_and_channels_last_paths_run_on_cpu(tmp_path, capsys):
    train.main(["--model", "resnet", "--dataset", "sklearn-digits", "--dry-run", "--precision", "bf16"]
               + dirs(tmp_path))
    out = capsys.readouterr().out
    assert "precision: bf16 + channels_last (asked for with --precision bf16)" in out
    assert "epoch   1/20 | train loss" in out and "nan" not in out.split("epoch   1/20")[1]
    assert not (tmp_path / "model_hub").exists()


@pytest.mark.slow
def test_search_under_torchrun_spreads_and_gathers_the_trials(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                        str(ROOT / "search.py"), *DIGITS, "--n-iter", "3", "--epochs", "1", "--device", "cpu",
                        "--outputs", str(tmp_path / "outputs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    gathered = json.loads((tmp_path / "outputs" / "search" / "lenet.json").read_text())
    expected = search.sample_configs(search.GRID, 3, 0)
    assert sorted(search.config_key(t["params"]) for t in gathered["trials"]) == \
        sorted(search.config_key(p) for p in expected)
    assert result.stdout.count("lenet trial") == 3  # rank 0 alone logs, once per trial


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_and_resume_finishes(tmp_path):
    import signal

    command = [sys.executable, str(ROOT / "train.py"), *DIGITS, "--epochs", "200", *dirs(tmp_path)]
    returncode, output, errors = signal_at_epoch(command, tmp_path, signal.SIGINT)
    assert returncode == 130, errors[-1000:]
    assert "continue with --resume" in output
    last = torch.load(tmp_path / "model_hub" / "pre_trained" / "lenet_unfinished_last.pth", weights_only=True)
    assert 2 <= last["epoch"] < 200 and len(last["history"]) == last["epoch"]
    train.main(DIGITS + ["--epochs", str(last["epoch"] + 1), "--resume"] + dirs(tmp_path))
    history = json.loads((tmp_path / "outputs" / "train" / "lenet.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(1, last["epoch"] + 2))
    assert not list((tmp_path / "model_hub").rglob("*unfinished*"))  # published under the finished names


@pytest.mark.slow
def test_a_cancelled_fresh_run_never_replaces_a_finished_one(tmp_path):
    import signal

    train.main(DIGITS + ["--epochs", "2"] + dirs(tmp_path))
    finished = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    command = [sys.executable, str(ROOT / "train.py"), *DIGITS, "--epochs", "200", "--lr", "0.02", *dirs(tmp_path)]
    returncode, _, errors = signal_at_epoch(command, tmp_path, signal.SIGINT, epoch=1)
    assert returncode == 130, errors[-1000:]
    assert all(path.read_bytes() == content for path, content in finished.items())
    unfinished = torch.load(tmp_path / "model_hub" / "pre_trained" / "lenet_unfinished_last.pth", weights_only=True)
    assert unfinished["args"]["learning_rate"] == 0.02  # kept for --resume, beside the finished run
    with pytest.raises(SystemExit):  # a failed fresh run (diverged) leaves them alone too
        train.main(DIGITS + ["--epochs", "3", "--lr", "1e5", "--clip", "0"] + dirs(tmp_path))
    assert all(path.read_bytes() == content for path, content in finished.items())


def test_one_copy_of_the_epochs_affines_trains_exactly_as_one_draw_per_step():
    """epoch_affines moves the augmentation parameters to the device once per epoch: the numbers
    (and so the trained weights) must be those of drawing them on the CPU at every step."""
    import torch.nn.functional as F
    from data import augment, iterate_batches
    from runs import choose_precision

    torch.manual_seed(0)
    images = torch.randint(0, 256, (70, 28, 28), dtype=torch.uint8)  # 70 = 4 batches of 16 and one of 6
    labels = torch.arange(70) % 10
    data = {"train": (images, labels), "mean": 0.3, "std": 0.3, "classes": 10}
    settings = dict(train.DEFAULTS, batch_size=16)
    fp32 = choose_precision("fp32", torch.device("cpu"))

    def fresh():
        torch.manual_seed(1)
        model = build_model("lenet", 10)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, optimizer = fresh()
    train.train_one_epoch(model, optimizer, data, settings, fp32, torch.Generator().manual_seed(5), 1)
    reference, reference_optimizer = fresh()
    reference.train()
    generator = torch.Generator().manual_seed(5)
    for batch, target in iterate_batches(images, labels, 16, shuffle=True, generator=generator):
        loss = F.cross_entropy(reference(augment(batch, 0.3, 0.3, generator)), target)
        reference_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        reference_optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    untrained, _ = fresh()
    assert any(not torch.equal(value, untrained.state_dict()[name]) for name, value in model.state_dict().items())


def test_each_augment_recipe_trains_differently_and_is_recorded(tmp_path, capsys):
    weights = {}
    for recipe in ["study", "shift-flip", "none"]:
        train.main(DIGITS + ["--epochs", "1", "--batch-size", "64", "--augment", recipe] + dirs(tmp_path / recipe))
        state = torch.load(tmp_path / recipe / "model_hub" / "pre_trained" / "lenet.pth", weights_only=True)
        assert state["args"]["augment"] == recipe
        weights[recipe] = state["state_dict"]["fc.weight"]
    assert not torch.equal(weights["study"], weights["shift-flip"])
    assert not torch.equal(weights["shift-flip"], weights["none"])
    assert "augment        shift-flip       flag" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        train.main(DIGITS + ["--augment", "flips", "--dry-run"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "invalid choice: 'flips'" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("make_optimizer", [lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
                                            lambda params: torch.optim.Adam(params, lr=1e-3)])
def test_a_resumed_optimizer_state_follows_the_model_to_its_device(make_optimizer):
    """Resuming loads the optimizer state on the CPU before prepare_model moves the model; on a
    GPU the first step then failed with tensors on two devices. With no GPU here, a change of
    dtype made after the state was loaded stands in for the move: prepare_model must cast the
    state to whatever its parameters became."""
    from runs import Precision

    model = build_model("lenet", 10)
    optimizer = make_optimizer(model.parameters())
    model(torch.rand(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    resumed_model = build_model("lenet", 10)
    resumed = make_optimizer(resumed_model.parameters())
    resumed.load_state_dict(optimizer.state_dict())
    resumed_model.double()  # the parameters change after the state was loaded, as a move to a GPU does
    moved = train.prepare_model(resumed_model, torch.device("cpu"), Precision(False, False, "test"), 1, False,
                                resumed)
    states = [resumed.state[param] for param in moved.parameters()]
    buffers = [value for state in states for key, value in state.items() if key != "step"]
    assert len(buffers) >= len(states) == 14 and all(buffer.dtype == torch.float64 for buffer in buffers)


def test_the_cosine_schedule_anneals_from_lr_to_zero_step_by_step():
    cosine = {"schedule": "cosine", "learning_rate": 0.1, "epochs": 4}
    rates = [train.scheduled_lr(cosine, epoch, step, 10) for epoch in range(1, 5) for step in range(10)]
    assert rates[0] == pytest.approx(0.1) and rates[20] == pytest.approx(0.05)  # the start and halfway
    assert all(earlier > later for earlier, later in zip(rates, rates[1:]))
    assert 0 < rates[-1] < 1e-3
    constant = {"schedule": "constant", "learning_rate": 0.1, "epochs": 4}
    assert {train.scheduled_lr(constant, epoch, step, 10) for epoch in range(1, 5) for step in range(10)} == {0.1}


@pytest.mark.slow
def test_a_cosine_run_interrupted_and_resumed_repeats_an_uninterrupted_one(tmp_path, capsys):
    import signal

    cosine = DIGITS + ["--lr", "0.05", "--schedule", "cosine"]
    train.main(cosine + ["--epochs", "6"] + dirs(tmp_path / "straight"))
    straight = json.loads((tmp_path / "straight" / "outputs" / "train" / "lenet.json").read_text())["history"]
    rates = [row["lr"] for row in straight]
    assert all(earlier > later for earlier, later in zip(rates, rates[1:])) and rates[-1] < 0.05 / 100
    train.main(DIGITS + ["--lr", "0.05", "--epochs", "6"] + dirs(tmp_path / "constant"))
    constant = json.loads((tmp_path / "constant" / "outputs" / "train" / "lenet.json").read_text())["history"]
    assert {row["lr"] for row in constant} == {0.05} and constant[-1]["train_loss"] != straight[-1]["train_loss"]

    stopped = tmp_path / "stopped"
    command = [sys.executable, str(ROOT / "train.py"), *cosine, "--epochs", "6", *dirs(stopped)]
    returncode, _, errors = signal_at_epoch(command, tmp_path, signal.SIGINT)
    assert returncode == 130, errors[-1000:]
    last = stopped / "model_hub" / "pre_trained" / "lenet_unfinished_last.pth"
    assert 2 <= torch.load(last, weights_only=True)["epoch"] < 6
    for flags, wanted in [(["--schedule", "constant"], "--schedule constant contradicts"),
                          (["--epochs", "8"], "its cosine schedule was planned over 6 epochs")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--model", "lenet", "--resume"] + flags + dirs(stopped))
        assert wanted in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
    capsys.readouterr()
    train.main(["--model", "lenet", "--resume"] + dirs(stopped))  # its own 6 epochs, its own schedule
    out = capsys.readouterr().out
    assert f"epochs         6                resumed run {last}" in out
    assert f"schedule       cosine           resumed run {last}" in out
    resumed = json.loads((stopped / "outputs" / "train" / "lenet.json").read_text())["history"]
    assert [row["epoch"] for row in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert a["lr"] == pytest.approx(b["lr"]) and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_fine_tuning_follows_its_own_schedule(trained_lenet, tmp_path):
    _, checkpoint = trained_lenet
    finetune.main(["--ckpt", str(checkpoint), "--epochs", "3", "--schedule", "cosine"] + dirs(tmp_path))
    history = json.loads((tmp_path / "outputs" / "finetune" / "lenet.json").read_text())["history"]
    rates = [row["lr"] for row in history]
    assert rates[0] < finetune.DEFAULTS["learning_rate"] and all(a > b for a, b in zip(rates, rates[1:]))
    state = torch.load(tmp_path / "model_hub" / "fine_tuned" / "lenet_tuned.pth", weights_only=True)
    assert state["args"]["schedule"] == "cosine"


@pytest.mark.parametrize("schedule, epochs_run", [("constant", 2), ("cosine", 3)])
def test_early_stopping_never_cuts_a_cosine_schedule_short(tmp_path, monkeypatch, schedule, epochs_run):
    losses = iter([0.5, 0.6, 0.7])  # validation never improves after epoch 1
    monkeypatch.setattr(train, "evaluate_loss_acc", lambda *args, **kwargs: {"loss": next(losses), "acc": 0.5})
    train.main(DIGITS + ["--epochs", "3", "--schedule", schedule, "--subset", "200"] + dirs(tmp_path)
               + (["--patience", "1"] if schedule == "constant" else []))
    result = json.loads((tmp_path / "outputs" / "train" / "lenet.json").read_text())
    assert len(result["history"]) == epochs_run and result["best_epoch"] == 1
    first, last = result["history"][0]["lr"], result["history"][-1]["lr"]
    assert last < first / 10 if schedule == "cosine" else last == first  # annealed to its last step


def test_patience_with_a_cosine_schedule_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(DIGITS + ["--schedule", "cosine", "--patience", "3"] + dirs(tmp_path))
    message = str(stop.value.code)  # one_line_errors exits with the one line
    assert message.startswith("error: --patience 3") and len(message.splitlines()) == 1
    assert "a cosine schedule runs all its --epochs" in message
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # nothing written


def test_fine_tuning_chooses_its_rate_on_validation_and_keeps_that_run(trained_lenet, tmp_path):
    _, checkpoint = trained_lenet
    finetune.main(["--ckpt", str(checkpoint), "--epochs", "2", "--val-fraction", "0.1", "--lr", "0.002", "1e-6"]
                  + dirs(tmp_path))
    rates = json.loads((tmp_path / "outputs" / "finetune" / "lenet_rates.json").read_text())
    assert [row["learning_rate"] for row in rates["rates"]] == [0.002, 1e-6]
    best = max(rates["rates"], key=lambda row: (row["val_acc"], -row["val_loss"]))
    assert rates["chosen"] == best["learning_rate"]
    tuned = torch.load(tmp_path / "model_hub" / "fine_tuned" / "lenet_tuned.pth", weights_only=True)
    history = json.loads((tmp_path / "outputs" / "finetune" / "lenet.json").read_text())
    assert tuned["args"]["learning_rate"] == history["args"]["learning_rate"] == rates["chosen"]
    assert history["best_val_acc"] == best["val_acc"] and len(history["history"]) == 2
    assert sorted(path.name for path in (tmp_path / "model_hub" / "fine_tuned").iterdir()) == [
        "lenet_tuned.pth", "lenet_tuned_last.pth"]  # the other rate's files are gone


def test_fine_tuning_on_every_image_resumes_as_if_never_stopped(trained_lenet, tmp_path):
    """Without --val-fraction a fine-tuning holds out nothing (its args say 0.0): --resume continues it
    and ends with the weights of a run that was never stopped."""
    flags = ["--ckpt", str(trained_lenet[1]), "--lr", "0.002"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finetune.main(flags + ["--epochs", "2"] + dirs(straight))
    finetune.main(flags + ["--epochs", "1"] + dirs(stopped))
    finetune.main(flags + ["--epochs", "2", "--resume"] + dirs(stopped))
    weights = [torch.load(folder / "model_hub" / "fine_tuned" / "lenet_tuned.pth", weights_only=True)["state_dict"]
               for folder in (straight, stopped)]
    assert weights[1].keys() == weights[0].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    history = json.loads((stopped / "outputs" / "finetune" / "lenet.json").read_text())
    assert history["args"]["val_fraction"] == 0.0 and [row["epoch"] for row in history["history"]] == [1, 2]


RATE_CHOICE = ["--epochs", "2", "--val-fraction", "0.1", "--lr", "0.002", "1e-6"]


@pytest.fixture(scope="module")
def unstopped_rate_choice(trained_lenet, tmp_path_factory):
    """The rates JSON of a rate choice that ran without a stop."""
    folder = tmp_path_factory.mktemp("unstopped")
    finetune.main(["--ckpt", str(trained_lenet[1]), *RATE_CHOICE] + dirs(folder))
    return json.loads((folder / "outputs" / "finetune" / "lenet_rates.json").read_text())


@pytest.mark.parametrize("second", ["resumed", "an older run's"])
def test_a_stopped_rate_choice_resumes_each_rate_where_it_stopped(trained_lenet, unstopped_rate_choice, tmp_path,
                                                                  capsys, second):
    """Stopped in the second rate's first epoch: --resume keeps the first rate's finished run, continues
    the second (or, when its files are another run's, trains it anew) and chooses as an unstopped run did."""
    flags = ["--ckpt", str(trained_lenet[1]), *RATE_CHOICE]
    assert "nothing to resume" in refused(finetune.main, flags + ["--resume"] + dirs(tmp_path), capsys)
    process = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *flags, *dirs(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = 0
    for line in process.stdout:
        seen += line.startswith("epoch   1/2")
        if seen == 2:  # the second rate's first epoch
            process.send_signal(signal.SIGINT)
            break
    process.communicate(timeout=120)
    assert process.returncode == 130
    hub = tmp_path / "model_hub" / "fine_tuned"
    assert not (tmp_path / "outputs" / "finetune" / "lenet_rates.json").exists()
    if second != "resumed":
        state = torch.load(hub / "lenet_tuned_unfinished_last_lr1e-06.pth", weights_only=True)
        torch.save(dict(state, run="an older run"), hub / "lenet_tuned_unfinished_last_lr1e-06.pth")
    capsys.readouterr()
    finetune.main(flags + ["--resume"] + dirs(tmp_path))
    out = capsys.readouterr().out
    assert f"resuming {hub / 'lenet_tuned_unfinished_last_lr0.002.pth'} after epoch 2" in out
    assert (f"resuming {hub / 'lenet_tuned_unfinished_last_lr1e-06.pth'} after epoch 1" in out) == (second == "resumed")
    assert out.count("epoch   2/2") == 1 and out.count("epoch   1/2") == (second != "resumed")
    result = json.loads((tmp_path / "outputs" / "finetune" / "lenet_rates.json").read_text())
    assert result["chosen"] == unstopped_rate_choice["chosen"]
    for a, b in zip(result["rates"], unstopped_rate_choice["rates"], strict=True):
        assert a["best_epoch"] == b["best_epoch"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert sorted(path.name for path in hub.iterdir()) == ["lenet_tuned.pth", "lenet_tuned_last.pth"]


@pytest.mark.parametrize("schedule, patience, stopped", [("constant", 2, True), ("constant", 3, False),
                                                        ("constant", 0, False), ("cosine", 2, False)])
def test_a_rate_that_stopped_early_is_not_trained_further_on_resume(schedule, patience, stopped):
    history = [{"epoch": epoch, "val_loss": loss, "val_acc": 0.5} for epoch, loss in enumerate([0.4, 0.5, 0.6], 1)]
    assert train.stops_early(history, {"schedule": schedule, "patience": patience}) == stopped


def test_help_names_every_augmentation_and_how_search_subsets_combine(capsys):
    import search
    from data import AUGMENTS

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in AUGMENTS)
    with pytest.raises(SystemExit):
        search.parse_args(["--help"])
    assert "or of its --subset N images when given" in " ".join(capsys.readouterr().out.split())


def test_curves_mark_the_kept_epoch_and_an_early_stop_on_whole_epochs(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(train, "save_figure", lambda figure, path: figures.append(figure))
    history = [dict(epoch=e, train_loss=1 / e, train_acc=0.5, val_loss=1 / e, val_acc=0.5) for e in range(1, 8)]
    train.plot_history(history, tmp_path / "curves.png", "lenet", kept=5, planned=20)
    for axis in figures[0].axes:
        labels = [text.get_text() for text in axis.get_legend().get_texts()]
        assert "kept: epoch 5" in labels and "early stop (7 of 20)" in labels
        assert all(float(tick).is_integer() for tick in axis.get_xticks())
    train.plot_history(history, tmp_path / "curves.png", "lenet", kept=7, planned=7)  # ran all its epochs
    assert not any("early stop" in text.get_text() for text in figures[1].axes[0].get_legend().get_texts())


def test_a_new_setting_is_one_row(monkeypatch):
    """The README's recipe: one row in SETTINGS gives a flag with its help and default, a type check for
    the flag and for the same value read from a file, and a place in the settings a run prints."""
    monkeypatch.setitem(train.SETTINGS, "label_smoothing",
                        train.Setting(0.0, "--label-smoothing", train.non_negative_float, "label smoothing"))
    defaults = {**train.DEFAULTS, "label_smoothing": 0.0}
    parser = train.Parser()
    train.add_setting_flags(parser, defaults)
    assert "label smoothing (default: 0.0)" in parser.format_help().replace("\n", " ").replace("  ", " ")
    args = parser.parse_args(["--label-smoothing", "0.1"])
    lines = []
    assert train.resolve_settings(args, defaults, [], lines.append)["label_smoothing"] == 0.1
    assert any("label_smoothing" in line and "flag" in line for line in lines)
    with pytest.raises(SystemExit):
        parser.parse_args(["--label-smoothing", "-1"])
    with pytest.raises(train.UserError, match="label_smoothing is '0.1', not a number"):
        train.check_setting("label_smoothing", "0.1", "checkpoint")


def test_every_stage_makes_its_optimizer_in_one_place(tmp_path, monkeypatch):
    """Pre-training, the search, fine-tuning and transfer all call train.build_optimizer, so a forker who
    changes it changes every stage."""
    made = []
    original = train.build_optimizer

    def recording(model, settings):
        made.append(settings["optimizer"])
        return original(model, settings)

    monkeypatch.setattr(train, "build_optimizer", recording)
    search.main(DIGITS + ["--n-iter", "1", "--epochs", "1", "--dry-run"])
    assert made == ["sgd"]
    train.main(DIGITS + ["--epochs", "1"] + dirs(tmp_path))
    finetune.main(DIGITS + ["--epochs", "1", "--no-download"] + dirs(tmp_path))
    assert made == ["sgd", "sgd", "adam"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished two-epoch LeNet run on sklearn-digits (copy it before changing it)."""
    folder = tmp_path_factory.mktemp("two_epochs")
    train.main(DIGITS + ["--epochs", "2"] + dirs(folder))
    return folder


def test_an_unfinished_pair_of_two_runs_is_never_resumed(tmp_path, capsys, two_epochs):
    """Run A stops unfinished; run B stops between its two first saves, leaving its best beside A's last:
    --resume refuses the pair in one line instead of publishing B's best as A's."""
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    hub = tmp_path / "model_hub" / "pre_trained"
    for name in ("lenet.pth", "lenet_last.pth"):  # A's checkpoints, as an unfinished run leaves them
        (hub / name).rename(hub / name.replace("lenet", "lenet_unfinished"))
    other = torch.load(hub / "lenet_unfinished.pth", weights_only=True)
    torch.save(dict(other, run="another run"), hub / "lenet_unfinished.pth")  # B's first save
    assert "belong to two different runs" in refused(train.main, DIGITS + ["--epochs", "3", "--resume"]
                                                     + dirs(tmp_path), capsys)
    assert not (hub / "lenet.pth").exists()
    torch.save(dict(other), hub / "lenet_unfinished.pth")  # the pair of one run resumes
    train.main(DIGITS + ["--epochs", "3", "--resume"] + dirs(tmp_path))
    assert torch.load(hub / "lenet.pth", weights_only=True)["run"] == other["run"]


@pytest.mark.parametrize("field, value, wanted", [
    ("args", {"learning_rate": "0.1"}, "learning_rate is '0.1', not a number"),
    ("args", {"augment": "sideways"}, "augment"),
    ("args", {"schedule": "warm"}, "schedule"),
    ("history", [{}, {}], "history row 1"),
    ("history", [{"epoch": 1, "train_loss": "x"}, {}], "history row 1"),
    ("optimizer", {}, "optimizer state"),
    ("optimizer", {"state": {}, "param_groups": [{"params": [0, 1]}]}, "optimizer state"),
    ("epoch", "2", "epoch"),
])
def test_a_damaged_checkpoint_is_refused_by_resume_in_one_line(tmp_path, capsys, two_epochs, field, value, wanted):
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    hub = tmp_path / "model_hub" / "pre_trained"
    state = torch.load(hub / "lenet_last.pth", weights_only=True)
    state[field] = {**state[field], **value} if field == "args" else value
    torch.save(state, hub / "lenet_last.pth")
    capsys.readouterr()
    error = refused(train.main, DIGITS + ["--epochs", "3", "--resume"] + dirs(tmp_path), capsys)
    assert wanted in error and "cannot be resumed" in error, error


@pytest.mark.parametrize("flags, wanted", [(["--seed", "1"], "--seed 1"), (["--val-fraction", "0.2"], "--val-fraction 0.2"),
                                           (["--subset", "1000"], "--subset 1000")])
def test_fine_tuning_validates_only_on_images_pre_training_held_out(two_epochs, capsys, flags, wanted):
    line = refused(finetune.main, DIGITS + ["--val-fraction", "0.1", "--dry-run", *flags] + dirs(two_epochs), capsys)
    assert wanted in line and "trained on" in line
    finetune.main(DIGITS + ["--val-fraction", "0.1", "--dry-run"] + dirs(two_epochs))  # its own split: fine
