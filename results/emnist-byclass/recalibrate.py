"""Measure the BatchNorm statistics of trained networks again on their unaugmented training images.

    python results/emnist-byclass/recalibrate.py CKPT [CKPT ...] --out DIR

Statistics gathered while training on augmented images do not match clean ones; this measures them
again (train.recalibrate_bn: dropout off, a cumulative average over every training image the
checkpoint trained on) and writes DIR/{name} with those statistics and the same weights otherwise.
`train.py` and `finetune.py` do the same at the end of a run with --recalibrate-bn.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402
import train  # noqa: E402
from models import load_checkpoint, save_checkpoint  # noqa: E402
from runs import Parser, one_line_errors  # noqa: E402


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="+", help="checkpoints")
    parser.add_argument("--out", required=True, help="folder for the recalibrated checkpoints")
    parser.add_argument("--data-dir", default="data/emnist-byclass-carved", help="the carve")
    args = parser.parse_args(argv)
    with one_line_errors():
        for path in map(Path, args.ckpt):
            ckpt, model = load_checkpoint(path)
            run = ckpt["args"]
            train_data = data.training_data(ckpt["dataset"], args.data_dir, torch.device("cpu"),
                                             run["seed"], run["val_fraction"], run["subset"],
                                             download_missing=False,
                                             stats=(ckpt["mean"], ckpt["std"]))
            train.recalibrate_bn(model, *train_data["train"], ckpt["mean"], ckpt["std"], "fp32")
            keep = ("model", "num_classes", "dataset", "classes", "mean", "std", "args", "history")
            count = len(train_data["train"][1])
            save_checkpoint(Path(args.out) / path.name, dict(
                {key: ckpt[key] for key in keep}, state_dict=model.state_dict(),
                recalibrated_bn=f"on the {count:,} unaugmented training images"))
            print(f"wrote {Path(args.out) / path.name}")


if __name__ == "__main__":
    main()
