"""Adam fine-tuning of a pre-trained network (stage 3 of the study), with train.py's loop.

    python finetune.py --model alexnet             # model_hub/pre_trained/alexnet.pth, every image
    python finetune.py --ckpt other.pth            # network, classes, normalisation from the file
    python finetune.py --model alexnet --val-fraction 0.1   # validate on what pre-training held out

Writes model_hub/fine_tuned/{model}_tuned.pth and outputs/finetune/{model}.json. Without
--val-fraction every training image is used and the last epoch is kept: the test set never chooses.
"""
from pathlib import Path

import data
import train
from models import MODELS, load_checkpoint
from runs import Parser, UserError, get_device, one_line_errors, parse_settings, set_seed

# The study's fine-tuning: Adam at its usual rate, 5 epochs, every training image, the last epoch.
# None: the pre-training's (its dataset, batch size).
DEFAULTS = dict(train.DEFAULTS, optimizer="adam", learning_rate=1e-3, weight_decay=0.0, epochs=5,
                patience=5, val_fraction=0.0, dataset=None, batch_size=None)


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), help="(default: the checkpoint's)")
    parser.add_argument("--ckpt", metavar="FILE", help="(default: HUB/pre_trained/MODEL.pth)")
    known, _ = train.add_flags(parser, DEFAULTS).parse_known_args(argv)
    if not known.model and not known.ckpt:
        parser.error("give --model NAME (uses HUB/pre_trained/NAME.pth) or --ckpt FILE")
    with one_line_errors():
        path = Path(known.ckpt or Path(known.hub) / "pre_trained" / f"{known.model}.pth")
        ckpt, model = load_checkpoint(path, known.model)
        pretraining = ckpt.get("args", {})
        args = parse_settings(parser, argv, layers=[(f"pre-training {path}", {
            "model": ckpt["model"], "dataset": ckpt["dataset"],
            "batch_size": pretraining.get("batch_size") or 64})])
        if args.dataset != ckpt["dataset"]:
            raise UserError(f"{path} was trained on {ckpt['dataset']}: leave --dataset out")
        held_out = {key: pretraining.get(key) for key in ("seed", "subset", "val_fraction")}
        if args.val_fraction and held_out != {key: getattr(args, key) for key in held_out}:
            raise UserError(f"--val-fraction would validate on images {path} trained on: give the "
                            f"split its pre-training held out ({held_out})")
        device = get_device(args.device)
        set_seed(args.seed)
        train_data = data.training_data(args.dataset, args.data_dir, device, args.seed,
                                        args.val_fraction, args.subset,
                                        download_missing=not (args.no_download or args.dry_run),
                                        stats=(ckpt["mean"], ckpt["std"]))
        meta = {key: ckpt[key] for key in ("model", "num_classes", "dataset", "classes", "mean",
                                           "std")}
        train.run_stage(model, train_data, args, device,
                        Path(args.hub) / "fine_tuned" / f"{args.model}_tuned.pth",
                        Path(args.outputs) / "finetune" / f"{args.model}.json",
                        dict(meta, pretrained=str(path)))


if __name__ == "__main__":
    main()
