"""SimSiam (pretrain.py) and the add-on methods (ssl_methods.py): each method's heads and loss against the
formulas of its paper."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bit_common
import datasets
import pretrain
import ssl_methods
from bit_convert import resnet_v2
from helpers import TinyBackbone, tiny_args


def cos(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ---------------------------------------------------------------------------------------------------- SimSiam


def test_simsiam_loss_is_symmetric_negative_cosine_with_stop_gradient():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(8, 16, generator=g, requires_grad=True) for _ in range(4))
    loss = pretrain.simsiam_loss(p1, p2, z1, z2)
    expected = -(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2
    assert torch.allclose(loss, expected)
    assert torch.equal(loss, pretrain.simsiam_loss(p2, p1, z2, z1))  # swapping the views changes nothing
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient: nothing flows into z
    assert p1.grad is not None and p2.grad is not None


def test_simsiam_loss_is_minus_one_when_predictions_match_the_other_view():
    z1, z2 = torch.randn(4, 32), torch.randn(4, 32)
    assert pretrain.simsiam_loss(3 * z2, 0.5 * z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.heavy
@pytest.mark.parametrize("projector, linears, affine", [("paper", 2, True), ("simsiam", 3, False)])
def test_simsiam_projector_of_the_authors_and_of_simsiam(projector, linears, affine):
    """The authors' code: Linear-BN-ReLU, Linear-BN (2048-2048-2048); SimSiam's builder.py: three Linear-BN,
    the last BN without affine. Both: predictor 2048-512-2048, a bottleneck with BN-ReLU in the middle; the
    predictor keeps a fixed lr."""
    model = pretrain.SimSiam(resnet_v2("r50x1", "bn", cifar_stem=True), projector)
    layers = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(2048, 2048)] * linears
    assert model.projector[-1].affine is affine and isinstance(model.projector[-1], torch.nn.BatchNorm1d)
    predictor = [(m.in_features, m.out_features) for m in model.predictor if isinstance(m, torch.nn.Linear)]
    assert predictor == [(2048, 512), (512, 2048)]
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    loss, z = model([x1, x2])
    assert z.shape == (4, 2048) and loss.shape == () and -1 <= loss.item() <= 1
    groups = model.param_groups()
    assert [g["fixed_lr"] for g in groups] == [False, True]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.predictor.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------- the losses, by formula


def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_nt_xent_against_a_loop_over_positives_and_negatives():
    """SimCLR Eq. 1: view i's positive is the other view of its image, its negatives the 2N - 2 others."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    z, n, t = normalise(torch.cat([z1, z2]).double().numpy()), 5, 0.3
    terms = []
    for i in range(2 * n):
        others = [j for j in range(2 * n) if j != i]
        positive = (i + n) % (2 * n)
        terms.append(-z[i] @ z[positive] / t + np.log(sum(np.exp(z[i] @ z[j] / t) for j in others)))
    assert ssl_methods.nt_xent_loss(z1, z2, t).item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_byol_loss_is_the_symmetric_normalised_mse_without_gradient_to_the_target():
    g = torch.Generator().manual_seed(2)
    p1, p2, t1, t2 = (torch.randn(6, 9, generator=g, requires_grad=True) for _ in range(4))
    a = [x.detach().double().numpy() for x in (p1, p2, t1, t2)]
    mse = lambda p, t: np.mean(np.sum((normalise(p) - normalise(t)) ** 2, axis=1))  # noqa: E731
    loss = ssl_methods.byol_loss(p1, p2, t1, t2)
    assert loss.item() == pytest.approx((mse(a[0], a[3]) + mse(a[1], a[2])) / 4, rel=1e-5)
    loss.backward()
    assert t1.grad is None and t2.grad is None and p1.grad is not None
    assert ssl_methods.byol_loss(t2, t1, t1, t2).item() == pytest.approx(0, abs=1e-5)


