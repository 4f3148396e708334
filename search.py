"""Random search over the study's hyperparameter grid on the mini subset (stage 1 of the study).

    python search.py --model alexnet                  # 28 trials x 5 epochs, 10 % of ByClass (80/20)
    python search.py --model all --n-iter 10          # the six networks, one after another
    python search.py --model lenet --dataset sklearn-digits --n-iter 2 --epochs 1
    python search.py --model lenet --dataset sklearn-digits --grid '{"learning_rate": [0.01, 0.05]}'
    torchrun --nproc_per_node=2 search.py --model vggnet   # trials spread over the ranks

Writes outputs/search/{model}.json after every trial (best_params, best_val_loss, trials),
so an interrupted search resumes where it stopped. train.py uses best_params only when asked:
`python train.py --model alexnet --params outputs/search/alexnet.json`.
"""
import runs

if __name__ == "__main__":
    runs.interrupt_quietly()  # Ctrl-C while torch loads: one line and exit 130

import argparse
import json
import time
from pathlib import Path

import torch.distributed as dist
from sklearn.model_selection import ParameterSampler

import train
from data import CLASSES, add_data_flags, load_training_data
from models import MODELS, build_model
from runs import (Parser, UserError, add_run_flags, check_outputs, choose_precision, is_number, is_terminal, log_for,
                  one_line_errors, output_lock, positive_int, read_json, resolve_settings, set_seed,
                  setup_distributed, write_json)
from train import GRID, TrainingError, add_setting_flags, best_row, check_params, fit  # GRID: train.SETTINGS' grid

DEFAULTS = {  # the search's values, each written only here; the rest of a trial is train.DEFAULTS
    "dataset": "emnist-byclass",
    "subset": None,
    "seed": 0,
    "n_iter": 28,  # the study's number of trials
    "epochs": 5,  # per trial: enough to rank configurations, not to converge
}


def config_key(params):
    """A configuration as a string, to tell configurations apart."""
    return json.dumps(params, sort_keys=True)


def parse_grid(text):
    """--grid: a JSON object of non-empty lists; the keys it names replace the study's, the others stay."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({err})")
    if not isinstance(given, dict) or not given:
        raise argparse.ArgumentTypeError('must be a JSON object such as \'{"learning_rate": [0.01, 0.05]}\'')
    unknown = sorted(set(given) - set(GRID))
    if unknown:
        raise argparse.ArgumentTypeError(f"has unknown keys {unknown}: use {', '.join(GRID)}")
    grid = {**GRID, **given}
    for key, values in given.items():
        if not isinstance(values, list) or not values:
            raise argparse.ArgumentTypeError(f"{key} must be a non-empty list")
        for value in values:
            try:
                check_params({**{k: v[0] for k, v in GRID.items()}, key: value}, "--grid")
            except UserError as err:
                raise argparse.ArgumentTypeError(str(err).removeprefix("--grid: ")) from None
    return grid


def sample_configs(grid, n_iter, seed):
    """Up to n_iter distinct configurations drawn with scikit-learn's ParameterSampler."""
    configs, seen = [], set()
    size = 1
    for values in grid.values():
        size *= len(values)
    for params in ParameterSampler(grid, n_iter=min(n_iter, size), random_state=seed):  # at most the whole grid
        params = {key: (value.item() if hasattr(value, "item") else value) for key, value in sorted(params.items())}
        if config_key(params) not in seen:
            seen.add(config_key(params))
            configs.append(params)
    return configs


def run_trial(name, params, data, settings, precision, device, dry_run):
    """Train one configuration from scratch with train.py's loop and the rest of its defaults; the
    trial's score is its best epoch's validation loss (every epoch runs: no early stop)."""
    trial = {**train.DEFAULTS, **settings, **params, "patience": settings["epochs"]}
    set_seed(trial["seed"])
    model = build_model(name, data["classes"])
    optimizer = train.build_optimizer(model, trial)
    model = train.prepare_model(model, device, precision)
    started = time.time()
    try:
        history = fit(model, optimizer, data, trial, precision, dry_run=dry_run, log=lambda *_: None)
    except TrainingError:  # a diverged configuration ranks last instead of ending the search
        return {"params": params, "val_loss": None, "val_acc": None, "diverged": True,
                "seconds": time.time() - started}
    best = best_row(history)
    return {"params": params, "val_loss": best["val_loss"], "val_acc": best["val_acc"], "best_epoch": best["epoch"],
            "seconds": time.time() - started}


def search_settings(settings, grid):
    return {**{key: settings[key] for key in ("dataset", "subset", "epochs", "n_iter", "seed")}, "grid": grid}


def load_previous(path, expected, log):
    """Trials of an earlier run with the same settings, so an interrupted search resumes."""
    if not path.is_file():
        return []
    previous = read_json(path, "search")
    if previous.get("settings") != expected:
        raise UserError(f"{path} holds a search with other settings ({previous.get('settings')}): move it away, "
                        f"pass the same settings to resume it, or write this one elsewhere with --outputs")
    if not isinstance(previous.get("trials"), list) or not all(
            isinstance(trial, dict) and isinstance(trial.get("params"), dict) and
            (trial.get("val_loss") is None or is_number(trial.get("val_loss")))
            for trial in previous["trials"]):
        raise UserError(f"{path} has no readable list of trials: move it away and search again")
    log(f"resuming {path}: {len(previous['trials'])} trials already done")
    return previous["trials"]


