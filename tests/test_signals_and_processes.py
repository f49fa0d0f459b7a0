"""The third audit (issue 26), its runs, signals and processes: a stop at any step, a crash with loader
workers, the --out lock and the links planted there, the temporary files of killed processes, --force into a
finished run, an empty --out, FIFOs as inputs, torchrun's processes that never meet, a closed stdout, a signal
at any moment, and a second torchrun job into a live run. Each test names its row of CATALOGUE.md ("Third
audit"). Then issue 24's background writer: the next epoch trains while an epoch's files are written, a kill
-9 during the write, a write that fails."""

import errno
import importlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from argparse import Namespace
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image

import bit_common
import bit_convert
import datasets
import eval_common
import pretrain
from helpers import (
    REPO,
    TIMING,
    TinyBackbone,
    patched,
    run_patched,
    run_pretraining_over_gloo,
    tiny_args,
    without_timing,
)

STEPS = 3  # an epoch of small_args: 90 pretrain images in batches of 30
TAG = "RUN_SAFETY_TAG"  # in the environment of a test's processes, and so of every process they start


def small_args(tmp, epochs=2, out="run", split_file=None):
    """tiny_args with a smaller pretrain part (5 % of digits, 90 images): three steps an epoch; the split
    file `split_file` where given (that of an earlier run)."""
    args = tiny_args(tmp, epochs, out) + ["--save-at", "1"]
    args[args.index("--split") + 1] = "0.05,0.05,0.05,0.85"
    if split_file:
        args[args.index("--split-file") + 1] = str(split_file)
    return args


def tagged(tag):
    """The pids of the live processes whose environment holds TAG=tag: a test's processes and all that they
    started, wherever they went (torchrun starts its workers in sessions of their own; an orphan changes
    parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not a process
            continue
        if f"{TAG}={tag}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def tag():
    """A tag for the environment of the test's processes (TAG); those still alive at its end are killed, so
    that a test that fails, or times out, leaves no process behind (a timeout kills torchrun, not its
    processes)."""
    tag = uuid.uuid4().hex
    yield tag
    for pid in tagged(tag):
        os.kill(pid, signal.SIGKILL)


def backbone_tensors(path):
    return torch.load(path, weights_only=True)["state_dict"]


def same_run(expected, got):
    """Two run folders hold the same run: every backbone bit-identical, the metrics equal but for the timing,
    which is present, finite and positive."""
    for name in ("backbone.pt", "backbone_ep1.pt"):
        a, b = backbone_tensors(expected / name), backbone_tensors(got / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [pretrain_rows(expected), pretrain_rows(got)]
    assert [[{k: v for k, v in r.items() if k not in TIMING} for r in rs] for rs in rows][0] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in rows[1]
    ]
    for row in rows[1][1:]:  # write_s: empty in a process's first epoch (pretrain.finish_epoch)
        assert all(float(row[k]) >= 0 for k in TIMING if row[k] != "") and float(row["epoch_s"]) > 0


def pretrain_rows(out):
    import csv

    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two epochs of three steps, uninterrupted, in-process (one thread, as the scripts in run_script): what
    every interrupted run must end as."""
    tmp = tmp_path_factory.mktemp("reference")
    assert pretrain.main(small_args(tmp)) == 0
    return tmp / "run"


# ------------------------------------------------------------------------ row 1: a stop at any step resumes


def signal_during(step, signum, add=pretrain.RunState.add):
    """pretrain.RunState.add that also sends `signum` to this process at the run's step `step` (counted from
    its start), as a scheduler's SIGTERM that arrives while the step computes."""

    def add_and_signal(state, loss, z_std):
        add(state, loss, z_std)
        if (state.epoch - 1) * STEPS + state.step == step:
            os.kill(os.getpid(), signum)

    return add_and_signal


@pytest.mark.script
def test_a_stop_at_every_step_resumes_to_the_uninterrupted_run(reference, tmp_path, monkeypatch, capsys):
    """Row 1: a signal during each of the six steps in turn (SIGTERM, and Ctrl-C and SIGHUP too), each time
    --resume; the stops at an epoch's last step (steps 3 and 6) could never be resumed (ZeroDivisionError in
    end_epoch). The run ends bit-identical to the one never interrupted, with the timing of every epoch."""
    args = small_args(tmp_path, split_file=reference / "split.json")
    resume = ["--out", str(tmp_path / "run"), "--resume"]
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTERM, signal.SIGTERM]
    for step, signum in enumerate(signals, 1):
        monkeypatch.setattr(pretrain.RunState, "add", signal_during(step, signum))
        assert pretrain.main(args if step == 1 else resume) == 128 + signum
        epoch, at = divmod(step - 1, STEPS)
        assert f"stopped by signal in epoch {epoch + 1}, step {at + 1}; saved" in capsys.readouterr().out
    monkeypatch.undo()
    assert pretrain.main(resume) == 0
    same_run(reference, tmp_path / "run")


