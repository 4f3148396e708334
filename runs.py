"""Run plumbing every script shares: one-line errors, atomic writes, locks, the settings table,
device, precision and distribution. Nothing here knows about datasets or networks.

    from runs import one_line_errors, write_json
    with one_line_errors():          # a UserError, Ctrl-C, a full disk: one line and a non-zero exit
        write_json("outputs/x.json", {"a": 1})   # a temporary file, then a rename: never half-written
"""
import argparse
import contextlib
import errno
import json
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

JSON_DEPTH = 100  # deeper nesting in a JSON file we read is refused (Python's parser would recurse away)


def interrupt_quietly():
    """Ctrl-C before a script's work starts (torch takes seconds to load): one line and exit 130, not a
    traceback. Each script calls it first; runs.py itself imports torch only inside its functions."""
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))


class UserError(Exception):
    """Something the user can fix: the message says what to do; scripts print it as one line."""


class DataError(UserError):
    """A problem with the user's data files or pictures."""


# ----------------------------------------------------------------------------- files

def refuse_special(path, what="output"):
    """A directory, FIFO or device where a file belongs is refused in one line."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise UserError(f"{path} is {kind}, where the {what} file goes: move it away or choose another folder")


def atomic_folder(path):
    """Make the folder a file goes in, or say in one line what is in the way."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot make the folder {Path(path).parent}: a file is in the way; move it or choose "
                        f"another folder") from None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a unique temporary path beside `path`; it replaces `path` only if the block succeeds.

    Whatever stops the block (an error, Ctrl-C, a full disk), the temporary file is removed
    and the previous `path` stays as it was.
    """
    with temporary_beside(path) as partial:
        yield partial
        os.replace(partial, path)


@contextlib.contextmanager
def all_or_nothing(*paths, renames=()):
    """Yield a temporary path for each of `paths`; once the block has written them all, each replaces
    its path, and each existing source of `renames` ((source, destination) pairs) its destination,
    with Ctrl-C and SIGTERM held back while the renames run.

    A signal before the renames (while the block works) publishes nothing and ends the run as usual
    (exit 130, every old file as it was); one that arrives during them is taken only afterwards and
    discarded, with a line that says everything was published, so the run ends with exit 0. Either
    way the published files are all the old run's or all the new run's.
    """
    with contextlib.ExitStack() as stack:
        partials = [stack.enter_context(temporary_beside(path)) for path in paths]
        yield partials
        publish([(Path(source), Path(destination)) for source, destination in renames if Path(source).is_file()]
                + list(zip(partials, map(Path, paths))))


@contextlib.contextmanager
def temporary_beside(path):
    """A unique temporary path beside `path` (not created), removed afterwards if still there."""
    path = Path(path)
    refuse_special(path)
    atomic_folder(path)
    partial = path.parent / f".{os.getpid()}-{os.urandom(4).hex()}.{path.name}.tmp"
    try:
        yield partial
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def publish(renames):
    """os.replace each (source, destination) with SIGINT and SIGTERM blocked; a signal that came
    meanwhile is consumed afterwards, and said so in one line: everything was published."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        for source, destination in renames:
            os.replace(source, destination)
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for source, destination in renames:
            with contextlib.suppress(OSError):
                os.chmod(source, 0o644)  # mkstemp-like 0600 would hide results from the folder's other users
            os.replace(source, destination)
    finally:
        pending = signal.sigpending() & held - set(previous)
        for number in pending:
            signal.sigwait({number})
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if pending:
        print("interrupted while publishing: every file of the finished run was written; it stands", flush=True)


def write_json(path, payload):
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(payload, indent=2) + "\n")


def too_deep(value, depth=0):
    if depth > JSON_DEPTH:
        return True
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(too_deep(child, depth + 1) for child in children)


