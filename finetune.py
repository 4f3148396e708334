"""Adam fine-tuning on 100 % of the training split (stage 3 of the study), with train.py's loop.

    python finetune.py --model alexnet                        # from model_hub/pre_trained/alexnet.pth
    python finetune.py --ckpt other.pth                       # network, classes, normalisation from it
    python finetune.py --model alexnet --val-fraction 0.1     # hold out 10 % and keep the best epoch
    python finetune.py --model alexnet --val-fraction 0.1 --lr 0.001 0.0001   # choose the rate on validation
    python finetune.py --ckpt other.pth --dataset emnist-letters --replace-head

Writes model_hub/fine_tuned/{model}_tuned.pth, outputs/finetune/{model}.json and .png.
Without --val-fraction every training image is used and the last epoch is kept: early
stopping needs a validation set, and the test set is never one. With several --lr values
(and --val-fraction) each rate is fine-tuned from the same checkpoint, the one with the best
validation accuracy (ties: lower loss) is kept, and outputs/finetune/{model}_rates.json
lists them all. --resume continues a stopped rate choice too: each rate where it stopped.
"""
import runs

if __name__ == "__main__":
    runs.interrupt_quietly()  # Ctrl-C while torch loads: one line and exit 130

import argparse
import copy
from pathlib import Path

from data import CLASSES, DATASETS, add_data_flags, held_out_by, load_training_data
from models import MODELS, load_checkpoint, read_checkpoint, replace_head, training_args
from runs import (Parser, UserError, add_run_flags, check_outputs, choose_precision, log_for, one_line_errors,
                  path_value, positive_float, resolve_settings, set_seed, setup_distributed, write_json)
import train

# What fine-tuning changes in pre-training's values (train.SETTINGS); dataset and batch size: the checkpoint's.
DEFAULTS = {**{key: value for key, value in train.DEFAULTS.items() if key not in ("momentum", "weight_decay")},
            "optimizer": "adam", "learning_rate": 1e-3, "epochs": 5,  # the study's: Adam at its usual rate, 5 epochs
            "patience": 5,  # used only with --val-fraction and a constant schedule
            "val_fraction": 0.0}  # 0: train on 100 % of the training split and keep the last epoch
UNFINISHED = ("unfinished", "unfinished_last")  # the files each rate keeps apart until one is chosen


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=sorted(MODELS), metavar="NAME",
                        help="network (default: the checkpoint's)")
    parser.add_argument("--ckpt", default=None, type=path_value, metavar="FILE",
                        help="checkpoint (default: HUB/pre_trained/MODEL.pth)")
    train.add_setting_flags(parser, DEFAULTS, skip=("learning_rate",))
    parser.add_argument("--lr", dest="learning_rate", nargs="+", type=positive_float, default=None, metavar="X",
                        help=f"Adam rate; several: chosen on validation (default: {DEFAULTS['learning_rate']})")
    parser.add_argument("--replace-head", action="store_true", help="give a checkpoint of another dataset a new head")
    add_data_flags(parser, "data-dir", "no-download")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run")
    add_run_flags(parser, "device", "hub", "outputs", "precision", "compile", "dry-run", "update-results")
    args = parser.parse_args(argv)
    if not args.model and not args.ckpt:
        parser.error("give --model NAME (uses HUB/pre_trained/NAME.pth) or --ckpt PATH")
    if args.patience and not args.val_fraction and not args.resume:
        parser.error("--patience needs a validation set to stop on: add --val-fraction 0.1, or leave --patience out")
    args.rates = args.learning_rate or []
    if len(args.rates) > 1 and not args.val_fraction:
        parser.error("choosing among several --lr values needs a validation set: add --val-fraction 0.1")
    if len(set(args.rates)) != len(args.rates):
        parser.error("--lr lists a rate twice")
    if len(args.rates) == 1:  # one rate is a setting like any other (resolve_settings reads args.learning_rate)
        args.learning_rate = args.rates[0]
    elif args.rates:  # several: the flag's value for the printout; each rate's run sets its own
        args.learning_rate = tuple(args.rates)
    return args


