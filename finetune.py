"""Adam fine-tuning of a pre-trained network (stage 3 of the study), with train.py's loop.

    python finetune.py --model alexnet                     # from model_hub/pre_trained/alexnet.pth, 100 % of the data
    python finetune.py --ckpt other.pth                    # network, classes, normalisation from the checkpoint
    python finetune.py --model alexnet --val-fraction 0.1  # validate on the images pre-training held out
    python finetune.py --ckpt letters.pth --dataset emnist-digits --replace-head

Writes model_hub/fine_tuned/{model}_tuned.pth, outputs/finetune/{model}.json and .png. Without
--val-fraction every training image is used and the last epoch is kept: the test set never chooses.
"""
from pathlib import Path

import data
import train
from models import MODELS, load_checkpoint, replace_head
from runs import Parser, UserError, get_device, one_line_errors, parse_settings, set_seed

# The study's fine-tuning: Adam at its usual rate, 5 epochs, every training image, the last epoch kept.
DEFAULTS = dict(train.DEFAULTS, optimizer="adam", learning_rate=1e-3, weight_decay=0.0, epochs=5, patience=5,
                val_fraction=0.0, dataset=None, batch_size=None)  # None: the pre-training's


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), help="network (default: the checkpoint's)")
    parser.add_argument("--ckpt", metavar="FILE", help="pre-trained checkpoint (default: HUB/pre_trained/MODEL.pth)")
    parser.add_argument("--replace-head", action="store_true", help="a new head for a checkpoint of another dataset")
    args = parse_settings(train.add_flags(parser, DEFAULTS), argv)
    if not args.model and not args.ckpt:
        parser.error("give --model NAME (uses HUB/pre_trained/NAME.pth) or --ckpt FILE")
    with one_line_errors():
        path = Path(args.ckpt or Path(args.hub) / "pre_trained" / f"{args.model}.pth")
        ckpt, model = load_checkpoint(path, args.model)
        pretraining = ckpt.get("args", {})
        args.model = ckpt["model"]
        for key, value in (("dataset", ckpt["dataset"]), ("batch_size", pretraining.get("batch_size", 64))):
            if getattr(args, key) is None:
                setattr(args, key, value)
                print(f"  {key:14s} {value!s:24s} (the pre-training's, {path})")
        if args.dataset != ckpt["dataset"] and not args.replace_head:
            raise UserError(f"{path} was trained on {ckpt['dataset']}: give --dataset {ckpt['dataset']}, or "
                            f"--replace-head to fine-tune it on {args.dataset} with a new head")
        held_out = {key: pretraining.get(key) for key in ("seed", "subset", "val_fraction")}
        if args.val_fraction and held_out != {key: getattr(args, key) for key in held_out}:
            raise UserError(f"--val-fraction would validate on images {path} trained on: give the split its "
                            f"pre-training held out ({held_out})")
        device = get_device(args.device)
        set_seed(args.seed)
        same = args.dataset == ckpt["dataset"]
        train_data = data.training_data(args.dataset, args.data_dir, device, args.seed, args.val_fraction,
                                        args.subset, download_missing=not (args.no_download or args.dry_run),
                                        stats=(ckpt["mean"], ckpt["std"]) if same else None)
        if not same:
            model = replace_head(model, train_data["classes"])
        meta = {"model": args.model, "num_classes": train_data["classes"], "dataset": args.dataset,
                "classes": list(data.DATASETS[args.dataset].classes), "mean": train_data["mean"],
                "std": train_data["std"], "pretrained": str(path)}
        train.run_stage(model, train_data, args, device, Path(args.hub) / "fine_tuned" / f"{args.model}_tuned.pth",
                        Path(args.outputs) / "finetune" / f"{args.model}.json", meta, f"{args.model} fine-tuning")


if __name__ == "__main__":
    main()