def test_byol_loss_takes_the_gradient_of_lightlys_benchmark_loss():
    """The default lr and weight decay are lightly's CIFAR-10 benchmark's, whose BYOL loss is
    0.5 (-cos(p1, t2) - cos(p2, t1)): d loss / d cos = -1/2 per direction, hence the same step (the paper's
    sum of 2 - 2 cos over both directions has -2: 4 times the step)."""
    g = torch.Generator().manual_seed(12)
    p1, p2, t1, t2 = (torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(4))
    ours = [p.clone().requires_grad_() for p in (p1, p2)]
    ssl_methods.byol_loss(*ours, t1, t2).backward()
    lightly = [p.clone().requires_grad_() for p in (p1, p2)]
    (0.5 * (-cos(lightly[0], t2).mean() - cos(lightly[1], t1).mean())).backward()
    for mine, theirs in zip(ours, lightly):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-9)


def test_info_nce_against_a_loop_over_the_queue():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    queue = F.normalize(torch.randn(11, 8, generator=g), dim=1)
    qn, kn, qu, t = normalise(q.double().numpy()), normalise(k.double().numpy()), queue.double().numpy(), 0.2
    terms = [
        -np.log(np.exp(qn[i] @ kn[i] / t) / (np.exp(qn[i] @ kn[i] / t) + np.exp(qu @ qn[i] / t).sum()))
        for i in range(4)
    ]
    assert ssl_methods.info_nce_loss(q, k, queue, t).item() == pytest.approx(np.mean(terms), rel=1e-5)


def sinkhorn_numpy(scores, epsilon, iterations):
    """SwAV App. A.1, written out: Q = exp(S/eps)^T scaled to rows summing to 1/K, columns to 1/B, in turn."""
    q = np.exp(scores / epsilon).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def test_sinkhorn_codes_have_the_marginals_of_an_equipartition():
    g = torch.Generator().manual_seed(4)
    scores = (
        F.normalize(torch.randn(12, 6, generator=g), dim=1)
        @ F.normalize(torch.randn(5, 6, generator=g), dim=1).T
    )
    s = scores.double().numpy()
    codes = ssl_methods.sinkhorn(scores, 0.05, 3).double().numpy()
    assert np.allclose(codes, sinkhorn_numpy(s, 0.05, 3), rtol=1e-4, atol=1e-7)
    assert np.allclose(codes.sum(1), 1, atol=1e-5)  # each sample's code is a distribution
    converged = ssl_methods.sinkhorn(scores, 0.05, 300).double().numpy()
    assert np.allclose(converged.sum(0), 12 / 5, rtol=1e-3)  # every prototype gets B/K samples
    # the solution is diag(u) exp(S / eps) diag(v): log Q - S / eps is a row term plus a column term
    residual = np.log(converged) - s / 0.05
    residual = residual - residual.mean(0) - residual.mean(1, keepdims=True) + residual.mean()
    assert np.abs(residual).max() < 1e-3


def test_swav_loss_is_the_swapped_prediction_of_the_sinkhorn_codes():
    g = torch.Generator().manual_seed(5)
    z = F.normalize(torch.randn(4, 6, 8, generator=g), dim=2)  # 2 large crops, 2 small, batch 6
    prototypes = F.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(2, 9, 8, generator=g), dim=2)
    zn, c, qn = z.double().numpy(), prototypes.detach().double().numpy(), queue.double().numpy()
    for with_queue in (False, True):
        expected = []
        for i in range(2):
            known = np.concatenate([qn[i] @ c.T, zn[i] @ c.T]) if with_queue else zn[i] @ c.T
            codes = sinkhorn_numpy(known, 0.05, 3)[-6:]
            for v in range(4):
                if v != i:
                    logits = zn[v] @ c.T / 0.1
                    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
                    expected.append(-(codes * log_p).sum(1).mean())
        loss = ssl_methods.swav_loss(z, prototypes, 0.1, queue if with_queue else None)
        assert loss.item() == pytest.approx(np.mean(expected), rel=1e-4)
    loss.backward()
    assert prototypes.grad.abs().sum() > 0


