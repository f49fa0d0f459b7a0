"""Test settings for every file: one thread a worker, the signal handlers restored after each test, the
`script` marker enforced, and the order of the modules. Helpers that tests import live in helpers.py."""

import signal
import subprocess

import pytest
import torch

import datasets

# The suite runs as two pytest-xdist workers (.ci/run) on a 2-core machine: one thread each, as the scripts
# run as subprocesses here (OMP_NUM_THREADS=1 in run_script). Two threads a worker would fight over the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """pretrain.main() installs SIGINT/SIGTERM/SIGHUP handlers, bit_common.end_workers resets SIGCHLD's; a
    test that calls them in-process must not keep them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(autouse=True)
def unmarked_tests_start_no_process(request, monkeypatch):
    """A test that runs a script (its main, in this process or another) or starts processes carries
    @pytest.mark.script, which `-m "not script"` leaves out of the quick run; one that starts a process
    without it fails here."""
    if request.node.get_closest_marker("script") is None:

        def refuse(*args, **kwargs):
            raise AssertionError("this test starts a process: mark it @pytest.mark.script")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


# pytest-xdist's loadscope hands out whole modules in collection order (--no-loadscope-reorder, pytest.ini):
# the modules of whole pretraining runs go first, the longest first, so that no worker is left alone with one
# at the end. Their shares of a full run, measured with --durations=0 while other jobs loaded the 2 cores
# (load average about 9, 33 min 39 s in all): 690, 579, 535, 510, 502 and 350 s.
LONGEST_FIRST = [
    "test_signals_and_processes.py",
    "test_pretrain.py",
    "test_distributed.py",
    "test_methods_runs.py",
    "test_resume.py",
    "test_gpu_check.py",
    "test_linear_eval_and_tsne.py",
]


def scheduling_rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items):
    items.sort(key=scheduling_rank)  # stable: each module's tests keep their order


@pytest.fixture
def before_data(monkeypatch):
    """A bad flag must be refused before the slow part: the test fails if the script goes on to load data."""

    def reached(args):
        raise AssertionError("the flag was accepted: the script went on to load the data")

    monkeypatch.setattr(datasets, "data_from_args", reached)
