"""The four interventions of issue 9, functions of the weights and of the views: Ciga et al.'s weight scaling
and filter selection (reconstructions, arXiv 2109.01721), Hassanpour et al.'s whitening (IterNorm) and local
loss.
Expectations come from formulas, NumPy or hand-made geometry, never from the code's own output."""

import copy
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import bit_convert
import interventions
import pretrain
import ssl_methods
from bit_common import UserError


def randomize_norms(model, seed=0):
    """Pretrained-looking norms: gamma and beta (and BN statistics) away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def one_line_user_error(call, *words):
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


# ------------------------------------------------------------------------------------------- shrink (Ciga)


def small_net(norm):
    """Three BiT units (one with a projection and a stride) and a final norm: a ResNetV2 in miniature."""
    torch.manual_seed(0)
    make_norm = partial(nn.GroupNorm, 4) if norm == "gn" else nn.BatchNorm2d
    units = [(16, 8, 32, 1), (32, 8, 32, 1), (32, 16, 64, 2)]
    net = nn.Sequential(
        *[bit_convert.PreActBottleneck(*u, make_norm, bit_convert.StdConv2d) for u in units], make_norm(64)
    )
    return randomize_norms(net)


def test_shrink_multiplies_every_parameter_and_keeps_every_buffer():
    model = small_net("bn")
    before = copy.deepcopy(model)
    interventions.shrink(model, 0.4)
    for (name, new), old in zip(model.named_parameters(), before.parameters()):
        np.testing.assert_allclose(new.detach().numpy(), 0.4 * old.detach().numpy(), rtol=1e-6, err_msg=name)
    for (name, new), old in zip(model.named_buffers(), before.buffers()):
        assert torch.equal(new, old), name


def test_shrinking_the_kernels_of_a_ws_network_changes_nothing_but_the_norms_do():
    """A weight-standardised conv divides its kernel's scale out: the shrunk network computes what the
    network with only its norms' gamma/beta scaled computes, and that differs from the original."""
    net, x = small_net("gn"), torch.randn(2, 16, 8, 8)
    shrunk, norms_only = interventions.shrink(copy.deepcopy(net), 0.3), copy.deepcopy(net)
    with torch.no_grad():
        for m in norms_only.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.mul_(0.3), m.bias.mul_(0.3)
        expected, original, out = norms_only(x), net(x), shrunk(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (out - original).abs().max() > 0.1


@pytest.mark.parametrize("cin, cout, stride", [(16, 16, 1), (16, 32, 2)])
def test_shrink_scales_each_residual_branch_and_each_projection(cin, cout, stride):
    """A unit without projection: x + f * branch(x); with one (shortcut and branch read norm1): f * out."""
    torch.manual_seed(0)
    unit = bit_convert.PreActBottleneck(cin, 8, cout, stride, partial(nn.GroupNorm, 4), bit_convert.StdConv2d)
    randomize_norms(unit)
    x = torch.randn(3, cin, 6, 6)
    with torch.no_grad():
        old = unit(x)
        new = interventions.shrink(unit, 0.25)(x)
    expected = 0.25 * old if unit.proj is not None else x + 0.25 * (old - x)
    torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-5)


def test_shrinking_a_standardised_kernel_divides_its_gradient_by_the_factor():
    """The effective step: the gradient of a scale-invariant function scales as 1/factor, so SGD moves the
    shrunk kernel 1/factor^2 further relative to its size."""
    torch.manual_seed(0)
    conv, x, r = bit_convert.StdConv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    (conv(x) * r).sum().backward()
    before = conv.weight.grad.clone()
    conv.weight.grad = None
    interventions.shrink(conv, 0.5)
    (conv(x) * r).sum().backward()
    torch.testing.assert_close(conv.weight.grad, before / 0.5, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("factor", [0, -0.5, 1.5])
def test_shrink_outside_zero_one_is_a_one_line_error(factor):
    one_line_user_error(lambda: interventions.shrink(nn.Linear(2, 2), factor), "--shrink", "(0, 1]")


# -------------------------------------------------------------------------------- filter selection (Ciga)


NORM_AFTER = {"conv1": "norm2", "conv2": "norm3"}  # big_transfer: the unit's norm-ReLU-conv order
NORM_TENSORS = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}  # and a fresh BN's


