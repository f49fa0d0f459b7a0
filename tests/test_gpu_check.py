"""benchmarks/gpu_check.py as a dry run on the CPU, so that the check a GPU will run cannot rot before one is
lent: every path runs through, the report holds every figure, and a failed path makes the exit non-zero."""

import json

import pytest

from helpers import run_script

PATHS = [
    *(f"pretrain-{m}" for m in ("simsiam", "simclr", "byol", "mocov2", "swav")),
    "pretrain-simsiam-fp16",
    "pretrain-whiten",
    "pretrain-mocov2-local",
    "torchrun",
    "sigterm-resume",
    "linear-eval",
    "finetune-q4",
    "model-only-channels-last",
    "model-only-contiguous",
]


@pytest.mark.slow
def test_every_path_runs_on_the_cpu_and_is_reported(tmp_path):
    run = run_script(
        "benchmarks/gpu_check.py",
        "--device",
        "cpu",
        "--tiny",
        "--budget-s",
        "1200",
        "--out",
        tmp_path,
        timeout=1300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"device", "torch", "cuda", "precision", "image_size", "batch_size", "seconds", "paths"} <= set(
        report
    )
    assert list(report["paths"]) == PATHS
    assert {p["status"] for p in report["paths"].values()} == {"ok"}
    for name in [n for n in PATHS if n.startswith(("pretrain", "torchrun", "model-only"))]:
        assert report["paths"][name]["img_per_s"] > 0, name
    for name in [n for n in PATHS if n.startswith(("pretrain", "torchrun"))]:
        assert 0 < report["paths"][name]["data_wait"] < 1, name
    assert report["paths"]["sigterm-resume"]["max_abs_difference"] == 0  # the CPU resumes bit for bit
    assert "model-only-contiguous" in run.stdout  # the table


def test_a_failed_path_exits_non_zero_and_is_named(tmp_path):
    """In the default run (the whole dry run is -m slow): the model-only measurement, which must report its
    figures, and linear_eval.py alone, without the pretraining that makes its backbone: it fails, and the
    check names it and exits non-zero."""
    run = run_script(
        "benchmarks/gpu_check.py",
        "--device",
        "cpu",
        "--tiny",
        "--only",
        "model-only-contiguous,linear-eval",
        "--out",
        tmp_path,
    )
    assert run.returncode == 1
    assert "failed: linear-eval" in run.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["paths"]["linear-eval"]["status"] == "failed"
    assert report["paths"]["model-only-contiguous"]["status"] == "ok"
    assert report["paths"]["model-only-contiguous"]["img_per_s"] > 0