def summary(name, settings, grid, trials, planned):
    finished = [trial for trial in trials if trial.get("val_loss") is not None]
    best = min(finished, key=lambda trial: trial["val_loss"]) if finished else None
    return {"model": name, "dataset": settings["dataset"], "num_classes": len(CLASSES[settings["dataset"]]),
            "complete": len(trials) >= planned, "dry_run": False, "settings": search_settings(settings, grid),
            "best_params": best["params"] if best else None,
            "best_val_loss": best["val_loss"] if best else None, "best_val_acc": best["val_acc"] if best else None,
            "trials": trials}


def search_model(name, settings, grid, data, precision, device, dist_info, dry_run, path, log):
    """Every trial of one network not yet in `path`, spread over the ranks; the JSON after each round."""
    rank, world_size = dist_info
    configs = sample_configs(grid, settings["n_iter"], settings["seed"])
    trials = load_previous(path, search_settings(settings, grid), log) if rank == 0 and not dry_run else []
    if world_size > 1:  # every rank must agree on which trials are left
        shared = [trials]
        dist.broadcast_object_list(shared, src=0)
        trials = shared[0]
    done = {config_key(trial["params"]) for trial in trials}
    todo = [params for params in configs if config_key(params) not in done][: 1 if dry_run else None]
    rounds = range(0, len(todo), world_size)  # one round: a trial per rank
    if rank == 0 and is_terminal() and not dry_run:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=f"{name} trials", unit="round", leave=False)
        log = rounds.write  # keeps the bar below the trial lines
    try:
        for start in rounds:
            mine = todo[start + rank] if start + rank < len(todo) else None
            results = [run_trial(name, mine, data, settings, precision, device, dry_run) if mine else None]
            if world_size > 1:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, results[0])
                results = gathered
            results = list(filter(None, results))
            trials += results
            if rank == 0 and not dry_run:  # saved before the trials' lines are printed
                write_json(path, summary(name, settings, grid, trials, len(configs)))
            for number, result in enumerate(results, len(trials) - len(results) + 1):
                loss = "diverged" if result["val_loss"] is None else f"val loss {result['val_loss']:.4f}"
                log(f"{name} trial {number:3d}/{len(configs)}: {result['params']} -> {loss} "
                    f"({result['seconds']:.1f}s)")
    except KeyboardInterrupt:
        log(f"\ninterrupted: {len(trials)} finished trials are saved in {path}; the same command resumes")
        raise
    result = summary(name, settings, grid, trials, len(configs))
    if dry_run:
        log(f"{name}: dry run finished (one trial, one batch per epoch); nothing was written")
    elif result["best_params"] is None:
        log(f"{name}: every trial diverged: try a grid with lower learning rates")
    else:
        log(f"{name}: best {result['best_params']} (val loss {result['best_val_loss']:.4f}); wrote {path}\n"
            f"  train with them: python train.py --model {name} --params {path}")
    return result


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0] + " The mini subset is a stratified 10 % of the training "
                                "split, or of its --subset N images when given, itself split 80/20.")
    parser.add_argument("--model", nargs="+", default=["alexnet"], choices=sorted(MODELS) + ["all"], metavar="NAME",
                        help=f"networks ({', '.join(sorted(MODELS))}) or all (default: alexnet)")
    add_setting_flags(parser, DEFAULTS, skip=("epochs", "n_iter"))
    parser.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                        help=f"epochs per trial (default: {DEFAULTS['epochs']})")
    parser.add_argument("--n-iter", type=positive_int, default=None, metavar="N",
                        help=f"configurations to try (default: {DEFAULTS['n_iter']})")
    parser.add_argument("--grid", type=parse_grid, default=GRID, metavar="JSON",
                        help="lists that replace the study's grid's, e.g. '{\"learning_rate\": [0.01, 0.05]}' "
                             "(default: the grid column of SETTINGS in train.py)")
    add_data_flags(parser, "data-dir", "no-download")
    add_run_flags(parser, "device", "outputs", "precision", "dry-run", "update-results")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        rank, world_size, device = setup_distributed(args.device)
        log = log_for(rank)
        names = list(MODELS) if "all" in args.model else list(dict.fromkeys(args.model))  # the study's order
        settings = resolve_settings(args, DEFAULTS, [], log)
        precision = choose_precision(args.precision, device)
        paths = {name: Path(args.outputs) / "search" / f"{name}.json" for name in names}
        writing = not args.dry_run and rank == 0
        if writing:
            check_outputs(*paths.values())
        with output_lock(*paths.values()) if writing else output_lock():
            data = load_training_data(settings, device, args.data_dir, not args.no_download, mini=True,
                                      dry_run=args.dry_run)
            log(f"searching on {settings['dataset']}: {len(data['train'][1]):,} train / {len(data['val'][1]):,} val "
                f"images, {settings['n_iter']} trials x {settings['epochs']} epochs, device {device}, "
                f"{precision.name}, world size {world_size}")
            return {name: search_model(name, settings, args.grid, data, precision, device, (rank, world_size),
                                       args.dry_run, paths[name], log) for name in names}


if __name__ == "__main__":
    main()
