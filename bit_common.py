"""What every script shares and no reader of the method needs first: the plumbing of a run.

- A script's end: one line for a bad input (UserError, DataError, WeightsError) or a signal, exit codes, the
  loader workers ended (run, Stopped, end_workers).
- Files: atomic writes (write_atomic, save_atomic), refusal of FIFOs and devices (require_regular_file).
- Flags: argparse types with bounds, shared by every script and by a resumed run's args.json (bounded).
- A run folder: its lock, --force setting an earlier run aside, args.json restored and checked on --resume,
  last.pt read and checked, metrics.csv, the stop signal of a training loop, the thread that writes an
  epoch's files (lock_output ... EpochWriter); a torchrun process's process group (join_process_group,
  on_process_0).
- The decoded-image cache: every image decoded once at the working size into a memory-mapped file
  (decode_all).
- The interface of a self-supervised method (Method).
"""

import argparse
import csv
import errno
import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageOps


class UserError(ValueError):
    """Something the user gave (a flag, a file, a key in it) that cannot be used; the message names it."""


class Stopped(BaseException):
    """A signal that ends a script where it stands (a BaseException, as KeyboardInterrupt: no `except
    Exception` may take it for an error to recover from). The atomic writes under way remove their temporary
    files as it passes; run() says so in one line."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def what_stopped(e):
    """What a KeyboardInterrupt or a Stopped names in a message: Ctrl-C, or the signal."""
    return str(e) if isinstance(e, Stopped) and e.signum != signal.SIGINT else "Ctrl-C"


def run(main):
    """A script's entry point. Its end, however it comes, is one of: main's exit status; one line for a
    UserError, a loss that stopped being finite, or a signal (exit 128 + signum, as a shell reports a process
    that a signal ended); a traceback for anything else, a bug (exit 1). Each ends the DataLoader workers
    first, which would otherwise keep the process alive for ever (end_workers)."""
    prog = Path(sys.argv[0]).name
    # what it prints may hold file names that are not UTF-8 (os.fsdecode keeps their bytes as lone
    # surrogates): printed escaped, as stderr prints them, not a UnicodeEncodeError
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout, sys.stderr = (
        stream and OutputThatCannotStopARun(stream) for stream in (sys.stdout, sys.stderr)
    )
    for signum in stop_signals():
        signal.signal(signum, functools.partial(stop, os.getpid()))
    try:
        status = main()
    except SystemExit as e:  # argparse's one line, --help
        status = e.code
    except (UserError, FloatingPointError) as e:
        status = f"{prog}: error: {e}"
    except Stopped as e:
        status = 128 + e.signum
        print(f"{prog}: stopped by {e}; no file was left half-written", file=sys.stderr)
    except BaseException:  # a bug: its traceback, and an end
        traceback.print_exc()
        status = 1
    finally:
        end_workers()
    sys.exit(status)


def stop_signals():
    """The signals that stop a script cleanly: Ctrl-C, SIGTERM (a scheduler's stop or preemption) and SIGHUP
    (the terminal closed), but not a SIGHUP that the process started out ignoring (`nohup`), which must stay
    ignored."""
    hangup = signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
    return [signal.SIGINT, signal.SIGTERM] + [signal.SIGHUP] * hangup


def stop(main_pid, signum, _frame):
    """The handler of stop_signals outside a training loop (StopSignal's inside): the script ends at
    once, through Stopped. Further signals are ignored, so that none interrupts the clean-up. A process
    forked from the script's (a DataLoader worker, which Ctrl-C at a terminal reaches too) inherits the
    handler, and leaves the signal to the main process, as the training loaders' workers do
    (ignore_signals)."""
    if os.getpid() != main_pid:
        return
    for s in stop_signals():
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def end_workers():
    """Kill the DataLoader worker processes that are still alive. They ignore SIGINT and SIGTERM
    (ignore_signals: the main process decides when a run stops), so multiprocessing's exit handler, which
    sends SIGTERM and then waits for them, would wait for ever after an exception; they hold nothing that must
    be saved. PyTorch's SIGCHLD handler, which raises when a worker dies by a signal, is removed first."""
    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join()


class OutputThatCannotStopARun:
    """sys.stdout or sys.stderr, whose failures are not the run's: once its reader is gone (`pretrain.py |
    head -1`: BrokenPipeError) or its disk is full, what the script prints goes to /dev/null and the script
    goes on. The redirection is the one the Python documentation gives for a closed pipe (the signal module,
    "Note on SIGPIPE"), so that Python's own flush at exit fails no more either."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError:
            self.lost()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError:
            self.lost()

    def lost(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        except OSError:  # a stream without a file descriptor: nothing of it for Python to flush at exit
            self.stream = open(os.devnull, "w")
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def write_atomic(path, write):
    """Create or replace `path` whole or not at all: `write(tmp)` fills a temporary file beside it, which is
    renamed onto `path` once complete (a rename replaces a symbolic link at `path`; it never writes through
    one). A crash or a full disk leaves whatever was at `path` as it was; a full disk is a UserError that
    names `path`. The temporary files that killed processes left in that folder are removed first."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a link planted at that name would have write() write through it
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        full = disk_full(e)
        if full:
            raise UserError(
                f"cannot write {path}: the disk is full ({full.strerror}); nothing was replaced"
            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder):
    """Remove the temporary files of write_atomic whose process, on this machine, no longer exists: those that
    a kill -9 or a power cut left behind (a last.pt's is as large as the run's checkpoint). Those of a live
    process, and those of another machine (a --cache-dir on a shared disk), are left alone."""
    pattern = re.compile(rf"\..+\.{re.escape(socket.gethostname())}\.(\d+)\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:  # no such folder yet: write() says what is wrong with it
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match and not process_exists(int(match[1])):
            Path(folder, name).unlink(missing_ok=True)


def process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: the checks of kill(2), nothing sent
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def require_regular_file(path, error=UserError):
    """Refuse, with `error` naming it, an existing `path` that is not a regular file (after links): opening a
    FIFO waits for a writer, and no signal ends that wait; a device or a socket is not a file to read either.
    A path that does not exist is left to the caller, who says so in its own words."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        kind = {stat.S_ISFIFO: "a FIFO", stat.S_ISDIR: "a directory", stat.S_ISSOCK: "a socket"}
        found = next((name for test, name in kind.items() if test(mode)), "a device")
        raise error(f"{path}: {found}, not a regular file")


def disk_full(error):
    """The OSError ENOSPC (or EDQUOT, a full quota) behind `error`, or None. torch.save into a file object
    reports the OSError of its write as the context of a RuntimeError, hence the walk along the chain."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__context__
    return None


def save_atomic(obj, path):
    """torch.save, atomically. Into a file object that Python writes, so that a full disk is an OSError that
    write_atomic recognises; torch.save into a path reports it only as "unexpected pos" (PyTorch 2.x)."""

    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomic(path, save)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag ends in one line (`script.py: error: argument --lr: ...`, exit 2) as
    every other error of the scripts do; --help still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text):
    """argparse type of every float flag: a number, but not nan or inf, which every range check lets through
    (nan < 0 and nan > 0 are both false)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def bounded(kind, least=None, above=None, below=None, most=None):
    """An argparse type: a whole number (kind int) or a finite one (kind float) within the bounds given, least
    <= value, above < value, value < below, value <= most. The same function checks the flag on the command
    line and the value that --resume restores from args.json (restored_args)."""
    low = f"[{least}" if least is not None else f"({above}" if above is not None else "(-inf"
    high = f"{most}]" if most is not None else f"{below})" if below is not None else "inf)"
    expected = f"{'a whole number' if kind is int else 'a number'} in {low}, {high}"

    def check(text):
        try:
            value = finite_float(text) if kind is float else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}") from None
        if not (
            (least is None or value >= least)
            and (above is None or value > above)
            and (below is None or value < below)
            and (most is None or value <= most)
        ):
            raise argparse.ArgumentTypeError(f"{text}: expected {expected}")
        return value

    check.__name__ = "int" if kind is int else "float"  # argparse's word for the type in its own messages
    return check


POSITIVE_INT = bounded(int, least=1)  # epochs, batch sizes, trials, k of the kNN
NON_NEGATIVE_INT = bounded(int, least=0)  # --workers
POSITIVE = bounded(float, above=0)  # learning rates, temperatures

# --knn-t: the kNN's votes are exp(cosine / t) in float32, whose largest number is e^88.7 (IEEE 754): from
# t = 0.02 up, k votes of at most e^50 each stay finite for any bank below 10^16 images
KNN_TEMPERATURE = bounded(float, least=0.02)
NON_NEGATIVE = bounded(float, least=0)  # weight decay, focal loss gamma, warm-up epochs
FRACTION = bounded(float, above=0, most=1)  # --train-fraction, --shrink, --select-filters

# SGD's velocity is v <- momentum * v + gradient (torch.optim.SGD, LARS too): below 1 old gradients fade; at
# 1 or above they never do, and the steps grow without bound
MOMENTUM = bounded(float, least=0, below=1)

# Every seed of the scripts: a run's view of image i in epoch e is seeded with
# (seed * 100_003 + e) * 10_000_019 + i (datasets.SeededSampler), which must stay below 2**64, the limit of
# torch.manual_seed: seeds below 2**24 leave room for 10**11 epochs. Below 2**32, scikit-learn's limit, too.
SEED_LIMIT = 2**24
SEED = bounded(int, least=0, below=SEED_LIMIT)

# --image-size: every image is decoded at SIZE x SIZE into the cache, N * SIZE**2 * 3 bytes (31.5 GB for the
# 10,015 images of HAM10000 at 1024 px). Our cap: twice the largest resolution of BiT's own transfer recipe,
# 512 px resized then 480 cropped (google-research/big_transfer, bit_hyperrule.py get_resolution), and above
# HAM10000's 600x450 originals.
MAX_IMAGE_SIZE = 1024
IMAGE_SIZE = bounded(int, least=1, most=MAX_IMAGE_SIZE)


def device_name(text):
    """argparse type of --device: cpu, cuda or cuda:N, one that this machine has. The name itself is kept
    (args.json holds strings)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has no such GPU ({gpus} found); use --device cpu"
        )
    return text


def output_dir(path, flag="--out"):
    """Make `path` a directory that takes files, before any computing: a file there, or a place that cannot
    be written, is one line now rather than a traceback after the work."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    return path


def path_arg(text):
    """argparse type of every path flag: a path, but not an empty one. `--out ""` (a shell variable that was
    never set, `--out "$RUN"`) would mean the current folder, and a whole run written into it."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, not an empty string")
    return Path(text)