def test_momentum_update_and_its_cosine_schedule():
    g = torch.Generator().manual_seed(6)
    online, target = [torch.randn(3, 4, generator=g)], [torch.randn(3, 4, generator=g)]
    expected = 0.9 * target[0].double().numpy() + 0.1 * online[0].double().numpy()
    ssl_methods.momentum_update(online, target, 0.9)
    assert np.allclose(target[0].numpy(), expected, atol=1e-6)
    assert ssl_methods.cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert ssl_methods.cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert ssl_methods.cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert ssl_methods.cosine_momentum(0.99, 0.25) == pytest.approx(1 - 0.01 * (np.cos(np.pi / 4) + 1) / 2)


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_moco_momentum_is_lightlys_constant_099(progress):
    """MoCo Eq. 2 with lightly's CIFAR-10 benchmark's m = 0.99 at every step (update_momentum(..., 0.99)): the
    key encoder moves by 0.01 of the way to the encoder, at the start, half-way and at the end alike."""
    model = build("mocov2")
    with torch.no_grad():
        model.backbone[0].weight.add_(1.0)
    online, target = model.backbone[0].weight.clone(), model.target[0][0].weight.clone()
    model.after_step(progress)
    assert torch.allclose(model.target[0][0].weight, 0.99 * target + 0.01 * online, atol=1e-6)


# ------------------------------------------------------------------------------------------ the methods whole


SMALL = {"mocov2": {"queue_size": 16}, "swav": {"queue_size": 12, "prototypes": 7, "queue_start": 1}}


