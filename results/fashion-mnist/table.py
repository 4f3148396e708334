"""The tables of this folder's README, printed from the JSON files and logs beside it.

    python results/fashion-mnist/table.py

1. The study's recipe (study/): test metrics per network and the ensemble of all five.
2. The recipe chosen on validation (chosen-on-validation/): ResNet, SpinalNet and their ensemble.
3. Every run that was tried (study/ and tried/): pre-training's best validation accuracy,
   test accuracy and F1, and the hardware that trained it (from logs/times.log).
Standard library only: it reads, it never trains or evaluates.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from runs import UserError, read_json  # noqa: E402
ORDER = ["lenet", "alexnet", "vggnet", "resnet", "spinalnet", "ensnet"]
NAMES = {"lenet": "LeNet", "alexnet": "AlexNet", "vggnet": "VGGNet", "resnet": "ResNet", "spinalnet": "SpinalNet",
         "ensnet": "EnsNet", "ensemble": "ensemble"}


def load(path):
    return read_json(path, "study") if path.is_file() else None  # runs.py: one-line errors, stdlib only


def percent(value):
    return f"{100 * value:.2f}"


def metrics_table(folder):
    """Test accuracy and weighted P / R / F1 of every evaluated network in `folder`, then the ensemble."""
    comparison = load(folder / "outputs" / "eval" / "comparison.json")
    lines = ["| network | test accuracy | precision | recall | F1 |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, column in comparison["models"].items():
        test = column["test"]
        lines.append(f"| {NAMES[name]} | {percent(test['accuracy'])} | {percent(test['precision'])} | "
                     f"{percent(test['recall'])} | {percent(test['f1'])} |")
    return lines


def hardware(folder, name):
    """Where pre-training ran, from the last successful line of logs/times.log ('-' when unrecorded)."""
    log = folder / "logs" / "times.log"
    lines = [line for line in log.read_text().splitlines() if line.startswith(f"train {name} rc=0")] \
        if log.is_file() else []
    if not lines:
        return "-"
    return "NVIDIA H200" if "H200" in lines[-1] else "CPU, 2 cores" if "2 cores" in lines[-1] else "CPU, 1 core"


def runs():
    """(recipe, folder) of every run: the study's, then each folder under tried/ and its seed-N/ folders."""
    yield "study", HERE / "study"
    for folder in sorted((HERE / "tried").iterdir()):
        if (folder / "outputs").is_dir():
            yield folder.name, folder
        for seed in sorted(folder.glob("seed-*")):
            yield f"{folder.name}/{seed.name}", seed


def tried_table():
    lines = ["| recipe | network | pre-training: best val. acc. (epoch / run) | test acc. | test F1 | trained on |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for recipe, folder in runs():
        for name in ORDER:
            trained = load(folder / "outputs" / "train" / f"{name}.json")
            evaluated = load(folder / "outputs" / "eval" / f"{name}.json")
            if not trained and not evaluated:
                continue
            val = (f"{percent(trained['best_val_acc'])} ({trained['best_epoch']} / {len(trained['history'])})"
                   if trained else "-")
            test = (percent(evaluated["test"]["accuracy"]), percent(evaluated["test"]["f1"])) if evaluated \
                else ("-", "-")
            lines.append(f"| {recipe} | {NAMES[name]} | {val} | {test[0]} | {test[1]} | {hardware(folder, name)} |")
        comparison = load(folder / "outputs" / "eval" / "comparison.json")
        if comparison and "ensemble" in comparison["models"]:
            test = comparison["models"]["ensemble"]["test"]
            members = ", ".join(NAMES[name] for name in comparison["models"] if name != "ensemble")
            lines.append(f"| {recipe} | ensemble of {members} | | {percent(test['accuracy'])} | "
                         f"{percent(test['f1'])} | |")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv:
            print("usage: python results/fashion-mnist/table.py  (prints this folder's README tables)")
            sys.stdout.flush()
            raise SystemExit(0 if argv[0] in ("-h", "--help") else 2)
        print("## The study's recipe, seed 0 (test split, percent)\n")
        print("\n".join(metrics_table(HERE / "study")))
        print("\n## The recipe chosen on validation (test split, percent)\n")
        print("\n".join(metrics_table(HERE / "chosen-on-validation")))
        print("\n## Every run tried (percent)\n")
        print("\n".join(tried_table()))
        sys.stdout.flush()
    except (UserError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # fields of the wrong type
        what = err if isinstance(err, UserError) else f"a file of {HERE} lacks a field or holds one of the wrong type " \
                                                    f"({type(err).__name__}: {err})"
        sys.stderr.write(f"error: {what}; restore the folder with `git checkout {HERE.relative_to(HERE.parents[1])}`\n")
        raise SystemExit(1)
    except OSError as err:  # a full disk behind stdout is one line; a closed pipe (`| head`) ends quietly
        if not isinstance(err, BrokenPipeError):
            sys.stderr.write(f"error: cannot write the tables ({err.strerror or err})\n")
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
