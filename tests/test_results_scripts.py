"""The Fashion-MNIST study's scripts (results/fashion-mnist/): bad options are refused before any
work, and table.py prints what the committed JSONs hold."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

STUDY = ROOT / "results" / "fashion-mnist"


@pytest.mark.parametrize("options, wanted", [
    (["--schedule", "linear"], "--schedule takes cosine"),
    (["--augment", "rotate"], "--augment takes shift-flip"),
    (["--epochs", "0"], "--epochs needs a whole number above 0"),
    (["--finetune-epochs", "two"], "--finetune-epochs needs a whole number above 0"),
    (["--finetune-lr", "0"], "--finetune-lr needs a number above 0"),
    (["--weight-decay", "-1"], "--weight-decay needs a number of 0 or more"),
    (["--weight-decay"], "--weight-decay needs a number of 0 or more"),
    (["--finetune-lr", "1e-4x"], "--finetune-lr needs a number above 0"),
    (["--seed", "0"], "--seed needs a whole number above 0"),
    (["--fast"], "unknown option --fast"),
])
def test_run_study_refuses_bad_options_in_one_line_before_any_work(options, wanted):
    before = sorted(path.name for path in STUDY.iterdir())
    result = subprocess.run(["bash", str(STUDY / "run_study.sh"), *options, "lenet"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and wanted in result.stdout and len(result.stdout.splitlines()) == 1
    assert sorted(path.name for path in STUDY.iterdir()) == before


def test_table_prints_every_committed_comparison():
    printed = subprocess.run([sys.executable, str(STUDY / "table.py")], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    comparisons = sorted(STUDY.glob("**/outputs/eval/comparison.json"))
    assert comparisons
    for path in comparisons:
        if "seed-" in str(path) or "ensnet" in str(path):
            continue  # the seeds are summarised as mean +- std; EnsNet is listed as a subset
        for name, result in json.loads(path.read_text())["models"].items():
            accuracy = f"| {100 * result['test']['accuracy']:.2f} |"
            assert accuracy in printed, (path, name)


def sandbox_study(tmp_path):
    """A copy of run_study.sh in an empty repository layout, with a `python` on PATH that only
    records its arguments: what the script would run, without running it."""
    study = tmp_path / "results" / "fashion-mnist"
    study.mkdir(parents=True)
    for script in ("run_study.sh", "numbers.sh"):
        (study / script).write_text((STUDY / script).read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n')
    (bin_dir / "python").chmod(0o755)
    return study, {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_finetune_options_reuse_the_recipes_finished_pre_training(tmp_path):
    study, env = sandbox_study(tmp_path)
    base = study / "shift-flip-cosine"
    (base / "outputs" / "train").mkdir(parents=True)
    (base / "work" / "pre_trained").mkdir(parents=True)
    (base / "logs").mkdir()
    (base / "outputs" / "train" / "resnet.json").write_text('{"best_epoch": 20}')
    (base / "work" / "pre_trained" / "resnet.pth").write_bytes(b"weights")
    (base / "logs" / "times.log").write_text("train resnet rc=0 seconds=9 2026-11-26T00:00:00Z x86_64 1 cores\n")
    (study / "outputs" / "search").mkdir(parents=True)
    (study / "outputs" / "search" / "resnet.json").write_text('{"complete": true}')
    result = subprocess.run(["bash", str(study / "run_study.sh"), "--augment", "shift-flip", "--schedule", "cosine",
                             "--finetune-lr", "1e-4", "resnet"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    here = study / "shift-flip-cosine-finetune-lr-0.0001"  # the rate written as printf %g writes it
    assert (here / "work" / "pre_trained" / "resnet.pth").read_bytes() == b"weights"
    assert (here / "outputs" / "train" / "resnet.json").read_text() == '{"best_epoch": 20}'
    assert "train resnet rc=0 " in (here / "logs" / "times.log").read_text()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert not any(call.startswith("train.py") for call in calls)
    tuning = [call for call in calls if call.startswith("finetune.py")]
    assert len(tuning) == 1 and "--lr 0.0001" in tuning[0] and "--schedule cosine" in tuning[0]


def test_finetune_options_wait_for_the_recipes_pre_training(tmp_path):
    study, env = sandbox_study(tmp_path)
    (study / "outputs" / "search").mkdir(parents=True)
    (study / "outputs" / "search" / "lenet.json").write_text('{"complete": true}')
    result = subprocess.run(["bash", str(study / "run_study.sh"), "--finetune-epochs", "3", "lenet"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert "lenet: the pre-training in results/fashion-mnist has not finished" in result.stdout
    assert not (tmp_path / "calls").exists()  # nothing trained, nothing fine-tuned


def test_weight_decay_option_pre_trains_into_its_own_folder(tmp_path):
    study, env = sandbox_study(tmp_path)
    (study / "outputs" / "search").mkdir(parents=True)
    (study / "outputs" / "search" / "resnet.json").write_text('{"complete": true}')
    result = subprocess.run(["bash", str(study / "run_study.sh"), "--augment", "shift-flip", "--epochs", "40",
                             "--weight-decay", "1e-4", "resnet"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    here = study / "shift-flip-40-epochs-weight-decay-0.0001"
    assert (here / "outputs" / "search" / "resnet.json").read_text() == '{"complete": true}'  # the study's winners
    training = [call for call in (tmp_path / "calls").read_text().splitlines() if call.startswith("train.py")]
    assert len(training) == 1 and "--epochs 40 --weight-decay 0.0001" in training[0]
    assert f"--outputs {here.relative_to(tmp_path)}/outputs" in training[0]


@pytest.mark.parametrize("arguments, wanted", [
    ([], "usage: bash"),
    (["no-such-folder", "resnet", "1e-4"], "no-such-folder/work/pre_trained/resnet.pth is missing"),
])
def test_finetune_lr_validation_refuses_in_one_line(arguments, wanted):
    result = subprocess.run(["bash", str(STUDY / "finetune_lr_validation.sh"), *arguments], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and wanted in result.stdout and len(result.stdout.splitlines()) == 1
    assert not (STUDY / "finetune-lr-validation" / "no-such-folder").exists()


def test_finetune_lr_validation_runs_each_rate_on_the_held_out_split(tmp_path):
    study, env = sandbox_study(tmp_path)
    (study / "finetune_lr_validation.sh").write_text((STUDY / "finetune_lr_validation.sh").read_text())
    run = study / "shift-flip-cosine"
    (run / "outputs" / "train").mkdir(parents=True)
    (run / "work" / "pre_trained").mkdir(parents=True)
    (run / "outputs" / "train" / "resnet.json").write_text("{}")
    (run / "work" / "pre_trained" / "resnet.pth").write_bytes(b"weights")
    script = str(study / "finetune_lr_validation.sh")
    result = subprocess.run(["bash", script, "shift-flip-cosine", "resnet", "1e-4", "0.001"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    tuning = [call for call in (tmp_path / "calls").read_text().splitlines() if call.startswith("finetune.py")]
    assert len(tuning) == 2 and all("--val-fraction 0.1" in call for call in tuning)
    assert "--lr 0.0001 " in tuning[0] and "lr-0.0001" in tuning[0] and "--lr 0.001 " in tuning[1]
    (tmp_path / "calls").unlink()
    for rates in (["fast"], ["1e-5", "-1"]):  # a bad rate anywhere: nothing runs, not even the good ones
        bad = subprocess.run(["bash", script, "shift-flip-cosine", "resnet", *rates], capture_output=True, text=True,
                             timeout=60, env=env)
        assert bad.returncode == 2 and bad.stdout.strip() == "each RATE is a number above 0, such as 0.0001"
        assert not (tmp_path / "calls").exists() or "finetune.py" not in (tmp_path / "calls").read_text()


def fake_run(folder, name, val_acc, rate, weights):
    for part in ("outputs/train", "outputs/finetune", "model_hub/fine_tuned"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    (folder / "outputs" / "train" / f"{name}.json").write_text(json.dumps({"best_val_acc": val_acc}))
    (folder / "outputs" / "finetune" / f"{name}.json").write_text(json.dumps({"args": {"learning_rate": rate}}))
    (folder / "model_hub" / "fine_tuned" / f"{name}_tuned.pth").write_bytes(weights)


def validation_run(root, name, rate, val_acc, val_loss):
    run = root / "finetune-lr-validation" / "long" / "outputs" / f"lr-{rate:g}" / "finetune"
    run.mkdir(parents=True, exist_ok=True)
    (run / f"{name}.json").write_text(json.dumps({"args": {"model": name, "learning_rate": rate}, "history": [
        {"val_acc": 0.5, "val_loss": 1.0}, {"val_acc": val_acc, "val_loss": val_loss}]}))


@pytest.mark.parametrize("acc, loss, better_rate, wanted", [(0.925, 0.30, 1e-4, b"reused, 1e-4"),
                                                             (0.900, 0.20, 1e-3, b"long, 1e-3"),
                                                             (0.920, 0.20, 1e-4, b"reused, 1e-4")])  # tie: lower loss
def test_pick_by_validation_links_the_best_validated_run(tmp_path, monkeypatch, acc, loss, better_rate, wanted):
    sys.path.insert(0, str(STUDY))
    try:
        import pick_by_validation as pick
    finally:
        sys.path.remove(str(STUDY))
    monkeypatch.setattr(pick, "HERE", tmp_path)
    monkeypatch.setattr(pick, "OUT", tmp_path / "picked")
    monkeypatch.setattr(pick, "RECIPES", {"long": "", "long-lr": "", "short": ""})
    fake_run(tmp_path, "resnet", 0.86, 1e-3, b"study")
    fake_run(tmp_path / "long", "resnet", 0.92, 1e-3, b"long, 1e-3")
    fake_run(tmp_path / "long-lr", "resnet", 0.92, 1e-4, b"reused, 1e-4")  # the same pre-training
    fake_run(tmp_path / "short", "resnet", 0.91, 1e-4, b"short")
    validation_run(tmp_path, "resnet", 1e-4, acc, loss)
    validation_run(tmp_path, "resnet", 1e-3, 0.92, 0.25)
    other = 1e-3 if better_rate == 1e-4 else 1e-4  # another network's choice never decides ResNet's
    validation_run(tmp_path, "alexnet", other, 0.99, 0.1)
    assert pick.main() == 0
    link = tmp_path / "picked" / "model_hub" / "fine_tuned" / "resnet_tuned.pth"
    assert link.is_symlink() and not Path(str(link.readlink())).is_absolute() and link.read_bytes() == wanted
    picks = json.loads((tmp_path / "picked" / "picks.json").read_text())
    assert picks["networks"]["resnet"]["validated_finetune_lr"] == better_rate
    assert pick.validated_rate("lenet") == other  # no runs of its own: the choice over all networks
    assert sorted(picks["networks"]["resnet"]["candidates"]) == ["long", "long-lr", "short", "the study's recipe"]
    assert not (tmp_path / "picked" / "model_hub" / "fine_tuned" / "lenet_tuned.pth").exists()


def study_module(name):
    sys.path.insert(0, str(STUDY))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(STUDY))


def test_the_ensemble_is_the_most_accurate_subset_on_validation_ties_to_fewer_networks():
    ensemble = study_module("ensemble_by_validation")
    labels = np.array([0, 1, 2])
    sure = lambda classes: np.eye(3, dtype=np.float16)[classes]  # noqa: E731
    # a and c together get all three right; b pulls any mix it joins down
    probabilities = {"a": sure([0, 1, 0]) * 0.6, "b": sure([1, 0, 1]), "c": sure([2, 2, 2]) * 0.5}
    probabilities["a"][2, 2] = 0.3
    members, accuracy, scored = ensemble.choose(probabilities, labels)
    assert members == ["a", "c"] and accuracy == 1.0 and len(scored) == 4
    tie = {"a": sure([0, 1, 2]), "b": sure([0, 1, 2]), "c": sure([0, 1, 2])}  # all subsets perfect: the pair wins
    assert ensemble.choose(tie, labels)[0] == ["a", "b"]
    with pytest.raises(ensemble.UserError, match="needs two networks"):
        ensemble.choose({"a": tie["a"]}, labels)


def test_ensemble_by_validation_links_the_chosen_fine_tuned_networks_and_repeats_from_saved(
        trained_lenet, trained_spinalnet, tmp_path, monkeypatch, capsys):
    ensemble = study_module("ensemble_by_validation")
    monkeypatch.setattr(ensemble, "HERE", tmp_path)
    monkeypatch.setattr(ensemble, "OUT", tmp_path / "picked")
    _, lenet = trained_lenet
    for folder, name, source in [("a", "lenet", lenet), ("b", "spinalnet", trained_spinalnet)]:
        (tmp_path / folder / "work" / "pre_trained").mkdir(parents=True)
        (tmp_path / folder / "work" / "pre_trained" / f"{name}.pth").write_bytes(source.read_bytes())
    for folder, name in [("a", "lenet"), ("b-finetune-lr-0.0001", "spinalnet")]:  # the second reused b's pre-training
        tuned = tmp_path / folder / "model_hub" / "fine_tuned" / f"{name}_tuned.pth"
        tuned.parent.mkdir(parents=True)
        tuned.write_bytes(f"{name} fine-tuned".encode())
        (tmp_path / "picked" / "model_hub" / "fine_tuned").mkdir(parents=True, exist_ok=True)
        (tmp_path / "picked" / "model_hub" / "fine_tuned" / f"{name}_tuned.pth").symlink_to(tuned)
    with pytest.raises(ensemble.UserError, match="picks.json is missing"):
        ensemble.run(ensemble.parse_args([]))
    (tmp_path / "picked" / "picks.json").write_text(json.dumps({"networks": {
        "spinalnet": {"picked": "b-finetune-lr-0.0001"}, "lenet": {"picked": "a"}}}))
    assert ensemble.run(ensemble.parse_args([])) == 0
    result = json.loads((tmp_path / "picked" / "ensemble" / "ensemble.json").read_text())
    assert result["members"] == ["lenet", "spinalnet"] and result["networks"]["spinalnet"]["pre_trained"] == \
        "b/work/pre_trained/spinalnet.pth"
    saved = np.load(tmp_path / "picked" / "validation_probabilities.npz")
    mean = (saved["lenet"].astype(np.float32) + saved["spinalnet"].astype(np.float32)) / 2
    assert result["val_acc"] == float((mean.argmax(1) == saved["labels"]).mean()) and len(saved["labels"]) > 100
    hub = tmp_path / "picked" / "ensemble" / "model_hub" / "fine_tuned"
    assert (hub / "spinalnet_tuned.pth").read_bytes() == b"spinalnet fine-tuned"
    assert not Path(str((hub / "lenet_tuned.pth").readlink())).is_absolute()
    for path in tmp_path.glob("*/work/pre_trained/*.pth"):
        path.unlink()
    with pytest.raises(ensemble.UserError, match="pass --from-saved"):
        ensemble.run(ensemble.parse_args([]))
    assert ensemble.run(ensemble.parse_args(["--from-saved"])) == 0
    assert json.loads((tmp_path / "picked" / "ensemble" / "ensemble.json").read_text()) == result
    (tmp_path / "picked" / "picks.json").write_text(json.dumps({"networks": {  # picked again, elsewhere
        "spinalnet": {"picked": "b"}, "lenet": {"picked": "a"}}}))
    with pytest.raises(ensemble.UserError, match="other picks"):
        ensemble.run(ensemble.parse_args(["--from-saved"]))


def test_gpu_run_refuses_a_missing_job_list_or_bad_seconds_before_any_work(tmp_path):
    script = str(STUDY / "gpu_run.sh")
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("touch should-not-run\n")
    for arguments, wanted in [([], "usage: bash"), ([str(tmp_path / "none.txt")], "usage: bash"),
                              ([str(jobs), "soon"], "SECONDS must be a whole number above 0")]:
        result = subprocess.run(["bash", script, *arguments], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 2 and wanted in result.stdout and len(result.stdout.splitlines()) == 1
    assert not list((tmp_path / "out").iterdir()) and not (ROOT / "should-not-run").exists()
