"""The Fashion-MNIST study (results/fashion-mnist/): run_study.sh refuses bad arguments before any
work and runs the stages in order, and the README's tables are what the committed JSONs hold."""
import fcntl
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from models import MODELS

STUDY = ROOT / "results" / "fashion-mnist"


def committed_bytes(folder):
    """The size of what the repository holds under folder: its tracked files (a run's work/ checkpoints
    and other untracked files in a clone do not count), or every file outside work/ without git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--", str(folder)], cwd=ROOT, capture_output=True)
    paths = [ROOT / name for name in listed.stdout.decode().split("\0") if name] if listed.returncode == 0 else [
        path for path in folder.rglob("*") if "work" not in path.relative_to(folder).parts]
    return sum(path.stat().st_size for path in paths if path.is_file())


@pytest.mark.parametrize("arguments, wanted, code", [
    ([], "usage:", 2),
    (["fast"], "unknown recipe fast", 2),
    (["study", "nosuchnet"], "unknown network nosuchnet", 2),
    (["chosen", "lenet", "1e400"], "unknown network 1e400", 2),
    (["--fast"], "unknown recipe --fast", 2),
    (["--help"], "usage:", 0),
])
def test_run_study_answers_bad_arguments_and_help_in_one_line_before_any_work(arguments, wanted, code):
    before = sorted(str(path) for path in STUDY.rglob("*"))
    logs = {path: path.read_bytes() for path in STUDY.rglob("*.log")}
    result = subprocess.run(["bash", str(STUDY / "run_study.sh"), *arguments], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == code and wanted in result.stdout and len(result.stdout.splitlines()) == 1
    assert sorted(str(path) for path in STUDY.rglob("*")) == before
    assert all(path.read_bytes() == content for path, content in logs.items())


def study_sandbox(tmp_path, name, behaviour=""):
    """results/NAME/run_study.sh in an empty repository layout, with a `python` on PATH that records its
    arguments, then runs the shell lines `behaviour`: what the study would run, without running it."""
    study = tmp_path / "results" / name
    study.mkdir(parents=True)
    (study / "run_study.sh").write_text((ROOT / "results" / name / "run_study.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n' + behaviour)
    (bin_dir / "python").chmod(0o755)
    return study, {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def sandbox(tmp_path, fail=None):
    """The Fashion-MNIST study's sandbox: its `python` fails for the script named by `fail`, writes the
    rate a validation run chose, and a fine-tuning's checkpoint."""
    rates = tmp_path / "results" / "fashion-mnist" / "chosen-on-validation" / "outputs" / "rates" / "finetune"
    return study_sandbox(tmp_path, "fashion-mnist", (
        (f'case "$1" in {fail}) echo "error: it broke"; exit 1 ;; esac\n' if fail else "")
        + 'case "$*" in finetune.py*--val-fraction*) ;; finetune.py*)\n'
          '  for arg; do case $previous in --model) m=$arg ;; --hub) h=$arg ;; esac; previous=$arg; done\n'
          '  mkdir -p "$h/fine_tuned"; touch "$h/fine_tuned/${m}_tuned.pth" ;; esac\n'
        + f'case "$*" in *--val-fraction*) mkdir -p {rates}; m=$(echo "$*" | sed "s|.*--ckpt [^ ]*/\\([a-z]*\\)\\.pth.*|\\1|"); '
          f'printf \'{{\\n  "chosen": 0.0001,\\n  "rates": []\\n}}\\n\' > {rates}/${{m}}_rates.json ;; esac\n'))


