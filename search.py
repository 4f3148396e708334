"""Random search over the study's grid on the mini subset (stage 1), with train.py's loop.

    python search.py --model alexnet                    # 28 trials x 5 epochs on 10 % of the split
    python search.py --model lenet --dataset sklearn-digits --n-iter 2 --epochs 1

Writes outputs/search/{model}.json after every trial (best_params, best_val_loss, trials): the
same command resumes an interrupted search. train.py uses the result only when asked:
`python train.py --model alexnet --params outputs/search/alexnet.json`.
"""
import json
import math
import time
from pathlib import Path

from sklearn.model_selection import ParameterSampler

import data
import train
from models import MODELS, build_model
from runs import (Parser, UserError, choose_precision, get_device, one_line_errors, parse_settings,
                  save_json, set_seed)

GRID = {  # the study's grid
    "learning_rate": [1e-3, 1e-2, 1e-1],
    "batch_size": [16, 32, 64],
    "momentum": [0.0, 0.85, 0.9, 0.95],
    "weight_decay": [0.0, 1e-2, 1e-3, 1e-4],
}
DEFAULTS = dict(dataset="emnist-byclass", n_iter=28, epochs=5, augment="study", clip=1.0)  # study's


def run_trial(name, params, train_data, args, device, precision):
    """Train one configuration from scratch (SGD); its score is its best epoch's validation loss.
    A diverged one scores None and ranks last."""
    set_seed(args.seed)
    model = build_model(name, train_data["classes"]).to(device)
    rate, size = params["learning_rate"], params["batch_size"]
    optimizer = train.OPTIMIZERS["sgd"](model.parameters(), rate, params["momentum"],
                                        params["weight_decay"])
    val, mean, std, scores = train_data["val"], train_data["mean"], train_data["std"], []
    for epoch in range(1, args.epochs + 1):
        batches = train.epoch_batches(train_data, size, args.augment, args.seed, epoch)
        loss, _, _ = train.train_one_epoch(model, optimizer, batches, lambda step: rate, args.clip,
                                           precision)
        if not math.isfinite(loss):
            return {"params": params, "val_loss": None, "val_acc": None, "diverged": True}
        scores.append(train.evaluate(model, *val, mean, std, precision))
    val_loss, val_acc = min(scores)
    return {"params": params, "val_loss": val_loss, "val_acc": val_acc}


def summary(trials):
    done = [trial for trial in trials if trial["val_loss"] is not None]
    best = min(done, key=lambda trial: trial["val_loss"]) if done else {}
    return {"best_params": best.get("params"), "best_val_loss": best.get("val_loss"),
            "best_val_acc": best.get("val_acc")}


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.set_defaults(**DEFAULTS)
    add = parser.add_argument
    add("--model", default="alexnet", choices=sorted(MODELS), help="(default: %(default)s)")
    add("--dataset", choices=sorted(data.DATASETS), metavar="NAME", help="(default: %(default)s)")
    add("--subset", type=int, metavar="N", help="search N stratified images (default: all)")
    add("--n-iter", type=int, metavar="N", help="configurations drawn (default: %(default)s)")
    add("--epochs", type=int, metavar="N", help="epochs per trial (default: %(default)s)")
    add("--augment", choices=list(data.AUGMENTS), help="(default: %(default)s)")
    add("--clip", type=float, metavar="X", help="gradient-norm clip (default: %(default)s)")
    add("--seed", type=int, default=0, help="(default: %(default)s)")
    add("--data-dir", default="data", help="(default: %(default)s)")
    add("--no-download", action="store_true", help="never download missing data")
    add("--outputs", default="outputs", help="(default: %(default)s)")
    add("--device", default="auto", help="(default: %(default)s)")
    add("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="(default: auto)")
    add("--dry-run", action="store_true", help="one trial of one epoch; writes nothing")
    args = parse_settings(parser, argv)
    with one_line_errors():
        device = get_device(args.device)
        precision, why = choose_precision(args.precision, device)
        print(f"precision: {precision} ({why})")
        train_data = data.training_data(args.dataset, args.data_dir, device, args.seed,
                                        subset=args.subset, mini=True,
                                        download_missing=not (args.no_download or args.dry_run))
        path = Path(args.outputs) / "search" / f"{args.model}.json"
        settings = {key: getattr(args, key) for key in ("dataset", "subset", "n_iter", "epochs",
                                                        "augment", "clip", "seed")}
        previous = json.loads(path.read_text()) if path.is_file() and not args.dry_run else {}
        if previous.get("settings", settings) != settings:
            raise UserError(f"{path} is a search with other settings ({previous['settings']}): "
                            f"give the same flags to resume it, or another --outputs")
        trials = previous.get("trials", [])
        draws = ParameterSampler(GRID, n_iter=args.n_iter, random_state=args.seed)
        configs = [{key: value.item() if hasattr(value, "item") else value
                    for key, value in sorted(params.items())} for params in draws]
        print(f"{args.model}: {len(configs)} configurations, {len(trials)} done in {path}")
        if args.dry_run:
            configs, args.epochs = configs[:1], 1
        for number, params in enumerate(configs[len(trials):], len(trials) + 1):
            start = time.time()
            trial = run_trial(args.model, params, train_data, args, device, precision)
            trials.append(dict(trial, seconds=time.time() - start))
            print(f"trial {number:2d}/{len(configs)} {json.dumps(params)}: val loss "
                  f"{trial['val_loss']} ({time.time() - start:.0f}s)", flush=True)
            if args.dry_run:
                print("dry run: one trial of one epoch ran; nothing was written")
                return
            save_json(path, dict(summary(trials), model=args.model, settings=settings,
                                 complete=len(trials) == len(configs), trials=trials))
        print(f"best of {path}: {summary(trials)}")


if __name__ == "__main__":
    main()
