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
    """A script's entry point: a UserError, or a loss that stopped being finite, ends it with one line. What
    it prints may hold file names that are not UTF-8 (os.fsdecode keeps their bytes as lone surrogates):
    printed escaped, as stderr prints them, not a UnicodeEncodeError."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
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


def bounded(kind, least=None, above=None, below=None, most=None):
    """An argparse type: a whole number (kind int) or a finite one (kind float) within the bounds given, least
    <= value, above < value, value < below, value <= most. The same function checks the flag on the command
    line and the value that --resume restores from args.json (runs.restored_args)."""
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
# (seed * 100_003 + e) * 10_000_019 + i (views.SeededSampler), which must stay below 2**64, the limit of
# torch.manual_seed: seeds below 2**24 leave room for 10**11 epochs. Below 2**32, scikit-learn's limit, too.
SEED_LIMIT = 2**24
SEED = bounded(int, least=0, below=SEED_LIMIT)
# --image-size: every image is decoded at SIZE x SIZE into the cache, N * SIZE**2 * 3 bytes (31.5 GB for the
# 10,015 images of HAM10000 at 1024 px). Our cap: twice the largest resolution of BiT's own transfer recipe,
# 512 px resized then 480 cropped (google-research/big_transfer, bit_hyperrule.py get_resolution), and above
# HAM10000's 600x450 originals.
MAX_IMAGE_SIZE = 1024
IMAGE_SIZE = bounded(int, least=1, most=MAX_IMAGE_SIZE)


def check_trial_seeds(seed, trials):
    """--seed and --trials: the trials run with the seeds seed .. seed + trials - 1, each a valid --seed."""
    if seed + trials > SEED_LIMIT:
        raise UserError(
            f"--seed {seed} --trials {trials}: the last trial's seed {seed + trials - 1} is above "
            f"{SEED_LIMIT - 1}, the largest seed"
        )


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
