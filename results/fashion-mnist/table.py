"""The README's Fashion-MNIST tables, printed from the JSON files and logs in this folder.

    python results/fashion-mnist/table.py

- One table per recipe (the study's, then each option folder in RECIPES). Per network that
  finished every stage: the search winner, pre-training epochs run (best by validation loss),
  train and test accuracy, weighted precision / recall / F1 on the test split, the wall time
  of each stage (each stage's own clock, in the JSONs) and where it trained. Then the
  ensemble row of `evaluate.py --model all`, and, where seed-N/ folders hold more runs, test
  accuracy as mean +- std over the seeds.
- Pre-training's best validation accuracy for every run that finished pre-training, by
  recipe and seed.
- The test accuracy of checkpoints evaluated before (or without) fine-tuning.

Standard library only: it reads, it never trains or evaluates.
"""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["lenet", "alexnet", "vggnet", "resnet", "spinalnet"]
RECIPES = {"no-augment": "--no-augment",  # folder: its options
           "no-augment-finetune-lr-0.0001": "--no-augment --finetune-lr 0.0001",
           "shift-flip": "--augment shift-flip",
           "shift-flip-cosine": "--augment shift-flip --schedule cosine",
           "shift-flip-cosine-40-epochs": "--augment shift-flip --schedule cosine --epochs 40",
           "shift-flip-cosine-40-epochs-finetune-lr-0.0001":
               "--augment shift-flip --schedule cosine --epochs 40 --finetune-lr 0.0001",
           "shift-flip-cosine-60-epochs": "--augment shift-flip --schedule cosine --epochs 60",
           "shift-flip-cosine-60-epochs-finetune-lr-0.0001":
               "--augment shift-flip --schedule cosine --epochs 60 --finetune-lr 0.0001",
           "shift-flip-cosine-40-epochs-weight-decay-0.0001":
               "--augment shift-flip --schedule cosine --epochs 40 --weight-decay 0.0001",
           "shift-flip-cosine-40-epochs-weight-decay-0.0001-finetune-lr-0.0001":
               "--augment shift-flip --schedule cosine --epochs 40 --weight-decay 0.0001 --finetune-lr 0.0001"}
NAMES = {"lenet": "LeNet", "alexnet": "AlexNet", "vggnet": "VGGNet", "resnet": "ResNet", "spinalnet": "SpinalNet",
         "ensnet": "EnsNet", "ensemble": "ensemble"}


def load(path):
    return json.loads(path.read_text()) if path.is_file() else None


def minutes(*stages):
    """Each stage's time in minutes from the JSONs' own clocks (sum of trials; last epoch's elapsed);
    a string stands as it is."""
    return " + ".join(seconds if isinstance(seconds, str) else "?" if seconds is None else f"{seconds / 60:.0f}"
                      for seconds in stages)


def search_seconds(search):
    return sum(trial["seconds"] for trial in search["trials"]) if search.get("trials") else None


def elapsed(history):
    return history["history"][-1]["elapsed"] if history and history.get("history") else None


def percent(value):
    return f"{100 * value:.2f}"


def winner(params, used=None):
    """The search winner's lr, batch, momentum and weight decay; a value pre-training changed (an
    option such as --weight-decay) is shown as used, with the winner's beside it."""
    used = used or {}
    return ", ".join(f"{params[key]:g}" if used.get(key, params[key]) == params[key] else
                     f"**{used[key]:g}** (searched {params[key]:g})"
                     for key in ("learning_rate", "batch_size", "momentum", "weight_decay"))


def metric_cells(result):
    """An evaluation's train accuracy, test accuracy and test P / R / F1, as table cells."""
    train, test = result["train"], result["test"]
    return (f"{percent(train['accuracy'])} | {percent(test['accuracy'])} "
            f"| {percent(test['precision'])} / {percent(test['recall'])} / {percent(test['f1'])}")