def to_json(args):
    """The arguments as JSON values (paths as strings): args.json, results.json, checkpoints."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


class DataError(UserError):
    """Data that cannot be used as asked; the message names the file, id or flag."""


class WeightsError(UserError):
    """A weights file that cannot go into the model asked for; the message names the file and the key."""


REPLACED = ".replaced"


def lock_output(args):
    """An exclusive lock on DIR/.lock for as long as this process lives, and a refusal to replace another
    run's last.pt without --resume or --force; nothing else of DIR is touched. Returns the open lock file.

    The lock is a POSIX record lock (lockf): the process's own, which the DataLoader workers that it forks do
    not inherit (an flock would be theirs too, and outlive a kill -9 of the run by as long as they take to
    notice it), released by the OS when the process dies, however it dies. DIR/.lock is opened without
    following a symbolic link (O_NOFOLLOW) and must be a regular file: the pid written into it goes nowhere
    else."""
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: a file, not a directory")
    path = args.out / ".lock"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(
                f"--out {args.out}: {path} is a symbolic link; a run writes its pid there, into no other "
                "file: remove the link"
            ) from None
        if e.errno != errno.EISDIR:
            raise UserError(f"--out {args.out}: cannot write there ({e.strerror})") from None
        fd, regular = None, False
    if not regular:  # a directory, a FIFO, a device
        if fd is not None:
            os.close(fd)
        raise UserError(f"--out {args.out}: {path} is not a regular file; remove it")
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # lockf(3) reports a held lock as either
            raise
        holder = lock.read().strip() or "?"
        lock.close()
        raise UserError(
            f"--out {args.out} is in use by process {holder}: another run is writing there (--force does "
            "not override a live run); wait for it, or choose another --out"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    if (args.out / "last.pt").exists() and not (args.resume or args.force):
        raise UserError(
            f"--out {args.out} holds another run: pass --resume to continue it, --force to replace it, "
            "or another --out"
        )
    return lock


def set_aside_earlier_run(out, run_files, keep=None):
    """Before a new run writes into DIR: the files of an earlier run there (`run_files`: names and glob
    patterns; but for `keep`, the split file the new run reads) go, so that none passes for the new run's (an
    old backbone_ep1.pt for its epoch 1, an old last.pt beside its args.json). A run that wrote a last.pt
    (replaced with --force) is moved into DIR/.replaced/, last.pt first, and stays there until the new run
    writes its first last.pt (save_last): a new run killed before that leaves DIR with its own args.json,
    which --resume starts over, and the old run intact beside it. Files without a last.pt are those of a run
    killed before its first one, with nothing to resume: they are deleted, and a run set aside earlier is
    kept."""
    kept = keep and Path(keep).resolve()
    found = {path for pattern in run_files for path in out.glob(pattern) if path.resolve() != kept}
    found = sorted(found, key=lambda path: path.name != "last.pt")
    if found and found[0].name == "last.pt":
        remove_replaced(out)  # one whose replacement had written its last.pt
        (out / REPLACED).mkdir()
        for path in found:
            os.replace(path, out / REPLACED / path.name)
    else:
        for path in found:
            path.unlink()


def save_last(state, out):
    """DIR/last.pt, atomically. The first one of a run that replaced another commits it: the replaced run,
    kept aside until now (set_aside_earlier_run), is deleted."""
    save_atomic(state, out / "last.pt")
    remove_replaced(out)


def remove_replaced(out):
    """DIR/.replaced and what it holds; one that is not a directory (a link planted there) is removed
    itself, and nothing it points to."""
    aside = out / REPLACED
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink(missing_ok=True)


def write_args(args):
    """DIR/args.json, what --resume restores. A resumed run writes it once its last.pt has proved good."""
    text = json.dumps(to_json(args), indent=1) + "\n"
    write_atomic(args.out / "args.json", lambda tmp: tmp.write_text(text))


def restored_args(parser, argv, out, not_restored, resolved):
    """--resume: (the arguments in DIR/args.json, with the command line's for the keys in `not_restored`, and
    the saved dict itself). Every saved value is checked by its flag's own type and choices, the code that
    checks the flag on a command line (restored_value): an args.json edited to a value that no flag takes is
    an error, as that flag would be. The keys in `resolved` are those a run always records a value for (a new
    run fills them in from the checkpoint or the defaults): null is not one."""
    path = out / "args.json"
    try:
        require_regular_file(path)
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--resume: {out} holds no run to resume (no args.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: {path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} is not a dict of arguments")
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown = [key for key in saved if key not in flags]
    if unknown:
        raise UserError(f"--resume: {path}: {unknown[0][:60]!r} is not an argument of this script")
    # a method's setting added since the run was written (its default None: the method's value) takes it
    missing = [
        key
        for key in flags
        if key not in saved
        and key not in not_restored
        and (flags[key].default is not None or key in resolved)
    ]
    if missing:
        raise UserError(
            f"--resume: {path} lacks {missing[0]} (written by another version of the script?); add the "
            "value the run used, or start afresh with --force"
        )
    restored = {
        k: restored_value(flags[k], v, path, k not in resolved)
        for k, v in saved.items()
        if k not in not_restored
    }
    parser.set_defaults(**restored)
    args = parser.parse_args(argv)
    args.out = out
    return args, saved


def restored_value(action, value, path, may_be_none):
    """A value of args.json, checked as argparse checks its flag (argparse checks the command line, not the
    defaults that --resume sets): the flag's choices, and its type applied to the value as text. Returns the
    value the type makes of it."""

    def refuse(reason):
        raise UserError(f"--resume: {path}: {action.dest} = {json.dumps(value)[:60]}: {reason}")

    if value is None and action.default is None and may_be_none:  # a flag not given (another --method's)
        return None
    if action.choices and (isinstance(value, list) or value not in action.choices):
        refuse(f"expected one of {', '.join(map(str, action.choices))}")
    if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction)):
        return value if isinstance(value, bool) else refuse("expected true or false")
    if action.nargs == "?":  # --whiten: a placement, or true/false as runs written before placements record
        return value if isinstance(value, (str, bool)) else refuse("expected a string, true or false")
    if action.nargs in ("+", "*"):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            refuse("expected a list")
        return [restored_item(action, item, refuse) for item in value]
    return restored_item(action, value, refuse)


def restored_item(action, value, refuse):
    if action.type in (None, str, Path, path_arg):  # a flag that takes text (a path: not an empty one)
        if not isinstance(value, str) or (action.type is path_arg and not value):
            refuse("expected a path" if action.type is path_arg else "expected a string")
        return value  # argparse applies the type to a default given as text
    if isinstance(value, bool) or not isinstance(value, (str, int, float, list)):
        refuse(f"expected a value of --{action.dest.replace('_', '-')}")
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)  # --save-at: 25,400
    try:
        converted = action.type(text)
    except (argparse.ArgumentTypeError, ValueError) as e:
        refuse(str(e) or "not a value of the flag")
    if converted != value or isinstance(converted, str) != isinstance(value, str):  # "2" for 2, 2.5 for 2
        refuse(f"expected {json.dumps(converted)}")
    return converted


def refuse_changes(args, saved, may_change, reason=""):
    """On --resume, a flag outside `may_change` whose value differs from the saved run is an error."""
    current = to_json(args)
    changed = [k for k, v in saved.items() if k not in may_change and current.get(k, v) != v]
    if changed:
        key = changed[0]
        raise UserError(
            f"--resume: --{key.replace('_', '-')} {current[key]} differs from the run in {args.out} "
            f"({saved[key]}){reason if key == 'epochs' else ''}; only "
            f"--{' --'.join(sorted(k.replace('_', '-') for k in may_change))} may change"
        )


def read_checkpoint(args, may_change, keys):
    """DIR/last.pt, checked: it loads (weights_only: a pickle from elsewhere must not run code), it is a dict
    with the `keys` the script saves, its model's weights are finite, and it was trained with the arguments
    of DIR/args.json, but for those in `may_change`."""
    path = args.out / "last.pt"
    require_regular_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"--resume: {path} is not a readable checkpoint ({type(e).__name__}); it is written atomically, "
            "so it was damaged after the run wrote it"
        ) from None
    if (
        not isinstance(state, dict)
        or any(k not in state for k in keys)
        or not isinstance(state["args"], dict)
    ):
        raise UserError(
            f"--resume: {path} is not a last.pt of this script (expected a dict with the keys "
            f"{', '.join(keys)}, args a dict)"
        )
    model = state["model"]
    if not isinstance(model, dict) or not all(torch.is_tensor(t) for t in model.values()):
        raise UserError(f"--resume: {path}: its model is not a dict of tensors")
    check_finite(model, f"--resume: {path}")
    current = to_json(args)
    edited = [k for k, v in state["args"].items() if k not in may_change and current.get(k) != v]
    if edited:
        key = edited[0]
        raise UserError(
            f"--resume: {args.out / 'args.json'} says {key} = {current.get(key)!r}, but {path} was trained "
            f"with {state['args'][key]!r} (args.json edited by hand?)"
        )
    return state


def check_progress(saved, fresh, path):
    """last.pt's record of where the run stands against a fresh run's (`fresh`: its state_dict): the same
    keys, each of the same kind where the fresh one is not None (a float may be whole; a tensor of the same
    shape and dtype; a list of dicts, the metrics rows and trials), counts not negative, epochs from 1."""
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        raise UserError(f"--resume: {path}: its progress is not a dict with the keys {', '.join(fresh)}")
    for key, value in saved.items():
        if fresh[key] is None:
            continue
        kinds = {float: (int, float)}.get(type(fresh[key]), type(fresh[key]))
        if (
            not isinstance(value, kinds)
            or isinstance(value, bool)
            or (torch.is_tensor(value) and (value.shape, value.dtype) != (fresh[key].shape, fresh[key].dtype))
            or (isinstance(value, list) and not all(isinstance(row, dict) for row in value))
        ):
            shape = f" of shape {tuple(value.shape)}" if torch.is_tensor(value) else ""
            raise UserError(
                f"--resume: {path}: progress {key} is a {type(value).__name__}{shape}, not what a run "
                "records there"
            )
        least = 1 if key == "epoch" else 0
        if type(fresh[key]) is int and value < least:
            raise UserError(f"--resume: {path}: progress {key} = {value}, below {least}")


def load_module(module, state):
    """module.load_state_dict, and what it does not check: every tensor of the dtype the module holds there
    (an integer tensor would be cast into a float parameter without a word)."""
    own = module.state_dict()
    for name, tensor in state.items():
        if name in own and tensor.dtype != own[name].dtype:
            raise ValueError(f"{name} is {tensor.dtype}, the module's {own[name].dtype}")
    module.load_state_dict(state)


def load_optimizer(optimizer, state):
    """optimizer.load_state_dict, and then what it does not check: every tensor of a parameter's state
    (momentum buffers, Adam's moments) of that parameter's shape, which would otherwise fail at the first
    step."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                    raise ValueError(
                        f"{name} of shape {tuple(value.shape)} for a parameter {tuple(param.shape)}"
                    )