def check_held_out(settings, pretraining, path):
    """Validation while fine-tuning must be images the checkpoint never trained on: the split its own
    pre-training held out, which the same seed, subset and fraction make again."""
    if "seed" not in pretraining:
        raise train.TrainingError(f"{path} does not say which images its pre-training held out: fine-tune it "
                                  f"without --val-fraction")
    for key, value in held_out_by(pretraining).items():
        if settings[key] != value:
            raise train.TrainingError(f"{train.SETTINGS[key].flag} {settings[key]} would validate on images {path} "
                                      f"trained on: its pre-training held out its images with "
                                      f"{train.SETTINGS[key].flag} {value}; give that")


def checkpoint_batch_size(state, path):
    """The pre-training's batch size, which fine-tuning keeps ({} when the checkpoint says none)."""
    batch = training_args(state).get("batch_size")
    if batch is None:
        return {}
    try:
        return {"batch_size": train.check_setting("batch_size", batch, f"{path}: args")}
    except UserError as err:
        raise train.TrainingError(f"{err}: it is damaged or was edited; give --batch-size N") from None


def adapt_head(state, path, settings, model, replace):
    """The checkpoint's normalisation when the data is the same; a new head (--replace-head) when not."""
    if state["dataset"] == settings["dataset"]:
        return (state["mean"], state["std"])
    if not replace:
        raise train.TrainingError(f"{path} was trained on {state['dataset']} ({state['num_classes']} classes), not "
                                  f"{settings['dataset']} ({len(CLASSES[settings['dataset']])}): pass --replace-head "
                                  f"to give it a new classifier, or leave --dataset out")
    replace_head(model, len(CLASSES[settings["dataset"]]))
    return None


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        rank, world_size, device = setup_distributed(args.device)
        log = log_for(rank)
        source = Path(args.ckpt or Path(args.hub) / "pre_trained" / f"{args.model}.pth")
        state, model = load_checkpoint(source, args.model, hint=f"make one with `python train.py --model {args.model}"
                                                                f"` or pass --ckpt PATH",
                                       datasets=DATASETS)
        args.model = state["model"]
        files = train.stage_files(Path(args.hub) / "fine_tuned" / f"{args.model}_tuned.pth",
                                  Path(args.outputs) / "finetune" / f"{args.model}.json")
        if len(args.rates) > 1 and not args.dry_run and rank == 0:
            check_outputs(files["json"].with_name(f"{args.model}_rates.json"))
        with train.locked(files, args.dry_run, rank):
            continued = resumed_runs(args, files, log) if args.resume else [None] * max(len(args.rates), 1)
            resumed, _, layer = continued[0] or (None, None, None)  # the first rate's run: the run's settings
            pretrained = {"dataset": state["dataset"],
                          **(checkpoint_batch_size(state, source) if args.batch_size is None else {})}
            layers = ([layer] if layer else []) + [(f"checkpoint {source}", pretrained)]
            settings = resolve_settings(args, DEFAULTS, layers, log)
            train.check_settings(settings, args)
            if settings["val_fraction"] and state["dataset"] == settings["dataset"]:
                check_held_out(settings, training_args(state), source)
            precision = choose_precision(args.precision, device)
            log(f"precision: {precision.name} ({precision.reason})")
            stats = adapt_head(state, source, settings, model, args.replace_head)
            data = load_training_data(settings, device, args.data_dir, not args.no_download, stats=stats,
                                      dry_run=args.dry_run)
            log(f"fine-tuning {source} on {settings['dataset']}: {len(data['train'][1]):,} train / "
                f"{len(data['val'][1]) if data['val'] else 0:,} val images, device {device}, world size {world_size}")
            meta = train.checkpoint_meta(args.model, settings, data, precision, resumed, pretrained=str(source))
            train.discard_unfinished(files, resumed and resumed["path"], args.dry_run)
            tried = {}
            for rate, run in zip(args.rates if len(args.rates) > 1 else [settings["learning_rate"]], continued):
                settings = dict(settings, learning_rate=rate)
                files_of_rate = files if len(args.rates) < 2 else rate_files(files, rate)
                state_of_rate, resumed_model, _ = run or (None, None, None)
                history = state_of_rate["history"] if state_of_rate else []
                if len(args.rates) > 1:
                    log(f"fine-tuning at lr {rate}:")
                if len(args.rates) > 1 and history and train.stops_early(history, settings):
                    log(f"lr {rate} had stopped early after epoch {len(history)}: kept as it was")
                else:
                    set_seed(settings["seed"])
                    tuned = resumed_model or copy.deepcopy(model)
                    optimizer = train.build_optimizer(tuned, settings)
                    if state_of_rate:
                        optimizer.load_state_dict(state_of_rate["optimizer"])
                    tuned = train.prepare_model(tuned, device, precision, world_size, args.compile, optimizer)
                    history = train.fit(tuned, optimizer, data, settings, precision, history=history,
                                        files=None if args.dry_run else files_of_rate,
                                        meta=dict(meta, args=dict(settings, precision=precision.name)), rank=rank,
                                        world_size=world_size, dry_run=args.dry_run, log=log)
                tried[rate] = (settings, history, files_of_rate)
            if rank == 0 and not args.dry_run:
                settings, history, chosen, rates = choose_rate(tried, files, args.model, log)
                train.finish(chosen, settings, history, f"{args.model} fine-tuning on {settings['dataset']}", log,
                             extra=rates)
                for other in (other for _, _, other in tried.values() if other is not chosen):
                    for key in UNFINISHED:
                        other[key].unlink(missing_ok=True)