SIGNAL_AT = """
import os, signal
add = pretrain.RunState.add
def add_and_signal(state, loss, z_std):
    add(state, loss, z_std)
    if os.environ["RANK"] == "{rank}" and (state.epoch - 1) * 3 + state.step == {step}:
        os.kill(os.getpid(), signal.SIGTERM)
pretrain.RunState.add = add_and_signal
"""


@pytest.mark.script
def test_a_stop_over_two_gloo_processes_resumes_from_an_epochs_last_step(tmp_path, tag):
    """Row 1 under torchrun, two processes with a loader worker each: they agree to stop at an epoch's last
    step (the all-reduce of bit_common.StopSignal), where a 2-process job could never be resumed. A SIGTERM to
    process 1 alone during step 2 stops both at step 3, the last of the run; --resume ends it."""
    args = small_args(tmp_path, epochs=1) + ["--workers", "1"]
    signal_at = SIGNAL_AT.format(rank=1, step=2)
    stopped = run_pretraining_over_gloo(args, signal_at, check=False, env={TAG: tag}, timeout=600)
    assert stopped.returncode != 0 and "stopped by signal in epoch 1, step 3; saved" in stopped.stdout
    resume = ["--out", tmp_path / "run", "--resume", "--workers", "1"]
    resumed = run_pretraining_over_gloo(resume, env={TAG: tag}, timeout=600)
    assert "resumed" in resumed.stdout and "epoch 1:" in resumed.stdout
    assert [row["epoch"] for row in pretrain_rows(tmp_path / "run")] == ["0", "1"]
    assert torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------- row 2: a crash with loader workers ends


FAIL_IN_WORKERS = """
import os, torch, datasets
get = datasets.ImageSet.__getitem__
def fail_in_a_worker(self, key):
    if torch.utils.data.get_worker_info() is not None and os.environ.get("RANK", "1") == "1":
        raise RuntimeError("an image could not be made (injected by the test)")
    return get(self, key)
datasets.ImageSet.__getitem__ = fail_in_a_worker
"""


def evaluation_args(tmp, out):
    """The flags of an evaluation script on digits at 8 px, whose scored parts are small (90, 90, 180)."""
    return [
        *("--data", "digits", "--image-size", "8", "--split", "0.8,0.05,0.05,0.1", "--device", "cpu"),
        *("--split-file", tmp / "split.json", "--cache-dir", tmp / "cache", "--out", tmp / out),
    ]


CRASH_IN_TRAINING = """
def crash(*args, **kwargs):
    raise RuntimeError("a training step failed (injected by the test)")
finetune.train_step = crash
"""
# every script that starts DataLoader workers (the training loader, datasets.eval_images): a crash while
# they live, and the flags to one that has workers
CRASHING = {
    "pretrain.py": (FAIL_IN_WORKERS, lambda tmp: small_args(tmp)),
    "finetune.py": (CRASH_IN_TRAINING, lambda tmp: evaluation_args(tmp, "ft") + ["--init", "scratch"]),
    "linear_eval.py": (FAIL_IN_WORKERS, lambda tmp: evaluation_args(tmp, "linear") + ["--init", "scratch"]),
    "tsne.py": (FAIL_IN_WORKERS, lambda tmp: evaluation_args(tmp, "figures") + ["--init", "scratch"]),
}


@pytest.mark.script
@pytest.mark.parametrize("script", CRASHING)
def test_a_crash_with_loader_workers_ends_at_once_and_leaves_no_process(tmp_path, tag, script):
    """Row 2: an exception while DataLoader workers live printed its traceback, then waited for ever on the
    workers, which ignore SIGTERM: pretrain.py (an image that fails in a worker of the persistent training
    loader), finetune.py (a training step that fails). It now exits 1 within seconds, and no process of the
    run is left. linear_eval.py and tsne.py, whose workers only make the evaluation view, did not wait before
    either (an image failing in a worker, or Ctrl-C meanwhile, tried on the code before): kept so."""
    patch, args = CRASHING[script]
    run = run_patched(script, patch, *args(tmp_path), "--workers", "2", env={TAG: tag}, timeout=600)
    assert run.returncode == 1 and "injected by the test" in run.stderr, run.stderr[-2000:]
    assert not tagged(tag)


@pytest.mark.script
def test_a_crash_of_one_torchrun_process_ends_them_all(tmp_path, tag):
    """Row 2 under torchrun: process 1's loader worker fails; process 1 ends, process 0 loses it in the next
    all-reduce and ends too, and torchrun with them: no process lingers (they lived 33 minutes)."""
    args = small_args(tmp_path) + ["--workers", "1"]
    run = run_pretraining_over_gloo(args, FAIL_IN_WORKERS, check=False, env={TAG: tag}, timeout=600)
    assert run.returncode != 0 and "injected by the test" in run.stderr
    deadline = time.monotonic() + 10  # torchrun's own exit follows its workers'
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged(tag)


# --------------------------------------------------------------- row 4: the lock is the main process's alone


