"""What every script needs around the work: settings and their sources, seeds, the device and its
precision, atomic writes, and one-line errors for a user's mistakes."""
import argparse
import contextlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A mistake the user can fix (a flag, missing data, a foreign file): one line, exit 1."""


class Parser(argparse.ArgumentParser):
    """argparse, with a mistaken flag reported in one line (not the usage, then the error)."""

    def error(self, message):
        sys.exit(f"{self.prog}: error: {message} (see --help)")


@contextlib.contextmanager
def one_line_errors():
    """A user's mistake, an unwritable output or Ctrl-C: one line, no traceback."""
    try:
        yield
    except UserError as err:
        sys.exit(f"error: {' '.join(str(err).split())}")  # one line, whatever a library's text held
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # an unwritable output folder, a full disk
        sys.exit(f"error: {err.strerror or err}: {err.filename or ''}")


def parse_settings(parser, argv=None, params_keys=(), layers=()):
    """Parse argv; `layers`, each (source, {key: value}), replace defaults (e.g. the checkpoint
    fine-tuned), and so does `--params FILE` (a search's best_params) for `params_keys`. Prints
    every value once with its source: a flag, a layer, the params file, or the script's default."""
    known, _ = parser.parse_known_args(argv)
    layers = list(layers)
    if getattr(known, "params", None):
        try:
            best = json.loads(Path(known.params).read_text())["best_params"]
            layers.append((f"--params {known.params}", {key: best[key] for key in params_keys}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(f"--params {known.params} is not a finished search ({type(err).__name__})")
    sources = {}
    for source, values in layers:
        parser.set_defaults(**values)
        sources.update(dict.fromkeys(values, source))
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    args = parser.parse_args(argv)
    for key, value in vars(args).items():
        source = "flag" if getattr(given, key) is not unset else sources.get(key, "default")
        print(f"  {key:15s} {value!s:24s} ({source})")
    return args


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_device(name="auto"):
    if name == "auto":
        mps = torch.backends.mps.is_available()
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device; use auto or cpu")
    return torch.device(name)


def choose_precision(choice, device):
    """bf16 where the hardware does it natively (measured faster: benchmarks/), else fp32."""
    if choice != "auto":
        return choice, "asked for"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16", "auto: this GPU does bf16 natively"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if device.type == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags):
        return "bf16", "auto: this CPU has AVX512-BF16 or AMX"
    return "fp32", f"auto: no native bf16 on this {device.type}"


def autocast(precision, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def atomic_write(path, write):
    """write(temporary path) makes the file beside `path`, then it is renamed over it: a kill at
    any moment leaves the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def save_json(path, payload):
    atomic_write(path, lambda partial: partial.write_text(json.dumps(payload, indent=2) + "\n"))
