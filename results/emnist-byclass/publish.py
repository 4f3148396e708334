"""Publish trained checkpoints as DIR/{model}.pth: their weights and settings, no optimizer state.

    python results/emnist-byclass/publish.py CKPT [CKPT ...] --out results/emnist-byclass/published

--recalibrate measures the BatchNorm statistics again on the unaugmented images the checkpoint
trained on (train.recalibrate_bn: dropout off, a cumulative average over every image), as
`--recalibrate-bn` does at the end of a run; --as-trained takes the last epoch's weights as they
were trained, before such a recalibration (for a run that kept its last epoch); --average publishes
one network, the mean of the checkpoints' weights (runs of one network from one start: a "soup"),
recalibrated.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402
import train  # noqa: E402
from models import load_checkpoint, save_checkpoint  # noqa: E402
from runs import Parser, UserError, one_line_errors  # noqa: E402


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="+", help="checkpoints")
    parser.add_argument("--out", required=True, help="folder for the published checkpoints")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--recalibrate", action="store_true", help="measure BatchNorm again")
    how.add_argument("--as-trained", action="store_true", help="the last epoch, not recalibrated")
    parser.add_argument("--average", action="store_true", help="publish the mean of their weights")
    parser.add_argument("--data-dir", default="data/emnist-byclass-carved", help="the carve")
    args = parser.parse_args(argv)
    with one_line_errors():
        loaded = []
        for path in map(Path, args.ckpt):
            ckpt, model = load_checkpoint(path)
            if args.as_trained:
                if ckpt["args"].get("keep") != "last" or "last" not in ckpt:
                    raise UserError(f"{path} did not keep its last epoch: leave --as-trained out")
                model.load_state_dict(ckpt["last"]["state_dict"])
            loaded.append((ckpt, model))
        if args.average:
            if not args.recalibrate or len({ckpt["model"] for ckpt, _ in loaded}) > 1:
                raise UserError("--average takes checkpoints of one network and --recalibrate")
            states = [model.state_dict() for _, model in loaded]
            mean = {key: sum(state[key] for state in states) / len(states)
                    if value.is_floating_point() else value for key, value in states[0].items()}
            loaded[0][1].load_state_dict(mean)
            loaded = loaded[:1]
        for ckpt, model in loaded:
            run = ckpt["args"]
            recalibrated = run.get("recalibrate_bn") and not args.as_trained
            note = "at the end of its run" if recalibrated else None
            if args.recalibrate:
                train_data = data.training_data(ckpt["dataset"], args.data_dir, torch.device("cpu"),
                                                 run["seed"], run["val_fraction"], run["subset"],
                                                 download_missing=False,
                                                 stats=(ckpt["mean"], ckpt["std"]))
                train.recalibrate_bn(model, *train_data["train"], ckpt["mean"], ckpt["std"], "fp32")
                note = f"on the {len(train_data['train'][1]):,} unaugmented training images"
            keep = ("model", "num_classes", "dataset", "classes", "mean", "std", "args", "history")
            out = Path(args.out) / f"{ckpt['model']}.pth"
            published = dict({key: ckpt[key] for key in keep}, state_dict=model.state_dict())
            if args.average:
                published["averaged"] = args.ckpt
            save_checkpoint(out, dict(published, recalibrated_bn=note) if note else published)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
