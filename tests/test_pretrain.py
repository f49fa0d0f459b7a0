"""pretrain.py: the schedule, the sampler, and whole runs on the CPU (outputs, the numbers of the code before
it was reshaped, exact resume, the epoch-0 row, the NaN stop, a collapse, bad arguments); two processes over
gloo are in test_distributed.py."""

import csv
import json
import signal
import socket
from argparse import Namespace

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

import bit_common
import bit_convert
import datasets
import pretrain
from bit_convert import load_backbone, resnet_v2, save_backbone
from helpers import (
    REPO,
    STAND_IN,
    TIMING,
    TinyBackbone,
    read_metrics,
    run_patched,
    run_script,
    sigterm_at,
    tiny_args,
    without_timing,
    write_pretrained_backbone,
)

# ----------------------------------------------------------------------------------------------- the schedule


def test_learning_rate_follows_warmup_then_cosine():
    args = Namespace(lr=0.03, batch_size=128, warmup_epochs=10, epochs=400, cosine_epochs=None)
    peak, steps = 0.03 * 128 / 256, 50

    def lr(epoch):  # the lr of the last step of `epoch`
        return pretrain.scheduled_lr(round(epoch * steps) - 1, steps, args)

    assert lr(1) == pytest.approx(peak / 10)
    assert lr(10) == pytest.approx(peak)
    assert lr(205) == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 195 / 390)))
    assert lr(400) == pytest.approx(0.0, abs=1e-12)
    args.cosine_epochs = 800  # the authors' code: the cosine's horizon is 800 epochs, the run stops at 400
    assert lr(400) == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 390 / 790)))


def test_seeded_sampler_splits_the_data_between_processes_and_resumes_mid_epoch():
    data = list(range(103))
    samplers = [
        datasets.SeededSampler(data, 2, rank, shuffle=True, seed=7, drop_last=True) for rank in (0, 1)
    ]
    for s in samplers:
        s.set_epoch(3)
    keys = [list(s) for s in samplers]
    indices = [[i for _, i in k] for k in keys]
    assert len(indices[0]) == len(indices[1]) == 51 and not set(indices[0]) & set(indices[1])
    assert len({seed for k in keys for seed, _ in k}) == 102  # every image its own augmentation seed
    samplers[0].set_epoch(3, start=20)
    assert list(samplers[0]) == keys[0][20:]
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != keys[0]  # a new epoch, a new order and new seeds


# ------------------------------------------------------------------------------------------------- whole runs


# The seed of tests/data/pinned_metrics.csv: the run below is also the one pinned to those numbers
SEED = ["--seed", "3"]


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """Two epochs, uninterrupted, in-process."""
    tmp = tmp_path_factory.mktemp("complete")
    pretrain.main(tiny_args(tmp) + SEED + ["--save-at", "1"])
    return tmp, tmp / "run"


@pytest.mark.script
def test_a_run_writes_every_output(complete_run):
    tmp, out = complete_run
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            ".lock",
            "args.json",
            "backbone.pt",
            "backbone_ep1.pt",
            "curves.png",
            "last.pt",
            "metrics.csv",
            "split.json",
        ]
    )
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"epoch", "loss", "lr", "z_std", "knn_acc", "knn_bacc", "rankme", *TIMING}
    # write_s: the seconds of the writes of the epoch before, which this process's first epoch has not
    assert all(rows[e][k] != "" for e in (1, 2) for k in rows[0] if (e, k) != (1, "write_s"))
    assert rows[1]["write_s"] == ""
    assert rows[0]["loss"] == "" and rows[0]["knn_bacc"] != ""  # epoch 0: the untrained network, evaluated
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "split.json").read_bytes() == (tmp / "split.json").read_bytes()
    assert json.loads((out / "args.json").read_text())["epochs"] == 2
    backbone, meta = load_backbone(out / "backbone.pt")
    assert (meta["epoch"], meta["arch"], meta["norm"], meta["cifar_stem"]) == (2, "r50x1", "bn", True)
    resnet_v2("r50x1", "bn", cifar_stem=True).load_state_dict(torch.load(out / "backbone.pt")["state_dict"])
    assert load_backbone(out / "backbone_ep1.pt")[1]["epoch"] == 1
    state = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "progress", "rng", "args"} <= set(state)
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (3, 0)


# In a process of its own: the stand-in network, and SIGTERM in epoch 2 (its first step done)
# (the context is held to the end of the process: one that is collected restores RunState.add)
STOP_IN_EPOCH_2 = f"{STAND_IN}\nstop = helpers.sigterm_at(2, 1)\nstop.__enter__()\n"


