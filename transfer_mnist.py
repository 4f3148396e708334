"""Transfer a network trained on EMNIST to MNIST (stage 5 of the study), with train.py's loop.

    python transfer_mnist.py --model vggnet                 # HUB/fine_tuned/vggnet_tuned.pth
    python transfer_mnist.py --model vggnet --from-scratch  # the same network from random weights
    python transfer_mnist.py --ckpt some.pth --data-dir ../shared/data --no-download

The EMNIST network is first scored zero-shot: a 10-class head made of its old head's digit rows
(the same logits for 0-9). Then it is fine-tuned with Adam on the MNIST training set and scored
again. Both datasets are upright (data.py turns EMNIST's files upright): that is what makes the
transfer work. Writes model_hub/transfer/{model}_mnist.pth, outputs/transfer/{model}.json (before
and after, train and test) and {model}_history.json.
"""
from pathlib import Path

import torch
import torch.nn as nn

import data
import evaluate
import train
from models import MODELS, build_model, load_checkpoint
from runs import Parser, UserError, get_device, one_line_errors, parse_settings, save_json, set_seed

# The study's transfer: Adam at 1e-3 for 5 epochs on every MNIST training image, the study's affine.
DEFAULTS = dict(train.DEFAULTS, dataset="mnist", optimizer="adam", learning_rate=1e-3,
                weight_decay=0.0, epochs=5, val_fraction=0.0, batch_size=64)


def replace_head(model, num_classes, keep_rows=None):
    """A new classifier for `num_classes` classes: a copy of the old one's `keep_rows`, or fresh."""
    def new_head(old):
        head = nn.Linear(old.in_features, num_classes).to(old.weight.device)
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)
        if keep_rows is not None:
            with torch.no_grad():
                head.weight.copy_(old.weight[keep_rows])
                head.bias.copy_(old.bias[keep_rows])
        return head

    heads = model.fc if isinstance(model.fc, nn.ModuleList) else None  # EnsNet's eleven heads
    model.fc = nn.ModuleList(map(new_head, heads)) if heads is not None else new_head(model.fc)
    return model


def scores(model, ckpt, args, device):
    """MNIST train and test metrics of a 10-class network."""
    result = {}
    for split in ("train", "test"):
        images, labels = data.load_images("mnist", split == "train", args.data_dir,
                                          not args.no_download)
        probs = evaluate.probabilities(model, images, ckpt["mean"], ckpt["std"], device)
        result[split] = evaluate.metrics(labels, probs, list(data.DIGITS))
    return result


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), help="(default: the checkpoint's)")
    parser.add_argument("--ckpt", metavar="FILE",
                        help="EMNIST checkpoint (default: the hub's fine-tuned, else pre-trained)")
    parser.add_argument("--from-scratch", action="store_true", help="start from random weights")
    known, _ = train.add_flags(parser, DEFAULTS).parse_known_args(argv)
    if not known.model and not known.ckpt:
        parser.error("give --model NAME or --ckpt FILE")
    with one_line_errors():
        path = Path(known.ckpt) if known.ckpt else evaluate.find_checkpoint(known.hub, known.model)
        ckpt, model = load_checkpoint(path, known.model)
        args = parse_settings(parser, argv, layers=[(str(path), {"model": ckpt["model"]})])
        if args.dataset != "mnist":
            raise UserError("transfer_mnist.py transfers to MNIST only: leave --dataset out")
        if not all(digit in ckpt["classes"] for digit in data.DIGITS):
            raise UserError(f"{path} was trained on {ckpt['dataset']}: it has no digits")
        device = get_device(args.device)
        set_seed(args.seed)
        rows = [ckpt["classes"].index(digit) for digit in data.DIGITS]
        model = build_model(args.model, 10) if args.from_scratch else replace_head(model, 10, rows)
        train_data = data.training_data("mnist", args.data_dir, device, args.seed, 0.0, args.subset,
                                        download_missing=not (args.no_download or args.dry_run),
                                        stats=(ckpt["mean"], ckpt["std"]))
        name = args.model + ("_scratch" if args.from_scratch else "")
        before = None if args.from_scratch or args.dry_run else scores(model, ckpt, args, device)
        meta = {"model": args.model, "num_classes": 10, "dataset": "mnist", "mean": ckpt["mean"],
                "classes": list(data.DIGITS), "std": ckpt["std"], "pretrained": str(path)}
        out = Path(args.outputs) / "transfer"
        train.run_stage(model, train_data, args, device,
                        Path(args.hub) / "transfer" / f"{name}_mnist.pth",
                        out / f"{name}_history.json", meta)
        if not args.dry_run:
            after = scores(model, ckpt, args, device)
            save_json(out / f"{name}.json", dict(checkpoint=str(path), before=before, after=after))
            for label, result in (("zero-shot", before), ("after transfer", after)):
                if result:
                    print(f"MNIST test {label}: {100 * result['test']['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