@pytest.mark.heavy
def test_select_filters_keeps_the_responding_filters_and_reinitialises_the_rest():
    torch.manual_seed(0)
    model = randomize_norms(bit_convert.resnet_v2("r50x1", norm="bn"))
    with torch.no_grad():  # a zero kernel standardises to zero: its filter's output, hence its score, is 0
        model.blocks[0][0].conv1.weight[0::2] = 0
        model.blocks[2][3].conv2.weight[:128] = 0
    before = copy.deepcopy(model)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    kept = interventions.select_filters(
        model, images, 0.5, torch.device("cpu"), torch.Generator().manual_seed(1)
    )

    assert torch.equal(kept["blocks.0.0.conv1"], torch.arange(1, 64, 2))
    assert torch.equal(kept["blocks.2.3.conv2"], torch.arange(128, 256))
    assert len(kept) == 2 * 16 and model.training  # conv1 and conv2 of 16 units; the mode restored
    touched = set()
    for name, keep in kept.items():
        conv, old_conv = model.get_submodule(name), before.get_submodule(name)
        norm_name = f"{name.rsplit('.', 1)[0]}.{NORM_AFTER[name[-5:]]}"
        norm, old_norm = model.get_submodule(norm_name), before.get_submodule(norm_name)
        assert len(keep) == conv.out_channels // 2
        dropped = torch.tensor(sorted(set(range(conv.out_channels)) - set(keep.tolist())))
        bound = 1 / math.sqrt(conv.weight[0].numel())  # PyTorch's Conv2d init: U(-1/sqrt(fan_in), ...)
        assert torch.equal(conv.weight[keep], old_conv.weight[keep])
        fresh = conv.weight[dropped]
        assert fresh.abs().max() <= bound and not torch.equal(fresh, old_conv.weight[dropped])
        assert fresh.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        for attr, value in NORM_TENSORS.items():
            assert torch.equal(getattr(norm, attr)[keep], getattr(old_norm, attr)[keep]), (name, attr)
            assert torch.all(getattr(norm, attr)[dropped] == value), (name, attr)
        touched |= {f"{name}.weight"} | {f"{norm_name}.{attr}" for attr in NORM_TENSORS}
    old_state = before.state_dict()
    for key, value in model.state_dict().items():
        if key not in touched:  # stem, conv3, projections, norm1, the final norm, every BN statistic
            assert torch.equal(value, old_state[key]), key


@pytest.mark.parametrize("fraction", [0, -0.1, 1.2])
def test_select_filters_outside_zero_one_is_a_one_line_error(fraction):
    call = lambda: interventions.select_filters(None, None, fraction, torch.device("cpu"))  # noqa: E731
    one_line_user_error(call, "--select-filters", "(0, 1]")


# ------------------------------------------------------------------------------- IterNorm (Hassanpour, Huang)


def correlated_batch(seed=0, n=16, c=6, hw=4):
    """Channels mixed by a random rotation with variances 1 to 4: correlated, and well conditioned."""
    g = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(c, c, generator=g))[0]
    mixing = rotation * torch.linspace(1, 2, c)
    z = torch.randn(n, c, hw, hw, generator=g)
    return torch.einsum("dc,nchw->ndhw", mixing, z) + torch.randn(1, c, 1, 1, generator=g) * 3


def positions(x):
    """(N*H*W, C) float64 NumPy: one row per position."""
    return x.detach().double().numpy().transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def numpy_zca(rows, eps=1e-5):
    """(mean, Sigma^(-1/2)) by an eigendecomposition, Sigma = the biased covariance + eps I."""
    mean = rows.mean(0)
    sigma = np.cov(rows - mean, rowvar=False, bias=True) + eps * np.eye(rows.shape[1])
    values, vectors = np.linalg.eigh(sigma)
    return mean, vectors @ np.diag(values**-0.5) @ vectors.T


