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


def run_patched(script, patch, *args, **kwargs):
    """run_script, after `patch` (Python code, run once the script's module is imported as its name, e.g.
    `pretrain`) has changed what it needs: a failure or a signal at one chosen moment, from outside the code
    under test. The script then runs as from its command line, through common.run."""
    module = Path(script).stem
    code = f"import sys\nsys.argv = [{script!r}, *sys.argv[1:]]\nimport common, {module}\n{patch}\n"
    return run_script("-c", code + f"common.run({module}.main)\n", *args, **kwargs)


def run_pretraining_over_gloo(args, patch=None, check=True, env=None, timeout=300):
    """pretrain.py as two processes (torchrun, gloo, one thread each), after `patch` where given (see
    run_patched); asserts that it ran through unless not `check`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if patch is not None:
        code = f"import sys\nsys.argv = ['pretrain.py', *sys.argv[1:]]\nimport common, pretrain\n{patch}\n"
        command += ["--no-python", sys.executable, "-c", code + "common.run(pretrain.main)\n"]
    else:
        command.append("pretrain.py")
    run = subprocess.run(
        [*command, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert run.returncode == 0 or not check, run.stderr[-3000:]
    return run


def load_data(args):
    """datasets.load_data with the values of a script's data flags (`args` from datasets.add_data_args)."""
    return datasets.load_data(
        args.data, args.data_root, args.image_size, args.cache_dir, args.skip_bad_images, args.download
    )
