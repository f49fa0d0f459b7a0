"""benchmarks/gpu_check.py as a dry run on the CPU, so that the check a GPU will run cannot rot before one is
lent: every path runs through, the report holds every figure, and a failed path makes the exit non-zero."""

import csv
import json

import pytest

from helpers import run_script

pytestmark = pytest.mark.script  # every test here runs the check, which runs the scripts

PATHS = [
    "model-only-channels-last",
    "model-only-contiguous",
    "model-only-compiled",
    "pretrain-simsiam",
    "pretrain-simsiam-device-views",
    "pretrain-simsiam-ham-size",
    "pretrain-simsiam-device-views-ham-size",
    "pretrain-simsiam-compiled",
    "pretrain-simsiam-fp16",
    "torchrun",
    "sigterm-resume",
    "linear-eval",
    "finetune-q4",
    *(f"pretrain-{m}" for m in ("simclr", "byol", "swav", "mocov2-local", "whiten")),
    *(f"pretrain-{m}-device-views" for m in ("simclr", "byol", "swav", "mocov2-local")),
    "model-only-max-autotune",
]
# torch.compile's paths, which the CPU dry run leaves out unless --only names them (minutes of compiling)
COMPILED = ["model-only-compiled", "pretrain-simsiam-compiled", "model-only-max-autotune"]
HEADER = {"device", "torch", "cuda", "precision", "image_size", "batch_size", "budget_s", "cpus", "seconds"}


def gpu_check(out, *flags, timeout=600):
    return run_script(
        "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", out, *flags, timeout=timeout
    )