def test_iternorm_whitens_a_batch_closer_with_every_iteration_and_converges_to_zca():
    x = correlated_batch()
    errors = []
    for t in (1, 2, 3, 5, 10):
        out = positions(bit_convert.IterNorm(6, iterations=t).train()(x))
        errors.append(np.abs(np.cov(out, rowvar=False, bias=True) - np.eye(6)).max())
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-3
    assert errors[3] < 0.1  # T = 5, the default: nearly there on a well-conditioned batch
    mean, inv_sqrt = numpy_zca(positions(x))
    np.testing.assert_allclose(out, (positions(x) - mean) @ inv_sqrt.T, atol=2e-3)


def test_iternorm_affine_is_per_channel():
    x, norm = correlated_batch(), bit_convert.IterNorm(6)
    plain = norm(x).detach()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0)), norm.bias.copy_(torch.arange(6.0) - 3)
    expected = plain * torch.arange(1.0, 7.0)[:, None, None] + (torch.arange(6.0) - 3)[:, None, None]
    torch.testing.assert_close(norm(x), expected)


def test_iternorm_eval_mode_uses_the_running_statistics():
    x, y = correlated_batch(0), correlated_batch(1)
    norm = bit_convert.IterNorm(6, iterations=10).train()
    norm(x)
    mean, inv_sqrt = numpy_zca(positions(x))
    running_mean, running_whitening = 0.1 * mean, 0.9 * np.eye(6) + 0.1 * inv_sqrt  # momentum 0.1 from (0, I)
    np.testing.assert_allclose(norm.running_mean.double().numpy(), running_mean, atol=1e-5)
    np.testing.assert_allclose(norm.running_whitening.double().numpy(), running_whitening, atol=1e-4)
    out = positions(norm.eval()(y))
    np.testing.assert_allclose(out, (positions(y) - running_mean) @ running_whitening.T, rtol=1e-4, atol=1e-4)
    assert np.abs(out - positions(norm.train()(y))).max() > 0.1  # train mode would use y's own statistics


def test_iternorm_momentum_none_is_a_cumulative_average_and_reset_starts_afresh():
    norm = bit_convert.IterNorm(6, momentum=None)
    batches = [correlated_batch(s) for s in range(3)]
    for x in batches:
        norm(x)
    expected = np.mean([positions(x).mean(0) for x in batches], axis=0)
    np.testing.assert_allclose(norm.running_mean.double().numpy(), expected, atol=1e-5)
    norm.reset_running_stats()
    assert torch.equal(norm.running_whitening, torch.eye(6)) and not norm.running_mean.any()


def test_gradients_flow_through_iternorm_into_input_and_affine():
    x = correlated_batch().requires_grad_()
    norm = bit_convert.IterNorm(6)
    (norm(x) * torch.randn(x.shape)).sum().backward()
    for grad in (x.grad, norm.weight.grad, norm.bias.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def iternorms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, bit_convert.IterNorm)}


def test_whiten_at_the_final_norm_replaces_it_and_groupnorm_is_refused():
    backbone = bit_convert.resnet_v2("r50x1", norm="bn")
    blocks = backbone.blocks
    bit_convert.whiten(backbone, at="final")
    assert isinstance(backbone.norm, bit_convert.IterNorm) and backbone.norm.num_features == 2048
    assert backbone.blocks is blocks and list(iternorms(backbone)) == ["norm"]
    one_line_user_error(
        lambda: bit_convert.whiten(bit_convert.resnet_v2("r50x1", norm="gn")), "--whiten", "--norm bn"
    )


