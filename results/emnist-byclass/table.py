"""The tables of this folder's README, printed from the JSON files and logs beside it.

    python results/emnist-byclass/table.py

1. The study's recipe (study/) on the carve's 20,000 test images, beside the published study's
   subset table (its own 20,000 test images, not these).
2. Every network of the recipe, stage by stage: the search's winner, pre-training's best
   validation accuracy, the test metrics, and the time and threads of each stage (logs/times.log;
   pre-training and fine-tuning: the runs' own clocks, which count the epochs of every resumed part).
3. Transfer to MNIST of each recipe's best-validated network, beside the study's 95.27 %.
4. The recipe chosen on validation (chosen-on-validation/): its test metrics, once all five are evaluated;
   what validation chose for each network (pre-training, fine-tuning rate, ensemble members), with the
   accuracies it chose on; its best network over three seeds, mean +- std.
5. The repository README's summary of the test tables.
Standard library only: it reads, it never trains or evaluates.
"""
import os
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from runs import UserError, read_json  # noqa: E402
ORDER = ["lenet", "alexnet", "vggnet", "resnet", "spinalnet", "ensnet"]  # ensnet: run_study.sh study ensnet
NAMES = {"lenet": "LeNet", "alexnet": "AlexNet", "vggnet": "VGGNet", "resnet": "ResNet", "spinalnet": "SpinalNet",
         "ensnet": "EnsNet", "ensemble": "ensemble"}
# The published study's subset table (120,000 training and 20,000 test images of ByClass), percent.
PAPER = {"alexnet": (87.95, 87.62, 87.95, 86.59), "vggnet": (89.80, 90.01, 89.80, 88.42),
         "spinalnet": (87.15, 86.18, 87.15, 85.28), "resnet": (89.28, 89.24, 89.28, 88.30)}
PAPER_TRANSFER = ("vggnet", 95.27)


def load(path):
    return read_json(path, "study") if path.is_file() else None  # runs.py: one-line errors, stdlib only


def percent(value):
    return f"{100 * value:.2f}"


def evaluated(folder):
    """{network: eval JSON} of every evaluated network, then the ensemble's column when there is one."""
    results = {name: load(folder / "outputs" / "eval" / f"{name}.json") for name in ORDER}
    results = {name: result for name, result in results.items() if result}
    comparison = load(folder / "outputs" / "eval" / "comparison.json")
    if comparison and "ensemble" in comparison["models"]:
        results["ensemble"] = comparison["models"]["ensemble"]
    return results