@pytest.mark.script
def test_the_same_seed_gives_the_same_run_and_a_stop_by_signal_resumes_exactly(tmp_path, monkeypatch):
    """A run of its own process stopped by SIGTERM during the second epoch, then --resume: the final weights
    and metrics are those of the run that was never interrupted (in this process). The interrupted run
    loads with two worker processes: the augmentations depend on the seed, epoch and image alone. The
    stand-in network (helpers.TinyBackbone): what is tested is the run around it."""
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    assert pretrain.main(tiny_args(tmp_path, out="complete") + SEED) == 0
    args = tiny_args(tmp_path) + SEED
    args[args.index("--workers") + 1] = "2"
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as this process: same sums
    stopped = run_patched("pretrain.py", STOP_IN_EPOCH_2, *args, env=env)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped by signal in epoch 2, step 1; saved" in stopped.stdout
    assert not (tmp_path / "run" / "backbone.pt").exists()

    resumed = run_patched(
        "pretrain.py", STAND_IN, "--out", tmp_path / "run", "--resume", "--workers", "0", env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    expected = torch.load(tmp_path / "complete" / "backbone.pt", weights_only=True)["state_dict"]
    got = torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert without_timing(read_metrics(tmp_path / "run")) == without_timing(
        read_metrics(tmp_path / "complete")
    )


@pytest.mark.script
def test_one_torchrun_process_still_runs_the_process_group_and_ddp(monkeypatch):
    """torchrun --nproc_per_node 1 (RANK and WORLD_SIZE set) takes the distributed path, as a machine with one
    GPU must to exercise NCCL; a plain `python pretrain.py` does not."""
    args = pretrain.parse_args(["--data", "digits", "--device", "cpu"])
    assert pretrain.init_process(args) == (0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    layer = torch.nn.Sequential(torch.nn.Linear(3, 3), bit_convert.IterNorm(3))
    layer.sync_batch_norm = True  # as a method says (bit_common.Method)
    assert pretrain.distribute(layer, torch.device("cpu")) is layer
    assert layer[1].process_group is None  # no process group: it whitens its own batch
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        assert pretrain.init_process(args) == (0, 1, torch.device("cpu"))
        assert torch.distributed.get_backend() == "gloo"
        assert isinstance(
            pretrain.distribute(layer, torch.device("cpu")), torch.nn.parallel.DistributedDataParallel
        )
        assert layer[1].process_group is torch.distributed.group.WORLD  # whitens the global batch
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.script
def test_the_reshaped_code_gives_the_numbers_of_the_code_before_it(complete_run):
    """Issue 8 moved the code around without changing what it computes: the same seed gives the metrics.csv
    that pretrain.py wrote before (tests/data/pinned_metrics.csv, from commit bc87b32)."""
    with open(REPO / "tests" / "data" / "pinned_metrics.csv", newline="") as f:
        pinned = list(csv.DictReader(f))
    got = read_metrics(complete_run[1])
    assert len(got) == len(pinned)
    for row, expected in zip(got, pinned):
        for column, value in expected.items():
            assert (row[column] == "") == (value == "")
            assert value == "" or float(row[column]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), (
                column
            )


@pytest.mark.script
def test_bn_statistics_are_estimated_before_the_model_is_distributed(tmp_path, monkeypatch):
    """Under torchrun on GPUs the model gets SyncBatchNorm, whose train-mode forward all-gathers: estimating
    the initial statistics on process 0 alone after that would hang the others. Here the conversion happens on
    the CPU (SyncBatchNorm falls back to a plain BatchNorm without a process group), and the estimate must
    come first."""
    events = []
    estimate = bit_convert.estimate_bn_statistics
    monkeypatch.setattr(
        pretrain, "estimate_bn_statistics", lambda *a, **k: events.append("estimate") or estimate(*a, **k)
    )

    def distribute(method, device):
        events.append("distribute")
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)

    monkeypatch.setattr(pretrain, "distribute", distribute)
    pretrain.main(tiny_args(tmp_path, epochs=1))
    assert events == ["estimate", "distribute"]
    backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(resnet_v2("r50x1", "bn", cifar_stem=True))
    with pytest.raises(ValueError, match="before the model is distributed"):
        bit_convert.estimate_bn_statistics(
            backbone, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.device("cpu")
        )


@pytest.mark.script
def test_epoch_0_of_a_pretrained_backbone_file_is_its_network_with_its_own_statistics(tmp_path):
    """A backbone file that records its epoch (a pretraining's) carries the BatchNorm statistics it trained
    with: the epoch-0 row measures that network as it is. Here against a weighted kNN vote and RankMe in
    NumPy on the file's eval-mode features; statistics estimated on the bank instead give other numbers."""
    init = write_pretrained_backbone(tmp_path / "pretrained.pt")
    argv = tiny_args(tmp_path, epochs=1) + ["--init", str(init)]
    argv[argv.index("--split") + 1] = "0.05,0.05,0.05,0.85"  # 90 pretrain images: 3 steps of 30
    assert pretrain.main(argv) == 0
    row = {k: float(v) for k, v in read_metrics(tmp_path / "run")[0].items() if v != ""}
    backbone, data = load_backbone(init)[0].eval(), datasets.load_digits()
    split = datasets.load_split(data, tmp_path / "run" / "split.json")

    def features(part):
        index = datasets.indices(data, split, part)
        with torch.no_grad():  # BiT's inputs: [-1, 1]
            x = backbone(datasets.eval_images(data, index, 8).float() / 127.5 - 1)
        return x.double().numpy(), data.labels[index]

    (bank, bank_labels), (queries, truth) = features("train"), features("val")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(queries) @ unit(bank).T
    votes = np.zeros((len(queries), len(data.classes)))
    for i, row_similarity in enumerate(similarity):  # k = 200 > 90 bank images: every one votes
        np.add.at(votes[i], bank_labels, np.exp(row_similarity / 0.1))
    predicted = votes.argmax(1)
    sigma = np.linalg.svd(bank, compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    assert row["knn_acc"] == pytest.approx(np.mean(predicted == truth), abs=1e-9)
    assert row["knn_bacc"] == pytest.approx(balanced_accuracy_score(truth, predicted), abs=1e-9)
    assert row["rankme"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)


@pytest.mark.script
def test_a_starting_network_keeps_its_statistics_only_if_it_pretrained_and_nothing_changed_it(tmp_path):
    """The epoch-0 row's rule (bit_convert.untrained_statistics, as linear_eval.py and tsne.py apply it):
    statistics are estimated for scratch, BiT and a converted file (no epoch recorded), and for a pretrained
    file that an intervention or --zero-init-last changes; a pretrained file whitened already keeps its own
    with --whiten, which then changes nothing."""
    pretrained = write_pretrained_backbone(tmp_path / "pretrained.pt")
    save_backbone(resnet_v2("r50x1", "bn", cifar_stem=True), tmp_path / "converted.pt")  # as bit_convert.py
    whitened = bit_convert.whiten(resnet_v2("r50x1", "bn", cifar_stem=True))
    save_backbone(whitened, tmp_path / "whitened.pt", epoch=2)

    def kept(*flags):
        args = pretrain.parse_args(tiny_args(tmp_path) + list(map(str, flags)))
        return not bit_convert.untrained_statistics(whitened, pretrain.starting_metadata(args))

    assert kept("--init", pretrained)
    assert kept("--init", tmp_path / "whitened.pt", "--whiten")
    assert not kept() and not kept("--init", "bit-m") and not kept("--init", tmp_path / "converted.pt")
    for change in (["--shrink", "0.5"], ["--select-filters", "0.5"], ["--whiten"], ["--zero-init-last"]):
        assert not kept("--init", pretrained, *change), change


@pytest.mark.script
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    loss, steps = pretrain.simsiam_loss, []

    def poisoned(*outputs):  # NaN from the second epoch's first step (6 steps an epoch)
        steps.append(1)
        return loss(*outputs) * (float("nan") if len(steps) > 6 else 1.0)

    monkeypatch.setattr(pretrain, "simsiam_loss", poisoned)
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())  # any network
    with pytest.raises(FloatingPointError, match="the loss became nan in epoch 2"):
        pretrain.main(tiny_args(tmp_path, epochs=2))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (
        2,
        0,
    )  # the end of epoch 1, the last good
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "backbone.pt").exists()