def load_parts(path, parts):
    """Load each (name, load) of `parts`, the pieces of last.pt into the run's modules: a piece that does not
    fit them (a tensor of another shape, a missing key, an optimiser of other parameters) is one line."""
    for name, load in parts:
        try:
            load()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise UserError(
                f"--resume: {path}: its {name} does not fit this run ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]})"
            ) from None


def write_csv(path, rows):
    """A list of dicts as a CSV file, replaced whole."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


class StopSignal:
    """Ctrl-C, SIGTERM and SIGHUP (stop_signals) ask the run to stop: the current step finishes, the
    run saves, and exits 128 + signum. Under DDP the processes agree every 20 steps and at the end of an epoch
    (an all-reduce), so that they stop at the same step."""

    def __init__(self, distributed=False, device=None):
        self.signum, self.distributed, self.device = None, distributed, device
        for signum in stop_signals():
            signal.signal(signum, self.catch)

    def catch(self, signum, _frame):
        self.signum = signum

    def requested(self, step, steps_per_epoch):
        if not self.distributed:
            return self.signum is not None
        if step % 20 and step != steps_per_epoch:
            return False
        flag = torch.tensor(float(self.signum is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = self.signum or (signal.SIGTERM if flag.item() else None)
        return self.signum is not None


class EpochWriter:
    """One thread that writes an epoch's files while the next epoch trains (torch.save and savefig release the
    GIL for their file I/O, not for all of their work); at most one epoch's writes pending. wait() waits for
    them and raises their error (a full disk's UserError: the previous last.pt kept) in the training loop's
    thread; their seconds are left in `seconds` (None before any). join() only waits, and ends the thread, for
    a run that ends, with an error of its own or none. A kill -9 during a write leaves the last.pt written
    before, whole (write_atomic)."""

    def __init__(self):
        self.pool, self.pending, self.seconds = ThreadPoolExecutor(1, "epoch writer"), None, None

    def write(self, work):
        self.wait()
        self.pending = self.pool.submit(timed, work)

    def join(self):
        self.pool.shutdown(wait=True)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            self.seconds = pending.result()  # raises work's error, whatever it was


def timed(work):
    tic = time.perf_counter()
    work()
    return time.perf_counter() - tic


def host_copy(state):
    """A copy of a state dict (nested dicts and lists) whose tensors are copies in CPU memory: a GPU's copy
    into host memory, after which the training changes nothing of what the writer writes."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: host_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(value) for value in state)
    return state


def ignore_signals(_worker_id):
    """DataLoader workers leave Ctrl-C, SIGTERM and SIGHUP to the main process, which finishes its step and
    saves (a terminal sends them to every process of its foreground group, workers included); it kills them
    when it ends (end_workers)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


# How long the processes of a distributed run wait for each other to join before they give up with one line:
# as long as torchrun's own rendezvous (join_timeout, "Defaults to 600 seconds": PyTorch's
# torch/distributed/elastic/rendezvous/dynamic_rendezvous.py, create_handler)
JOIN_TIMEOUT_S = 600


def join_process_group(backend):
    """The process group of the RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT that torchrun (or a scheduler)
    set, each checked first. No process waits longer than JOIN_TIMEOUT_S for the others: one started by hand
    without its process 0, or a process 0 whose others never came, ends with a line that says what it waited
    for. Process 0's port is tried from Python before PyTorch connects to it, whose retries print a C++ stack
    each; once joined, the store keeps PyTorch's usual timeout (process 0 may build the image cache for a long
    time while the others wait)."""
    rank, world = launch_number("RANK"), launch_number("WORLD_SIZE")
    address, port = launch_variable("MASTER_ADDR"), launch_number("MASTER_PORT")
    if not 0 <= rank < world or not 0 < port < 65536:
        raise UserError(
            f"RANK={rank}, WORLD_SIZE={world}, MASTER_PORT={port}: expected 0 <= RANK < WORLD_SIZE and a "
            "port from 1 to 65535"
        )
    waited_for = f"process 0 of WORLD_SIZE={world} at MASTER_ADDR:MASTER_PORT = {address}:{port}"
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while rank > 0:
        try:
            socket.create_connection((address, port), timeout=5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"RANK={rank}: no {waited_for} within {JOIN_TIMEOUT_S} s; start every process of the "
                    "run (torchrun does), or correct MASTER_ADDR and MASTER_PORT"
                ) from None
            time.sleep(1)
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=JOIN_TIMEOUT_S)))
    except dist.DistNetworkError as e:  # process 0 cannot listen on the port: another program has it
        raise UserError(
            f"RANK={rank}: cannot serve the run at MASTER_ADDR:MASTER_PORT = {address}:{port} "
            f"({' '.join(str(e).split())[:100]}); choose a free MASTER_PORT (torchrun --master-port)"
        ) from None
    except dist.DistError:  # DistStoreError: the others did not come in time
        raise UserError(
            f"RANK={rank}: the {world} processes did not all join {waited_for} within {JOIN_TIMEOUT_S} s; "
            "start every process of the run (torchrun does)"
        ) from None
    store.set_timeout(dist.constants.default_pg_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def launch_variable(name):
    value = os.environ.get(name)
    if not value:
        raise UserError(
            f"RANK and WORLD_SIZE are set (one process of a distributed run), but {name} is not: start the "
            "processes with torchrun, or set MASTER_ADDR and MASTER_PORT too"
        )
    return value


def launch_number(name, default=None):
    text = launch_variable(name) if default is None else os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: expected a whole number (torchrun sets it)") from None


def on_process_0(rank, work):
    """work() on process 0; a UserError of its is every process's, each ending with its one line. Under
    torchrun the others wait meanwhile (the broadcast is their barrier): left waiting on a process 0 that had
    gone, they would die of the process group's error. Returns work()'s result on process 0, None on the
    others."""
    result, error = None, [None]
    if rank == 0:
        try:
            result = work()
        except UserError as e:
            error = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise UserError(error[0])
    return result


def read_rgb(path, size):
    """An image file as a (size, size, 3) uint8 array: every mode becomes RGB, 16-bit and float images are
    stretched from their own min..max, and the image is resized to a square, as the paper resized HAM10000
    (§3)."""
    require_regular_file(path, OSError)  # a FIFO named .jpg would block the decoding for ever
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at the smallest scale that is still >= size
        # the EXIF orientation of a photo taken with the camera turned (phones, dermatoscopes on phones): the
        # pixels as the photo is shown, as PIL's own exif_transpose turns them
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(img, dtype=np.float64)
            if not np.isfinite(a).all():  # a float image: NaN or inf would make the stretch meaningless
                raise ValueError(f"{int((~np.isfinite(a)).sum())} pixel value(s) are NaN or infinite")
            img = Image.fromarray(
                np.round((a - a.min()) / max(a.max() - a.min(), 1e-12) * 255).astype(np.uint8)
            )
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def decode_all(paths, size, cache_dir, skip_bad):
    """All `paths` decoded at `size` into a memory-mapped .npy, built once and reused while no file changes.
    Returns (images, {position: reason} of unreadable files). Unreadable files are an error unless
    skip_bad."""
    stamp = "\n".join(map(file_stamp, paths))
    # surrogateescape: a file name's bytes that are not UTF-8 (os.fsdecode keeps them as lone surrogates)
    key = hashlib.sha256(f"{size}\n{stamp}".encode("utf-8", "surrogateescape")).hexdigest()[:20]
    cache, index = cache_dir / "images" / f"{size}px-{key}.npy", cache_dir / "images" / f"{size}px-{key}.json"
    shape = (len(paths), size, size, 3)
    entry = cached(cache, index, shape)
    if entry is None:  # absent, or damaged since it was written
        check_free_space(cache_dir, cache, shape)
        broken, digest = {}, {}

        def decode_into(tmp):
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            preallocate(tmp)

            def decode(j):
                try:
                    images[j] = read_rgb(paths[j], size)
                except Exception as e:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError
                    return j, f"{type(e).__name__}: {e}"

            pool = ThreadPoolExecutor(os.cpu_count())  # PIL decodes with the GIL released
            try:
                broken.update(b for b in pool.map(decode, range(len(paths))) if b)
            finally:  # stopped (Stopped, a signal): the images not yet begun are not decoded
                pool.shutdown(cancel_futures=True)
            images.flush()
            digest["sha256"] = hashlib.sha256(images).hexdigest()

        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, decode_into)
            record = json.dumps({"size": size, "count": len(paths), "bad": broken, **digest}, indent=1)
            write_atomic(index, lambda tmp: tmp.write_text(record))  # last: the array is complete
        except OSError as e:
            raise DataError(f"--cache-dir {cache_dir}: cannot write the decoded images there ({e})") from None
        entry = cached(cache, index, shape)
    images, broken = entry
    if broken and not skip_bad:
        j, reason = next(iter(broken.items()))
        raise DataError(
            f"{paths[j]}: unreadable image ({reason}); {len(broken)} such file(s), "
            "--skip-bad-images skips them"
        )
    return images, broken


def check_free_space(cache_dir, cache, shape):
    """The cache's size against the free space of --cache-dir, before anything is written: filling the disk
    would fail, and take the space that every other writer (the error line itself, on a full disk) needs."""
    folder = next((p for p in (cache.parent, *cache.parents) if p.exists()), None)
    need = int(np.prod(shape, dtype=np.int64))
    try:
        free = shutil.disk_usage(folder).free if folder is not None else need
    except OSError:
        return  # not measurable here: the write itself will say what fails
    if need > free:
        raise DataError(
            f"--cache-dir {cache_dir}: the decoded images need {need} bytes ({need / 1e9:.1f} GB: "
            f"{shape[0]} images at {shape[1]} px) for {cache.name}, and only {free} bytes are free there "
            f"({free / 1e9:.1f} GB); choose a smaller --image-size or another --cache-dir"
        )


def file_stamp(path):
    """What changes when an image file does: its real path, size and modification time. A file that cannot be
    stat'ed (a broken symbolic link) is stamped as such; decoding it then fails, and says why."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path} unreadable"
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"