def read_json(path, what):
    """A JSON object from a file the user may have emptied, truncated or edited: one-line errors."""
    path = Path(path)
    refuse_special(path, what)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"no file {path}: check the path") from None
    except OSError as err:  # the file may be fine: it cannot be read here
        raise DataError(f"{path} cannot be read ({err.strerror or type(err).__name__}): fix its permissions, or "
                        f"give another path") from None
    try:
        payload = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(f"{path} is not readable JSON ({type(err).__name__}): fix or delete it, or redo the {what}") \
            from None
    if not isinstance(payload, dict) or too_deep(payload):
        raise DataError(f"{path} does not hold a usable JSON object: fix or delete it, or redo the {what}")
    return payload


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, whatever MPLBACKEND says."""
    os.environ.pop("MPLBACKEND", None)  # an unusable value would break the import itself
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path, dpi=100):
    """Save a matplotlib figure as a PNG atomically (never a half-written one) and close it."""
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=dpi, format="png")
    pyplot().close(figure)


RESULTS = Path(__file__).resolve().parent / "results"  # the studies' committed files
UPDATE_RESULTS = {"given": False}  # --update-results of the script running now (Parser.parse_args sets it)


def replaces_results(path):
    """Whether writing `path` would replace a committed file of the studies under results/."""
    path = Path(path)
    return (path.is_file() or path.is_symlink()) and path.resolve().is_relative_to(RESULTS)


def check_outputs(*paths):
    """Fail before any work when an output file could not be written where it goes, or would replace a
    committed result without --update-results (creates nothing)."""
    for path in map(Path, paths):
        if replaces_results(path) and not UPDATE_RESULTS["given"]:
            raise UserError(f"{path} is a committed result of this repository's studies: give other "
                            f"--hub/--outputs folders (results/*/run_study.sh passes --update-results to redo one)")
        refuse_special(path)
        folder = path.parent
        while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"cannot make the folder {path.parent}: {folder} is a file in the way; move it or "
                            f"choose other --hub/--outputs/--out folders")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"cannot write in {folder} (permission denied): choose other --hub/--outputs/--out "
                            f"folders or fix their permissions")


@contextlib.contextmanager
def output_lock(*paths):
    """Hold PATH.lock for each output path: a second run on the same outputs stops with one line.

    flock is released by the kernel whatever ends the process, so a crashed run never
    leaves a lock that blocks the next one. A run that locked a file another run deleted meanwhile
    (opened just before that run let go) sees that the name is no longer its file and locks again,
    so two runs never hold one output. Folders made for the lock alone are removed again.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no locks
        yield
        return
    held, created = [], []
    try:
        for path in paths:
            lock = Path(str(path) + ".lock")
            if lock.is_symlink() or (lock.exists() and not lock.is_file()):
                raise UserError(f"{lock} is not a lock file this project made: remove it and run again")
            folder = lock.parent
            while not folder.exists() and folder != folder.parent:
                created.append(folder)
                folder = folder.parent
            lock.parent.mkdir(parents=True, exist_ok=True)
            held.append((lock, lock_file(lock, path, fcntl)))
        yield
    finally:
        for lock, handle in held:
            lock.unlink(missing_ok=True)
            os.close(handle)
        for folder in created:  # deepest first; a folder that now holds outputs stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def lock_file(lock, path, fcntl):
    """An open handle holding the flock of the file named `lock` now (not of one deleted meanwhile)."""
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(handle, 32, 0).decode(errors="replace").strip() or "?"
            os.close(handle)
            raise UserError(f"another run (pid {owner}) is writing {path}: wait for it to finish, or give "
                            f"this run other --hub/--outputs folders") from None
        try:
            current = os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle).st_ino:
            os.ftruncate(handle, 0)
            os.pwrite(handle, str(os.getpid()).encode(), 0)
            return handle
        os.close(handle)  # its holder let go and deleted it after we opened it: lock the file there now


# ----------------------------------------------------------------------------- the command line

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line that says what to do."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        UPDATE_RESULTS["given"] = bool(getattr(parsed, "update_results", False))
        return parsed

    def error(self, message):
        if rank_label() != 0:  # under torchrun one rank speaks for all
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):
        """--help into a full disk or a closed pipe is one line and exit status 1, not a silent 0."""
        if not message:
            return
        file = file or sys.stderr
        try:
            file.write(message)  # argparse's own writer swallows the OSError and exits 0
            file.flush()
        except BrokenPipeError:  # piped into `head`: stop quietly
            quiet_exit(1)
        except (OSError, ValueError, AttributeError) as err:
            quiet_exit(1, f"error: cannot write the output ({getattr(err, 'strerror', None) or err})")


def checked(name, convert, test, wanted):
    """An argparse type: convert, then refuse with `wanted` when `test` fails (also used on JSON values)."""
    def check(text):
        try:
            value = convert(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value
    check.__name__, check.kind = name, convert
    return check


def one_of(names, what):
    """An argparse type (and file-value check) that takes one of `names`."""
    names = list(names)

    def check(text):
        if text not in names:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, names))}, not {text!r}")
        return text
    check.__name__, check.kind, check.names = what, str, names
    return check


