"""The plumbing every file shares: errors a user can fix (one line, a non-zero exit), atomic writes that say
when the disk is full, the flag types that refuse what every range check lets through, the input scaling and
mixed precision.
"""

import argparse
import errno
import math
import os
import sys
import tempfile
from pathlib import Path

import torch


class UserError(ValueError):
    """Something the user gave (a flag, a file, a key in it) that cannot be used; the message names it."""


def run(main):
    """A script's entry point: a UserError, or a loss that stopped being finite, ends it with one line."""
    try:
        sys.exit(main())
    except (UserError, FloatingPointError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")


def write_atomic(path, write):
    """Create or replace `path` whole or not at all: `write(tmp)` fills a temporary file beside it, which is
    renamed onto `path` once complete. A crash or a full disk leaves whatever was at `path` as it was; a full
    disk is a UserError that names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
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


def to_json(args):
    """The arguments as JSON values (paths as strings): args.json, results.json, checkpoints."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


# --------------------------------------------------------------------------------------- inputs and precision


def to_input(images, device):
    """uint8 images -> float in [-1, 1] on `device`. BiT was trained on [-1, 1] inputs; every init uses the
    same scaling, so that one checkpoint means one thing in every script. Scaling on the device moves 4x fewer
    bytes."""
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.float() / 127.5 - 1.0


def amp_dtype(device):
    """Mixed precision: bf16 on GPUs that compute in it (Ampere and newer), fp16 with a GradScaler on older
    ones (V100, T4: they report bf16 "supported" through a slow emulation, hence including_emulation=False),
    float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device):
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype, enabled=dtype != torch.float32)


# ------------------------------------------------------------------------------------------- frozen backbones


# ----------------------------------------------------------------------------------------------- measurements


class DataError(UserError):
    """Data that cannot be used as asked; the message names the file, id or flag."""


class WeightsError(UserError):
    """A weights file that cannot go into the model asked for; the message names the file and the key."""