def test_the_study_searches_trains_with_the_winners_fine_tunes_and_evaluates(tmp_path):
    study, env = sandbox(tmp_path)
    result = subprocess.run(["bash", str(study / "run_study.sh"), "study", "lenet"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["search.py", "train.py", "finetune.py", "-", "evaluate.py"]
    assert "--params results/fashion-mnist/study/outputs/search/lenet.json" in calls[1]
    assert "--ensemble-from-validation" not in calls[-1]
    assert "search lenet rc=0 " in (study / "study" / "logs" / "times.log").read_text()


def test_the_chosen_recipe_uses_its_options_and_the_rate_validation_chose(tmp_path):
    study, env = sandbox(tmp_path)
    search = study / "study" / "outputs" / "search" / "resnet.json"
    search.parent.mkdir(parents=True)
    search.write_text('{"complete": true}')  # a finished search is not repeated
    result = subprocess.run(["bash", str(study / "run_study.sh"), "chosen", "resnet"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["train.py", "finetune.py", "finetune.py", "-", "evaluate.py"]
    assert "--augment shift-flip --schedule cosine --epochs 40 --weight-decay 0.0001" in calls[0]
    assert "--val-fraction 0.1 --lr 0.001 0.0001 --augment shift-flip --schedule cosine" in calls[1]
    assert "--lr 0.0001 --augment shift-flip --schedule cosine" in calls[2] and "--epochs" not in calls[2]
    assert "--ensemble-from-validation results/fashion-mnist/chosen-on-validation/work" in calls[-1]


def test_committed_results_without_their_weights_are_left_as_they_are(tmp_path):
    study, env = sandbox(tmp_path)
    committed = {"study/outputs/search/lenet.json": '{"complete": true}', "chosen-on-validation/outputs/train/"
                 "lenet.json": "{}", "chosen-on-validation/outputs/rates/finetune/lenet_rates.json":
                 '{\n  "chosen": 0.0001\n}\n', "chosen-on-validation/outputs/finetune/lenet.json": "{}",
                 "chosen-on-validation/outputs/eval/comparison.json": "{}"}  # a clone: lenet's weights left out
    for name, text in committed.items():
        (study / name).parent.mkdir(parents=True, exist_ok=True)
        (study / name).write_text(text)
    result = subprocess.run(["bash", str(study / "run_study.sh"), "chosen", "lenet"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "publish lenet: nothing to publish, this copy holds lenet's results without its " \
                            "fine-tuned weights\nnothing to redo: every stage's files are here\n"
    assert not (tmp_path / "calls").exists()  # no publish, no evaluation of the networks that are here
    assert all((study / name).read_text() == text for name, text in committed.items())


def test_a_failed_stage_is_one_line_on_the_terminal_and_a_non_zero_exit(tmp_path):
    study, env = sandbox(tmp_path, fail="train.py")
    result = subprocess.run(["bash", str(study / "run_study.sh"), "study", "lenet"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 1
    assert "train lenet: failed, exit status 1: error: it broke" in result.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert not any(call.startswith("finetune.py") for call in calls)  # nothing after a failed stage


def test_the_readme_tables_are_what_the_committed_files_hold():
    printed = subprocess.run([sys.executable, str(STUDY / "table.py")], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    readme = (STUDY / "README.md").read_text()
    for table in printed.split("\n## ")[1:]:
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        assert rows and all(row in readme for row in rows), table.splitlines()[0]
    for path in sorted(STUDY.glob("**/outputs/eval/comparison.json")):
        for name, result in json.loads(path.read_text())["models"].items():
            assert f"| {100 * result['test']['accuracy']:.2f} |" in printed, (path, name)


def test_the_committed_checkpoints_are_the_networks_of_the_two_headline_tables():
    checkpoints = sorted(str(path.relative_to(STUDY)) for path in STUDY.rglob("*.pth"))
    assert checkpoints == [f"chosen-on-validation/model_hub/fine_tuned/{name}_tuned.pth"
                           for name in ("resnet", "spinalnet")] + [
        f"study/model_hub/fine_tuned/{name}_tuned.pth" for name in ("alexnet", "lenet", "resnet", "spinalnet",
                                                                    "vggnet")]
    assert committed_bytes(STUDY) < 30e6


# ----------------------------------------------------------------------------- the ByClass study

BYCLASS = ROOT / "results" / "emnist-byclass"
FIVE = " ".join(name for name in MODELS if name != "ensnet")  # the order `--model all` evaluates them in


@pytest.mark.parametrize("arguments, wanted, code", [
    ([], "usage:", 2), (["chosen-later"], "unknown recipe chosen-later", 2),
    (["study", "lenet5"], "unknown network lenet5", 2), (["--help"], "usage:", 0)])
def test_the_byclass_study_answers_bad_arguments_in_one_line_before_any_work(arguments, wanted, code):
    before = sorted(str(path) for path in BYCLASS.rglob("*"))
    result = subprocess.run(["bash", str(BYCLASS / "run_study.sh"), *arguments], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == code and wanted in result.stdout and len(result.stdout.splitlines()) == 1
    assert sorted(str(path) for path in BYCLASS.rglob("*")) == before


def byclass_sandbox(tmp_path):
    """The ByClass study's sandbox: a choice among label=JSON pairs takes the tried option set `cosine` when
    there is one, else the first label; a publish step makes the published checkpoint; a rate choice
    writes 1e-4; the check of remade runs is run; with REMADE=DIR, train.py and finetune.py write DIR's
    train.json and finetune.json as their run's JSON; every call's CPU kernel limits go to `isa`, its
    threads to `threads`."""
    rates = tmp_path / "results" / "emnist-byclass" / "chosen-on-validation" / "outputs" / "rates" / "finetune"
    study, env = study_sandbox(tmp_path, "emnist-byclass", (
        f'echo "$1 ${{ONEDNN_MAX_CPU_ISA:-any}} ${{ATEN_CPU_CAPABILITY:-any}}" >> {tmp_path}/isa\n'
        f'echo "${{OMP_NUM_THREADS:-all}}" >> {tmp_path}/threads\n'
        'case "${REMADE:+remade }$1" in "remade train.py" | "remade finetune.py") stage=${1%.py}\n'
        '  for arg; do case $previous in --model) m=$arg ;; --outputs) o=$arg ;; esac; previous=$arg; done\n'
        '  mkdir -p "$o/$stage"; cp "$REMADE/$stage.json" "$o/$stage/$m.json" ;;\nesac\n'
        f'case "$*" in "- "*=*/remade/*) exec {sys.executable} "$@" ;;\n'
        '  "- "*cosine=*) cat > /dev/null; echo cosine ;;\n'
        '  "- "*=*) cat > /dev/null; echo "${2%%=*}" ;;\n'
        '  "- "*) cat > /dev/null; touch "$3" ;;\n'
        f'  *--val-fraction*) mkdir -p {rates}; printf \'{{\\n  "chosen": 0.0001\\n}}\\n\' > {rates}/$4_rates.json ;;'
        '\nesac\n'))
    return study, {**env, "EMNIST_DIR": str(tmp_path / "official")}


def rerun_with_the_others_published(study, recipe, env):
    """Publish the four networks other than lenet, run the recipe again on all five, and return its calls."""
    folder = study / ("study" if recipe == "study" else "chosen-on-validation")
    for name in ("spinalnet", "alexnet", "resnet", "vggnet"):
        (folder / "model_hub" / "fine_tuned" / f"{name}_tuned.pth").touch()
    calls = study.parents[1] / "calls"
    calls.unlink()
    subprocess.run(["bash", str(study / "run_study.sh"), recipe], capture_output=True, text=True, timeout=60,
                   env=env, check=True)
    return calls.read_text().splitlines()


def test_the_byclass_study_carves_then_runs_each_stage_and_evaluates_only_when_all_are_done(tmp_path):
    study, env = byclass_sandbox(tmp_path)
    result = subprocess.run(["bash", str(study / "run_study.sh"), "study", "lenet"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls] == [
        "results/emnist-byclass/carve.py", "search.py", "train.py", "finetune.py", "-"]
    assert calls[0].endswith(f"{tmp_path / 'official'} data/emnist-byclass-carved")
    assert "--dataset emnist-byclass --data-dir data/emnist-byclass-carved" in calls[1]
    assert "--params results/emnist-byclass/study/outputs/search/lenet.json" in calls[2]
    assert "evaluation and transfer wait for: spinalnet alexnet resnet vggnet" in result.stdout
    assert "--precision" not in " ".join(calls) and "AVX2" not in (tmp_path / "isa").read_text()  # the CPU's own
    assert set((tmp_path / "threads").read_text().split()) == {"all"}  # THREADS unset: every core
    (study / "study" / "outputs" / "train").mkdir(parents=True)
    for name in ("lenet", "spinalnet", "alexnet", "resnet", "vggnet"):  # what the five pre-trainings wrote
        (study / "study" / "outputs" / "train" / f"{name}.json").write_text("{}")
    calls = rerun_with_the_others_published(study, "study", env)  # evaluate, then transfer
    assert calls[-2].startswith(f"evaluate.py --update-results --model {FIVE}")
    assert "--data-dir data/emnist-byclass-carved" in calls[-2]
    assert calls[-1].startswith("transfer_mnist.py --update-results --model lenet --ckpt "
                                "results/emnist-byclass/study/model_hub/fine_tuned/lenet_tuned.pth")


def test_ensnet_runs_only_when_named_and_is_evaluated_on_its_own(tmp_path):
    study, env = byclass_sandbox(tmp_path)
    (tmp_path / "data" / "emnist-byclass-carved").mkdir(parents=True)
    result = subprocess.run(["bash", str(study / "run_study.sh"), "study", "ensnet"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["search.py", "train.py", "finetune.py", "-", "evaluate.py"]
    assert all("--model ensnet" in call for call in calls if call != calls[3])
    assert "--hub results/emnist-byclass/study/model_hub --outputs results/emnist-byclass/study/outputs " \
           "--split test" in calls[4]
    assert "evaluation and transfer wait for: lenet spinalnet alexnet resnet vggnet" in result.stdout
    (tmp_path / "calls").unlink()
    subprocess.run(["bash", str(study / "run_study.sh"), "study"], capture_output=True, text=True, timeout=60,
                   env=env, check=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 21 and not any("ensnet" in call for call in calls)  # 4 stages of each of the five
    assert calls[-1].startswith(f"evaluate.py --update-results --model {FIVE} ")  # their comparison alone


@pytest.mark.parametrize("remade_as_committed", [True, False])
def test_byclass_weights_left_out_are_trained_again_in_work_and_published_only_if_they_are_the_committed_runs(
        tmp_path, remade_as_committed):
    study, env = byclass_sandbox(tmp_path)
    (tmp_path / "data" / "emnist-byclass-carved").mkdir(parents=True)
    chosen, here = "results/emnist-byclass/chosen-on-validation", study / "chosen-on-validation"
    run = [{"epoch": epoch, "train_loss": 1 / epoch, "train_acc": 0.8, "val_loss": None, "val_acc": None,
            "lr": 1e-4, "seconds": 30.0} for epoch in (1, 2, 3)]
    committed = {"study/outputs/search/lenet.json": '{"complete": true}',  # lenet's committed results
                 "study/outputs/train/lenet.json": json.dumps({"history": run}),
                 "chosen-on-validation/outputs/tried/cosine/train/lenet.json": json.dumps({"history": run}),
                 "chosen-on-validation/outputs/rates/finetune/lenet_rates.json": '{\n  "chosen": 0.0001\n}\n',
                 "chosen-on-validation/outputs/finetune/lenet.json": json.dumps({"history": run}),
                 "chosen-on-validation/logs/times.log": "finetune lenet rc=0 seconds=90\n"}
    for name, text in committed.items():
        (study / name).parent.mkdir(parents=True, exist_ok=True)
        (study / name).write_text(text)
    remade = tmp_path / "remade"  # what the runs of this clone write: another clock, and maybe other numbers
    remade.mkdir()
    (remade / "train.json").write_text(json.dumps({"history": [{**epoch, "seconds": 41.5} for epoch in run]}))
    tuned = [dict(epoch) for epoch in run]
    if not remade_as_committed:
        tuned[1]["train_loss"] += 1e-12
    (remade / "finetune.json").write_text(json.dumps({"history": tuned}))
    result = subprocess.run(["bash", str(study / "run_study.sh"), "chosen", "lenet"], capture_output=True,
                            text=True, timeout=60, env={**env, "REMADE": str(remade)})
    assert "lenet: its results are committed without its weights; training it again in " \
           f"{chosen}/work/remade" in result.stdout
    calls = [call for call in (tmp_path / "calls").read_text().splitlines() if not call.startswith("- study=")]
    assert [call.split()[0] for call in calls[:3]] == ["train.py", "finetune.py", "-"]  # no rate choice
    assert "--schedule cosine" in calls[0] and calls[0].endswith("--precision fp32")
    assert f"--hub {chosen}/work/remade/work/tried/cosine --outputs {chosen}/work/remade/outputs/tried/cosine" \
           in calls[0]
    assert f"--ckpt {chosen}/work/remade/work/tried/cosine/pre_trained/lenet.pth --lr 0.0001 --schedule cosine " \
           f"--data-dir data/emnist-byclass-carved --no-download --hub {chosen}/work/remade/work " \
           f"--outputs {chosen}/work/remade/outputs" in calls[1]
    assert set((tmp_path / "threads").read_text().split()) == {"1"}
    for name, text in committed.items():  # the committed files are as they were
        assert (study / name).read_text() == text, name
    published = here / "model_hub" / "fine_tuned" / "lenet_tuned.pth"
    if remade_as_committed:
        assert result.returncode == 0, result.stdout + result.stderr
        assert calls[3] == f"- {chosen}/work/remade/work/fine_tuned/lenet_tuned.pth {published.relative_to(tmp_path)}"
        assert published.is_file()
        assert "check lenet against the committed runs rc=0" in (here / "work/remade/logs/times.log").read_text()
    else:
        assert result.returncode == 1 and not published.exists() and len(calls) == 3
        assert f"check lenet against the committed runs: failed, exit status 1: {chosen}/work/remade/outputs/" \
               f"finetune/lenet.json differs from the committed {chosen}/outputs/finetune/lenet.json from epoch 2 " \
               "on (another kind of CPU or other threads compute another run): not published; its weights: " \
               f"{chosen}/work/remade/work/fine_tuned/lenet_tuned.pth" in result.stdout


def test_the_byclass_readme_tables_are_what_the_committed_files_hold():
    printed = subprocess.run([sys.executable, str(BYCLASS / "table.py")], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    readme = (BYCLASS / "README.md").read_text()
    *tables, headline = printed.split("\n## ")[1:]
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        assert all(row in readme for row in rows), table.splitlines()[0]
    rows = [line for line in headline.splitlines() if line.startswith("| ")]
    chosen = any(BYCLASS.glob("chosen-on-validation/outputs/eval/*.json"))  # its row once a network is evaluated
    assert len(rows) == 4 + chosen and all(row in (ROOT / "README.md").read_text() for row in rows)
    for path in sorted(BYCLASS.glob("study/outputs/eval/*.json")) + sorted(BYCLASS.glob("chosen-*/**/eval/*.json")):
        if path.name != "comparison.json":
            assert f"| {100 * json.loads(path.read_text())['test']['accuracy']:.2f} |" in printed, path
    for text in (readme, (ROOT / "README.md").read_text()):  # every table that uses the carve says what it is
        assert "trained on 96,323 images of the official test split, tested on the other 20,000; not the " \
               "official train/test protocol" in " ".join(text.split())
    assert committed_bytes(BYCLASS) < 30e6


def test_a_stopped_rate_choice_resumes_however_the_rates_are_written(tmp_path):
    study, env = byclass_sandbox(tmp_path)
    script = study / "run_study.sh"
    script.write_text(script.read_text().replace('RATES="0.001 0.0001"', 'RATES="1e-3 1e-4"', 1))
    (tmp_path / "data" / "emnist-byclass-carved").mkdir(parents=True)
    for stage in ("search", "train"):
        (study / "study" / "outputs" / stage).mkdir(parents=True)
        (study / "study" / "outputs" / stage / "lenet.json").write_text('{"complete": true}')
    choices = []
    for stopped in (False, True):
        if stopped:  # finetune.py names a rate's file as Python prints it: 0.001, not 1e-3
            folder = study / "chosen-on-validation" / "work" / "rates" / "fine_tuned"
            folder.mkdir(parents=True)
            (folder / "lenet_tuned_unfinished_last_lr0.001.pth").touch()
            (study / "chosen-on-validation" / "outputs" / "rates" / "finetune" / "lenet_rates.json").unlink()
        subprocess.run(["bash", str(script), "chosen", "lenet"], capture_output=True, text=True, timeout=60, env=env)
        choices += [call for call in (tmp_path / "calls").read_text().splitlines() if "--val-fraction" in call]
        (tmp_path / "calls").unlink()
    assert len(choices) == 2 and "--lr 1e-3 1e-4" in choices[0]
    assert "--resume" not in choices[0] and "--resume" in choices[1]


def test_the_byclass_chosen_recipe_picks_on_validation_then_runs_the_best_network_over_three_seeds(tmp_path):
    study, env = byclass_sandbox(tmp_path)
    (tmp_path / "data" / "emnist-byclass-carved").mkdir(parents=True)
    for stage in ("search", "train"):
        if stage == "train":
            result = subprocess.run(["bash", str(study / "run_study.sh"), "chosen", "lenet"], capture_output=True,
                                    text=True, timeout=60, env=env)
            assert "chosen lenet waits for the study's pre-training of lenet" in result.stdout  # nothing to compare
            assert not (tmp_path / "calls").exists()
        (study / "study" / "outputs" / stage).mkdir(parents=True, exist_ok=True)
        for name in ("lenet", "spinalnet", "alexnet", "resnet", "vggnet"):
            (study / "study" / "outputs" / stage / f"{name}.json").write_text('{"complete": true}')
    result = subprocess.run(["bash", str(study / "run_study.sh"), "chosen", "lenet"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    chosen = "results/emnist-byclass/chosen-on-validation"
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["train.py", "-", "finetune.py", "finetune.py", "-"]
    assert "--params results/emnist-byclass/study/outputs/search/lenet.json --schedule cosine" in calls[0]
    assert f"--hub {chosen}/work/tried/cosine --outputs {chosen}/outputs/tried/cosine" in calls[0]
    assert calls[1].startswith("- study=results/emnist-byclass/study/outputs/train/lenet.json cosine=")
    assert f"--ckpt {chosen}/work/tried/cosine/pre_trained/lenet.pth --val-fraction 0.1 --lr 0.001 0.0001 " \
           f"--schedule cosine" in calls[2]
    assert "--lr 0.0001 --schedule cosine" in calls[3] and "--val-fraction" not in calls[3]
    assert all(calls[i].endswith("--precision fp32") for i in (0, 2, 3))  # the same numbers on both AMD EPYCs
    assert set((tmp_path / "isa").read_text().split("\n")[:-1]) == {"train.py AVX2 avx2", "- AVX2 avx2",
                                                                       "finetune.py AVX2 avx2"}
    assert set((tmp_path / "threads").read_text().split()) == {"1"}  # one thread, as its committed runs
    assert (study / "chosen-on-validation" / "work" / "chosen" / "pre_trained" / "lenet.pth").is_symlink()
    assert "the seeds wait for the pre-training of all five networks" in result.stdout
    tried = study / "chosen-on-validation" / "outputs" / "tried" / "cosine" / "train"
    tried.mkdir(parents=True)
    for name in ("lenet", "spinalnet", "alexnet", "resnet", "vggnet"):  # all five pre-trained, lenet the best
        (tried / f"{name}.json").write_text("{}")
    (study / "chosen-on-validation" / "outputs" / "rates" / "finetune" / "lenet_rates.json").unlink()
    (tmp_path / "calls").unlink()
    result = subprocess.run(["bash", str(study / "run_study.sh"), "chosen", "spinalnet"], capture_output=True,
                            text=True, timeout=60, env=env)  # the seeds need not wait for the others' fine-tuning
    seeds = [call for call in (tmp_path / "calls").read_text().splitlines() if "/seeds/seed-" in call]
    assert [call.split()[0] for call in seeds] == ["train.py"] and "--seed 1" in seeds[0]
    assert "the seeds of lenet fine-tune once its rate is chosen" in result.stdout
    assert "evaluation waits for: alexnet resnet vggnet" in result.stdout
    lock = study / "chosen-on-validation" / "seeds" / "seed-1" / "outputs" / "train" / "lenet.json.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as handle:  # a second copy of the script runs seed 1: this one takes seed 2
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (tmp_path / "calls").unlink()
        result = subprocess.run(["bash", str(study / "run_study.sh"), "chosen", "spinalnet"], capture_output=True,
                                text=True, timeout=60, env=env)
    seeds = [call for call in (tmp_path / "calls").read_text().splitlines() if "/seeds/seed-" in call]
    assert [call.split()[0] for call in seeds] == ["train.py"] and "--seed 2" in seeds[0]
    assert "seed 1 of lenet: another run holds it, so this one goes on to the next" in result.stdout
    lock.unlink()
    stopped = study / "chosen-on-validation" / "work" / "rates" / "fine_tuned" / "lenet_tuned_unfinished_last_lr0.001.pth"
    stopped.parent.mkdir(parents=True)
    stopped.touch()  # lenet's rate choice had stopped: it resumes
    calls = rerun_with_the_others_published(study, "chosen", env)  # lenet's rate chosen again, the seeds, evaluate
    assert "--resume" in next(call for call in calls if "--val-fraction" in call)
    evaluate = next(call for call in calls if call.startswith(f"evaluate.py --update-results --model {FIVE}"))
    assert f"--ensemble-from-validation {chosen}/work/chosen" in evaluate
    assert calls.index(evaluate) < min(i for i, call in enumerate(calls) if "/seeds/seed-" in call)  # hours before
    seeds = [call for call in calls if "/seeds/seed-" in call]
    assert [call.split()[0] for call in seeds] == ["train.py", "finetune.py", "evaluate.py"] * 2
    assert "--schedule cosine --seed 1" in seeds[0] and f"--hub {chosen}/seeds/seed-1/work" in seeds[0]
    assert seeds[0].endswith("--precision fp32") and seeds[1].endswith("--precision fp32")
    assert f"--ckpt {chosen}/seeds/seed-1/work/pre_trained/lenet.pth --lr 0.0001 --schedule cosine --seed 1" in seeds[1]
    assert "--split test" in seeds[2] and f"--hub {chosen}/seeds/seed-1/work" in seeds[2] and "--seed 2" in seeds[3]
    transfer = next(call for call in calls if call.startswith("transfer_mnist.py"))  # the best network's, in fp32
    assert transfer.startswith(f"transfer_mnist.py --update-results --model lenet --ckpt {chosen}/model_hub/"
                               f"fine_tuned/lenet_tuned.pth ") and transfer.endswith(
        f"--hub {chosen}/work --outputs {chosen}/outputs --precision fp32")
    assert calls.index(evaluate) < calls.index(transfer) < min(i for i, call in enumerate(calls) if "/seeds/" in call)
