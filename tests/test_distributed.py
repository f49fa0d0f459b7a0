"""pretrain.py under torchrun, two processes over gloo: a whole run for every flag that changes the network or
the loss (each --method, --whiten at both places, --local-weight, --shrink, --select-filters) must finish,
and the code that process 0 runs alone (the monitor, the epoch-0 row) must issue no collective, which the
other process would never join: a hang."""

import functools
import json

import pytest
import torch
import torch.distributed as dist

import bit_convert
import datasets
import pretrain
from bit_convert import load_backbone
from helpers import read_metrics, run_pretraining_over_gloo, tiny_args, write_pretrained_backbone

SPLIT = "0.05,0.05,0.05,0.85"  # 90 pretrain images, 45 a process: 3 steps of 30 (15 a process), 1 of 60
INIT = "INIT"  # stands for a backbone file that the test writes: --shrink and --select-filters need one
# Flags may share a run; each run is as short as it can be (one epoch; the monitor runs at epochs 0 and 1).
# A 2048-channel IterNorm takes seconds a step on the CPU: the --whiten runs take one step of 60 images
# (a flag given again overrides tiny_args'), and whiten with ONE_NEWTON_STEP. Every run is SHALLOW (below).
# SimSiam over two processes runs in test_signals_and_processes.py (a stop and --resume) and test_pretrain.py.
RUNS = {
    "byol-whiten-branch": ["--method", "byol", "--whiten", "branch", "--batch-size", "60"],
    "simclr-whiten-final": ["--method", "simclr", "--whiten", "final", "--batch-size", "60"],
    "mocov2-local-select-shrink": [
        *("--method", "mocov2", "--queue-size", "64", "--local-weight", "0.5", "--local-grid", "2"),
        *("--init", INIT, "--select-filters", "0.5", "--shrink", "0.5"),
    ],
    # a SwAV queue of 2 batches, full and in use at the third step; --multi-crop: 8 crops of two sizes
    "swav-multi-crop": [
        *("--method", "swav", "--queue-size", "60", "--queue-start", "1", "--prototypes", "10"),
        "--multi-crop",
    ],
}

# What these runs pin, that every process joins every collective to the end, the depth of the network does not
# change: they train an r50x1 of one unit a block (BiT's has 3, 4, 6 and 3), every kind of layer there at its
# width, in both processes and in the test's own, which writes the --init file and reads backbone.pt.
ONE_UNIT_A_BLOCK = ((1, 1, 1, 1), 1)
SHALLOW = f"import bit_convert\nbit_convert.ARCHS['r50x1'] = {ONE_UNIT_A_BLOCK}"
# Each of IterNorm's Newton iterations is three 2048 x 2048 matrix products (seconds on one CPU thread, and as
# many again backwards): the --whiten runs take one iteration instead of Huang et al.'s five. The number
# changes no collective: batch_moments all-reduces the moments once, before the iterations.
ONE_NEWTON_STEP = "import functools\npretrain.whiten = functools.partial(pretrain.whiten, iterations=1)"


def run_args(tmp, flags):
    args = tiny_args(tmp, epochs=1) + [str(tmp / "init.pt") if flag == INIT else flag for flag in flags]
    args[args.index("--split") + 1] = SPLIT
    return args


@pytest.mark.script
@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_over_gloo_run_to_the_end(tmp_path, name, monkeypatch):
    """torchrun --nproc_per_node 2 on the CPU: the run finishes within the time limit (a collective that one
    process never joins would hang it), and writes its metrics and a backbone.pt that records its flags."""
    flags = RUNS[name]
    monkeypatch.setitem(bit_convert.ARCHS, "r50x1", ONE_UNIT_A_BLOCK)
    if INIT in flags:
        write_pretrained_backbone(tmp_path / "init.pt")
    patch = SHALLOW + ("\n" + ONE_NEWTON_STEP if "--whiten" in flags else "")
    run = run_pretraining_over_gloo(run_args(tmp_path, flags), patch=patch, timeout=300)
    assert "2 process(es) over gloo" in run.stdout
    # said once, by process 0: MoCo v2 shuffles its BatchNorm's batches instead of synchronising them
    note = "no SyncBatchNorm for this method" if "mocov2" in flags else "SyncBatchNorm runs on GPUs only"
    assert run.stdout.count(note) == 1
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 30
    assert f"{45 // (batch // 2)} steps per epoch" in run.stdout  # --batch-size is global
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "run")] == [0, 1]
    _, meta = load_backbone(tmp_path / "run" / "backbone.pt")
    method = flags[flags.index("--method") + 1]
    whiten = flags[flags.index("--whiten") + 1] if "--whiten" in flags else False
    assert (meta["epoch"], meta["method"], meta["whiten"]) == (1, method, whiten)
    recorded = json.loads((tmp_path / "run" / "args.json").read_text())
    for flag in ("--local-weight", "--select-filters", "--shrink"):
        if flag in flags:
            assert recorded[flag[2:].replace("-", "_")] == float(flags[flags.index(flag) + 1])


COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)


@pytest.mark.script
def test_the_monitor_that_process_0_runs_alone_issues_no_collective(tmp_path, monkeypatch):
    """The epoch-0 row (BatchNorm and IterNorm statistics estimated in train mode) and a later row, as process
    0 computes them under torchrun with two processes, of a whitened backbone inside a method whose forward
    gathers (MoCo's key encoder): any collective there is one that the other process never joins. SHALLOW
    and ONE_NEWTON_STEP, as the runs above."""
    monkeypatch.setitem(bit_convert.ARCHS, "r50x1", ONE_UNIT_A_BLOCK)
    monkeypatch.setattr(pretrain, "whiten", functools.partial(pretrain.whiten, iterations=1))
    args = pretrain.parse_args(run_args(tmp_path, ["--method", "mocov2", "--whiten"]))
    data, cpu = datasets.data_from_args(args), torch.device("cpu")
    split = datasets.load_split(data, args.split_file, args.split, args.split_seed, args.split_by)
    method = pretrain.prepare_method(args, data, split, cpu)
    monitor = pretrain.KnnMonitor(data, split, args.image_size, args.knn_k, args.knn_t, cpu)

    def collective(*args, **kwargs):
        raise AssertionError("a collective in code that process 0 runs alone")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, collective)
    initial = monitor.initial(method.backbone, pretrain.starting_metadata(args))
    later = monitor(method.backbone)
    assert 0 <= initial["knn_bacc"] <= 1 and 0 <= later["knn_bacc"] <= 1
    assert method.backbone.blocks[-1][-1].branch_norm.num_batches_tracked == 1  # estimated, in train mode


def test_only_a_distributed_model_whitens_over_the_processes():
    """pretrain.distribute synchronises every IterNorm (the backbone's and a momentum encoder's), as
    convert_sync_batchnorm converts every BatchNorm; estimate_bn_statistics then refuses the model, as it
    refuses a SyncBatchNorm."""
    args = pretrain.parse_args(["--data", "digits", "--method", "byol", "--whiten", "--device", "cpu"])
    method = pretrain.prepare_method(args, None, None, torch.device("cpu"))
    norms = [m for m in method.modules() if isinstance(m, bit_convert.IterNorm)]
    assert len(norms) == 2 and all(norm.process_group is None for norm in norms)  # backbone, target
    group = object()  # stands for a process group: nothing here runs a collective
    assert bit_convert.synchronise_whitening(method, group) is method
    assert all(norm.process_group is group for norm in norms)
    with pytest.raises(ValueError, match="before the model is distributed"):
        bit_convert.estimate_bn_statistics(
            method.backbone, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.device("cpu")
        )


@pytest.mark.heavy
@pytest.mark.parametrize("method_name, synchronised", [("byol", True), ("mocov2", False)])
def test_distribute_whitens_over_the_processes_but_not_for_moco(tmp_path, method_name, synchronised):
    """pretrain.distribute, in a process group of one: BYOL's IterNorms (backbone and target) whiten over
    every process; MoCo v2's stay per process, as its BatchNorms do, since a key encoder whitened over the
    global batch would see every query's own image in its statistics (He et al. 2020, §3.3)."""
    args = pretrain.parse_args(["--data", "digits", "--method", method_name, "--whiten", "--device", "cpu"])
    method = pretrain.prepare_method(args, None, None, torch.device("cpu"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        pretrain.distribute(method, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    groups = [m.process_group for m in method.modules() if isinstance(m, bit_convert.IterNorm)]
    assert len(groups) == 2 and all((group is not None) == synchronised for group in groups)
