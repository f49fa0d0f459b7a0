"""What several test files share: the scripts as subprocesses, the smallest pretraining run that still
exercises everything, the data flags as `datasets.load_data` takes them, and a pretrained backbone file."""

import os
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import torch

import datasets
from bit_convert import estimate_bn_statistics, resnet_v2, save_backbone

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
    under test. The script then runs as from its command line, through bit_common.run."""
    module = Path(script).stem
    code = f"import sys\nsys.argv = [{script!r}, *sys.argv[1:]]\nimport bit_common, {module}\n{patch}\n"
    return run_script("-c", code + f"bit_common.run({module}.main)\n", *args, **kwargs)


def run_pretraining_over_gloo(args, patch=None, check=True, env=None, timeout=300):
    """pretrain.py as two processes (torchrun, gloo, one thread each), after `patch` where given (see
    run_patched); asserts that it ran through unless not `check`. A hang (a collective that one process never
    joins) fails the test after `timeout` seconds, its processes stopped."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if patch is not None:
        code = (
            f"import sys\nsys.argv = ['pretrain.py', *sys.argv[1:]]\nimport bit_common, pretrain\n{patch}\n"
        )
        command += ["--no-python", sys.executable, "-c", code + "bit_common.run(pretrain.main)\n"]
    else:
        command.append("pretrain.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    hung = False
    with subprocess.Popen(
        [*command, *map(str, args)], cwd=REPO, stdout=PIPE, stderr=PIPE, text=True, env=env
    ) as torchrun:
        try:
            stdout, stderr = torchrun.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            torchrun.terminate()  # torchrun stops its workers on SIGTERM; a SIGKILL would leave them waiting
            stdout, stderr = torchrun.communicate()
            hung = True
    if hung:
        pytest.fail(
            f"pretrain.py over gloo did not finish in {timeout} s; its output ended with: {stdout[-1500:]}"
        )
    assert torchrun.returncode == 0 or not check, stderr[-3000:]
    return subprocess.CompletedProcess(torchrun.args, torchrun.returncode, stdout, stderr)


def load_data(args):
    """datasets.load_data with the values of a script's data flags (`args` from datasets.add_data_args)."""
    return datasets.load_data(
        args.data, args.data_root, args.image_size, args.cache_dir, args.skip_bad_images, args.download
    )


def write_pretrained_backbone(path, seed=0):
    """A backbone file as a pretraining leaves one (it records its epoch): r50x1/bn with the cifar stem, for
    8 px digits. Its BatchNorm statistics are those of random-noise images: real ones, as a trained network
    has (fresh ones, mean 0 and variance 1, blow eval-mode features up), yet far from any estimate on the
    digits, so that a test sees whether a script kept them."""
    torch.manual_seed(seed)
    backbone = resnet_v2("r50x1", "bn", cifar_stem=True)
    noise = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    estimate_bn_statistics(backbone, noise, torch.device("cpu"))
    save_backbone(backbone, path, epoch=3, init="scratch", data="digits", image_size=8, method="simsiam")
    return path