def preallocate(path):
    """Reserve the blocks of a memory-mapped file before writing into it. A page of a sparse mapping that the
    full disk cannot back kills the process with SIGBUS; reserved first, the full disk is an OSError (ENOSPC)
    here."""
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def cached(cache, index, shape):
    """(images, {position: reason}) of a complete cache entry, or None where it is absent or damaged (a .npy
    truncated, overwritten or replaced after it was written, an unreadable index): such an entry is built
    again, never read. The SHA-256 of the pixels, recorded when the entry was written, is checked once here
    (measured: 0.26 - 0.6 s for 450 MB on a 2-core machine)."""
    try:
        for path in (index, cache):  # a FIFO planted there: rebuilt over, not waited on
            require_regular_file(path, OSError)
        record = json.loads(index.read_text())
        broken = {int(j): reason for j, reason in record["bad"].items()}
        images = np.load(cache, mmap_mode="r")  # numpy refuses a file shorter than its header says
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if images.shape != shape or images.dtype != np.uint8:
        return None
    return (images, broken) if hashlib.sha256(images).hexdigest() == record.get("sha256") else None


def check_finite(tensors, where):
    """Weights (a dict of name: tensor or array) with a NaN or an infinity make every output NaN: refused,
    naming the first such tensor."""
    for name, tensor in tensors.items():
        tensor = torch.as_tensor(tensor)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(f"{where}: {name} holds {bad} value(s) that are NaN or infinite")


