"""The output directory of a long run (pretrain.py, finetune.py): one run at a time, its args.json, a last.pt
that --resume continues exactly, a clean stop on Ctrl-C or SIGTERM, and metrics written whole.

    DIR/.lock       held by the process that writes DIR, released by the OS when it dies (kill -9 included)
    DIR/args.json   the run's arguments; --resume restores them
    DIR/last.pt     everything to resume, written atomically: a crash leaves the previous one
    DIR/.replaced/  the run that --force replaces, until the new one has written its first last.pt
"""

import argparse
import csv
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import torch
import torch.distributed as dist

from bit_convert import check_finite
from common import UserError, path_arg, require_regular_file, save_atomic, stop_signals, to_json, write_atomic

REPLACED = ".replaced"


def claim_output(args, run_files):
    """Make --out the run's own (lock_output); a new run then sets aside the files (`run_files`, names and
    patterns) of the run it replaces and writes DIR/args.json. Returns the open lock file: keep a reference
    to it."""
    lock = lock_output(args)
    if not args.resume:  # at once: a run killed while it starts can be resumed
        set_aside_earlier_run(args.out, run_files)
        write_args(args)
    return lock


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
    """Ctrl-C, SIGTERM and SIGHUP (common.stop_signals) ask the run to stop: the current step finishes, the
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


def ignore_signals(_worker_id):
    """DataLoader workers leave Ctrl-C, SIGTERM and SIGHUP to the main process, which finishes its step and
    saves (a terminal sends them to every process of its foreground group, workers included); it kills them
    when it ends (common.end_workers)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