class TinyEncoder(torch.nn.Sequential):
    """A stand-in for the ResNet: what a method needs of a backbone is a forward and num_features."""

    def __init__(self):
        super().__init__(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.num_features = 16


def build(name, **options):
    torch.manual_seed(0)
    return ssl_methods.METHODS[name](TinyEncoder(), **{**SMALL.get(name, {}), **options})


@pytest.mark.parametrize("name", ["simclr", "byol", "mocov2", "swav"])
def test_each_method_trains_its_own_parts_under_mixed_precision(name):
    """The momentum encoder is out of the optimiser and needs no gradient; queues, targets and prototypes
    are in the state dict; the loss is float32 under bf16 autocast and reaches every trained parameter."""
    model = build(name)
    trained = {id(p) for group in model.param_groups() for p in group["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    if hasattr(model, "target"):
        assert not any(p.requires_grad for p in model.target.parameters())
        assert not trained & {id(p) for p in model.target.parameters()}
    views = [torch.randn(4, 3, 8, 8) for _ in model.view_names]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, z = model(views)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and z.shape == (4, model.out_dim)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    keys = model.state_dict()
    assert name not in SMALL or "queue" in keys
    assert ("target.0.0.weight" in keys) == (name in ("byol", "mocov2"))


def test_moco_enqueues_the_keys_of_the_momentum_encoder():
    model = build("mocov2")
    before = model.queue.clone()
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    model([x1, x2])
    keys = F.normalize(model.target[1](model.target[0](x2)), dim=1)  # train mode: the same batch statistics
    assert torch.allclose(model.queue[:4], keys, atol=1e-5)
    assert torch.equal(model.queue[4:], before[:-4])


def moco_step_in_one_of_two_processes(rank, init_file, state, x1, x2, out_dir):
    """One of two gloo processes: a MoCo v2 step on its half of the batch; saves its queue (the keys of both
    processes, gathered in rank order, hence those of the batch in its order) and its generator's state."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = build("mocov2")
    model.load_state_dict(state)
    model([x1.chunk(2)[rank], x2.chunk(2)[rank]])
    torch.save(dict(queue=model.queue, state=model.shuffle_state), out_dir / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.script
def test_moco_shuffles_the_key_encoders_batch_norm_over_two_processes(tmp_path):
    """Shuffling BN (He et al. §3.3; moco/builder.py _batch_shuffle_ddp, _batch_unshuffle_ddp): the 8 key
    images of two processes are permuted by the method's seeded generator, each process encodes its half of
    that order with its own BatchNorm statistics, and each key returns to its image's process, in order: the
    queue of both processes receives the 8 keys in the batch's own order. Computed here directly: the key
    encoder in train mode on each shuffled half alone. Without the shuffle (each process's own half) the keys
    differ."""
    model = build("mocov2")
    g = torch.Generator().manual_seed(15)
    x1, x2 = torch.randn(2, 8, 3, 8, 8, generator=g)
    torch.multiprocessing.spawn(
        moco_step_in_one_of_two_processes, (tmp_path / "init", model.state_dict(), x1, x2, tmp_path), nprocs=2
    )
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    generator = torch.Generator()
    generator.set_state(model.shuffle_state)
    order = torch.randperm(8, generator=generator)

    def keys_of(images):  # the key encoder in train mode: its BatchNorm over these images alone
        key_backbone, key_projector = model.target
        return F.normalize(key_projector(key_backbone(images)), dim=1).detach()

    expected = torch.empty(8, model.out_dim)
    for share in order.chunk(2):
        expected[share] = keys_of(x2[share])
    for part in parts:
        torch.testing.assert_close(part["queue"][:8], expected, rtol=0, atol=1e-5)
        assert torch.equal(part["state"], generator.get_state())  # drawn once, kept for a resumed run
    unshuffled = torch.cat([keys_of(half) for half in x2.chunk(2)])
    assert (unshuffled - expected).abs().max() > 1e-2


@pytest.mark.script
@pytest.mark.parametrize("name, synchronised", [("mocov2", False), ("simclr", True)])
def test_on_gpus_every_method_but_moco_gets_sync_batch_norm(monkeypatch, name, synchronised):
    """pretrain.distribute under torchrun on GPUs: SyncBatchNorm for the others, plain per-process BatchNorm
    for MoCo v2, whose shuffling BN would shuffle nothing if the key encoder's statistics were global (its
    main_moco.py has no SyncBatchNorm)."""
    monkeypatch.setattr(pretrain.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pretrain.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(pretrain.nn.parallel, "DistributedDataParallel", lambda module, device_ids: module)
    norms = {type(m).__name__ for m in pretrain.distribute(build(name), torch.device("cuda")).modules()}
    assert ("SyncBatchNorm" in norms) == synchronised and ("BatchNorm2d" in norms) != synchronised


def test_byol_target_follows_the_online_network_by_the_cosine_momentum():
    model = build("byol")
    with torch.no_grad():
        model.backbone[0].weight.add_(1.0)
    online, target = model.backbone[0].weight.clone(), model.target[0][0].weight.clone()
    model.after_step(0.5)
    assert torch.allclose(model.target[0][0].weight, 0.995 * target + 0.005 * online, atol=1e-6)


def test_swav_freezes_prototypes_two_epochs_and_queues_from_the_first_step(monkeypatch):
    """solo-learn's solo/methods/swav.py with its cifar/swav.yaml: no gradient reaches the prototypes while
    current_epoch < freeze_prototypes_epochs = 2 (our epochs 1 and 2), the queue takes the large crops'
    embeddings at every step, and Sinkhorn uses it from --queue-start on (once full)."""
    model = build("swav", multi_crop=True, queue_start=2)
    assert model.view_names == ("swav",) * 2 + ("swav_small",) * 6
    with_queue, swav_loss = [], ssl_methods.swav_loss
    monkeypatch.setattr(
        ssl_methods,
        "swav_loss",
        lambda z, c, t, queue=None: with_queue.append(queue is not None) or swav_loss(z, c, t, queue),
    )
    views = [torch.randn(4, 3, 8, 8)] * 2 + [torch.randn(4, 3, 3, 3)] * 6
    for epoch, batches in ((1, 3), (2, 1), (3, 1)):  # 12 queued embeddings: full after 3 batches of 4
        model.start_epoch(epoch)
        for _ in range(batches):
            loss, z = model(views)
            loss.backward()
            model.before_step(epoch)
            assert (model.prototypes.grad is None) == (epoch <= 2)
    assert with_queue == [False, False, False, True, True]
    assert torch.equal(model.queue[0, :4], z.detach())  # the newest first
    with torch.no_grad():
        model.prototypes.mul_(3)
    model.after_step(0.1)
    assert torch.allclose(model.prototypes.norm(dim=1), torch.ones(7))


def test_swav_head_runs_once_over_all_crops():
    """main_swav.py: the backbone once per resolution, the head once over the concatenation of every crop, so
    that its BatchNorm's statistics are over the large and the small crops together."""
    model = build("swav", multi_crop=True)
    batches = []
    model.projector[1].register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    views = [torch.randn(4, 3, 8, 8)] * 2 + [torch.randn(4, 3, 3, 3)] * 6
    model.start_epoch(1)
    model(views)
    assert batches == [4 * 8]


def test_simclr_views_at_32_px_and_below_are_the_cifar_recipe():
    """google-research/simclr's CIFAR-10 command (--color_jitter_strength=0.5 --use_blur=False; Chen et al.
    App. B.9): data_util.color_jitter's 0.8 s, 0.8 s, 0.8 s, 0.2 s at s = 0.5, and no blur; s = 1 above."""
    for size, strength in ((8, 0.5), (32, 0.5), (33, 1.0)):
        steps = ssl_methods.VIEWS["simclr"](size).transforms
        assert len(steps) == (4 if strength == 0.5 else 5)  # crop, flip, jitter, grey (, blur)
        colour = steps[2].transforms[0]
        ranges = [colour.brightness, colour.contrast, colour.saturation, colour.hue]
        s = strength
        assert np.allclose(ranges, [(1 - 0.8 * s, 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)])


def test_simclr_views_and_head_are_chen_et_als():
    """App. A: crop scale 0.08-1, a flip, colour jitter (0.8, 0.8, 0.8, 0.2) with p = 0.8, grey p = 0.2, blur
    p = 0.5; SimCLR v1's projection head (google-research/simclr 1.0, model_util.projection_head):
    Linear-BN-ReLU, then Linear-BN with neither bias nor ReLU; temperature 0.5 (App. B.9, lightly's
    NTXentLoss)."""
    model = build("simclr")
    assert model.view_names == ("simclr", "simclr") and model.temperature == 0.5
    crop, flip, jitter, grey, blur = ssl_methods.VIEWS["simclr"](224).transforms
    assert crop.scale == (0.08, 1.0) and (flip.p, jitter.p, grey.p, blur.p) == (0.5, 0.8, 0.2, 0.5)
    colour = jitter.transforms[0]
    ranges = [colour.brightness, colour.contrast, colour.saturation, colour.hue]
    assert np.allclose(ranges, [(1 - 0.8, 1 + 0.8)] * 3 + [(-0.2, 0.2)])
    assert isinstance(blur.transforms[0], datasets.RandomGaussianBlur)
    layers = list(model.projector)
    assert [type(m).__name__ for m in layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in layers if isinstance(m, torch.nn.Linear))  # a BN follows each
    output_norm = layers[-1]  # scaled, not centred: TensorFlow's center=False
    trained = {id(p) for group in model.param_groups() for p in group["params"]}
    assert id(output_norm.weight) in trained and id(output_norm.bias) not in trained
    assert not output_norm.bias.any()


def test_swav_multi_crop_views_have_two_sizes():
    large, small = ssl_methods.VIEWS["swav"](224), ssl_methods.VIEWS["swav_small"](224)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 240, 3), dtype=np.uint8))
    assert large(image).size == (224, 224) and small(image).size == (96, 96)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--temperature", "0.1"],
            "--temperature 0.1: --method simsiam has no such setting (it is one of simclr",
        ),
        (["--method", "byol", "--multi-crop"], "--multi-crop: --method byol has no such setting"),
        (["--method", "swav", "--projector", "paper"], "--projector paper: --method swav has no such"),
        (["--method", "mocov2", "--queue-size", "0"], "--queue-size 0: too small for mocov2"),
        (["--method", "byol", "--target-momentum", "1"], "--target-momentum 1.0: must be in [0, 1)"),
        (["--method", "simclr", "--temperature", "0"], "--temperature 0.0: must be positive"),
        (["--method", "swav", "--prototypes", "1"], "--prototypes 1: must be at least 2"),
        (["--projector", "three"], "--projector three: expected paper or simsiam"),
    ],
)
def test_a_flag_that_does_not_fit_the_method_is_refused(flags, message):
    parser = argparse.ArgumentParser()
    pretrain.add_method_args(parser)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    with pytest.raises(bit_common.UserError) as error:
        pretrain.resolve_method_args(parser.parse_args(flags))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_each_method_takes_its_own_defaults():
    parser = argparse.ArgumentParser()
    pretrain.add_method_args(parser)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    args = parser.parse_args(["--method", "swav", "--queue-size", "0"])
    pretrain.resolve_method_args(args)
    assert (args.lr, args.weight_decay, args.temperature, args.prototypes, args.queue_size) == (
        0.6,
        1e-6,
        0.1,
        3000,
        0,
    )
    assert (args.queue_start, args.freeze_prototypes) == (51, 2)  # solo-learn's 50, counted from 0; 2
    assert args.multi_crop is False
    assert args.target_momentum is None and args.projector is None
    args = parser.parse_args(["--method", "mocov2"])
    pretrain.resolve_method_args(args)  # lightly's MocoModel, the rest of the recipe in the optimiser's test
    assert (args.temperature, args.queue_size, args.target_momentum) == (0.1, 4096, 0.99)
    args = parser.parse_args([])
    pretrain.resolve_method_args(args)
    assert (args.method, args.lr, args.projector, args.temperature) == ("simsiam", 0.03, "paper", None)
    assert args.weight_decay == 5e-4


