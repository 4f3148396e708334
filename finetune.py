"""Adam fine-tuning on 100 % of the training split (stage 3 of the study).

    python finetune.py --model alexnet            # from model_hub/pre_trained/alexnet.pth
    python finetune.py --ckpt other.pth           # the network, classes and normalisation come from it
    python finetune.py --model alexnet --val-fraction 0.1 --patience 5   # with early stopping
    python finetune.py --model lenet --epochs 2
    python finetune.py --ckpt other.pth --dataset emnist-letters --replace-head

Writes model_hub/fine_tuned/{model}_tuned.pth, outputs/finetune/{model}.json and .png.
Without --val-fraction every training image is used and the last epoch is kept: early
stopping needs a validation set, and the test set is never one.
"""
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and exit 130, not a traceback
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import torch

from data import CLASSES, Parser, add_flags, choose_precision, fraction, run_script, set_seed
from models import MODELS, load_checkpoint, replace_head
from train import (TrainingError, add_training_flags, checkpoint_meta, load_training_data,
                   locked_outputs, resolve_settings, resumed_run, run_stage, setup_distributed)

DEFAULTS = {  # the one place fine-tuning's defaults live (dataset and batch size: the checkpoint's first)
    "dataset": "emnist-byclass",
    "subset": None,
    "seed": 0,
    "learning_rate": 1e-3,  # Adam's usual default, as the study
    "batch_size": 64,
    "epochs": 5,
    "patience": 5,  # only used with --val-fraction
    "clip": 1.0,
    "augment": "study",
    "schedule": "constant",
    "val_fraction": 0.0,  # none: train on 100 % of the training split, keep the last epoch
}


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=sorted(MODELS),
                        help="network (default: the checkpoint's; checked against --ckpt when both are given)")
    parser.add_argument("--ckpt", default=None, help="pre-trained checkpoint (default: HUB/pre_trained/MODEL.pth)")
    add_flags(parser, "dataset", "data-dir")
    add_training_flags(parser, DEFAULTS, "Adam learning rate")
    parser.add_argument("--val-fraction", type=fraction, default=None,
                        help="hold out this stratified fraction of the training split for validation and early "
                             "stopping (default: none)")
    parser.add_argument("--replace-head", action="store_true",
                        help="allow a checkpoint of another dataset: give it a new classifier head")
    args = parser.parse_args(argv)
    if not args.model and not args.ckpt:
        parser.error("give --model NAME (uses HUB/pre_trained/NAME.pth) or --ckpt PATH")
    return args


def load_pretrained(args):
    """(path, state, model) of the pre-trained checkpoint; args.model becomes its network."""
    path = Path(args.ckpt or Path(args.hub) / "pre_trained" / f"{args.model}.pth")
    state, model = load_checkpoint(path, args.model, hint=f"python train.py --model {args.model}")
    args.model = state["model"]
    return path, state, model


def adapt_head(args, path, state, model):
    """The checkpoint's normalisation when the data is the same; a new head (--replace-head) when not."""
    if state["dataset"] == args.dataset:
        return (state["mean"], state["std"])
    if not args.replace_head:
        raise TrainingError(f"{path} was trained on {state['dataset']} ({state['num_classes']} classes), not "
                            f"{args.dataset} ({len(CLASSES[args.dataset])}): pass --replace-head to give it a "
                            f"new classifier, or leave --dataset out")
    replace_head(model, len(CLASSES[args.dataset]))
    return None


def run(args):
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *_: None)
    source, state, model = load_pretrained(args)
    best_path = Path(args.hub) / "fine_tuned" / f"{args.model}_tuned.pth"
    json_path = Path(args.outputs) / "finetune" / f"{args.model}.json"
    with locked_outputs(args, best_path, json_path, rank):
        resumed, resumed_model, layers = resumed_run(args, best_path, log, json_path)
        pretrained = {"dataset": state["dataset"], "batch_size": state["args"].get("batch_size")}
        layers.append((f"checkpoint {source}", {key: value for key, value in pretrained.items() if value is not None}))
        resolve_settings(args, DEFAULTS, layers, log)
        args.precision = choose_precision(args.precision, device)
        set_seed(args.seed)
        stats = adapt_head(args, source, state, model)
        data = load_training_data(args, device, val_fraction=args.val_fraction, stats=stats)
        if resumed_model is not None:
            model = resumed_model
        optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
        if resumed:
            optimizer.load_state_dict(resumed["optimizer"])
        val_count = len(data["val"][1]) if data["val"] else 0
        log(f"fine-tuning {source} on {args.dataset}: {len(data['train'][1]):,} train / {val_count:,} val images, "
            f"device {device}, world size {world_size}")
        meta = dict(checkpoint_meta(args, data), pretrained=str(source))
        return run_stage(args, model, optimizer, data, json_path=json_path, best_path=best_path,
                         title=f"{args.model} fine-tuning on {args.dataset}", meta=meta, rank=rank,
                         world_size=world_size, device=device, history=resumed["history"] if resumed else (),
                         log=log)


def main(argv=None):
    return run_script(run, parse_args(argv))


if __name__ == "__main__":
    main()
