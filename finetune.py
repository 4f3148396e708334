"""Adam fine-tuning on 100 % of the training split (stage 3 of the study).

    python finetune.py --model alexnet            # from model_hub/pre_trained/alexnet.pth
    python finetune.py --model alexnet --val-fraction 0.1 --patience 5   # with early stopping
    python finetune.py --model lenet --dataset sklearn-digits --epochs 2
    python finetune.py --model alexnet --ckpt other.pth --dataset emnist-letters --replace-head

Writes model_hub/fine_tuned/{model}_tuned.pth, outputs/finetune/{model}.json and .png.
Without --val-fraction every training image is used and the last epoch is kept: early
stopping needs a validation set, and the test set is never one.
"""
from pathlib import Path

import torch

from data import CLASSES, set_seed
from models import build_model, replace_head
from train import (CLIP_NORM, TrainingError, checkpoint_meta, common_parser, load_checkpoint, load_training_data,
                   resume_history, run_script, run_stage, setup_distributed)

LEARNING_RATE = 1e-3  # Adam's usual default, as the study
EPOCHS = 5
PATIENCE = 5  # only used with --val-fraction
BATCH_SIZE = 64  # when the checkpoint does not record one


def parse_args(argv=None):
    parser = common_parser(__doc__.splitlines()[0], epochs=EPOCHS)
    parser.set_defaults(dataset=None)
    parser.add_argument("--ckpt", default=None, help="pre-trained checkpoint (default: HUB/pre_trained/MODEL.pth)")
    parser.add_argument("--lr", dest="learning_rate", type=float, default=LEARNING_RATE, help="Adam learning rate")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold out this stratified fraction of the training split for validation and early stopping")
    parser.add_argument("--patience", type=int, default=PATIENCE, help="early-stopping patience (with --val-fraction)")
    parser.add_argument("--clip", type=float, default=CLIP_NORM, help="gradient-norm clipping (0: off)")
    parser.add_argument("--no-augment", action="store_true", help="fine-tune without the random affine")
    parser.add_argument("--replace-head", action="store_true",
                        help="allow a checkpoint of another dataset: give it a new classifier head")
    parser.add_argument("--resume", action="store_true", help="continue from HUB/fine_tuned/MODEL_tuned_last.pth")
    return parser.parse_args(argv)


def load_pretrained(args):
    """The pre-trained model, checked against --dataset (or taking the checkpoint's dataset)."""
    path = Path(args.ckpt or Path(args.hub) / "pre_trained" / f"{args.model}.pth")
    state = load_checkpoint(path, args.model, hint=f"python train.py --model {args.model}")
    args.dataset = args.dataset or state["dataset"]
    model = build_model(state["model"], state["num_classes"])
    model.load_state_dict(state["state_dict"])
    same_data = state["dataset"] == args.dataset and state["num_classes"] == len(CLASSES[args.dataset])
    if not same_data:
        if not args.replace_head:
            raise TrainingError(f"{path} was trained on {state['dataset']} ({state['num_classes']} classes), not "
                                f"{args.dataset} ({len(CLASSES[args.dataset])}): pass --replace-head to give it a "
                                f"new classifier, or --dataset {state['dataset']}")
        replace_head(model, len(CLASSES[args.dataset]))
    if args.batch_size is None:
        args.batch_size = state.get("args", {}).get("batch_size") or BATCH_SIZE
    return path, model, (state["mean"], state["std"]) if same_data else None


def run(args):
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *_: None)
    set_seed(args.seed)
    source, model, stats = load_pretrained(args)
    data = load_training_data(args, device, val_fraction=args.val_fraction, stats=stats)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    best_path = Path(args.hub) / "fine_tuned" / f"{args.model}_tuned.pth"
    history = resume_history(args, best_path, model, optimizer, log)
    val_count = len(data["val"][1]) if data["val"] else 0
    log(f"fine-tuning {source} on {args.dataset}: {len(data['train'][1]):,} train / {val_count:,} val images, "
        f"device {device}, world size {world_size}, Adam lr {args.learning_rate}, batch {args.batch_size}")
    meta = dict(checkpoint_meta(args, data), pretrained=str(source))
    return run_stage(args, model, optimizer, data, json_path=Path(args.outputs) / "finetune" / f"{args.model}.json",
                     title=f"{args.model} fine-tuning on {args.dataset}", best_path=best_path, meta=meta, rank=rank,
                     world_size=world_size, device=device, patience=args.patience if val_count else None,
                     history=history, log=log)


def main(argv=None):
    return run_script(run, parse_args(argv))


if __name__ == "__main__":
    main()