@pytest.mark.script
def test_resume_right_after_kill_9_of_a_run_with_workers_is_accepted(tmp_path, tag):
    """Row 4: the lock was an flock, which the forked loader workers shared; after kill -9 of the run they
    held it until they noticed (3 - 5 s), and --resume was refused ("in use by process N"). A POSIX record
    lock is the main process's alone: taken at once, while the orphaned workers still live."""
    process = subprocess.Popen(
        [sys.executable, "pretrain.py", *small_args(tmp_path), "--workers", "2"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1", TAG: tag},
    )
    deadline = time.monotonic() + 600
    while len(tagged(tag)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tagged(tag)) == 3, "the run and its two workers never were"
    process.kill()
    process.wait()
    lock = bit_common.lock_output(Namespace(out=tmp_path / "run", resume=True, force=False))
    assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()}\n"
    lock.close()


# ------------------------------------------------------------ row 5: the temporary files of dead processes


@pytest.mark.script
def test_the_temporary_files_of_dead_processes_are_removed_and_no_others(tmp_path):
    """Row 5: kill -9 during an atomic write left its .NAME.PID.tmp (a last.pt's: the checkpoint's size) for
    good. The next atomic write into that folder removes those of processes of this machine that no longer
    exist; a live process's, another machine's, and files of other names stay."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = socket.gethostname()
    stale = [tmp_path / f".last.pt.{host}.{dead.pid}.tmp", tmp_path / f".backbone.pt.{host}.{dead.pid}.tmp"]
    kept = [
        tmp_path / f".last.pt.{host}.{os.getppid()}.tmp",  # a live process's
        tmp_path / f".last.pt.other-machine.{dead.pid}.tmp",
        tmp_path / f"notes.{dead.pid}.tmp",
    ]
    for path in stale + kept:
        path.write_bytes(b"\0" * 1000)
    bit_common.write_atomic(tmp_path / "metrics.csv", lambda tmp: tmp.write_text("epoch\n"))
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert (tmp_path / "metrics.csv").read_text() == "epoch\n"


# ----------------------------------------------------------- row 6: no write through a link planted in --out


def test_a_lock_that_is_a_symbolic_link_or_not_a_file_is_refused_and_nothing_written(tmp_path):
    """Row 6: open(.lock, "a+") followed a link, and truncate(0) overwrote its target with the pid, even
    when the run was then refused. The lock is opened with O_NOFOLLOW and must be a regular file; a FIFO
    there does not block."""
    target = tmp_path / "precious.txt"
    target.write_text("the user's file")
    kinds = {"link": lambda p: p.symlink_to(target), "fifo": os.mkfifo, "directory": Path.mkdir}
    for kind, make in kinds.items():
        out = tmp_path / kind
        out.mkdir()
        make(out / ".lock")
        with pytest.raises(bit_common.UserError, match=f"--out {out}: {out / '.lock'} is"):
            bit_common.lock_output(Namespace(out=out, resume=False, force=False))
    assert target.read_text() == "the user's file"


def test_an_atomic_write_replaces_a_planted_link_and_never_writes_through_it(tmp_path):
    """Row 6, every other write into --out or --cache-dir goes through write_atomic: a link at the name
    itself is replaced by the rename, not followed; a link planted at the name of its temporary file is
    removed before the write."""
    target = tmp_path / "precious.txt"
    target.write_text("the user's file")
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").symlink_to(target)
    (out / f".metrics.csv.{socket.gethostname()}.{os.getpid()}.tmp").symlink_to(target)
    bit_common.write_args(Namespace(out=out, data="digits"))
    bit_common.write_atomic(out / "metrics.csv", lambda tmp: tmp.write_text("epoch\n"))
    assert target.read_text() == "the user's file"
    assert not (out / "args.json").is_symlink() and json.loads((out / "args.json").read_text())["data"]
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "metrics.csv"]


# ----------------------------------------------------- row 7: --force replaces a run whole, or not at all


@pytest.mark.script
def test_force_keeps_the_replaced_run_aside_until_the_new_one_saves(reference, tmp_path, monkeypatch):
    """Row 7: --force into a finished run, which stops before its first last.pt: the folder held the new
    args.json beside the old last.pt and backbone_ep1.pt, which neither --resume nor linear_eval could use.
    The old run is now moved whole into DIR/.replaced/ once the new run's checks pass, and deleted when the
    new run writes its first last.pt; until then DIR holds only the new run, which --resume starts over."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}

    def crash(state, loss, z_std):
        raise RuntimeError("stopped before its first last.pt")

    monkeypatch.setattr(pretrain.RunState, "add", crash)
    args = small_args(tmp_path, epochs=1, split_file=reference / "split.json") + ["--force", "--seed", "1"]
    with pytest.raises(RuntimeError, match="before its first last.pt"):
        pretrain.main(args)
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".replaced", "args.json", "split.json"]
    assert {p.name: p.read_bytes() for p in (out / ".replaced").iterdir()} == old
    with pytest.raises(bit_common.UserError, match="backbone.pt: no such file"):
        bit_convert.read_backbone_file(out / "backbone.pt")
    monkeypatch.undo()
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    assert not (out / ".replaced").exists() and json.loads((out / "args.json").read_text())["seed"] == 1
    new = backbone_tensors(out / "backbone_ep1.pt")  # the new run's epoch 1, its last
    assert (out / "backbone_ep1.pt").read_bytes() != old["backbone_ep1.pt"]
    assert all(torch.equal(new[k], v) for k, v in backbone_tensors(out / "backbone.pt").items())