def test_whiten_by_default_whitens_the_end_of_the_last_units_branch_as_the_source():
    """Hassanpour et al. replace layer4[-1].bn3: the last unit outputs IterNorm(branch) + identity. Here the
    last unit's output, minus its input (the identity shortcut), must be an IterNorm (tested against NumPy's
    ZCA above) of the branch computed by hand, and the final norm stays a BatchNorm."""
    torch.manual_seed(0)
    units = [
        bit_convert.PreActBottleneck(c, 8, 16, 1, nn.BatchNorm2d, bit_convert.StdConv2d) for c in (8, 16)
    ]
    mini = nn.Module()  # what whiten needs of a ResNetV2: its kind of norm, its blocks, its final norm
    mini.norm_kind, mini.blocks, mini.norm = "bn", nn.Sequential(nn.Sequential(*units)), nn.BatchNorm2d(16)
    bit_convert.whiten(mini)
    last = mini.blocks[-1][-1]
    assert mini.whitened == "branch" and isinstance(mini.norm, nn.BatchNorm2d)
    assert list(iternorms(mini)) == ["blocks.0.1.branch_norm"] and last.branch_norm.num_features == 16
    x = torch.randn(64, 16, 4, 4)
    with torch.no_grad():
        out = last.train()(x)
        branch = last.conv1(F.relu(last.norm1(x)))
        branch = last.conv3(F.relu(last.norm3(last.conv2(F.relu(last.norm2(branch))))))
        torch.testing.assert_close(out - x, bit_convert.IterNorm(16)(branch), rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_a_whitened_backbone_file_loads_as_the_whitened_network(tmp_path):
    backbone = bit_convert.whiten(bit_convert.resnet_v2("r50x1", norm="bn", cifar_stem=True))
    with torch.no_grad():
        backbone.blocks[-1][-1].branch_norm.running_whitening.mul_(0.5)  # not what a fresh IterNorm holds
    bit_convert.save_backbone(backbone, tmp_path / "w.pt", epoch=1)
    loaded, meta = bit_convert.load_backbone(tmp_path / "w.pt")
    assert meta["whiten"] == "branch" and list(iternorms(loaded)) == ["blocks.3.2.branch_norm"]
    torch.testing.assert_close(loaded.state_dict(), backbone.state_dict(), rtol=0, atol=0)


@pytest.mark.heavy
def test_a_file_of_the_earlier_placement_still_loads_with_its_final_norm_whitened(tmp_path):
    """Files written before the placement could be chosen record whiten = True: the final norm's."""
    backbone = bit_convert.whiten(bit_convert.resnet_v2("r50x1", norm="bn", cifar_stem=True), at="final")
    ckpt = dict(arch="r50x1", norm="bn", cifar_stem=True, head_size=0, ws=True, whiten=True)
    torch.save({**ckpt, "state_dict": backbone.state_dict()}, tmp_path / "old.pt")
    loaded, _ = bit_convert.load_backbone(tmp_path / "old.pt")
    assert list(iternorms(loaded)) == ["norm"]


def whiten_half_batches(rank, init_file, x, g, out_dir):
    """One of two gloo processes: a synchronised IterNorm on its half of x, the loss sum(out * g) of its half;
    and an IterNorm that was not synchronised on the same half."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
    alone = bit_convert.IterNorm(x.shape[1])(x[half])
    part = x[half].clone().requires_grad_()
    norm = bit_convert.synchronise_whitening(bit_convert.IterNorm(x.shape[1]))
    out = norm(part)
    (out * g[half]).sum().backward()
    saved = dict(out=out.detach(), grad=part.grad, alone=alone.detach(), **norm.state_dict())
    torch.save(saved, out_dir / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.script
def test_iternorm_over_two_processes_whitens_their_global_batch(tmp_path):
    """As SyncBatchNorm: two processes with half a batch each whiten it as one process whitens all of it,
    give each half the gradient of the whole batch's loss, and agree on the running statistics, once
    synchronise_whitening has made the IterNorm distributed (pretrain.distribute). Before that it whitens
    each process's own half and issues no collective, even with the process group up: code that one process
    runs alone (the epoch-0 row) must not start one."""
    x, g = correlated_batch(n=16), torch.randn(16, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.multiprocessing.spawn(whiten_half_batches, (tmp_path / "init", x, g, tmp_path), nprocs=2)
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    for part, half in zip(parts, x.chunk(2)):
        alone = bit_convert.IterNorm(6)(half).detach()
        torch.testing.assert_close(part["alone"], alone, rtol=0, atol=1e-5)
    whole, norm = x.clone().requires_grad_(), bit_convert.IterNorm(6)
    out = norm(whole)
    (out * g).sum().backward()
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), out.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), whole.grad, rtol=0, atol=1e-5)
    for part in parts:
        for name, value in norm.state_dict().items():
            torch.testing.assert_close(part[name], value, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- local loss (Hassanpour): geometry


def ramp_image(width=256, height=192):
    """R = the column, G = the row: every pixel says where it is."""
    rows, cols = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8))


def test_located_crop_returns_the_box_and_flip_that_made_the_view():
    source, size = ramp_image(), 64
    crop, flips = ssl_methods.LocatedCrop(size), set()
    for seed in range(8):
        torch.manual_seed(seed)
        view, box, flipped = crop(source)
        flips.add(flipped)
        x0, y0, x1, y1 = box.tolist()
        pixels = np.asarray(view).astype(float)
        c = np.arange(2, size - 2)  # away from the borders, where resampling filters are cut off
        u = x0 + (c + 0.5) / size * (x1 - x0)  # normalised source x of each view column
        u = u[::-1] if flipped else u
        v = y0 + (c + 0.5) / size * (y1 - y0)
        np.testing.assert_allclose(pixels[size // 2, c, 0], u * 256 - 0.5, atol=1.0)
        np.testing.assert_allclose(pixels[c, size // 2, 1], v * 192 - 0.5, atol=1.0)
    assert flips == {True, False}


def test_located_view_adds_simsiam_colour_steps_after_the_crop():
    def names(transforms):
        return [type(getattr(t, "transforms", [t])[0]).__name__ for t in transforms]

    assert names(ssl_methods.located_view(64).then.transforms) == [
        "ColorJitter",
        "RandomGrayscale",
        "RandomGaussianBlur",
    ]
    assert names(ssl_methods.located_view(32).then.transforms) == [
        "ColorJitter",
        "RandomGrayscale",
    ]  # no blur
    view, box, flipped = ssl_methods.located_view(64)(ramp_image())
    assert view.size == (64, 64) and box.shape == (4,) and isinstance(flipped, bool)


def test_matched_regions_of_hand_made_crops_with_and_without_flips():
    """Crops (0, 0, 0.6, 0.8) and (0.2, 0.4, 1, 1) overlap in (0.2, 0.4, 0.6, 0.8); a 2 x 2 grid of it, row by
    row, seen in each view (x / 0.6, y / 0.8 and (x - 0.2) / 0.8, (y - 0.4) / 0.6), mirrored where flipped.
    A fourth pair does not overlap."""
    box1 = torch.tensor([[0, 0, 0.6, 0.8]] * 3 + [[0, 0, 0.3, 0.3]], dtype=torch.float64)
    box2 = torch.tensor([[0.2, 0.4, 1, 1]] * 3 + [[0.5, 0.5, 1, 1]], dtype=torch.float64)
    flip1, flip2 = torch.tensor([False, True, False, False]), torch.tensor([False, False, True, False])
    regions1, regions2, overlaps = ssl_methods.matched_regions(box1, flip1, box2, flip2, grid=2)
    third, quarter = 1 / 3, 1 / 4
    view1 = [
        [third, 0.5, 2 * third, 0.75],
        [2 * third, 0.5, 1, 0.75],
        [third, 0.75, 2 * third, 1],
        [2 * third, 0.75, 1, 1],
    ]
    view1_flipped = [
        [third, 0.5, 2 * third, 0.75],
        [0, 0.5, third, 0.75],
        [third, 0.75, 2 * third, 1],
        [0, 0.75, third, 1],
    ]
    view2 = [
        [0, 0, quarter, third],
        [quarter, 0, 0.5, third],
        [0, third, quarter, 2 * third],
        [quarter, third, 0.5, 2 * third],
    ]
    view2_flipped = [
        [0.75, 0, 1, third],
        [0.5, 0, 0.75, third],
        [0.75, third, 1, 2 * third],
        [0.5, third, 0.75, 2 * third],
    ]
    for n, (expected1, expected2) in enumerate(
        [(view1, view2), (view1_flipped, view2), (view1, view2_flipped)]
    ):
        np.testing.assert_allclose(regions1[n].numpy(), expected1, atol=1e-12)
        np.testing.assert_allclose(regions2[n].numpy(), expected2, atol=1e-12)
    assert overlaps.tolist() == [True, True, True, False]


def test_matched_regions_of_real_views_show_the_same_source_pixels():
    """Two LocatedCrop views of the ramp image: each matched region's mean R and G (the source column and row)
    is the same in both views, and is the region's centre in the source."""
    source, size = ramp_image(), 64
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        (view1, box1, flip1), (view2, box2, flip2) = (
            ssl_methods.LocatedCrop(size)(source),
            ssl_methods.LocatedCrop(size)(source),
        )
        r1, r2, overlaps = ssl_methods.matched_regions(
            box1[None], torch.tensor([flip1]), box2[None], torch.tensor([flip2]), 3
        )
        if (
            not overlaps[0]
            or (torch.minimum(box1[2:], box2[2:]) - torch.maximum(box1[:2], box2[:2])).min() < 0.15
        ):
            continue
        means = []
        for view, regions in ((view1, r1), (view2, r2)):
            pixels = torch.from_numpy(np.asarray(view).astype(np.float32)).permute(2, 0, 1)[None, :2]
            boxes = regions[0] * size
            means.append(
                ssl_methods.roi_align(pixels, [boxes], output_size=1, aligned=True).flatten(1).numpy()
            )
        lo, hi = torch.maximum(box1[:2], box2[:2]), torch.minimum(box1[2:], box2[2:])
        cells = (torch.arange(3) + 0.5) / 3
        centres_x = (lo[0] + cells * (hi[0] - lo[0])).repeat(3).numpy() * 256 - 0.5
        centres_y = (lo[1] + cells * (hi[1] - lo[1])).repeat_interleave(3).numpy() * 192 - 0.5
        np.testing.assert_allclose(means[0], means[1], atol=2.0)
        np.testing.assert_allclose(means[0], np.stack([centres_x, centres_y], 1), atol=2.0)
        checked += 1
    assert checked >= 2


# ----------------------------------------------------------------------------- local loss (Hassanpour): loss


def test_local_infonce_against_a_brute_force_loop():
    """Regions on the cell edges of an 8 x 8 map: roi_align's average is then the mean of the cells inside."""
    g = torch.Generator().manual_seed(0)
    map1, map2 = (
        torch.randn(3, 5, 8, 8, generator=g, requires_grad=True),
        torch.randn(3, 5, 8, 8, generator=g),
    )
    corners = torch.randint(0, 7, (2, 3, 4, 2), generator=g)
    sizes = torch.randint(1, 3, (2, 3, 4, 2), generator=g)
    regions = torch.cat([corners, corners + sizes], -1).float() / 8  # (view, image, region, x0 y0 x1 y1)
    overlaps = torch.tensor([True, False, True])
    loss = ssl_methods.local_infonce(map1, map2, regions[0], regions[1], overlaps, temperature=0.2)

    def pooled(feature_map, box):
        x0, y0, x1, y1 = (box * 8).round().long().tolist()
        v = feature_map[:, y0:y1, x0:x1].mean((1, 2))
        return v / v.norm()

    terms = []
    for n in (0, 2):
        f1 = [pooled(map1[n], regions[0, n, r]) for r in range(4)]
        f2 = [pooled(map2[n], regions[1, n, r]) for r in range(4)]
        for queries, keys in ((f1, f2), (f2, f1)):
            for r in range(4):
                logits = torch.stack([queries[r] @ k / 0.2 for k in keys])
                terms.append(-(logits[r] - torch.logsumexp(logits, 0)))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert map1.grad[[0, 2]].abs().sum() > 0 and not map1.grad[1].any()  # image 1's crops do not overlap


def test_local_infonce_without_any_overlap_is_zero_and_still_differentiable():
    map1 = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss = ssl_methods.local_infonce(
        map1, torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4), torch.rand(2, 4, 4), torch.tensor([False, False])
    )
    loss.backward()
    assert loss.item() == 0 and map1.grad is not None