def rate_files(files, rate):
    """The stage's files for one rate of a rate choice: its own unfinished checkpoints until one is chosen."""
    return dict(files, **{key: files[key].with_name(f"{files[key].stem}_lr{rate}.pth") for key in UNFINISHED})


def resumed_runs(args, files, log):
    """What --resume continues, one entry per rate: train.resumed_run's (state, model, settings layer), or
    None for a rate of a rate choice that has not started (or whose files are an older choice's)."""
    if len(args.rates) < 2:
        return [train.resumed_run(args, files, DEFAULTS, log)]
    first = rate_files(files, args.rates[0])["unfinished_last"]
    if not first.is_file():
        raise train.TrainingError(f"nothing to resume: no stopped choice among these rates ({first} is missing); "
                                  f"start the run without --resume")
    run = read_checkpoint(first, "").get("run")
    continued = []
    for rate in args.rates:
        mine = rate_files(files, rate)
        if mine["unfinished_last"].is_file() and read_checkpoint(mine["unfinished_last"], "").get("run") == run:
            continued.append(train.resumed_run(argparse.Namespace(**{**vars(args), "learning_rate": rate}), mine,
                                               DEFAULTS, log))
        else:
            continued.append(None)
    return continued


def choose_rate(tried, files, model_name, log):
    """(settings, history, files, extra) of the rate whose best epoch validates most accurately (ties: lower
    loss): finish publishes its unfinished files; with several rates, {model}_rates.json lists them all
    (finish's `extra`, published with the run)."""
    if len(tried) == 1:
        return *next(iter(tried.values())), []
    best = {rate: train.best_row(history) for rate, (_, history, _) in tried.items()}
    table = [{"learning_rate": rate, "best_epoch": row["epoch"], "val_acc": row["val_acc"], "val_loss": row["val_loss"]}
             for rate, row in best.items()]
    chosen = max(table, key=lambda row: (row["val_acc"], -row["val_loss"]))["learning_rate"]
    log("validation accuracy by rate: " + ", ".join(f"{row['learning_rate']}: {100 * row['val_acc']:.2f}%"
                                                    for row in table) + f"; kept {chosen}")
    rates = (files["json"].with_name(f"{model_name}_rates.json"),
             lambda partial: write_json(partial, {"chosen": chosen, "rates": table}))
    return *tried[chosen], [rates]


if __name__ == "__main__":
    main()
