"""Score the published study's own networks on this carve's 20,000 test images (evaluate.metrics).

    python results/emnist-byclass/study_weights.py --weights ../shared/data/study-weights
    python results/emnist-byclass/study_weights.py        # downloads them into data/study-weights

The study (XavierSpycy/EMNIST-Classifier, MIT licence) committed five trained networks in its first
commit, 3335ed77; they were trained on 100,000 images of the official ByClass *training* split and
never saw these test images. Their module names are the study's, their parameters ours in the same
order, so they map one to one; they read the raw (transposed) orientation of the official files
and the study's normalisation. Writes results/emnist-byclass/study-weights.json (or --output).
"""

import hashlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402
from models import build_model  # noqa: E402
from runs import Parser, UserError, one_line_errors, save_json  # noqa: E402

URL = ("https://github.com/XavierSpycy/EMNIST-Classifier/raw/"
       "3335ed77ef653203e95ad08086ddaa6257a7ed23/model_hub/")
WEIGHTS = {  # file: (network, stage, SHA-256); the file's path at that commit is {stage}/{file}
    "lenet.pth": (
        "lenet",
        "pre_trained",
        "80ab01a73cb1df536cbcba3acaffe6d8d269d2bcedfabfa0c0467f9cc1cb57b1",
    ),
    "resnet.pth": (
        "resnet",
        "pre_trained",
        "cbff2d7209efa04fb85588997559af919949d0f8cbacf23483864cef628a4f62",
    ),
    "resnet_tuned.pth": (
        "resnet",
        "fine_tuned",
        "4f8acd6656d74c528c9d00f7c192f02131b208430256f6ca17ffe941fac43d38",
    ),
    "spinalnet.pth": (
        "spinalnet",
        "pre_trained",
        "ff8d5748cd82c2ea3ab56fba42cd1a6bffe5626808765f506b06990dfe5808b0",
    ),
    "spinalnet_tuned.pth": (
        "spinalnet",
        "fine_tuned",
        "abb52205ae5beb3b3a31d0fe7601b2f1615db7a776955c86430d72259fc88568",
    ),
}
MEAN, STD = 0.1736, 0.3248  # the study's Normalize((0.1736,), (0.3248,))


def study_network(path, name, sha256):
    """One of the study's state_dicts as our network (the same parameters in the same order)."""
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise UserError(f"{path} is not the study's file (its SHA-256 differs)")
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(name, 62)
    ours = model.state_dict()
    if [tuple(t.shape) for t in theirs.values()] != [tuple(t.shape) for t in ours.values()]:
        raise UserError(f"{path} does not hold the study's {name}")
    model.load_state_dict(dict(zip(ours, theirs.values())))
    return model


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        metavar="DIR",
        help="folder of the study's files (default: download them " "into data/study-weights)",
    )
    parser.add_argument(
        "--data-dir", default="data/emnist-byclass-carved", help="the carve (default: %(default)s)"
    )
    parser.add_argument(
        "--output", default=str(HERE / "study-weights.json"), help="(default: %(default)s)"
    )
    args = parser.parse_args(argv)
    with one_line_errors():
        folder = Path(args.weights or "data/study-weights")
        images, labels = data.load_images(
            "emnist-byclass", False, args.data_dir, download_missing=False
        )
        raw = images.transpose(
            1, 2
        ).contiguous()  # the study reads the files' own (transposed) orientation
        classes = list(data.DATASETS["emnist-byclass"].classes)
        scores = {}
        for file, (name, stage, sha256) in WEIGHTS.items():
            if not (folder / file).is_file():
                if args.weights:
                    raise UserError(f"no {file} in {folder}: give the folder of the study's files")
                folder.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(URL + f"{stage}/{file}", str(folder / file))
            probs = evaluate.probabilities(
                study_network(folder / file, name, sha256), raw, MEAN, STD, torch.device("cpu")
            )
            result = evaluate.metrics(labels, probs, classes)
            scores[file] = {
                "network": name,
                "stage": stage,
                "url": URL + f"{stage}/{file}",
                **{
                    k: result[k]
                    for k in (
                        "count",
                        "accuracy",
                        "precision",
                        "recall",
                        "f1",
                        "macro_f1",
                        "top5_accuracy",
                        "case_merged_accuracy",
                    )
                },
            }
            accuracy, f1 = 100 * result["accuracy"], 100 * result["f1"]
            print(f"the study's {file}: {accuracy:.2f}% of {len(labels):,} images, F1 {f1:.2f}%")
        save_json(args.output, scores)


if __name__ == "__main__":
    main()
