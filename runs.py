"""The output directory of a long run (pretrain.py, finetune.py): one run at a time, its args.json, a last.pt
that --resume continues exactly, a clean stop on Ctrl-C or SIGTERM, and metrics written whole.

    DIR/.lock       held by the process that writes DIR, released by the OS when it dies (kill -9 included)
    DIR/args.json   the run's arguments; --resume restores them
    DIR/last.pt     everything to resume, written atomically: a crash leaves the previous one
"""

import csv
import fcntl
import json
import os
import signal

import torch
import torch.distributed as dist

from common import UserError, to_json, write_atomic


def claim_output(args):
    """Make --out the run's own (lock_output), then write DIR/args.json. Returns the open lock file: keep a
    reference to it."""
    lock = lock_output(args)
    if not args.resume:  # at once: a run killed while it starts can be resumed
        write_args(args)
    return lock


def lock_output(args):
    """An exclusive lock on DIR/.lock for as long as this process lives, and a refusal to replace another
    run's last.pt without --resume or --force; nothing else of DIR is touched. Returns the open lock file."""
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: a file, not a directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        lock = open(args.out / ".lock", "a+")
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise UserError(
            f"--out {args.out} is in use by process {lock.read().strip() or '?'}: another run is writing "
            "there (--force does not override a live run); wait for it, or choose another --out"
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


def write_args(args):
    """DIR/args.json, what --resume restores. A resumed run writes it once its last.pt has proved good."""
    text = json.dumps(to_json(args), indent=1) + "\n"
    write_atomic(args.out / "args.json", lambda tmp: tmp.write_text(text))


def restored_args(parser, argv, out, not_restored):
    """--resume: (the arguments in DIR/args.json, with the command line's for the keys in `not_restored`, and
    the saved dict itself)."""
    try:
        saved = json.loads((out / "args.json").read_text())
    except FileNotFoundError:
        raise UserError(f"--resume: {out} holds no run to resume (no args.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: {out / 'args.json'} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {out / 'args.json'} is not a dict of arguments")
    for action in parser._actions:  # argparse checks the command line, not defaults: check the saved values
        value = saved.get(action.dest)
        if action.choices and value is not None and value not in action.choices:
            raise UserError(
                f"--resume: {out / 'args.json'}: {action.dest} = {saved[action.dest]!r} is not one of "
                f"{', '.join(map(str, action.choices))}"
            )
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in not_restored})
    args = parser.parse_args(argv)
    args.out = out
    return args, saved


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


def read_checkpoint(args, may_change):
    """DIR/last.pt, checked: it loads (weights_only: a pickle from elsewhere must not run code) and was
    trained with the arguments of DIR/args.json, but for those in `may_change`."""
    path = args.out / "last.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"--resume: {path} is not a readable checkpoint ({type(e).__name__}); it is written atomically, "
            "so it was damaged after the run wrote it"
        ) from None
    current = to_json(args)
    edited = [k for k, v in state["args"].items() if k not in may_change and current.get(k) != v]
    if edited:
        key = edited[0]
        raise UserError(
            f"--resume: {args.out / 'args.json'} says {key} = {current.get(key)!r}, but {path} was trained "
            f"with {state['args'][key]!r} (args.json edited by hand?)"
        )
    return state


def write_csv(path, rows):
    """A list of dicts as a CSV file, replaced whole."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


class StopSignal:
    """Ctrl-C and SIGTERM ask the run to stop: the current step finishes, the run saves, and exits 128 +
    signum. Under DDP the processes agree every 20 steps (an all-reduce), so that they stop at the same
    step."""

    def __init__(self, distributed=False, device=None):
        self.signum, self.distributed, self.device = None, distributed, device
        for signum in (signal.SIGINT, signal.SIGTERM):
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
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