# --------------------------------------------------------------------------------------- wired in pretrain.py


@pytest.mark.script
def test_the_interventions_in_one_pretraining_run(tmp_path):
    """MoCo v2 with the local loss (views that record their crops), from a .pt backbone with its filters
    selected and shrunk: the run trains (one step: 36 pretrain images, a batch of 30). --whiten is only built
    here: a 2048-channel IterNorm takes seconds a step on the CPU (its own tests above use small widths)."""
    from helpers import tiny_args

    bit_convert.save_backbone(bit_convert.resnet_v2("r50x1", "bn", cifar_stem=True), tmp_path / "init.pt")
    interventions = [
        "--select-filters",
        "0.5",
        "--shrink",
        "0.5",
        "--local-weight",
        "0.5",
        "--local-grid",
        "2",
    ]
    argv = tiny_args(tmp_path, epochs=1) + ["--init", str(tmp_path / "init.pt"), "--method", "mocov2"]
    argv[argv.index("--split") + 1] = "0.02,0.02,0.02,0.94"
    assert pretrain.main(argv + interventions + ["--queue-size", "60"]) == 0
    backbone, meta = bit_convert.load_backbone(tmp_path / "run" / "backbone.pt")
    assert meta["method"] == "mocov2" and not meta["whiten"]
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (args["shrink"], args["select_filters"], args["local_weight"]) == (0.5, 0.5, 0.5)
    args = pretrain.parse_args(argv + ["--whiten", "--out", str(tmp_path / "whitened")])
    method = pretrain.prepare_method(args, None, None, torch.device("cpu"))
    assert list(iternorms(method.backbone)) == list(iternorms(method.target[0])) == ["blocks.3.2.branch_norm"]


