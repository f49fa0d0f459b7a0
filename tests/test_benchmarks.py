"""The two benchmarks of the data path run through on the CPU, report what they say they report, and refuse
flags they cannot measure with one line: they are run on a lent GPU, where a crash costs the device time."""

import re

import pytest

from helpers import run_script


@pytest.mark.script
def test_loader_benchmark_reports_the_first_epoch_apart_from_the_steady_state():
    """48 stand-in JPEGs in batches of 8 through pretrain.py's loader with one worker, 3 epochs, a model step
    of 100 images/s after each batch: the first epoch's images per second and waiting fraction, then epochs
    2-3's together, and each. The step bounds the rate (80 ms a batch); what is not the step is waiting."""
    run = run_script(
        "benchmarks/loader.py",
        *("--images", 48, "--batch-size", 8, "--workers", 1, "--epochs", 3, "--size", 16, "--device", "cpu"),
        *("--step-img-per-s", 100, "--skip-decode-each-time"),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (
        "48 images of 600x450 -> two 16-px SimSiam views; workers 1, batch 8 (6 batches an epoch)"
        in run.stdout
    )
    assert "after each batch: a model step of 100 images/s" in run.stdout
    assert re.search(r"epoch 1 +epochs 2-3\n", run.stdout)
    found = re.search(
        r"decode-once cache +([\d.]+) +(\d+)% +([\d.]+) +(\d+)% +\(each: (\d+), (\d+)\)\n", run.stdout
    )
    assert found, run.stdout
    first, first_wait, steady, steady_wait, *each = map(float, found.groups())
    assert 0 < first <= 100 and 0 < steady <= 100 and all(0 < e <= 101 for e in each)
    # the step takes rate / 100 of the time, so the waiting is the rest but for the loop's own overhead, under
    # any load (how long the worker takes to start or keep up depends on the machine)
    for rate, wait in ((first, first_wait), (steady, steady_wait)):
        assert 100 - rate - 10 <= wait <= 100 - rate + 1
    assert "JPEG decoded every time" not in run.stdout


@pytest.mark.script
def test_loader_benchmark_refuses_fewer_than_4_batches_a_worker():
    """2 batches of 32 in the one epoch after the first cannot give 2 workers 4 batches each: one line naming
    the flags to change, before any image is made."""
    run = run_script(
        "benchmarks/loader.py", *("--images", 64, "--batch-size", 32, "--workers", 2, "--epochs", 2)
    )
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("loader.py: error: ")
    assert "fewer than 4 batches each" in run.stderr and "--workers" in run.stderr


@pytest.mark.script
def test_device_views_benchmark_times_each_set_of_views():
    """Two sets of views (SimSiam's, the located ones of the local loss) on 4 images of 40 px on the CPU: a
    row each with the parameters', the rendering's and both figures."""
    run = run_script(
        "benchmarks/device_views.py",
        *("--device", "cpu", "--batch-size", 4, "--size", 40, "--batches", 1, "--threads", 1),
        *("--views", "simsiam,simsiam", "located,located"),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "4 images of 40 px on cpu (CPU threads: 1)" in run.stdout
    for names in ("simsiam,simsiam", "located,located"):
        assert re.search(rf"{names} +(\s+[\d.]+ images/s +[\d.]+ ms){{3}}\n", run.stdout), run.stdout


@pytest.mark.script
def test_device_views_benchmark_names_an_unknown_view():
    run = run_script("benchmarks/device_views.py", "--device", "cpu", "--views", "simsiam,simsam")
    assert run.returncode == 1
    assert run.stderr == (
        "device_views.py: error: --views: unknown view 'simsam'; expected some of simsiam, simclr, byol1, "
        "byol2, swav, swav_small, located\n"
    )