def recipe_table(folder, search_folder):
    comparison = load(folder / "outputs" / "eval" / "comparison.json")
    if comparison is None:
        return None
    rows = ["| network | search winner: lr, batch, momentum, weight decay | pre-training epochs (best) "
            "| train acc. | test acc. | test P / R / F1 (weighted) | minutes: search + pre-training + "
            "fine-tuning | trained on |", "| --- | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for name in [name for name in ORDER if name in comparison["models"]] + ["ensemble"]:
        result = comparison["models"].get(name)
        if result is None:
            continue
        search = load(search_folder / "outputs" / "search" / f"{name}.json") or {}
        history = load(folder / "outputs" / "train" / f"{name}.json") or {}
        tuning = load(folder / "outputs" / "finetune" / f"{name}.json") or {}
        epochs = f"{len(history['history'])} ({history['best_epoch']})" if history else ""
        searched = search_seconds(search) if folder == search_folder else "0 (the study's winner)"
        source = reused_from(folder, name)
        pretraining = f"0 ({source}'s)" if source else elapsed(history)
        wall = minutes(searched, pretraining, elapsed(tuning)) if history else ""
        used = history.get("args", {}) if history else {}
        rows.append(f"| {NAMES[name]} | {winner(search['best_params'], used) if search.get('best_params') else ''} "
                    f"| {epochs} | {metric_cells(result)} | {wall} "
                    f"| {hardware(folder, name) if name != 'ensemble' else ''} |")
    return "\n".join(rows)


def pretraining_table():
    """Best validation accuracy of pre-training (the epoch early stopping keeps) per recipe and seed:
    every run that finished pre-training, fine-tuned or not (same 10 % validation split per seed)."""
    seeds = [("study, seed 0", HERE), ("seed 1", HERE / "seed-1"), ("seed 2", HERE / "seed-2")]
    columns = seeds + [(f"{name}/", HERE / name) for name in RECIPES  # options by folder: the headings say each
                       if any((HERE / name / "outputs" / "train" / f"{network}.json").is_file()
                              and not reused_from(HERE / name, network) for network in ORDER)]
    rows = ["| network | " + " | ".join(title for title, _ in columns[:3]) + " | study, mean +- std | "
            + " | ".join(title for title, _ in columns[3:]) + " |", "| --- |" + " ---: |" * (len(columns) + 1)]
    for name in ORDER:
        cells, study = [], []
        for title, folder in columns:
            history = load(folder / "outputs" / "train" / f"{name}.json")
            if history is None:
                cells.append("")
                continue
            cells.append(f"{percent(history['best_val_acc'])} ({history['best_epoch']}/{len(history['history'])}, "
                         f"{hardware(folder, name)})")
            if (title, folder) in seeds:
                study.append(100 * history["best_val_acc"])
        spread = f"{statistics.mean(study):.2f} +- {statistics.stdev(study):.2f}" if len(study) > 1 else ""
        rows.append(f"| {NAMES[name]} | " + " | ".join(cells[:3] + [spread] + cells[3:]) + " |")
    return "\n".join(rows)


def pretrained_test_lines():
    """Test accuracy of checkpoints evaluated without (or before) fine-tuning: outputs/pre-trained/
    and EnsNet's folder."""
    lines = []
    paths = sorted(HERE.glob("**/outputs/pre-trained/eval/*.json")) + sorted(HERE.glob("ensnet/outputs/eval/*.json"))
    for path in paths:
        result = load(path)
        if result is None or "test" not in result:
            continue
        folder = path.parents[3].name if "pre-trained" in path.parts else "study"
        recipe = RECIPES.get(folder, "the study's recipe")
        lines.append(f"- {NAMES.get(result['model'], result['model'])}, {recipe}: "
                     f"{percent(result['test']['accuracy'])} % test (F1 {percent(result['test']['f1'])}), "
                     f"the pre-trained checkpoint of epoch "
                     f"{result.get('epochs', '?')}, evaluated with {result.get('precision', '?')}")
    return lines


def times_lines(run, prefix):
    """The lines of a run's logs/times.log that start with prefix (none without the file)."""
    log = run / "logs" / "times.log"
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)] if log.is_file() else []


def reused_from(run, name):
    """The folder (relative to this one) whose pre-training a fine-tuning option copied, from
    run_study.sh's last 'reused NAME pre-training from FOLDER' line, or None."""
    lines = times_lines(run, f"reused {name} pre-training from ")
    if not lines:
        return None
    folder = Path(lines[-1].split(" from ", 1)[1].split()[0]).relative_to("results/fashion-mnist")
    return folder.as_posix() if folder.parts else "the study"