@pytest.mark.script
def test_a_second_pretraining_starts_from_a_whitened_backbone_as_it_is(tmp_path):
    """pretrain.py --init DIR/backbone.pt of a whitened backbone: the method's backbone is that network, its
    IterNorm's running statistics the file's, with or without --whiten; another placement is refused."""
    from helpers import tiny_args

    backbone = bit_convert.whiten(bit_convert.resnet_v2("r50x1", "bn", cifar_stem=True))
    with torch.no_grad():
        backbone.blocks[-1][-1].branch_norm.running_whitening.mul_(0.5)  # not what a fresh IterNorm holds
        backbone.blocks[-1][-1].branch_norm.running_mean.fill_(0.25)
    bit_convert.save_backbone(backbone, tmp_path / "whitened.pt", method="simsiam")
    saved = torch.load(tmp_path / "whitened.pt")["state_dict"]
    argv = tiny_args(tmp_path) + ["--init", str(tmp_path / "whitened.pt")]
    for whiten in ([], ["--whiten"]):
        method = pretrain.prepare_method(pretrain.parse_args(argv + whiten), None, None, torch.device("cpu"))
        assert list(iternorms(method.backbone)) == ["blocks.3.2.branch_norm"]
        torch.testing.assert_close(method.backbone.state_dict(), saved, rtol=0, atol=0)
    one_line_user_error(
        lambda: pretrain.parse_args(argv + ["--whiten", "final"]), "--whiten final", "whitened at branch"
    )