def is_int(value):
    """A whole number as JSON and checkpoints hold it: an int, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(check, value, where):
    """A value read from a file (--params, a checkpoint, a JSON), held to its flag's rules: the flag's
    type exactly (no text for a number, no 2.5 for a whole number, no bool), then the flag's test."""
    kind = getattr(check, "kind", None)
    if not {int: is_int, float: is_number, str: lambda v: isinstance(v, str)}.get(kind, lambda v: True)(value):
        raise UserError(f"{where} is {value!r}, not {check.__name__}")
    try:
        return check(value)
    except argparse.ArgumentTypeError as err:
        raise UserError(f"{where} {err}") from None


LARGEST = 1e6  # a learning rate, decay or clip above this overflows the optimizer's arithmetic
positive_int = checked("a whole number", int, lambda v: v >= 1, "at least 1")
positive_float = checked("a number", float, lambda v: 0 < v <= LARGEST, f"a number above 0 and at most {LARGEST:g}")
non_negative_float = checked("a number", float, lambda v: 0 <= v <= LARGEST, f"a number from 0 to {LARGEST:g}")
fraction = checked("a number", float, lambda v: 0 <= v < 1, "a fraction from 0 (none) to below 1")
momentum = checked("a number", float, lambda v: 0 <= v < 1, "at least 0 and below 1")
seed_value = checked("a whole number", int, lambda v: 0 <= v < 2 ** 32, "between 0 and 2**32 - 1")
path_value = checked("a path", str, lambda v: bool(v.strip()), "a file or folder name (an empty one would mean "
                                                                "the current folder)")


def add_run_flags(parser, *names, precision="auto"):
    """The flags about where and how a script runs; each script names the ones it uses."""
    flags = {
        "device": dict(default="auto", metavar="NAME", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)"),
        "hub": dict(default="model_hub", type=path_value, metavar="DIR",
                    help="checkpoint folder (default: %(default)s)"),
        "outputs": dict(default="outputs", type=path_value, metavar="DIR",
                        help="folder for JSON and plots (default: %(default)s)"),
        "precision": dict(default=None, choices=["auto", "fp32", "bf16"], metavar="NAME",
                          help=f"fp32, bf16, or auto: bf16 where native (default: {precision})"),
        "compile": dict(action="store_true", help="torch.compile the model (needs a C compiler)"),
        "dry-run": dict(action="store_true", help="one batch of each kind, then stop; writes nothing"),
        "update-results": dict(action="store_true", help="may replace committed results/ files (run_study.sh)"),
    }
    for name in names:
        parser.add_argument(f"--{name}", **flags[name])
    return parser


def resolve_settings(args, defaults, layers=(), log=print):
    """Each value from the first of: its flag, each (source, values) layer in order, the defaults.

    Prints every value with its source once, and returns them as a dict: the run's settings.
    """
    settings, sources = {}, {}
    for key in defaults:
        given = getattr(args, key, None)
        candidates = ([("flag", {key: given})] if given is not None else []) + list(layers) + [("default", defaults)]
        sources[key], settings[key] = next((source, values[key]) for source, values in candidates if key in values)
    log("settings (value: source):")
    for key in defaults:
        log(f"  {key:14} {settings[key]!s:16} {sources[key]}")
    return settings


# ----------------------------------------------------------------------------- seeds, devices, precision