@pytest.mark.parametrize(
    "method, optimizer, lr, weight_decay",
    [
        ("swav", "LARS", 0.3, 1e-6),
        ("byol", "SGD", 0.06, 5e-4),
        ("simclr", "SGD", 0.06, 5e-4),
        ("mocov2", "SGD", 0.06, 5e-4),
    ],
)
def test_each_method_trains_with_the_optimiser_of_its_source(tmp_path, method, optimizer, lr, weight_decay):
    """At batch 128: solo-learn's cifar/swav.yaml, LARS lr 0.6 x 128/256, weight decay 1e-6, 3000 prototypes;
    lightly's CIFAR-10 benchmark, BYOLModel, SimCLRModel and MocoModel: SGD lr 0.06, momentum 0.9, weight
    decay 5e-4."""
    args = pretrain.parse_args(["--method", method, "--batch-size", "128", "--out", str(tmp_path)])
    optimiser = pretrain.make_optimizer(build(method), args)
    assert type(optimiser).__name__ == optimizer and optimiser.defaults["momentum"] == 0.9
    assert optimiser.defaults["lr"] == pytest.approx(lr)
    assert getattr(optimiser, "decay", optimiser.defaults["weight_decay"]) == weight_decay
    assert ssl_methods.SwAV.defaults["prototypes"] == 3000