def test_setting_a_run_aside_follows_no_link_and_keeps_the_split_in_use(tmp_path):
    """Row 7, next to it: a .replaced planted as a link to the user's folder (rmtree refuses a link, and the
    old run would have been moved into the folder it points to), a --force that reuses the old run's own
    split.json as its --split-file (it stays), and a second --force before the first one's new run saved:
    the run set aside first is kept, the files of the run that never saved are deleted."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("the user's file")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("args.json", "split.json", "last.pt", "metrics.csv", "backbone.pt", "backbone_ep1.pt"):
        (out / name).write_text(f"old {name}")
    (out / bit_common.REPLACED).symlink_to(user)
    bit_common.set_aside_earlier_run(out, pretrain.RUN_FILES, keep=out / "split.json")
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and not (out / bit_common.REPLACED).is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [bit_common.REPLACED, "split.json"]
    (out / "args.json").write_text("new args.json")  # the new run, stopped before its first last.pt
    bit_common.set_aside_earlier_run(out, pretrain.RUN_FILES, keep=out / "split.json")
    assert sorted(p.name for p in out.iterdir()) == [bit_common.REPLACED, "split.json"]
    assert {p.read_text() for p in (out / bit_common.REPLACED).iterdir()} == {
        f"old {name}" for name in ("args.json", "last.pt", "metrics.csv", "backbone.pt", "backbone_ep1.pt")
    }
    bit_common.save_last({"step": 1}, out)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "split.json"]
    assert (user / "notes.txt").read_text() == "the user's file"


# ---------------------------------------------------------------------------------- row 8: an empty path


@pytest.mark.parametrize("script", ["pretrain", "finetune", "linear_eval", "tsne"])
@pytest.mark.parametrize("flag", ["--out", "--cache-dir", "--data-root", "--split-file"])
def test_an_empty_path_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, script, flag):
    """Row 8: `--out ''` (an unset shell variable) meant the current folder, where the whole run went; each
    path flag of each script refuses an empty path, in one line (argparse's, exit 2)."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data", "digits", "--init", "scratch", flag, ""]
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).parse_args(argv)
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and f"argument {flag}: expected a path, not an empty string" in error
    assert error.count("\n") == 1 and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------ row 9: a FIFO is never waited on


@contextmanager
def no_fifo_read_below(root):
    """Asserts that nothing opened a FIFO below `root` for reading meanwhile: a watcher opens each FIFO that
    it finds for writing without blocking, which succeeds only while a reader has it open, and closes it at
    once, so that such a reader is not left waiting for ever (it reads an end of file)."""
    readers, done = [], threading.Event()

    def watch():
        while not done.is_set():
            for path in root.rglob("*"):
                try:
                    if stat.S_ISFIFO(os.lstat(path).st_mode):
                        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                        readers.append(path)
                except OSError:  # ENXIO: no reader
                    pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    assert not readers, f"opened for reading: {readers}"


def fifo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def script_args(tmp, *extra):
    return ["--data", "digits", "--image-size", "8", "--cache-dir", str(tmp / "cache"), *map(str, extra)]


def script(name):
    return importlib.import_module(name)


FIFO_INPUTS = {  # every kind of file a script reads, given as a FIFO, read as the scripts read it
    "pretrain --init FILE.pt": lambda tmp: pretrain.parse_args(
        script_args(tmp, "--init", fifo(tmp / "i.pt"))
    ),
    "pretrain --init FILE.npz": lambda tmp: bit_convert.load_npz(
        bit_convert.resnet_v2("r50x1", "gn"), fifo(tmp / "BiT-M-R50x1.npz")
    ),
    "tsne --ckpt": lambda tmp: script("tsne").parse_args(
        script_args(tmp, "--ckpt", fifo(tmp / "backbone.pt"), "--out", tmp / "figures")
    ),
    "linear_eval --ckpt": lambda tmp: script("linear_eval").parse_args(
        script_args(tmp, "--ckpt", fifo(tmp / "backbone.pt"), "--out", tmp / "linear")
    ),
    "finetune --combine": lambda tmp: script("finetune").parse_args(
        script_args(tmp, "--combine", fifo(tmp / "a.pt"), fifo(tmp / "b.pt"))
    ),
    "linear_eval --compare": lambda tmp: script("linear_eval").main(
        ["--compare", str(fifo(tmp / "results.json")), "--out", str(tmp / "figures")]
    ),
    "--split-file": lambda tmp: datasets.load_split(datasets.load_digits(), fifo(tmp / "split.json")),
    "HAM10000_metadata.csv": lambda tmp: datasets.load_data(
        "ham10000", fifo(tmp / "ham" / "HAM10000_metadata.csv").parent, 8, tmp / "cache"
    ),
    "DermaMNIST .npz": lambda tmp: datasets.load_data(
        "dermamnist", fifo(tmp / "d" / "dermamnist.npz").parent
    ),
    "CIFAR-10 batch": lambda tmp: datasets.load_cifar10(
        fifo(tmp / "cifar-10-batches-py" / "data_batch_1").parents[1]
    ),
    "--resume: args.json": lambda tmp: pretrain.parse_args(
        ["--out", str(fifo(tmp / "run" / "args.json").parent), "--resume"]
    ),
    "--resume: last.pt": lambda tmp: bit_common.read_checkpoint(
        Namespace(out=fifo(tmp / "run" / "last.pt").parent), set(), ("model",)
    ),
}


