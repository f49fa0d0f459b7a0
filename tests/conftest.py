"""Test settings for every file: one thread a worker, and the signal handlers restored after each test.
Helpers that tests import live in helpers.py."""

import inspect
import signal

import pytest
import torch

# The suite runs as two pytest-xdist workers (.ci/run) on a 2-core machine: one thread each, as the scripts
# run as subprocesses here (OMP_NUM_THREADS=1 in run_script). Two threads a worker would fight over the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """pretrain.main() installs SIGINT/SIGTERM/SIGHUP handlers, common.end_workers resets SIGCHLD's; a test
    that calls them in-process must not keep them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# What a script run looks like in a test, its own code or a fixture's: these tests take seconds each, and
# `-m "not script"` leaves them out of a developer's unit run.
RUNS_A_SCRIPT = ("run_script(", "run_patched(", ".main(", "run_pretraining_over_gloo(", "tiny_args(")


def runs_a_script(function):
    try:
        return any(call in inspect.getsource(function) for call in RUNS_A_SCRIPT)
    except (OSError, TypeError):
        return False


# pytest-xdist's loadscope hands out whole modules in collection order (--no-loadscope-reorder, pytest.ini):
# the modules of whole pretraining runs go first, the longest first, so that no worker is left alone with one
# at the end. Their shares of a full run, measured with --durations=0 while other jobs loaded the 2 cores
# (load average about 9, 33 min 39 s in all): 690, 579, 535, 510, 502 and 350 s.
LONGEST_FIRST = [
    "test_run_safety.py",
    "test_pretrain.py",
    "test_distributed.py",
    "test_methods_runs.py",
    "test_runs.py",
    "test_gpu_check.py",
    "test_eval.py",
]


def scheduling_rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items):
    items.sort(key=scheduling_rank)  # stable: each module's tests keep their order
    for item in items:
        fixtures = [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values()]
        fixtures = [f for f in fixtures if f.__module__ != __name__]  # not this file's autouse fixture
        if runs_a_script(item.function) or any(map(runs_a_script, fixtures)):
            item.add_marker(pytest.mark.script)
