"""What several test files share: the scripts as subprocesses, the smallest pretraining run that still
exercises everything, and the data flags as `datasets.load_data` takes them."""

import os
import subprocess
import sys
from pathlib import Path

import datasets

REPO = Path(__file__).resolve().parents[1]


def tiny_args(tmp, epochs=2, out="run"):
    """digits at 8 px, 180 pretrain images in batches of 30 (6 steps an epoch), kNN every epoch, on the
    CPU."""
    return [
        "--data",
        "digits",
        "--image-size",
        "8",
        "--split",
        "0.1,0.05,0.05,0.8",
        "--split-file",
        str(tmp / "split.json"),
        "--cache-dir",
        str(tmp / "cache"),
        "--batch-size",
        "30",
        "--epochs",
        str(epochs),
        "--warmup-epochs",
        "1",
        "--workers",
        "0",
        "--eval-every",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp / out),
    ]


def run_script(script, *args, timeout=300, env=None, **popen):
    """Run a project script in a fresh interpreter; returns the CompletedProcess (text output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def run_pretraining_over_gloo(args):
    """pretrain.py as two processes (torchrun, gloo, one thread each); asserts that it ran through."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run(
        [*command, "pretrain.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def load_data(args):
    """datasets.load_data with the values of a script's data flags (`args` from datasets.add_data_args)."""
    return datasets.load_data(
        args.data, args.data_root, args.image_size, args.cache_dir, args.skip_bad_images, args.download
    )
