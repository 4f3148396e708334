"""One fine-tuned network per architecture, picked by validation accuracy over every recipe run
with seed 0, for a test evaluation and an ensemble that the test split chose nothing of.

    python results/fashion-mnist/pick_by_validation.py            # writes picked-by-validation/
    python evaluate.py --model all --dataset fashion-mnist --hub results/fashion-mnist/picked-by-validation/model_hub \
        --outputs results/fashion-mnist/picked-by-validation/outputs

- Candidates: each folder (the study's and every option in table.RECIPES) whose model_hub holds the
  network's fine-tuned checkpoint. Seed 0 only: every seed-0 run holds out the same 6,000
  validation images, so their accuracies compare.
- The pick: the highest best validation accuracy of pre-training. Folders that share a
  pre-training (a fine-tuning option reuses it) tie; the tie goes to the fine-tuning rate that
  validation chose for that network (finetune-lr-validation/: the best last-epoch validation accuracy,
  then the lower validation loss; a network without runs of its own takes the choice over all).
- Writes picked-by-validation/model_hub/fine_tuned/NAME_tuned.pth as relative links to the picked
  checkpoints (no copies) and picked-by-validation/picks.json with every candidate's numbers.

Standard library only: it reads JSONs and makes links; evaluate.py measures.
"""
import json
import os
import sys
from pathlib import Path

from table import HERE, NAMES, ORDER, RECIPES, load

OUT = HERE / "picked-by-validation"


def validated_rate(name):
    """The fine-tuning Adam rate that validation chose for `name` (finetune-lr-validation/), or None.

    The best last-epoch validation accuracy wins, ties to the lower validation loss. A network with
    no validation runs of its own takes the rate chosen over every network's runs.
    """
    runs = [load(path) for path in sorted(HERE.glob("finetune-lr-validation/*/outputs/lr-*/finetune/*.json"))]
    runs = [run for run in runs if run and run.get("history")]
    own = [run for run in runs if run["args"]["model"] == name]
    if not own and not runs:
        return None
    best = max(own or runs, key=lambda run: (run["history"][-1]["val_acc"], -run["history"][-1]["val_loss"]))
    return best["args"]["learning_rate"]


def candidates(name, rate):
    """(pre-training best validation accuracy, uses the validated rate, folder) for each finished run."""
    found = []
    for folder in [HERE] + [HERE / recipe for recipe in RECIPES]:
        checkpoint = folder / "model_hub" / "fine_tuned" / f"{name}_tuned.pth"
        history = load(folder / "outputs" / "train" / f"{name}.json")
        tuning = load(folder / "outputs" / "finetune" / f"{name}.json")
        if checkpoint.is_file() and history and tuning:
            found.append((history["best_val_acc"], tuning["args"]["learning_rate"] == rate, folder))
    return found


def write_atomically(path, text):
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def link_atomically(target, link):
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temporary.symlink_to(os.path.relpath(target, link.parent))
    os.replace(temporary, link)


def main():
    hub = OUT / "model_hub" / "fine_tuned"
    hub.mkdir(parents=True, exist_ok=True)
    picks = {"rule": "highest pre-training validation accuracy (seed 0, the same 6,000 images); ties (a shared "
                     "pre-training) to the fine-tuning rate validation chose for the network (best last-epoch "
                     "validation accuracy, then the lower loss; a network without runs of its own: over all)",
             "networks": {}}
    for name in ORDER:
        rate = validated_rate(name)
        found = candidates(name, rate)
        stale = hub / f"{name}_tuned.pth"
        if not found:
            stale.unlink(missing_ok=True)
            continue
        accuracy, _, folder = max(found, key=lambda candidate: candidate[:2])
        link_atomically(folder / "model_hub" / "fine_tuned" / f"{name}_tuned.pth", stale)
        picks["networks"][name] = {
            "picked": folder.relative_to(HERE).as_posix() if folder != HERE else "the study's recipe",
            "pre_training_best_val_acc": accuracy,
            "validated_finetune_lr": rate,
            "candidates": {(f.relative_to(HERE).as_posix() if f != HERE else "the study's recipe"): value
                           for value, _, f in sorted(found, key=lambda candidate: candidate[2])}}
        print(f"{NAMES[name]}: {picks['networks'][name]['picked']} ({100 * accuracy:.2f} % validation, "
              f"{len(found)} candidates)")
    write_atomically(OUT / "picks.json", json.dumps(picks, indent=2) + "\n")
    print(f"wrote {OUT / 'picks.json'} and the links in {hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