@pytest.mark.script
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init", "INIT", "--shrink", "0"], "argument --shrink: 0: expected a number in (0, 1]"),
        (["--init", "INIT", "--select-filters", "1.5"], "--select-filters: 1.5: expected a number in (0, 1]"),
        (["--shrink", "0.5"], "--shrink: changes pretrained weights before a second pretraining"),
        (["--whiten", "--norm", "gn"], "--whiten: needs a BatchNorm backbone"),
        (["--local-weight", "0.5", "--method", "simclr"], "--local-weight 0.5: --method simclr has no such"),
        (["--local-weight", "-1", "--method", "mocov2"], "--local-weight -1.0: must not be negative"),
    ],
)
def test_interventions_that_do_not_fit_are_one_line(tmp_path, capsys, extra, message):
    from helpers import tiny_args

    bit_convert.save_backbone(bit_convert.resnet_v2("r50x1", "bn", cifar_stem=True), tmp_path / "init.pt")
    extra = [str(tmp_path / "init.pt") if e == "INIT" else e for e in extra]
    with pytest.raises((UserError, SystemExit)) as e:  # SystemExit: argparse's error, a flag's type
        pretrain.parse_args(tiny_args(tmp_path) + extra)
    text = capsys.readouterr().err.strip() if e.type is SystemExit else str(e.value)
    assert "\n" not in text and message in text
    assert not (tmp_path / "run").exists()