@pytest.mark.script
def test_a_collapsed_representation_is_flagged(tmp_path, monkeypatch, capsys):
    def collapsed(self, views):  # every image maps to one point: the failure the paper's Fig. 1 shows
        z = self.projector(self.backbone(views[0])) * 0 + 1
        return pretrain.simsiam_loss(self.predictor(z), self.predictor(z), z, z), z

    monkeypatch.setattr(pretrain.SimSiam, "forward", collapsed)
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())  # any network
    pretrain.main(tiny_args(tmp_path, epochs=1))
    assert "the representation has collapsed" in capsys.readouterr().out
    assert float(read_metrics(tmp_path / "run")[1]["z_std"]) == 0.0


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.script
def test_an_existing_run_is_never_overwritten(complete_run):
    tmp, out = complete_run
    before = (out / "last.pt").stat().st_mtime_ns
    with pytest.raises(bit_common.UserError, match="holds another run.*--resume.*--force"):
        pretrain.main(tiny_args(tmp))
    assert (out / "last.pt").stat().st_mtime_ns == before


@pytest.mark.script
def test_resume_refuses_changed_arguments(complete_run, tmp_path):
    with pytest.raises(bit_common.UserError, match="--resume: --lr 0.5 differs from the run"):
        pretrain.main(["--out", str(complete_run[1]), "--resume", "--lr", "0.5"])
    with pytest.raises(
        bit_common.UserError, match="--resume: --epochs 3 differs.*with an explicit --cosine-epochs"
    ):
        pretrain.main(["--out", str(complete_run[1]), "--resume", "--epochs", "3"])
    with pytest.raises(bit_common.UserError, match="holds no run to resume"):
        pretrain.main(tiny_args(tmp_path) + ["--resume"])