def metrics_table(folder):
    lines = ["| network | accuracy | precision | recall | F1 | macro F1 | case-merged acc. | "
             "the study: acc. / P / R / F1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in evaluated(folder).items():
        test = result["test"]
        extra = [percent(test[key]) if key in test else "-" for key in ("macro_f1", "case_merged_accuracy")]
        paper = " / ".join(f"{value:.2f}" for value in PAPER[name]) if name in PAPER else "-"
        lines.append(f"| {NAMES[name]} | " + " | ".join(percent(test[key]) for key in ("accuracy", "precision",
                     "recall", "f1")) + f" | {extra[0]} | {extra[1]} | {paper} |")
    return lines


def headline_table(study, chosen):
    """The repository README's table: test accuracy / weighted F1 of every network, ours and the study's."""
    def row(title, results):
        cell = lambda name: (f"{percent(results[name]['test']['accuracy'])} / {percent(results[name]['test']['f1'])}"
                             if name in results else "waits")
        return f"| {title} | " + " | ".join(cell(name) for name in ORDER) + " |"
    paper = lambda name: f"{PAPER[name][0]:.2f} / {PAPER[name][3]:.2f}" if name in PAPER else "-"
    chosen = evaluated(chosen)
    chosen = [row("the recipe chosen on validation, here", chosen)] if chosen else []
    return ["| | " + " | ".join(NAMES[name] for name in ORDER) + " |", "| --- |" + " ---: |" * len(ORDER),
            row("the study's recipe, here", evaluated(study)), *chosen,
            "| the published study | " + " | ".join(paper(name) for name in ORDER) + " |"]


def stage_times(folder):
    """{(stage, network): (seconds, threads)} from the last successful line of each stage
    ("choose the fine-tuning rate of lenet rc=0 seconds=300 ... 1 threads": stage, then its network)."""
    times = {}
    log = folder / "logs" / "times.log"
    for line in log.read_text().splitlines() if log.is_file() else ():
        found = re.fullmatch(r"(.+) (\w+) rc=0 seconds=(\d+) .* (\d+) threads.*", line)
        if found:
            stage, name, seconds, threads = found.groups()
            times[(stage, name)] = (int(seconds), threads)
    return times


def minutes(seconds):
    return f"{seconds / 60:.0f} min"


def clock(run):
    """A run's own clock, which counts the epochs of every resumed part."""
    return minutes(run["history"][-1]["elapsed"]) if run else "-"


def threads_of(times, name):
    """The thread counts of a network's stages, as the table shows them."""
    return ", ".join(sorted({threads for (_, network), (_, threads) in times.items() if network == name})) or "-"


def stages_table(folder):
    lines = ["| network | search winner (lr, batch, momentum, decay) | pre-training: best val. acc. (epoch) | "
             "test acc. | search / pre-training / fine-tuning time (threads) |",
             "| --- | --- | ---: | ---: | --- |"]
    times = stage_times(folder)
    for name in ORDER:
        search = load(folder / "outputs" / "search" / f"{name}.json")
        trained = load(folder / "outputs" / "train" / f"{name}.json")
        result = load(folder / "outputs" / "eval" / f"{name}.json")
        if not search:
            continue
        best = search["best_params"]
        winner = f"{best['learning_rate']:g}, {best['batch_size']}, {best['momentum']:g}, {best['weight_decay']:g}"
        if not search.get("complete"):
            winner = f"({len(search['trials'])} of 28 trials so far)"
        val = f"{percent(trained['best_val_acc'])} ({trained['best_epoch']})" if trained else "-"
        test = percent(result["test"]["accuracy"]) if result else "-"
        tuned = load(folder / "outputs" / "finetune" / f"{name}.json")
        search_time = minutes(times[("search", name)][0]) if ("search", name) in times else "-"
        spent = " / ".join([search_time, clock(trained), clock(tuned)])
        lines.append(f"| {NAMES[name]} | {winner} | {val} | {test} | {spent} ({threads_of(times, name)}) |")
    return lines


def choices_table(study, chosen):
    """What validation chose for each network, with the accuracies it chose on, then the test accuracy."""
    tried = sorted(folder.name for folder in (chosen / "outputs" / "tried").glob("*/") if folder.name != "study")
    lines = [f"| network | pre-training, best val. acc.: the study's / {' / '.join(tried) or '-'} (kept) | "
             "fine-tuning rate: best val. acc. | test acc. | pre-training / rate choice / fine-tuning time (threads) |",
             "| --- | --- | --- | ---: | --- |"]
    bold = lambda text, kept: f"**{text}**" if kept else text
    times = stage_times(chosen)
    for name in ORDER:
        runs = {"study": load(study / "outputs" / "train" / f"{name}.json")} | {
            label: load(chosen / "outputs" / "tried" / label / "train" / f"{name}.json") for label in tried}
        if not tried or not all(runs.values()):
            continue
        kept = max(runs, key=lambda label: (runs[label]["best_val_acc"], label == "study"))  # the study's wins ties
        pre = " / ".join(bold(percent(run["best_val_acc"]), label == kept) for label, run in runs.items())
        rerun = load(chosen / "outputs" / "tried" / "study" / "train" / f"{name}.json")  # its checkpoint not kept
        if kept == "study" and rerun:
            pre += f", run again here: {percent(rerun['best_val_acc'])}"
        kept_run = rerun if kept == "study" and rerun else runs[kept]
        rates = load(chosen / "outputs" / "rates" / "finetune" / f"{name}_rates.json")
        rate = ", ".join(bold(f"{row['learning_rate']:g}: {percent(row['val_acc'])}",
                              row["learning_rate"] == rates["chosen"]) for row in rates["rates"]) if rates else "-"
        result = load(chosen / "outputs" / "eval" / f"{name}.json")
        tuned = load(chosen / "outputs" / "finetune" / f"{name}.json")
        choosing = times.get(("choose the fine-tuning rate of", name))
        clocks = [clock(kept_run) if kept != "study" or rerun else "-", minutes(choosing[0]) if choosing else "-",
                  clock(tuned)]
        lines.append(f"| {NAMES[name]} | {pre} ({kept}) | {rate} | "
                     f"{percent(result['test']['accuracy']) if result else '-'} | "
                     f"{' / '.join(clocks)} ({threads_of(times, name)}) |")
    comparison = load(chosen / "outputs" / "eval" / "comparison.json")
    if comparison and comparison.get("ensemble_choice"):
        choice, members = comparison["ensemble_choice"], comparison["ensemble_members"]
        score = choice["validation_accuracy"].get(" + ".join(members))
        lines.append(f"| ensemble | {' + '.join(NAMES[member] for member in members)}"
                     f"{f': {percent(score)}' if score else ''} (the best of every subset of two or more, on the same "
                     f"{choice['validation_images']:,} images) | | "
                     f"{percent(comparison['models']['ensemble']['test']['accuracy'])} | |")
    return lines


def seeds_table(chosen):
    """The best network of the chosen recipe over its seeds (seed 0: the chosen run itself), and their mean +- std
    (sample standard deviation)."""
    folders = [chosen] + sorted((chosen / "seeds").glob("seed-*"), key=lambda path: int(path.name[5:]))
    best = {path.stem for folder in folders[1:] for path in (folder / "outputs" / "eval").glob("*.json")}
    if len(best) != 1:
        return []
    best = best.pop()
    results = [(folder.name if folder != chosen else "seed-0", load(folder / "outputs" / "eval" / f"{best}.json"))
               for folder in folders]
    results = [(seed, result) for seed, result in results if result]
    keys = ("accuracy", "f1", "macro_f1", "case_merged_accuracy")
    lines = [f"| {NAMES[best]} | accuracy | F1 | macro F1 | case-merged acc. |", "| --- | ---: | ---: | ---: | ---: |"]
    for seed, result in results:
        lines.append(f"| {seed.replace('-', ' ')} | " + " | ".join(percent(result["test"][key]) for key in keys) + " |")
    if len(results) > 1:
        values = lambda key: [100 * result["test"][key] for _, result in results]
        lines.append(f"| mean +- std, {len(results)} seeds | " + " | ".join(
            f"{statistics.mean(values(key)):.2f} +- {statistics.stdev(values(key)):.2f}" for key in keys) + " |")
    return lines


def transfer_table(study, chosen):
    """Each recipe's transfer of its best-validated network, beside the study's."""
    lines = ["| network | MNIST test: zero-shot | after transfer | the study |", "| --- | ---: | ---: | ---: |"]
    paper = f"{PAPER_TRANSFER[1]:.2f} ({NAMES[PAPER_TRANSFER[0]]})"
    for recipe, folder in (("the study's recipe", study), ("the recipe chosen on validation", chosen)):
        for name in ORDER:
            result = load(folder / "outputs" / "transfer" / f"{name}.json")
            if result:
                lines.append(f"| {NAMES[name]}, {recipe} | {percent(result['before']['test']['accuracy'])} | "
                             f"{percent(result['after']['test']['accuracy'])} | {paper} |")
    return lines


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    study, chosen = HERE / "study", HERE / "chosen-on-validation"
    try:
        if argv:
            print("usage: python results/emnist-byclass/table.py  (prints this folder's README tables)")
            sys.stdout.flush()
            raise SystemExit(0 if argv[0] in ("-h", "--help") else 2)
        print("## The study's recipe, seed 0 (the carve's 20,000 test images, percent)\n")
        print("\n".join(metrics_table(study)))
        print("\n## Stage by stage\n")
        print("\n".join(stages_table(study)))
        print("\n## Transfer to MNIST (the official 10,000 test images, percent)\n")
        print("\n".join(transfer_table(study, chosen)))
        print("\n## The recipe chosen on validation, seed 0 (the carve's 20,000 test images, percent)\n")
        print("\n".join(metrics_table(chosen) if evaluated(chosen) else ["(waits for all five networks)"]))
        print("\n## What validation chose (bold: kept)\n")
        print("\n".join(choices_table(study, chosen)))
        print("\n## The best network of the chosen recipe over three seeds (test, percent)\n")
        print("\n".join(seeds_table(chosen) or ["(waits for its seeds)"]))
        print("\n## The repository README's table (test accuracy / weighted F1, percent)\n")
        print("\n".join(headline_table(study, chosen)))
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