class Method(nn.Module):
    """What pretrain.py's loop asks of a self-supervised method (pretrain.SimSiam, ssl_methods.METHODS), an
    nn.Module around a backbone, so that the loop knows none of them by name; the defaults are here.

        view_names            the augmentation of each view, by name (SimSiam's, or ssl_methods.VIEWS)
        defaults              the method's lr, weight decay and own flags (pretrain.METHOD_FLAGS)
        forward(views)        -> (loss, z), z the output whose spread is the collapse signal
        out_dim               the width of z
        param_groups()        the optimiser's groups; a group with fixed_lr keeps the peak lr (SimSiam)
        start_epoch(epoch)    before an epoch's first step
        before_step(epoch)    after the backward, before the optimiser steps
        after_step(progress)  after the optimiser steps; progress: the fraction of the schedule done
    """

    optimizer = "sgd"  # SGD with --momentum; "lars" for a method whose recipe is LARS's (SwAV)
    sync_batch_norm = True  # BN statistics over the global batch on GPUs, as main_simsiam.py's SyncBN

    def param_groups(self):
        return [{"params": [p for p in self.parameters() if p.requires_grad], "fixed_lr": False}]

    def start_epoch(self, epoch):
        pass

    def before_step(self, epoch):
        pass

    def after_step(self, progress):
        pass
