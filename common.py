"""The plumbing every file shares: errors a user can fix (one line, a non-zero exit), atomic writes that say
when the disk is full, resumable downloads, the flag types that refuse what every range check lets through,
the input scaling and mixed precision.
"""

import argparse
import errno
import fcntl
import functools
import http.client
import math
import multiprocessing
import os
import re
import signal
import socket
import stat
import sys
import tempfile
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm


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
    """The handler of stop_signals outside a training loop (runs.StopSignal's inside): the script ends at
    once, through Stopped. Further signals are ignored, so that none interrupts the clean-up. A process
    forked from the script's (a DataLoader worker, which Ctrl-C at a terminal reaches too) inherits the
    handler, and leaves the signal to the main process, as the training loaders' workers do
    (runs.ignore_signals)."""
    if os.getpid() != main_pid:
        return
    for s in stop_signals():
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def end_workers():
    """Kill the DataLoader worker processes that are still alive. They ignore SIGINT and SIGTERM (runs.
    ignore_signals: the main process decides when a run stops), so multiprocessing's exit handler, which
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


# ------------------------------------------------------------------------------------------------ downloads

# A connection silent for this long counts as broken: the download stops, resumable. Long enough for a slow
# server to answer, short enough that a dead connection does not hang a script.
DOWNLOAD_TIMEOUT_S = 60


def download(url, path, check, by_hand):
    """Fetch `url` into `path` with a progress bar, and keep it only once `check(file)` has passed.

    The bytes go to PATH.part beside it, renamed onto `path` once complete and checked, so `path` never holds
    a partial file. A transfer that stops (a broken connection, fewer bytes than Content-Length, a timeout,
    Ctrl-C, a full disk) keeps PATH.part, and the next call asks for the rest alone (an HTTP Range request);
    a server that ignores Range sends the whole file again, which replaces the part. A file that fails
    `check` (a UserError) is deleted. Processes that fetch the same file at once (torchrun's, on a fresh
    machine) take turns on a lock of PATH.part: the first fetches, the others find the file there. Written
    here rather than torch.hub.download_url_to_file, which deletes its temporary file when the transfer breaks
    (no resume) and keeps a body shorter than Content-Length. `by_hand`: what to do without network, ending
    the errors that the network causes. Returns `path`."""
    part = path.with_name(path.name + ".part")
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # removed if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(part, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that downloads {url} into {part}")
                fcntl.flock(f, fcntl.LOCK_EX)
            if path.exists():  # the process that held the lock fetched it
                return path
            if os.fstat(f.fileno()).st_nlink == 0:  # the holder deleted this part (nothing had arrived)
                return download(url, path, check, by_hand)
            transfer(url, f, part, by_hand)
            try:
                check(part)
            except UserError as e:
                part.unlink()
                raise UserError(
                    f"{url} arrived, but it is not what was asked for: {e}; it was deleted (run the same "
                    f"command again to fetch it anew, or {by_hand})"
                ) from None
            os.replace(part, path)
    except (KeyboardInterrupt, Stopped) as e:
        why = what_stopped(e)
        raise UserError(f"the download of {url} was stopped by {why}; run the same command again") from None
    finally:
        if part.exists() and part.stat().st_size == 0:  # nothing arrived: leave nothing behind
            part.unlink()
        for folder in made:
            if any(folder.iterdir()):
                break
            folder.rmdir()
    return path


def transfer(url, f, part, by_hand):
    """The bytes of `url` appended to the open file `f` (the part file `part`): the rest of them where `f`
    holds the start already and the server answers the Range request (206), all of them otherwise."""
    start = f.seek(0, os.SEEK_END)
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if (
            e.code == 416 and start
        ):  # "range not satisfiable": the part is whole (RFC 9110 §15.5.17) or longer
            if e.headers.get("Content-Range") == f"bytes */{start}":
                return  # complete already: a run stopped between its last byte and its check
            f.truncate(0)
            return transfer(url, f, part, by_hand)
        raise UserError(
            f"cannot download {url}: the server answered {e.code} {e.reason}; {by_hand}"
        ) from None
    except (OSError, http.client.HTTPException) as e:  # URLError (no network, refused), a timeout
        raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); {by_hand}") from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if start and response.status == 206:
            answered = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not answered or int(answered[1]) != start:
                raise UserError(
                    f"{url}: asked for the bytes from {start} on, the server answered Content-Range "
                    f"{response.headers.get('Content-Range')!r}; delete {part} and run the same command again"
                )
            total = int(answered[2]) if answered[2] != "*" else None
        else:
            if start:
                print(f"{url}: the server does not resume (it ignored the Range request); fetching it whole")
                f.truncate(0)
                start = 0
        received, why = start, None
        with tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.stem
        ) as bar:
            try:
                while chunk := response.read1(1 << 20):  # what has arrived, up to 1 MiB
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
            except (KeyboardInterrupt, Stopped) as e:
                why = f"stopped by {what_stopped(e)}"
            except (OSError, http.client.HTTPException) as e:
                if disk_full(e):
                    raise UserError(
                        f"cannot write {part}: the disk is full ({received:,} bytes kept); free some space "
                        "and run the same command again to resume"
                    ) from None
                why = f"{type(e).__name__}: {e}"
        if why is None and total is not None and received < total:
            why = "the connection closed early"
        if why:
            of = f" of {total:,}" if total is not None else ""
            raise UserError(
                f"the download of {url} stopped after {received:,}{of} bytes ({why}); "
                f"{part} is kept: run the same command again to resume"
            )


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


def path_arg(text):
    """argparse type of every path flag: a path, but not an empty one. `--out ""` (a shell variable that was
    never set, `--out "$RUN"`) would mean the current folder, and a whole run written into it."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, not an empty string")
    return Path(text)


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
