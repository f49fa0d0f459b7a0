"""A run's output directory (bit_common.py, pretrain.py): one run at a time, exact resume after kill -9 at any
moment, a warm-up that fits the run, extending a finished run, and the estimated time."""

import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch

import bit_common
import finetune
import pretrain
from helpers import REPO, read_metrics, run_script, tiny_args, without_timing


def backbone_tensors(out):
    return torch.load(out / "backbone.pt", weights_only=True)["state_dict"]


# ------------------------------------------------------------------------------------------ one run at a time


@pytest.mark.script
def test_a_live_run_keeps_its_directory_and_a_dead_one_does_not(tmp_path):
    """The lock is a POSIX record lock (lockf) on DIR/.lock, held here by another process: a second run, even
    with --force, fails at once naming the holder's pid; once the holder is gone, as when a process dies, the
    stale lock file is no obstacle."""
    out = tmp_path / "run"
    out.mkdir()
    hold = "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); f.write('4242\\n')"
    hold += "; f.flush(); print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    args = Namespace(out=out, resume=False, force=True, data="digits")
    with pytest.raises(bit_common.UserError, match=f"--out {out} is in use by process 4242"):
        finetune.claim_output(args, finetune.RUN_FILES)
    assert not (out / "args.json").exists()
    holder.communicate("")
    lock = finetune.claim_output(args, finetune.RUN_FILES)
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    assert json.loads((out / "args.json").read_text())["data"] == "digits"
    lock.close()


# ---------------------------------------------------------------------------------------------------- kill -9

HORIZON = ["--cosine-epochs", "4"]


def start(args, env):
    return subprocess.Popen(
        [sys.executable, "pretrain.py", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )


def kill_when(process, ready, then=0.0, timeout=240):
    """SIGKILL `process` `then` seconds after ready() holds: no handler runs, nothing is flushed."""
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(then)
    assert process.poll() is None, process.communicate()[0]
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """Two epochs of a cosine whose horizon is four, uninterrupted, in-process (one thread, as the scripts in
    run_script): what a killed run and an extended run must each end as."""
    tmp = tmp_path_factory.mktemp("whole")
    assert pretrain.main(tiny_args(tmp) + HORIZON) == 0
    return tmp / "run"


def continued_args(tmp, whole_run, epochs=2, out="run"):
    """The whole run's flags and split, for a run in `tmp`."""
    args = tiny_args(tmp, epochs, out) + HORIZON
    args[args.index("--split-file") + 1] = str(whole_run / "split.json")
    return args


@pytest.mark.script
def test_kill_9_at_any_moment_then_resume_ends_as_the_uninterrupted_run(tmp_path, whole_run):
    """Killed while it starts (args.json written, nothing trained), right after its first last.pt, and in the
    middle of the second epoch; each time --resume. The last.pt of the kill is the state replayed: the end is
    bit-identical to a run never interrupted, and the stale .lock of the killed processes is no obstacle."""
    env = {"OMP_NUM_THREADS": "1"}
    args = continued_args(tmp_path, whole_run, out="killed")
    out, resume = tmp_path / "killed", ["--out", str(tmp_path / "killed"), "--resume", "--workers", "0"]
    kill_when(start(args, env), lambda: (out / "args.json").exists())
    assert not (out / "last.pt").exists()
    kill_when(start(resume, env), lambda: (out / "last.pt").exists())
    saved, restored = (out / "last.pt").stat().st_mtime_ns, (out / "args.json").stat().st_mtime_ns
    # a resumed run writes args.json once it has loaded last.pt: 2 s later it is inside the second epoch
    kill_when(start(resume, env), lambda: (out / "args.json").stat().st_mtime_ns != restored, then=2)
    assert (out / "last.pt").stat().st_mtime_ns == saved and not (out / "backbone.pt").exists()
    finished = run_script("pretrain.py", *resume, env=env)
    assert finished.returncode == 0, finished.stderr
    assert "resumed" in finished.stdout and "epoch 2:" in finished.stdout
    expected, got = backbone_tensors(whole_run), backbone_tensors(out)
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(whole_run))


# ------------------------------------------------------------------------------------------ schedule and time


@pytest.mark.script
def test_a_warm_up_longer_than_the_run_is_shortened_to_a_tenth_and_said(tmp_path, capsys):
    args = pretrain.parse_args(tiny_args(tmp_path, epochs=5) + ["--warmup-epochs", "10"])
    assert args.warmup_epochs == 0.5
    assert (
        "--warmup-epochs 10 would not end before the cosine's horizon (5 epochs)" in capsys.readouterr().out
    )
    peak, steps = pretrain.peak_lr(args), 6
    lrs = [pretrain.scheduled_lr(step, steps, args) for step in range(5 * steps)]
    assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == 2  # the peak after half an epoch
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    args = pretrain.parse_args(tiny_args(tmp_path, epochs=50) + ["--warmup-epochs", "10"])
    assert args.warmup_epochs == 10  # one that fits is left alone


@pytest.mark.script
def test_a_finished_run_with_an_explicit_horizon_can_be_extended_exactly(tmp_path, whole_run, capsys):
    """--cosine-epochs 4: one epoch, then --resume --epochs 2, ends as a two-epoch run of the same horizon
    (its backbone.pt of epoch 1 kept as backbone_ep1.pt). The horizon itself may not change. Its last.pt holds
    the rows of a version before knn_s, save_s and write_s: they stay empty in metrics.csv, the new row has
    them."""
    pretrain.main(continued_args(tmp_path, whole_run, epochs=1, out="extended"))
    first = backbone_tensors(tmp_path / "extended")
    last = torch.load(tmp_path / "extended" / "last.pt", weights_only=True)
    new = ("knn_s", "save_s", "write_s")
    last["progress"]["history"] = [
        {k: v for k, v in r.items() if k not in new} for r in last["progress"]["history"]
    ]
    torch.save(last, tmp_path / "extended" / "last.pt")
    pretrain.main(["--out", str(tmp_path / "extended"), "--resume", "--epochs", "2"])
    extended = tmp_path / "extended"
    assert json.loads((extended / "args.json").read_text())["epochs"] == 2
    kept = torch.load(extended / "backbone_ep1.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(kept[k], v) for k, v in first.items())
    expected, got = backbone_tensors(whole_run), backbone_tensors(extended)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert without_timing(read_metrics(extended)) == without_timing(read_metrics(whole_run))
    rows = read_metrics(extended)
    assert [rows[1][k] for k in new] == ["", "", ""] and float(rows[2]["save_s"]) >= 0
    assert float(rows[1]["eta_s"]) == pytest.approx(0.0)  # epoch 1 was the last, then
    assert (
        float(rows[2]["eta_s"]) == 0.0 and "at this pace the whole run (1 epochs)" in capsys.readouterr().out
    )
    with pytest.raises(bit_common.UserError, match="--cosine-epochs 5.0 differs from the run"):
        pretrain.parse_args(["--out", str(extended), "--resume", "--epochs", "3", "--cosine-epochs", "5"])