@pytest.mark.heavy
@pytest.mark.parametrize("entry", FIFO_INPUTS)
def test_a_fifo_given_as_a_file_is_refused_not_waited_on(tmp_path, entry):
    """Row 9: a FIFO as --init or as tsne.py --ckpt blocked in open() for ever, Ctrl-C and SIGTERM doing
    nothing; so did every other file a script reads. Each is refused before it is opened, in one line naming
    it."""
    with no_fifo_read_below(tmp_path):
        with pytest.raises(bit_common.UserError, match="a FIFO, not a regular file") as refused:
            FIFO_INPUTS[entry](tmp_path)
    assert str(tmp_path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_fifo_among_the_images_is_named_or_skipped_not_waited_on(tmp_path):
    """Row 9: a FIFO named zz_fifo.jpg in an image folder blocked the decoding of the images for ever: it is
    an unreadable image, named, or skipped with --skip-bad-images."""
    for name in ("a", "b"):
        for k in range(3):
            (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / "images" / name / f"{k}.png")
    fifo(tmp_path / "images" / "b" / "zz_fifo.jpg")
    with no_fifo_read_below(tmp_path):
        with pytest.raises(bit_common.DataError, match=r"zz_fifo\.jpg: unreadable image .*a FIFO"):
            datasets.load_data("folder", tmp_path / "images", 8, tmp_path / "cache")
        data = datasets.load_data("folder", tmp_path / "images", 8, tmp_path / "cache", skip_bad=True)
    assert list(data.bad) == ["b/zz_fifo.jpg"] and len(data.ids) == 6


def test_a_fifo_planted_in_a_cache_is_rebuilt_over_not_waited_on(tmp_path):
    """Row 9, next to it: the decoded-image cache and the feature cache read their own files, which a FIFO
    may replace as well as any damage: each is built again, and the FIFO replaced by the new entry."""
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (8, 8), (40 * k, 90, 0)).save(tmp_path / "images" / name / f"{k}.png")
    first = datasets.load_data("folder", tmp_path / "images", 8, tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "images").glob("*.npy")
    entry.unlink()
    os.mkfifo(entry)
    features = tmp_path / "cache" / "features" / "f.pt"
    fifo(features)
    labels = torch.as_tensor(first.labels)
    with no_fifo_read_below(tmp_path):
        again = datasets.load_data("folder", tmp_path / "images", 8, tmp_path / "cache")
        assert eval_common.cached_features(features, labels) is None
    assert (again.images == first.images).all() and entry.is_file()


# ------------------------------------------------------------------ row 10: processes that never meet