@pytest.mark.script
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "500"], "--batch-size 500"),
        (["--init", "imagenet"], "--init 'imagenet'"),
        (["--split", "0.6,0.1,0.1,0.1"], "adding up to 1"),
    ],
)
def test_bad_arguments_fail_with_one_line(tmp_path, extra, message):
    run = run_script("pretrain.py", *tiny_args(tmp_path), *extra)
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and message in run.stderr and "error" in run.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.script
def test_a_backbone_file_of_another_architecture_is_refused(tmp_path):
    save_backbone(resnet_v2("r50x1", "gn", cifar_stem=True), tmp_path / "gn.pt")
    with pytest.raises(bit_common.UserError, match=r"--norm bn: .*gn\.pt holds a backbone with norm = gn"):
        pretrain.parse_args(tiny_args(tmp_path) + ["--init", str(tmp_path / "gn.pt"), "--norm", "bn"])
    args = pretrain.parse_args(tiny_args(tmp_path) + ["--init", str(tmp_path / "gn.pt")])
    assert (args.arch, args.norm, args.cifar_stem) == ("r50x1", "gn", True)  # the file's, when no flag says


@pytest.mark.script
@pytest.mark.slow
def test_pretraining_on_digits_raises_knn_balanced_accuracy(tmp_path):
    """The demonstration of the README: a short run from scratch on the embedded digits."""
    run = run_script(
        "pretrain.py",
        "--data",
        "digits",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--lr",
        "0.4",
        "--warmup-epochs",
        "1",
        "--eval-every",
        "1",
        "--workers",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
        "--split-file",
        tmp_path / "split.json",
        "--cache-dir",
        tmp_path,
        timeout=3600,
    )
    assert run.returncode == 0, run.stderr
    rows = read_metrics(tmp_path / "run")
    assert float(rows[-1]["knn_bacc"]) > float(rows[0]["knn_bacc"]) + 0.1


@pytest.mark.script
def test_views_drawn_on_the_device_resume_exactly_after_a_stop(tmp_path, monkeypatch, capsys):
    """--views-on device on the CPU, two loader workers drawing the views' numbers: a SIGTERM during step 2 of
    epoch 2, then --resume without workers, ends with the weights and metrics of the run never interrupted,
    bit for bit (each view is a function of (seed, epoch, image, draw) alone). The network is a stand-in:
    what is checked is the views and the order of the images. --views-on cannot change on --resume."""
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    device = ["--views-on", "device", *SEED]
    assert pretrain.main(tiny_args(tmp_path, out="whole") + device) == 0
    args = tiny_args(tmp_path) + device
    args[args.index("--workers") + 1] = "2"
    with sigterm_at(2, 2):
        assert pretrain.main(args) == 128 + signal.SIGTERM
    assert "stopped by signal in epoch 2, step 2; saved" in capsys.readouterr().out
    assert pretrain.main(["--out", str(tmp_path / "run"), "--resume", "--workers", "0"]) == 0
    expected = torch.load(tmp_path / "whole" / "backbone.pt", weights_only=True)["state_dict"]
    got = torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)["state_dict"]
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert without_timing(read_metrics(tmp_path / "run")) == without_timing(read_metrics(tmp_path / "whole"))
    with pytest.raises(bit_common.UserError, match="--views-on loader differs"):
        pretrain.main(["--out", str(tmp_path / "run"), "--resume", "--views-on", "loader"])