def test_lars_step_against_solo_learns_formula():
    """solo-learn's LARS (eta 0.02, clip_lr, exclude_bias_n_norm), written out in NumPy: a weight's gradient
    plus its decay, scaled by min(eta |w| / (|g| + wd |w|) / lr, 1), then SGD with momentum; a bias (one
    dimension) plain SGD, without decay. Two steps, so that the momentum buffer counts."""
    g = torch.Generator().manual_seed(14)
    weight, bias = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    lr, momentum, decay, eta = 0.3, 0.9, 1e-2, 0.02
    params = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    optimiser = ssl_methods.LARS([{"params": params}], lr=lr, momentum=momentum, weight_decay=decay)
    w, b = weight.double().numpy(), bias.double().numpy()
    buffers = [None, None]
    for step, scale in enumerate((1e-3, 1.0)):  # a tiny gradient: the ratio is clipped at 1; then below 1
        grads = [torch.randn(5, 4, generator=g) * scale, torch.randn(5, generator=g)]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimiser.step()
        gw, gb = (x.double().numpy() for x in grads)
        trust = min(eta * np.linalg.norm(w) / (np.linalg.norm(gw) + decay * np.linalg.norm(w)) / lr, 1)
        assert (trust == 1) == (step == 0)
        steps = [(gw + decay * w) * trust, gb]
        buffers = [d if step == 0 else momentum * buf + d for buf, d in zip(buffers, steps)]
        w, b = w - lr * buffers[0], b - lr * buffers[1]
        assert np.allclose(params[0].detach().numpy(), w, atol=1e-5)
        assert np.allclose(params[1].detach().numpy(), b, atol=1e-5)