def launched(monkeypatch, **variables):
    """The environment of one process of a distributed run, as torchrun (or a scheduler) would set it."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))


def free_port():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


@pytest.mark.script
@pytest.mark.parametrize("rank", [1, 0])
def test_a_process_whose_others_never_come_gives_up_with_one_line(monkeypatch, capfd, rank):
    """Row 10: RANK=1 WORLD_SIZE=2 with MASTER_ADDR/MASTER_PORT but no process 0 waited silently for ever
    (rank 0 without the others, 30 minutes). Each gives up after JOIN_TIMEOUT_S (torchrun's own join timeout,
    2 s here) with one line saying what it waited for, and without PyTorch's C++ retry messages."""
    monkeypatch.setattr(bit_common, "JOIN_TIMEOUT_S", 2)
    port = free_port()
    launched(monkeypatch, RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    args = pretrain.parse_args(["--data", "digits", "--device", "cpu"])
    waited = rf"process 0 of WORLD_SIZE=2 at MASTER_ADDR:MASTER_PORT = 127\.0\.0\.1:{port}"
    expected = (
        rf"RANK=1: no {waited} within 2 s" if rank else rf"RANK=0: the 2 processes did not all join {waited}"
    )
    tic = time.monotonic()
    with pytest.raises(bit_common.UserError, match=expected) as refused:
        pretrain.init_process(args)
    assert time.monotonic() - tic < 15 and "\n" not in str(refused.value)
    assert not torch.distributed.is_initialized() and "c10d" not in capfd.readouterr().err


def test_a_port_that_another_program_holds_is_one_line(monkeypatch):
    """Row 10, next to it: process 0 cannot listen on MASTER_PORT (another program has it): one line that
    says so at once, not a wait said to be for the other processes."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        launched(monkeypatch, RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        args = pretrain.parse_args(["--data", "digits", "--device", "cpu"])
        with pytest.raises(
            bit_common.UserError, match=rf"RANK=0: cannot serve the run at .*:{port} .*free MASTER_PORT"
        ):
            pretrain.init_process(args)


@pytest.mark.script
@pytest.mark.parametrize(
    "variables, message",
    [
        ({"RANK": 0, "WORLD_SIZE": 2}, "RANK and WORLD_SIZE are set .*, but MASTER_ADDR is not"),
        ({"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "localhost"}, "but MASTER_PORT is not"),
        (
            {"RANK": "one", "WORLD_SIZE": 2, "MASTER_ADDR": "h", "MASTER_PORT": 1},
            "RANK='one': expected a whole",
        ),
        (
            {"RANK": 2, "WORLD_SIZE": 2, "MASTER_ADDR": "h", "MASTER_PORT": 1},
            "expected 0 <= RANK < WORLD_SIZE",
        ),
        ({"RANK": 0, "WORLD_SIZE": 1, "MASTER_ADDR": "h", "MASTER_PORT": 70000}, "a port from 1 to 65535"),
    ],
)
def test_a_launch_environment_that_cannot_work_is_one_line(monkeypatch, variables, message):
    """Row 10 (and row 11's RANK=0 WORLD_SIZE=2 without MASTER_ADDR, a traceback of PyTorch's): every
    variable that torchrun sets is checked, each named."""
    launched(monkeypatch, **variables)
    args = pretrain.parse_args(["--data", "digits", "--device", "cpu"])
    with pytest.raises(bit_common.UserError, match=message):
        pretrain.init_process(args)


# ---------------------------------------------------------------------- rows 16 and 17: output and signals


@pytest.mark.script
def test_a_run_whose_stdout_is_closed_trains_to_the_end(tmp_path):
    """Row 16: `pretrain.py ... | head -1` died of BrokenPipeError before training. Output that cannot be
    written is dropped (the Python documentation's /dev/null, "Note on SIGPIPE"): the run trains to the end
    and exits 0."""
    process = subprocess.Popen(
        [sys.executable, "pretrain.py", *small_args(tmp_path, epochs=1)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    process.stdout.readline()
    process.stdout.close()  # as `| head -1` does once it has its line
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]
    assert "BrokenPipeError" not in stderr and "Exception ignored" not in stderr
    assert torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)["epoch"] == 1


SIGNAL_IN = """
import os, signal
{module}.{function} = lambda *args, **kwargs: os.kill(os.getpid(), signal.{name})
"""


@pytest.mark.script
@pytest.mark.parametrize(
    "script, where, name",
    [
        ("pretrain.py", "pretrain.KnnMonitor.initial", "SIGINT"),  # Ctrl-C during the epoch-0 kNN monitor
        ("linear_eval.py", "bit_convert.embed", "SIGTERM"),  # while a part is embedded
        ("tsne.py", "tsne.tsne_2d", "SIGHUP"),  # the terminal closed during t-SNE
    ],
)
def test_a_signal_at_any_moment_is_one_line_and_128_plus_its_number(tmp_path, script, where, name):
    """Row 17: Ctrl-C during the epoch-0 kNN monitor was a KeyboardInterrupt traceback; a signal outside the
    training loop, in any script, now ends it with one line naming the signal, exit 128 + signum, and no
    temporary file left."""
    module, function = where.rsplit(".", 1)
    patch = f"import {module.split('.')[0]}\n" + SIGNAL_IN.format(module=module, function=function, name=name)
    args = small_args(tmp_path) if script == "pretrain.py" else evaluation_args(tmp_path, "out")
    run = run_patched(script, patch, *args, *(["--init", "scratch"] if script != "pretrain.py" else []))
    assert run.returncode == 128 + signal.Signals[name], run.stderr[-2000:]
    assert run.stderr.strip() == f"{script}: stopped by {name}; no file was left half-written"
    assert not list(tmp_path.rglob("*.tmp"))


SLOW_WORKERS = """
import time, torch, datasets
get = datasets.ImageSet.__getitem__
def slowly(self, key):
    if torch.utils.data.get_worker_info() is not None:
        time.sleep(0.1)
    return get(self, key)
datasets.ImageSet.__getitem__ = slowly
"""


@pytest.mark.script
def test_ctrl_c_at_a_terminal_reaches_the_loader_workers_too_and_is_one_line(tmp_path, tag):
    """Row 17, next to it: Ctrl-C at a terminal signals every process of its foreground group, the loader
    workers of datasets.eval_images included, which inherit the script's handler: each would have printed its
    traceback. They leave the signal to the main process, which ends with its one line."""
    module = "linear_eval"
    code = (
        f"import sys\nsys.argv = ['{module}.py', *sys.argv[1:]]\nimport bit_common, {module}\n{SLOW_WORKERS}"
    )
    args = evaluation_args(tmp_path, "linear") + ["--init", "scratch", "--workers", "2"]
    process = subprocess.Popen(
        [sys.executable, "-c", code + f"bit_common.run({module}.main)\n", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        env={**os.environ, "OMP_NUM_THREADS": "1", TAG: tag},
    )
    deadline = time.monotonic() + 600
    while len(tagged(tag)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tagged(tag)) == 3, "the script and its two workers never were"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGINT
    assert stderr.strip() == "linear_eval.py: stopped by SIGINT; no file was left half-written", stderr[
        -3000:
    ]
    assert not tagged(tag)


def test_nohup_keeps_sighup_ignored(monkeypatch):
    """Row 17, next to it: SIGHUP (the terminal closed) stops a run as SIGTERM does, but one started with
    nohup, which ignores it, must keep ignoring it: neither bit_common.run nor a training loop takes it
    over."""
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN if s == signal.SIGHUP else None)
    assert bit_common.stop_signals() == [signal.SIGINT, signal.SIGTERM]
    monkeypatch.undo()
    assert signal.SIGHUP in bit_common.stop_signals()


@pytest.mark.script
def test_a_one_line_error_in_a_run_with_loader_workers_ends_it_at_once(tmp_path, tag):
    """Row 2, next to it: not only a traceback; a one-line error raised while the workers live (here the
    loss that becomes NaN, a FloatingPointError) also waited for ever on them. It exits 1 at once, one line,
    no process left."""
    nan = "loss = pretrain.simsiam_loss\n"
    nan += "pretrain.simsiam_loss = lambda *z: loss(*z) * float('nan')"
    run = run_patched(
        "pretrain.py", nan, *small_args(tmp_path), "--workers", "2", env={TAG: tag}, timeout=600
    )
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0, run.stderr[-2000:]
    assert "the loss became nan in epoch 1" in run.stderr and not tagged(tag)


# --------------------------------------------------------------- row 18: a second job into a live run


@contextmanager
def held(lock_file):
    """DIR/.lock held by another process, as a live run holds it (lockf), its pid written as 4242."""
    hold = "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); f.write('4242\\n')"
    hold += "; f.flush(); print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(lock_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.communicate("")


@pytest.mark.script
@pytest.mark.parametrize("cause", ["a live run's --out", "a split file that is not JSON"])
def test_an_error_of_process_0_ends_every_torchrun_process_with_its_line(tmp_path, tag, cause):
    """Row 18: a second torchrun job into a live run's --out: process 0 printed the lock's line and process 1
    died with a gloo RuntimeError, as it did after any error that process 0 met alone while the others
    waited for it (here: a split file that is not JSON, which process 0 reads first). Every process now
    leaves with process 0's line and a non-zero exit; the live run's folder is untouched."""
    out, split_file = tmp_path / "run", tmp_path / "split.json"
    out.mkdir()
    if cause == "a live run's --out":
        line, holding = f"pretrain.py: error: --out {out} is in use by process 4242", held(out / ".lock")
    else:
        split_file.write_text("{not json")
        line, holding = f"pretrain.py: error: split file {split_file}: not readable JSON", nullcontext()
    with holding:
        run = run_pretraining_over_gloo(small_args(tmp_path), check=False, env={TAG: tag}, timeout=600)
    assert run.returncode != 0
    assert run.stderr.count(line) == 2 and "RuntimeError" not in run.stderr, run.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written: process 0's lock alone


# ------------------------------------------------------ issue 24: the epoch's files written in the background


def backbone_of(model):
    """The backbone's tensors in a last.pt's model."""
    return {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def slow_writes(tmp_path_factory):
    """Three epochs of small_args (TinyBackbone), in-process, each last.pt written a second late (bit_common.
    save_last sleeps first): the run's folder; when the first step of each epoch started and when each
    epoch's last.pt was written; the backbone each last.pt holds, and the backbone's weights as finish_epoch
    found them at each epoch's end (cloned in this thread, before anything was handed to the writer)."""
    tmp = tmp_path_factory.mktemp("slow_writes")
    started, written, saved, truth = {}, {}, {}, {}
    save_last, finish, on_device = bit_common.save_last, pretrain.finish_epoch, pretrain.on_device

    def slow_save_last(last, out):
        time.sleep(1)
        save_last(last, out)
        epoch = last["progress"]["epoch"] - 1
        written[epoch] = time.monotonic()
        saved[epoch] = backbone_of(torch.load(out / "last.pt", weights_only=True)["model"])

    def finish_and_keep(row, args, state, method, *rest):
        truth[row["epoch"]] = {k: v.clone() for k, v in method.backbone.state_dict().items()}
        finish(row, args, state, method, *rest)

    def timed_on_device(view, device):
        started.setdefault(len(truth) + 1, time.monotonic())  # the first view of each epoch
        return on_device(view, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
        patch.setattr(bit_common, "save_last", slow_save_last)
        patch.setattr(pretrain, "finish_epoch", finish_and_keep)
        patch.setattr(pretrain, "on_device", timed_on_device)  # the name the loop calls
        assert pretrain.main(small_args(tmp, epochs=3)) == 0
    return Namespace(out=tmp / "run", started=started, written=written, saved=saved, truth=truth)


@pytest.mark.script
def test_the_next_epoch_trains_while_the_writer_writes_the_epochs_end(slow_writes):
    """Issue 24, item 4: each epoch's last.pt (here a second slow) is written while the next epoch trains,
    and what is written is the state of the epoch's end, copied before the next epoch's steps changed it:
    last.pt and backbone_ep1.pt hold the weights of their epoch's end, which the next epoch changed."""
    run = slow_writes
    for epoch in (1, 2):
        assert run.started[epoch + 1] < run.written[epoch], f"epoch {epoch + 1} waited for the writes"
        assert not same_tensors(run.truth[epoch], run.truth[epoch + 1])  # the next epoch changed them
    for epoch in (1, 2, 3):
        assert same_tensors(run.saved[epoch], run.truth[epoch]), f"epoch {epoch}'s last.pt"
    assert same_tensors(backbone_tensors(run.out / "backbone_ep1.pt"), run.truth[1])
    assert same_tensors(backbone_tensors(run.out / "backbone.pt"), run.truth[3])


KILL_WHILE_WRITING = """
import pathlib, sys, time, torch
sys.path.insert(0, "tests")
from helpers import TinyBackbone
pretrain.build_backbone = lambda *args, **kwargs: TinyBackbone()
marks, save, add = pathlib.Path({marks!r}), torch.save, pretrain.RunState.add
def slow_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "progress" in obj and obj["progress"]["epoch"] == 3:  # epoch 2's last.pt
        f.write(b"the first bytes of a checkpoint")
        f.flush()
        (marks / "writing").touch()
        time.sleep(600)
    return save(obj, f, *args, **kwargs)
def add_and_mark(state, loss, z_std):
    add(state, loss, z_std)
    if state.epoch == 3:
        (marks / "training").touch()
torch.save, pretrain.RunState.add = slow_save, add_and_mark
"""


@pytest.mark.script
def test_kill_9_while_the_writer_writes_last_pt_resumes_to_the_uninterrupted_run(
    slow_writes, tmp_path, tag, monkeypatch
):
    """Issue 24, item 4: kill -9 while the writer is in the middle of epoch 2's last.pt and epoch 3 trains
    meanwhile: epoch 1's last.pt is left whole beside the half-written temporary file, and --resume from it
    ends bit-identical to the run never interrupted."""
    out, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    args = small_args(tmp_path, epochs=3, split_file=slow_writes.out / "split.json")
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(
            [sys.executable, *patched("pretrain.py", KILL_WHILE_WRITING.format(marks=str(marks))), *args],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", TAG: tag},
        )
        deadline = time.monotonic() + 300
        while not all((marks / m).exists() for m in ("writing", "training")) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = process.poll() is None
        process.kill()
        process.wait()
    assert alive and (marks / "training").exists(), (tmp_path / "output.txt").read_text()[-3000:]
    assert len(list(out.glob(".last.pt.*.tmp"))) == 1  # the write under way, cut short
    progress = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["step"]) == (2, 0)  # epoch 1's
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    expected = slow_writes.out
    assert same_tensors(backbone_tensors(out / "backbone.pt"), backbone_tensors(expected / "backbone.pt"))
    assert without_timing(pretrain_rows(out)) == without_timing(pretrain_rows(expected))
    assert not list(out.glob(".*.tmp"))


FULL_DISK = """
import errno, os, sys, threading, torch
sys.path.insert(0, "tests")
from helpers import TinyBackbone
pretrain.build_backbone = lambda *args, **kwargs: TinyBackbone()
save = torch.save
def full(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "progress" in obj and obj["progress"]["epoch"] == 3:  # epoch 2's last.pt
        print(f"last.pt written by the thread {threading.current_thread().name}", flush=True)
        f.write(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save(obj, f, *args, **kwargs)
torch.save = full
"""


@pytest.mark.script
def test_a_full_disk_in_the_writer_is_one_line_and_keeps_the_previous_last_pt(tmp_path):
    """Issue 24, item 4: a write of the background writer that fails (a full disk in epoch 2's last.pt) ends
    the run, in the training loop's thread, with the line of a full disk that names last.pt, exit 1; epoch
    1's last.pt is kept whole, and no temporary file is left."""
    out = tmp_path / "run"
    run = run_patched("pretrain.py", FULL_DISK, *small_args(tmp_path))
    assert "last.pt written by the thread epoch writer" in run.stdout
    assert run.returncode == 1
    full = os.strerror(errno.ENOSPC)
    assert run.stderr.strip() == (
        f"pretrain.py: error: cannot write {out / 'last.pt'}: the disk is full ({full}); nothing was replaced"
    )
    progress = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["step"]) == (2, 0)  # epoch 1's
    assert not list(out.glob(".*.tmp"))