def picks_table():
    """picked-by-validation/: the run pick_by_validation.py linked per network, its pre-training
    validation accuracy, and what evaluate.py --model all measured on the test split, ensemble last."""
    picks = load(HERE / "picked-by-validation" / "picks.json")
    comparison = load(HERE / "picked-by-validation" / "outputs" / "eval" / "comparison.json")
    if picks is None or comparison is None:
        return None
    rows = ["| network | picked run | pre-training validation acc. | train acc. | test acc. | test P / R / F1 "
            "(weighted) |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for name in [name for name in ORDER if name in comparison["models"]] + ["ensemble"]:
        result = comparison["models"].get(name)
        if result is None:
            continue
        pick = picks["networks"].get(name, {})
        rows.append(f"| {NAMES[name]} | {pick.get('picked', 'the mean of the probabilities above')} "
                    f"| {percent(pick['pre_training_best_val_acc']) if pick else ''} | {metric_cells(result)} |")
    chosen = load(HERE / "picked-by-validation" / "ensemble" / "ensemble.json")
    measured = load(HERE / "picked-by-validation" / "ensemble" / "outputs" / "eval" / "comparison.json")
    if chosen and measured and sorted(measured["models"]) == sorted(chosen["members"] + ["ensemble"]):
        members = " and ".join(NAMES[name] for name in chosen["members"])
        rows.append(f"| ensemble chosen on validation | the mean of {members} "
                    f"| {percent(chosen['val_acc'])} (the pre-trained networks) "
                    f"| {metric_cells(measured['models']['ensemble'])} |")
    return "\n".join(rows)


def finetune_validation_lines():
    """Fine-tuning on the 90 % pre-training trained on, validated on the 10 % it held out, one run per
    Adam rate (finetune-lr-validation/FOLDER/, from finetune_lr_validation.sh): what chose --finetune-lr."""
    lines = []
    for path in sorted(HERE.glob("finetune-lr-validation/*/outputs/lr-*/finetune/*.json")):
        run, folder = load(path), path.parents[3].name  # FOLDER/outputs/lr-X/finetune/NAME.json
        start = load(HERE / folder / "outputs" / "train" / path.name)
        each = ", ".join(percent(row["val_acc"]) for row in run["history"])
        lines.append(f"- {NAMES[path.stem]} from {folder}/ "
                     f"({percent(start['best_val_acc']) if start else '?'} before), Adam lr "
                     f"{run['args']['learning_rate']:g}, {run['args']['schedule']}: {each} (epochs 1 to "
                     f"{len(run['history'])})")
    return lines


def hardware(run, name):
    """Where a run's pre-training ran, from the last 'train NAME rc=0' line of its logs/times.log."""
    lines = times_lines(run, f"train {name} rc=0 ")
    if not lines:  # runs from before times.log named the GPU ran on the CPU, in fp32
        history = load(run / "outputs" / "train" / f"{name}.json") or {}
        return "CPU" if history.get("args", {}).get("precision") == "fp32" else "?"
    gpu = lines[-1].split(" cores", 1)[1].strip()
    return gpu.replace("NVIDIA ", "") if gpu else "CPU"


def seed_lines(folder):
    """Test accuracy mean +- std per network over seed 0 (folder) and every seed-N/ below it, each
    from its network's evaluation JSON, with where it was trained and evaluated."""
    runs = {}
    for run in [folder] + sorted(folder.glob("seed-*")):
        seed = run.name.removeprefix("seed-") if run != folder else "0"
        for name in ORDER:
            result = load(run / "outputs" / "eval" / f"{name}.json")
            if result is not None:
                runs.setdefault(name, []).append((seed, 100 * result["test"]["accuracy"], hardware(run, name),
                                                  result.get("precision", "?")))
    lines = []
    for name in [name for name in ORDER if len(runs.get(name, [])) > 1]:
        values = [value for _, value, _, _ in runs[name]]
        each = "; ".join(f"seed {seed}: {value:.2f} ({where}, {precision})" for seed, value, where, precision in
                         runs[name])
        lines.append(f"- {NAMES[name]}: {statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} % over "
                     f"{len(values)} seeds ({each})")
    return lines


def main():
    for title, folder in [("the study's recipe", HERE)] + [(recipe, HERE / name) for name, recipe in RECIPES.items()]:
        table = recipe_table(folder, HERE)
        if table is None:
            continue
        print(f"{title} (test split, percent)\n\n{table}\n")
        lines = seed_lines(folder)
        if lines:
            print("\n".join(["test accuracy over seeds (pre-training + fine-tuning again with the same "
                              "settings):"] + lines) + "\n")
    table = picks_table()
    if table:
        print(f"picked by validation (test split, percent)\n\n{table}\n")
    print("pre-training: best validation accuracy, percent (best epoch / epochs run, trained on)\n")
    print(pretraining_table() + "\n")
    lines = finetune_validation_lines()
    if lines:
        print("\n".join(["fine-tuning's learning rate on validation: validation accuracy, percent, after each "
                          "epoch of fine-tuning on the other 90 %:"] + lines) + "\n")
    lines = pretrained_test_lines()
    if lines:
        print("\n".join(["checkpoints evaluated before (or without) fine-tuning:"] + lines))


if __name__ == "__main__":
    main()
