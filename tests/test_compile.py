"""pretrain.py --compile on the CPU (torch.compile's inductor, with this machine's C++ compiler), on the
stand-in network: it trains as the eager run does, writes the same files with the same state_dict keys,
resumes, and a compilation that fails is one line naming the flag."""

import json
import math
import signal

import pytest
import torch
from torch._dynamo.utils import counters

import pretrain
from helpers import (
    STAND_IN,
    TinyBackbone,
    read_metrics,
    run_patched,
    run_pretraining_over_gloo,
    sigterm_at,
    tiny_args,
)

pytestmark = pytest.mark.script  # each test runs pretrain.py

SEED = ["--seed", "3"]


def state_dicts(run):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    return checkpoint["model"], torch.load(run / "backbone.pt", weights_only=True)["state_dict"]


def assert_close(expected_files, got_files):
    """last.pt's modules and backbone.pt: the same keys in the same order, and the same values but for
    rounding. torch.compile (inductor) fuses the step and sums in another order, float32 rounding carried
    through 12 SGD steps of a BatchNorm network: measured on this CPU at most 3e-7 apart, 2e-6 relative to a
    tensor's largest value (the tolerances: 50 times that; some tensors, such as the bias of the projector's
    last BatchNorm, whose gradient is 0 in exact arithmetic, are rounding noise of 1e-12, which only the
    absolute tolerance can judge)."""
    for expected, got in zip(expected_files, got_files):
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert torch.allclose(got[key].double(), value.double(), rtol=1e-4, atol=1e-6), key


def losses(run):
    return [float(row["loss"]) for row in read_metrics(run) if int(row["epoch"]) > 0]


def test_a_compiled_run_trains_as_the_eager_one_and_resumes_with_or_without_it(tmp_path, monkeypatch, capsys):
    """Two epochs of 6 steps, eager and compiled: the same files, the same keys (no `_orig_mod.`), the same
    losses and weights but for the order of float32 sums. Then the compiled run stopped by SIGTERM in epoch
    2 and resumed with --no-compile (--resume may change it; args.json then records it): it ends as the
    compiled run does, within the same tolerance."""
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    assert pretrain.main(tiny_args(tmp_path, out="eager") + SEED) == 0
    counters.clear()
    assert pretrain.main(tiny_args(tmp_path, out="compiled") + SEED + ["--compile"]) == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, compiled once
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert sorted(p.name for p in eager.iterdir()) == sorted(p.name for p in compiled.iterdir())
    assert json.loads((compiled / "args.json").read_text())["compile"] is True
    assert json.loads((eager / "args.json").read_text())["compile"] is None  # off, as a run before the flag
    assert_close(state_dicts(eager), state_dicts(compiled))
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)  # measured: 4e-6 apart

    with sigterm_at(2, 2):
        assert pretrain.main(tiny_args(tmp_path) + SEED + ["--compile"]) == 128 + signal.SIGTERM
    assert "stopped by signal in epoch 2, step 2; saved" in capsys.readouterr().out
    stopped = tmp_path / "run"
    assert pretrain.parse_args(["--out", str(stopped), "--resume"]).compile is True  # the run's own setting
    assert pretrain.main(["--out", str(stopped), "--resume", "--no-compile"]) == 0
    assert json.loads((stopped / "args.json").read_text())["compile"] is False
    assert_close(state_dicts(compiled), state_dicts(stopped))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol", "mocov2", "swav"])
def test_every_method_compiles_into_one_graph(tmp_path, monkeypatch, method):
    """The other methods' steps (their queues, momentum encoders, Sinkhorn) compile too, each into one graph
    without a graph break, compiled once for the whole run (no recompilation as the epochs go): 25 - 40 s
    each here."""
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    counters.clear()
    assert pretrain.main(tiny_args(tmp_path) + ["--method", method, "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "run"))


@pytest.mark.slow
def test_a_compiled_run_of_two_processes_over_gloo_trains(tmp_path):
    """torchrun's two processes, each compiling its DDP-wrapped model (compiled after the wrapper: DDP's
    buckets split the graph): 35 - 60 s here, most of it the two compilations on 2 shared cores."""
    run_pretraining_over_gloo(tiny_args(tmp_path) + ["--compile"], patch=STAND_IN)
    keys = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert keys and not any(key.startswith(("_orig_mod", "module.")) for key in keys)
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "run"))


def test_a_compilation_that_fails_is_one_line_naming_the_flag(tmp_path):
    """No C++ compiler for inductor (CXX names none, and a fresh cache holds no compiled kernel): the first
    step's compilation fails; the run ends with one line that names --compile and the cause, and leaves no
    checkpoint, so that the same command without --compile starts afresh."""
    env = {"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = run_patched("pretrain.py", STAND_IN, *tiny_args(tmp_path), "--compile", env=env)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("pretrain.py: error: --compile: torch.compile failed in epoch 1, step 1 ")
    assert "No working C++ compiler" in lines[-1] and "run without --compile" in lines[-1]
    assert not (tmp_path / "run" / "last.pt").exists()
