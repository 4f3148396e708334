"""Which of the networks picked by validation join the ensemble: chosen on validation too, never on the
test split.

    python results/fashion-mnist/pick_by_validation.py              # first: one network per architecture
    python results/fashion-mnist/ensemble_by_validation.py          # writes picked-by-validation/ensemble/
    python evaluate.py --model all --dataset fashion-mnist --hub results/fashion-mnist/picked-by-validation/ensemble/model_hub \
        --outputs results/fashion-mnist/picked-by-validation/ensemble/outputs

The picked networks were fine-tuned on all the training images, so none has a held-out split left. Their
pre-trained checkpoints (seed 0) each held out the same 10 % (6,000 images): each of them predicts those
images, every subset of two or more networks is scored by the accuracy of its mean probability (what
evaluate.py's ensemble averages), and the best subset wins; ties go to fewer networks. The chosen
networks' fine-tuned checkpoints are linked (relative links, no copies) into
picked-by-validation/ensemble/model_hub/fine_tuned/, and ensemble.json lists every subset's accuracy.

The probabilities are saved in picked-by-validation/validation_probabilities.npz (float16), and the choice
is always made from them: `--from-saved` repeats it on a clone, where the pre-trained checkpoints (in the
ignored work/ folders) are not.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

from data import (VAL_FRACTION, UserError, atomic_path, load_images, run_script, stratified_split,  # noqa: E402
                  write_json)
from pick_by_validation import link_atomically  # noqa: E402
from table import ORDER  # noqa: E402

OUT = HERE / "picked-by-validation"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Choose the ensemble's members among the picked networks on "
                                                 "the validation images their pre-training held out.")
    parser.add_argument("--from-saved", action="store_true",
                        help="choose from the saved validation probabilities instead of the pre-trained checkpoints")
    parser.add_argument("--data-dir", default="data", help="folder with the dataset files (default: data)")
    return parser.parse_args(argv)


def choose(probabilities, labels):
    """(members, accuracy, every subset's accuracy): the subset of two or more networks whose mean
    probability is most accurate; ties to fewer networks, then to the earlier subset in `probabilities`' order."""
    names = list(probabilities)
    scored = []
    for size in range(2, len(names) + 1):
        for members in itertools.combinations(names, size):
            mean = np.mean([probabilities[name].astype(np.float32) for name in members], axis=0)
            scored.append((float((mean.argmax(1) == labels).mean()), list(members)))
    if not scored:
        raise UserError(f"an ensemble needs two networks, and {len(names)} were picked: run pick_by_validation.py "
                        f"after more networks have finished")
    accuracy, members = max(scored, key=lambda item: (item[0], -len(item[1])))  # max keeps the first of equals
    return members, accuracy, scored


def pre_trained_checkpoint(folder, name):
    """The pre-training a picked folder fine-tuned: its own, or the one a fine-tuning option reused."""
    path = folder / "work" / "pre_trained" / f"{name}.pth"
    if path.is_file() or "finetune-" not in folder.name:
        return path
    base = folder.name.split("finetune-")[0].rstrip("-")  # run_study.sh names fine-tuning options last
    return (folder.parent / base if base else folder.parent) / "work" / "pre_trained" / f"{name}.pth"


def predict(picks, data_dir):
    """{name: probabilities on the held-out images}, the labels, and each network's numbers."""
    import torch

    from evaluate import predict_probabilities
    from models import load_checkpoint

    probabilities, networks, split = {}, {}, None
    for name, pick in picks.items():
        folder = HERE if pick["picked"] == "the study's recipe" else HERE / pick["picked"]
        path = pre_trained_checkpoint(folder, name)
        if not path.is_file():
            raise UserError(f"{path} is missing (work/ folders are not committed): run this where that pre-training "
                            f"ran, or pass --from-saved to use the saved probabilities")
        state, model = load_checkpoint(path, name)
        run = (state["dataset"], state["args"].get("seed", 0), state["args"].get("val_fraction", VAL_FRACTION))
        if split is None:
            split = run
            images, labels = load_images(run[0], train=True, data_dir=data_dir, download=False)
            held = stratified_split(labels, run[2], run[1])[1]
            images, labels = images[held], labels[held]
        elif run != split:
            raise UserError(f"{path} held out another split ({run}, not {split}): the networks' validation "
                            f"accuracies would not compare; pick seed-0 runs of one dataset")
        probabilities[name] = predict_probabilities(model, images, state["mean"], state["std"],
                                                    torch.device("cpu")).numpy().astype(np.float16)
        networks[name] = {"picked": pick["picked"], "pre_trained": path.relative_to(HERE).as_posix(),
                          "recorded_best_val_acc": pick.get("pre_training_best_val_acc")}
        print(f"{name}: {path.relative_to(HERE)} predicted {len(labels):,} held-out images")
    return probabilities, labels.numpy(), networks


def run(args):
    picks_path, saved = OUT / "picks.json", OUT / "validation_probabilities.npz"
    if not picks_path.is_file():
        raise UserError(f"{picks_path} is missing: run python {HERE / 'pick_by_validation.py'} first")
    picks = json.loads(picks_path.read_text())["networks"]
    picks = {name: picks[name] for name in ORDER if name in picks}
    if args.from_saved:
        record = OUT / "ensemble" / "ensemble.json"
        if not saved.is_file() or not record.is_file():
            raise UserError(f"{saved} or {record} is missing: run without --from-saved where the pre-trained "
                            f"checkpoints are")
        with np.load(saved) as stored:
            labels, probabilities = stored["labels"], {name: stored[name] for name in picks if name in stored}
        networks = json.loads(record.read_text())["networks"]
        if list(probabilities) != list(picks) or \
                any(networks.get(name, {}).get("picked") != pick["picked"] for name, pick in picks.items()):
            raise UserError(f"the saved probabilities are of other picks than {picks_path}: run without "
                            f"--from-saved to predict again")
    else:
        probabilities, labels, networks = predict(picks, args.data_dir)
        with atomic_path(saved) as partial, open(partial, "wb") as file:  # a file: np.savez would add .npz to a name
            np.savez_compressed(file, labels=labels, **probabilities)
    for name, values in probabilities.items():
        networks[name]["val_acc"] = float((values.astype(np.float32).argmax(1) == labels).mean())
    members, accuracy, scored = choose(probabilities, labels)
    hub = OUT / "ensemble" / "model_hub" / "fine_tuned"
    hub.mkdir(parents=True, exist_ok=True)
    for name in ORDER:
        link = hub / f"{name}_tuned.pth"
        if name in members:
            link_atomically((OUT / "model_hub" / "fine_tuned" / f"{name}_tuned.pth").resolve(), link)
        elif link.is_symlink() or link.exists():
            link.unlink()
    result = {"rule": "every subset of two or more picked networks, scored by the accuracy of its mean probability "
                      "on the images their pre-training held out; ties to fewer networks",
              "validation_images": int(len(labels)), "networks": networks, "members": members,
              "val_acc": accuracy,
              "subsets": [{"members": subset, "val_acc": value} for value, subset in
                          sorted(scored, key=lambda item: (-item[0], len(item[1])))]}
    write_json(OUT / "ensemble" / "ensemble.json", result)
    for name, network in networks.items():
        print(f"{name}: {100 * network['val_acc']:.2f} % on the held-out images")
    print(f"ensemble: {' + '.join(members)}, {100 * accuracy:.2f} % ({len(scored)} subsets tried); "
          f"wrote {OUT / 'ensemble' / 'ensemble.json'} and the links in {hub}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(run, parse_args()))