@pytest.mark.slow
def test_every_path_runs_on_the_cpu_and_is_reported(tmp_path):
    """The whole sequence, as a GPU runs it: 3 to 4 minutes here (each path a real script run of R50x1)."""
    run = gpu_check(tmp_path, "--budget-s", "1200", timeout=1300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert HEADER | {"paths"} <= set(report)
    assert list(report["paths"]) == PATHS
    assert {p["status"] for n, p in report["paths"].items() if n not in COMPILED} == {"ok"}
    assert {report["paths"][n]["status"] for n in COMPILED} == {"skipped-on-cpu"}
    for name in [
        n for n in PATHS if n.startswith(("pretrain", "torchrun", "model-only")) and n not in COMPILED
    ]:
        assert report["paths"][name]["img_per_s"] > 0, name
    for name in [n for n in PATHS if n.startswith(("pretrain", "torchrun")) and n not in COMPILED]:
        assert 0 < report["paths"][name]["data_wait"] < 1, name
        assert report["paths"][name]["protocol_minutes"] > 0, name
    assert report["paths"]["pretrain-simsiam-ham-size"]["stand_in_write_s"] > 0  # written once, for both
    assert "stand_in_write_s" not in report["paths"]["pretrain-simsiam-device-views-ham-size"]
    assert report["paths"]["sigterm-resume"]["max_abs_difference"] == 0  # the CPU resumes bit for bit
    assert "model-only-contiguous" in run.stdout  # the table


def test_the_shared_paths_run_on_the_cpu(tmp_path):
    """In the default run: the paths every other path leans on (a pretraining, linear_eval.py on its
    backbone) and the headline pretraining on the HAM10000-sized stand-in (scaled down to 80 JPEGs of 60x45,
    3 epochs), about 30 s; the rest is -m slow above (each runs code that other tests run too: the model-only
    figures, SIGTERM and --resume, finetune.py, each method, --views-on device)."""
    shared = ["pretrain-simsiam", "pretrain-simsiam-ham-size", "linear-eval"]
    run = gpu_check(tmp_path, "--only", ",".join(shared))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert HEADER <= set(report) and report["device"] == "cpu" and report["precision"] == "float32"
    assert list(report["paths"]) == shared
    assert {p["status"] for p in report["paths"].values()} == {"ok"}
    for name in ("pretrain-simsiam", "pretrain-simsiam-ham-size"):
        figures = report["paths"][name]  # the epochs after the first, apart
        assert figures["steady_img_per_s"] > 0 and 0 <= figures["steady_data_wait"] < 1
        assert figures["img_per_s"] > 0 and 0 < figures["data_wait"] < 1  # the last epoch's, as before
        # the paper's 6,009 images x 400 epochs at the steady state's pace, in minutes
        assert figures["protocol_minutes"] == pytest.approx(6009 * 400 / figures["steady_img_per_s"] / 60)
    assert report["paths"]["pretrain-simsiam-ham-size"]["stand_in_write_s"] > 0
    figures = report["paths"]["pretrain-simsiam"]
    # the epoch's other work in the steady state (the tiny run's second and last epoch, evaluated and saved
    # after the first's writes), from the run's own metrics.csv: seconds, and fractions of the epoch
    with open(tmp_path / "pretrain-simsiam-metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert last["epoch"] == "2"
    epoch_s = float(last["epoch_s"])
    assert figures["steady_epoch_s"] == pytest.approx(epoch_s)
    for key in ("knn", "save", "write"):
        seconds = float(last[f"{key}_s"])
        assert seconds > 0 and figures[f"steady_{key}_s"] == pytest.approx(seconds), key
        assert figures[f"steady_{key}_fraction"] == pytest.approx(seconds / epoch_s), key


def test_a_failed_path_exits_non_zero_and_is_named(tmp_path):
    """linear_eval.py alone, without the pretraining that makes its backbone: it fails, and the check names
    it, keeps its error in the report and exits non-zero."""
    run = gpu_check(tmp_path, "--only", "linear-eval")
    assert run.returncode == 1
    assert "failed: linear-eval" in run.stderr
    failed = json.loads((tmp_path / "gpu_check.json").read_text())["paths"]["linear-eval"]
    assert failed["status"] == "failed" and "backbone.pt" in failed["error"]


def test_a_path_the_budget_cannot_hold_is_skipped_and_reported(tmp_path):
    run = gpu_check(tmp_path, "--only", "pretrain-simsiam", "--budget-s", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["paths"] == {"pretrain-simsiam": {"status": "skipped-for-budget", "seconds": 0.0}}
    assert "skipped-for-budget" in run.stdout


def test_the_cpu_dry_run_skips_the_compiled_paths_with_a_reason(tmp_path):
    """The whole sequence with no time to run any of it: each path is skipped, torch.compile's with the reason
    (on the CPU, inductor's C++ compilation of R50 takes minutes), in the order the check runs them."""
    run = gpu_check(tmp_path, "--budget-s", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    paths = json.loads((tmp_path / "gpu_check.json").read_text())["paths"]
    assert list(paths) == PATHS
    for name, found in paths.items():
        if name in COMPILED:
            assert found["status"] == "skipped-on-cpu" and "--only" in found["reason"]
        else:
            assert found == {"status": "skipped-for-budget", "seconds": 0.0}
    assert "skipped-on-cpu" in run.stdout and "reason: inductor compiles R50" in run.stdout


@pytest.mark.parametrize(
    "flags, code, error",
    [  # argparse's exit 2 for a flag's value, the scripts' exit 1 for a place that cannot take the report
        (["--only", "pretrain-simsiam,pretrain-simsam"], 2, "--only: no path named pretrain-simsam"),
        (["--budget-s", "nan"], 2, "--budget-s: expected a finite number, not 'nan'"),
        (["--out", "{tmp}/file"], 1, "file, not a directory"),
    ],
)
def test_a_bad_flag_is_one_line_and_nothing_runs(tmp_path, flags, code, error):
    (tmp_path / "file").write_text("kept\n")
    run = gpu_check(tmp_path, *[f.format(tmp=tmp_path) for f in flags])
    assert run.returncode == code and error in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "gpu_check.json").exists() and (tmp_path / "file").read_text() == "kept\n"