def set_seed(seed):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_device(name="auto"):
    """A torch.device that exists on this machine: auto is cuda, then mps, then cpu."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s); use --device auto or cpu")
    if device.type == "mps" and not mps:
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu")
    return device


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: the CPU multiplies bf16 in hardware (Linux reports it in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """How the arithmetic runs: bf16 autocast and/or channels_last, and why."""
    bf16: bool
    channels_last: bool
    reason: str

    @property
    def name(self):
        return "bf16 + channels_last" if self.bf16 and self.channels_last else ("bf16" if self.bf16 else "fp32")


def choose_precision(choice, device, default="auto"):
    """--precision (None: the script's `default`): auto picks bf16 autocast + channels_last only where
    bf16 is native and measured faster.

    Measured (benchmarks/throughput.py): on a CPU with AVX512-BF16, bf16 + channels_last trains
    1.1x (LeNet) to 2.2x (VGGNet) faster than fp32; without native bf16, bf16 is emulated and slower.
    """
    import torch

    how = "asked for with --precision" if choice else "this script's default"
    choice = choice or default
    if choice == "fp32":
        return Precision(False, False, f"{how} fp32")
    if choice == "bf16":
        return Precision(True, device.type in ("cpu", "cuda"), f"{how} bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision(True, True, f"auto: {torch.cuda.get_device_name(device)} does bf16 natively")
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision(True, True, "auto: this CPU has AVX512-BF16/AMX (native bf16)")
    what = {"cpu": "this CPU has no native bf16 (no AVX512-BF16 or AMX)",
            "cuda": "this GPU has no native bf16"}.get(device.type, f"bf16 is not native on {device.type}")
    return Precision(False, False, f"auto: {what}")


def setup_distributed(device_name):
    """(rank, world_size, device): torchrun's environment if present, else a single process."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = get_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def is_terminal(stream=None):
    """Whether a stream (stdout by default) is a terminal; False when it is closed or missing."""
    stream = stream or sys.stdout
    try:
        return bool(stream) and stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def log_for(rank):
    """print on rank 0, nothing on the others: one copy of every line under torchrun."""
    return print if rank == 0 else (lambda *_, **__: None)


# ----------------------------------------------------------------------------- ending in one line

def is_full_disk(err):
    """An OSError for a full disk, or torch.save's RuntimeError for the same thing."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "file write failed" in text or
                                              "No space left" in text)


def quiet_exit(code, message=None):
    """Exit with at most one line on stderr; a second Ctrl-C while exiting is ignored, not a traceback."""
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):  # a closed pipe must not fail again at exit's flush
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    if message and code == 1:
        raise SystemExit(message)  # printed on stderr by the interpreter, exit status 1
    if message:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(message + "\n")
    raise SystemExit(code)


def rank_label():
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")) if world_size > 1 else 0


def ignore_interrupts():
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def one_line_errors():
    """Run a script's work: user errors, Ctrl-C, `kill`, a full disk and a closed pipe each end in one line."""
    import atexit

    import torch.distributed as dist

    atexit.unregister(ignore_interrupts)
    atexit.register(ignore_interrupts)  # runs first at exit: a late Ctrl-C cannot break the exit handlers
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.suppress(ValueError):  # only the main thread may set handlers (tests call main() too)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` ends a run as Ctrl-C does
    if sys.stdout is None or sys.stdout.closed:
        sys.stdout = open(os.devnull, "w")  # stdout closed with >&-: print nowhere rather than crash
    for stream in (sys.stdout, sys.stderr):  # a path an ASCII terminal cannot show is escaped, never fatal
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    quiet = rank_label() != 0  # under torchrun one rank speaks for all
    try:
        yield
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing files: tearing gloo down under it aborts
    except UserError as err:
        quiet_exit(1, None if quiet else f"error: {err}")
    except KeyboardInterrupt:
        quiet_exit(130, None if quiet else "interrupted")
    except BrokenPipeError:  # output piped into `head`: stop quietly
        quiet_exit(1)
    except (OSError, RuntimeError) as err:
        if is_full_disk(err):
            quiet_exit(1, f"error: no space left on the device ({getattr(err, 'filename', None) or 'while writing'}): "
                          f"free some space and run again; earlier files were left as they were")
        if isinstance(err, PermissionError):
            quiet_exit(1, f"error: {err.strerror}: {err.filename}; fix the permissions or choose another folder")
        if isinstance(err, OSError) and err.filename:  # a path the file system refuses (/proc, a vanished folder)
            quiet_exit(1, f"error: {err.strerror or err}: {err.filename}; check the path or choose another folder")
        if isinstance(err, RuntimeError) and compiler_missing(err):
            quiet_exit(1, "error: --compile needs a working C compiler (none was found): install one (gcc) or "
                          "leave --compile out")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for number, handler in previous.items():  # as they were: main() may run inside a longer process
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(number, handler)


def compiler_missing(err):
    text = f"{type(err).__name__} {err}"
    return any(word in text for word in ("InductorError", "BackendCompilerFailed", "CppCompileError",
                                         "Failed to find C compiler", "InvalidCxxCompiler"))
