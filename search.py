"""Random search over the study's hyperparameter grid on the mini subset (stage 1 of the study).

    python search.py --model alexnet                  # 28 trials x 5 epochs, 10 % of ByClass (80/20)
    python search.py --model all --n-iter 10          # the six networks, one after another
    python search.py --model lenet --dataset sklearn-digits --n-iter 2 --epochs 1
    torchrun --nproc_per_node=2 search.py --model vggnet   # trials spread over the ranks

Writes outputs/search/{model}.json after every trial (best_params, best_val_loss, trials),
so an interrupted search resumes where it stopped; train.py then reads best_params.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.model_selection import ParameterSampler

from data import CLASSES, set_seed
from models import build_model
from train import (TrainingError, best_row, common_parser, fit, load_training_data, model_names, plain_args,
                   run_script, setup_distributed, write_json)

GRID = {  # the study's grid
    "learning_rate": [1e-3, 1e-2, 1e-1],
    "batch_size": [16, 32, 64],
    "momentum": [0.0, 0.85, 0.9, 0.95],
    "weight_decay": [0.0, 1e-2, 1e-3, 1e-4],
}
N_ITER = 28  # the study's number of trials
EPOCHS = 5  # per trial: enough to rank configurations, not to converge


def config_key(params):
    """A configuration as a string, to tell configurations apart."""
    return json.dumps(params, sort_keys=True)


def sample_configs(grid, n_iter, seed):
    """Up to n_iter distinct configurations drawn with scikit-learn's ParameterSampler."""
    configs, seen = [], set()
    for params in ParameterSampler(grid, n_iter=n_iter, random_state=seed):
        params = {key: (value.item() if hasattr(value, "item") else value) for key, value in sorted(params.items())}
        if config_key(params) not in seen:
            seen.add(config_key(params))
            configs.append(params)
    return configs


def run_trial(name, params, data, args, device):
    """Train one configuration from scratch; its score is the best epoch's validation loss."""
    set_seed(args.seed)
    model = build_model(name, len(CLASSES[args.dataset])).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=params["learning_rate"], momentum=params["momentum"],
                                weight_decay=params["weight_decay"])
    started = time.time()
    try:
        history = fit(model, optimizer, data, epochs=args.epochs, batch_size=params["batch_size"], seed=args.seed,
                      amp=args.amp, channels_last=False, log=lambda *_: None)
    except TrainingError:  # a diverged configuration ranks last instead of ending the search
        return {"params": params, "val_loss": None, "val_acc": None, "diverged": True,
                "seconds": time.time() - started}
    best = best_row(history)
    return {"params": params, "val_loss": best["val_loss"], "val_acc": best["val_acc"], "best_epoch": best["epoch"],
            "seconds": time.time() - started}


def settings(args, grid):
    return {"dataset": args.dataset, "subset": args.subset, "epochs": args.epochs, "n_iter": args.n_iter,
            "seed": args.seed, "grid": grid}


def load_previous(path, expected, log):
    """Trials of an earlier run with the same settings, so an interrupted search resumes."""
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    if previous.get("settings") != expected:
        log(f"{path} was written with other settings: starting a new search")
        return []
    log(f"resuming {path}: {len(previous['trials'])} trials already done")
    return previous["trials"]


def summary(name, args, grid, trials):
    finished = [trial for trial in trials if trial["val_loss"] is not None]
    best = min(finished, key=lambda trial: trial["val_loss"]) if finished else None
    return {"model": name, "dataset": args.dataset, "settings": settings(args, grid), "args": plain_args(args),
            "best_params": best["params"] if best else None, "best_val_loss": best["val_loss"] if best else None,
            "best_val_acc": best["val_acc"] if best else None, "trials": trials}


def search_model(name, args, grid, data, rank, world_size, device, log):
    path = Path(args.outputs) / "search" / f"{name}.json"
    trials = load_previous(path, settings(args, grid), log) if rank == 0 else []
    if world_size > 1:  # every rank must agree on which trials are left
        shared = [trials]
        dist.broadcast_object_list(shared, src=0)
        trials = shared[0]
    done = {config_key(trial["params"]) for trial in trials}
    todo = [params for params in sample_configs(grid, args.n_iter, args.seed) if config_key(params) not in done]
    total = len(trials) + len(todo)
    rounds = range(0, len(todo), world_size)  # one round: a trial per rank
    if rank == 0 and sys.stdout.isatty():
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=f"{name} trials", unit="round", leave=False)
        log = rounds.write  # keeps the bar below the trial lines
    for start in rounds:
        mine = todo[start + rank] if start + rank < len(todo) else None
        results = [run_trial(name, mine, data, args, device) if mine else None]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, results[0])
            results = gathered
        for result in filter(None, results):
            trials.append(result)
            loss = "diverged" if result["val_loss"] is None else f"val loss {result['val_loss']:.4f}"
            log(f"{name} trial {len(trials):3d}/{total}: "
                f"{result['params']} -> {loss} ({result['seconds']:.1f}s)")
        if rank == 0:
            write_json(path, summary(name, args, grid, trials))
    result = summary(name, args, grid, trials)
    log(f"{name}: best {result['best_params']} (val loss {result['best_val_loss']}); wrote {path}")
    return result


def parse_args(argv=None):
    parser = common_parser(__doc__.splitlines()[0], epochs=EPOCHS, several_models=True)
    parser.add_argument("--n-iter", type=int, default=N_ITER, help="number of configurations to try")
    parser.add_argument("--grid", default=None, help="a JSON object of lists to search instead of the study's grid")
    return parser.parse_args(argv)


def run(args):
    try:
        grid = json.loads(args.grid) if args.grid else GRID
    except json.JSONDecodeError as err:
        raise TrainingError(f"--grid is not valid JSON ({err})") from None
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *_: None)
    data = load_training_data(args, device, mini=True)
    log(f"searching on {args.dataset}: {len(data['train'][1]):,} train / {len(data['val'][1]):,} val images, "
        f"{args.n_iter} trials x {args.epochs} epochs, device {device}, world size {world_size}")
    return {name: search_model(name, args, grid, data, rank, world_size, device, log) for name in model_names(args)}


def main(argv=None):
    return run_script(run, parse_args(argv))


if __name__ == "__main__":
    main()