@pytest.mark.script
def test_momentum_follows_the_cosines_horizon_not_the_last_epoch(tmp_path, monkeypatch):
    """With --cosine-epochs 2 --epochs 1 (the authors' 800-of-400, shrunk) the lr ends at half its cosine and
    the momentum schedule at half its progress; over the horizon the progress reaches 1, and --epochs plays no
    part, so that a run extended with --resume --epochs N goes on where it stopped."""
    seen = []
    after_step = ssl_methods.BYOL.after_step
    monkeypatch.setattr(ssl_methods.BYOL, "after_step", lambda self, p: (seen.append(p), after_step(self, p)))
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())  # any network
    args = tiny_args(tmp_path, epochs=1) + ["--method", "byol", "--cosine-epochs", "2"]
    assert pretrain.main(args) == 0
    steps = 6  # 180 images in batches of 30
    assert seen == pytest.approx([k / (2 * steps) for k in range(1, steps + 1)])
    assert pretrain.momentum_progress(800 * 5, 5, 800) == 1.0
    assert pretrain.momentum_progress(400 * 5, 5, 800) == 0.5
    assert (
        pretrain.momentum_progress(900 * 5, 5, 800) == 1.0
    )  # past the horizon: the momentum stays at its end


def test_local_infonce_runs_in_float32_under_autocast():
    """Like every other loss: under bf16 autocast its logits (cosines / 0.2) are not rounded to bf16."""
    g = torch.Generator().manual_seed(13)
    map1, map2 = torch.randn(2, 3, 64, 4, 4, generator=g)
    regions = torch.rand(2, 3, 4, 2, generator=g).sort(-1).values  # (view, image, region, x0 y0 x1 y1)
    regions = torch.stack(
        [regions[..., 0, 0], regions[..., 1, 0], regions[..., 0, 1], regions[..., 1, 1]], -1
    )
    regions = regions.view(2, 3, 1, 4).repeat(1, 1, 4, 1) * torch.linspace(0.5, 1, 4).view(1, 1, 4, 1)
    overlaps = torch.ones(3, dtype=torch.bool)
    exact = ssl_methods.local_infonce(map1, map2, regions[0], regions[1], overlaps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ssl_methods.local_infonce(map1, map2, regions[0], regions[1], overlaps)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(exact.item(), rel=1e-6)
