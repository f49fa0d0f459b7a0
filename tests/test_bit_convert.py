"""Tests of bit_convert.py against BiT's .npz layout and formulas as big_transfer's models.py has them.

The synthetic .npz files are built from BiT's key table (never from bit_convert.bit_keys), and the
model is mapped to those keys by this file's own walk, so the loader is checked against an independent
description.
"""

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bit_common  # noqa: E402
import bit_convert  # noqa: E402
from helpers import (
    HEAD_BIAS,
    HEAD_KERNEL,
    R50,
    R101,
    REPO,
    ROOT_KEY,
    bit_layout,
    closed_port_url,
    failure,
    hwio_to_oihw,
    model_tensors,
    random_bit_arrays,
    write_npz,
    zero_bit_arrays,
)

R50X1_BACKBONE_PARAMS = 23_500_352


# ----------------------------------------------------------- the BiT layout, written from BiT's key table


def export_npz(model, path):
    """The model written out in the BiT layout: OIHW -> HWIO."""
    arrays = {}
    for key, t in model_tensors(model).items():
        a = t.detach().numpy()
        arrays[key] = a.transpose(2, 3, 1, 0).copy() if a.ndim == 4 else a.copy()
    np.savez(path, **arrays)
    return arrays


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------- independent references


def np_standardize(w):
    """BiT's weight standardisation in float64 NumPy: per output channel, biased variance, eps 1e-10."""
    w = w.detach().double().numpy()
    mean = w.mean(axis=(1, 2, 3), keepdims=True)
    var = ((w - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
    return torch.from_numpy((w - mean) / np.sqrt(var + 1e-10)).float()


def ref_conv(x, conv, stride=1, padding=0):
    return F.conv2d(x, np_standardize(conv.weight), stride=stride, padding=padding)


def np_zero_pad_max_pool(x):
    """Zero pad of 1, then a 3x3 stride-2 max-pool with no padding, one output position at a time."""
    n, c, h, w = x.shape
    p = np.zeros((n, c, h + 2, w + 2), x.dtype)
    p[:, :, 1:-1, 1:-1] = x
    oh, ow = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = p[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(2, 3))
    return out


def ref_unit(unit, x, stride):
    """BiT's unit (big_transfer PreActBottleneck); the stride goes on the 3x3 conv and the projection."""
    out = F.relu(unit.norm1(x))
    shortcut = ref_conv(out, unit.proj, stride) if unit.proj is not None else x
    out = ref_conv(out, unit.conv1)
    out = ref_conv(F.relu(unit.norm2(out)), unit.conv2, stride, 1)
    out = ref_conv(F.relu(unit.norm3(out)), unit.conv3)
    return out + shortcut


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small CPU convolutions run steadier on one thread, above all while other processes share the two
    cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """(path, arrays) of a synthetic BiT-M-R50x1-shaped .npz with random float32 values."""
    arrays = random_bit_arrays(R50)
    return write_npz(tmp_path_factory.mktemp("npz") / "BiT-M-R50x1.npz", arrays), arrays


@pytest.fixture(scope="module")
def loaded(r50):
    """{norm: r50x1 model loaded from the synthetic file}."""
    return {
        norm: bit_convert.load_npz(bit_convert.resnet_v2("r50x1", norm=norm), r50[0]) for norm in ("gn", "bn")
    }


@pytest.fixture(scope="module")
def saved_bn_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt") / "bn.pt"
    bit_convert.save_backbone(bit_convert.resnet_v2("r50x1", norm="bn"), path)
    return path


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t.ndim == 1 else 0.0))
            if t.ndim == 1:
                t.abs_()  # keeps BN running_var positive; harmless elsewhere
    return model


# ------------------------------------------------------------------------------ 1, 2: the layout and the copy


@pytest.mark.heavy
def test_synthetic_r50x1_file_has_153_keys(r50):
    assert len(r50[1]) == 153
    assert len(np.load(r50[0]).files) == 153


@pytest.mark.heavy
@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_r50x1_file_loads_and_backbone_has_reference_parameter_count(loaded, norm):
    model = loaded[norm]
    assert sum(p.numel() for p in model.parameters()) == R50X1_BACKBONE_PARAMS
    norm_type = nn.GroupNorm if norm == "gn" else nn.BatchNorm2d
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(norms) == 16 * 3 + 1 and all(type(m) is norm_type for m in norms)
    if norm == "gn":
        assert all(m.num_groups == 32 for m in norms)


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_every_conv_kernel_is_the_hwio_array_transposed(loaded, r50, norm):
    model, arrays = loaded[norm], r50[1]
    convs = {k: t for k, t in model_tensors(model).items() if k.endswith("/kernel") and k != HEAD_KERNEL}
    all_std_convs = {id(m.weight) for m in model.modules() if isinstance(m, bit_convert.StdConv2d)}
    assert {id(t) for t in convs.values()} == all_std_convs and len(convs) == 53
    for key, weight in convs.items():
        assert torch.equal(weight, hwio_to_oihw(arrays[key])), key


def test_gn_model_gets_gamma_and_beta(loaded, r50):
    tensors = model_tensors(loaded["gn"])
    for key in (k for k in r50[1] if "group_norm" in k):
        assert torch.equal(tensors[key], torch.from_numpy(r50[1][key])), key


def test_bn_model_keeps_pytorch_default_init(loaded):
    bns = [m for m in loaded["bn"].modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(
            bn.bias, torch.zeros_like(bn.bias)
        )
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.heavy
def test_bn_model_with_copy_norm_gets_gamma_and_beta_but_fresh_statistics(r50):
    model = bit_convert.load_npz(bit_convert.resnet_v2("r50x1", norm="bn"), r50[0], copy_norm=True)
    tensors = model_tensors(model)
    for key in (k for k in r50[1] if "group_norm" in k):
        assert torch.equal(tensors[key], torch.from_numpy(r50[1][key])), key
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert not bn.running_mean.any() and torch.equal(bn.running_var, torch.ones_like(bn.running_var))


# ---------------------------------------------------------------------------------- 3: weight standardisation


def test_std_conv_matches_numpy_weight_standardisation_with_stride_and_padding():
    torch.manual_seed(0)
    conv = bit_convert.StdConv2d(5, 6, 3, stride=2, padding=1)
    nn.init.normal_(conv.weight, mean=0.3, std=2.0)
    x = torch.randn(2, 5, 9, 8)
    out = conv(x)
    assert out.shape == (2, 6, 5, 4)
    torch.testing.assert_close(out, ref_conv(x, conv, stride=2, padding=1), rtol=1e-5, atol=1e-5)


def test_std_conv_without_standardize_is_a_plain_conv():
    torch.manual_seed(0)
    conv = bit_convert.StdConv2d(5, 6, 3, stride=2, padding=1, standardize=False)
    x = torch.randn(2, 5, 9, 8)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, stride=2, padding=1))


def test_std_conv_is_not_the_std_plus_1e_5_variant():
    """With kernels of std 1e-4, (w - mean) / (std + 1e-5) scales by ~0.91; BiT's sqrt(var + 1e-10) by
    ~0.995."""
    torch.manual_seed(0)
    conv = bit_convert.StdConv2d(8, 4, 3, padding=1)
    nn.init.normal_(conv.weight, std=1e-4)
    x = torch.randn(2, 8, 6, 6)
    w = conv.weight.detach()
    other = F.conv2d(
        x, (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5), padding=1
    )
    out = conv(x)
    torch.testing.assert_close(out, ref_conv(x, conv, padding=1), rtol=1e-4, atol=1e-4)
    assert ((out - other).norm() / out.norm()).item() > 0.05


# ------------------------------------------------------------------------------------------------ 4: the root


def test_root_pool_is_zero_pad_then_3x3_stride2_max_pool():
    model = bit_convert.resnet_v2("r50x1", norm="gn")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 10)
    assert (x < 0).any()
    out = model.stem.pool(model.stem.pad(x))
    assert np.array_equal(out.numpy(), np_zero_pad_max_pool(x.numpy()))

    negative = -torch.rand(2, 3, 9, 10) - 0.1
    ours = model.stem.pool(model.stem.pad(negative))
    assert np.array_equal(ours.numpy(), np_zero_pad_max_pool(negative.numpy()))
    minus_inf_padded = nn.MaxPool2d(3, 2, padding=1)(negative)
    assert ours.shape == minus_inf_padded.shape
    assert not torch.equal(ours, minus_inf_padded)


def test_stem_is_7x7_stride2_std_conv_then_the_zero_padded_pool():
    model = bit_convert.resnet_v2("r50x1", norm="gn")
    assert list(dict(model.stem.named_children())) == ["conv", "pad", "pool"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model.stem(x)
        conv = ref_conv(x, model.stem.conv, stride=2, padding=3)
    assert out.shape == (1, 64, 8, 8)
    torch.testing.assert_close(
        out, torch.from_numpy(np_zero_pad_max_pool(conv.numpy())), rtol=1e-5, atol=1e-4
    )


# ------------------------------------------------------------------------------------------------- 5: forward


@pytest.mark.parametrize("u, stride", [(0, 2), (1, 1)])
def test_unit_forward_follows_the_reference_recipe(loaded, u, stride):
    unit = loaded["gn"].blocks[1][u]
    assert (unit.proj is not None) == (u == 0)
    x = torch.randn(2, 256 if u == 0 else 512, 8, 8)
    with torch.no_grad():
        out, ref = unit(x), ref_unit(unit, x, stride)
    assert out.shape == (2, 512, 4 if stride == 2 else 8, 4 if stride == 2 else 8)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.heavy
def test_features_are_norm_relu_mean_pool_of_the_body_and_zero_head_gives_zero_logits():
    torch.manual_seed(0)
    fresh = bit_convert.resnet_v2("r50x1", norm="gn", head_size=7)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fresh_logits = fresh(x)
        model = randomize_(fresh).eval()  # the same model, now with a random head
        features = F.relu(model.norm(model.blocks(model.stem(x)))).mean((2, 3))
        logits = model(x)
        w, b = model.head.weight.flatten(1), model.head.bias
        model.head = None
        no_head = model(x)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(no_head, features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, features @ w.T + b, rtol=1e-4, atol=1e-4)
    assert fresh_logits.shape == (2, 7) and not fresh_logits.any()


# ----------------------------------------------------------------------- 6: round trip through the BiT layout


@pytest.mark.heavy
def test_gn_model_exported_to_bit_layout_reloads_identically(tmp_path):
    torch.manual_seed(0)
    model = randomize_(bit_convert.resnet_v2("r50x1", norm="gn", head_size=10)).eval()
    arrays = export_npz(model, tmp_path / "rt.npz")
    assert [(k, a.shape) for k, a in arrays.items()] == bit_layout(head=10)
    fresh = bit_convert.load_npz(
        bit_convert.resnet_v2("r50x1", norm="gn", head_size=10), tmp_path / "rt.npz", load_head=True
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


# ------------------------------------------------------------------------------ 7: zero-init of the last norm


@pytest.mark.heavy
@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_zero_init_last_switches_every_residual_branch_off(norm):
    model = bit_convert.zero_init_last(bit_convert.resnet_v2("r50x1", norm=norm))
    units = [unit for block in model.blocks for unit in block]
    assert len(units) == 16 and all(not unit.norm3.weight.any() for unit in units)
    assert all(
        unit.norm3.weight.all()
        for block in bit_convert.resnet_v2("r50x1", norm=norm).blocks
        for unit in block
    )
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.blocks[0][1](x), x)


def test_weight_standardisation_can_be_switched_off(r50):
    model = bit_convert.build_backbone(str(r50[0]), norm="bn", ws=False)
    convs = [m for m in model.modules() if isinstance(m, bit_convert.StdConv2d)]
    assert len(convs) == 53 and not any(conv.standardize for conv in convs) and model.ws is False
    x = torch.randn(1, 64, 5, 5)
    with torch.no_grad():
        assert torch.allclose(
            model.blocks[0][0].conv2(x), F.conv2d(x, model.blocks[0][0].conv2.weight, padding=1)
        )


def test_zero_init_holds_after_loading_bit_weights(r50):
    """BiT's GroupNorm gammas must not undo the zero-init: it is applied after the weights are loaded."""
    model = bit_convert.zero_init_last(bit_convert.build_backbone(str(r50[0]), norm="gn"))
    assert all(not unit.norm3.weight.any() for block in model.blocks for unit in block)
    assert all(unit.norm2.weight.any() for block in model.blocks for unit in block)


# -------------------------------------------------------------------------------------------------- 8: errors


def load_error(path, model=None, **kwargs):
    model = model if model is not None else bit_convert.resnet_v2("r50x1", norm="gn")
    with pytest.raises(bit_common.WeightsError) as e:
        bit_convert.load_npz(model, path, **kwargs)
    assert str(path) in str(e.value)
    return str(e.value)


def test_random_bytes_are_not_an_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    load_error(path)


def test_truncated_npz(r50, tmp_path):
    blob = r50[0].read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(blob[: len(blob) // 2])
    load_error(path)


def test_corrupted_array_fails_the_crc_check(r50, tmp_path):
    key = "resnet/block2/unit01/b/standardized_conv2d/kernel"
    blob, data = bytearray(r50[0].read_bytes()), r50[1][key].tobytes()
    start = blob.find(data[:64])
    assert start > 0
    blob[start + len(data) // 2 : start + len(data) // 2 + 4] = bytes(
        255 - c for c in data[len(data) // 2 :][:4]
    )
    path = tmp_path / "corrupt.npz"
    path.write_bytes(bytes(blob))
    message = load_error(path)
    assert "CRC" in message and key in message


def test_npy_array_file_is_a_weights_error(tmp_path):
    """np.load returns a bare ndarray for .npy; the loader should say so instead of crashing."""
    path = tmp_path / "single.npy"
    np.save(path, np.zeros((7, 7, 3, 64), np.float32))
    load_error(path)


@pytest.mark.heavy
def test_missing_key_is_named_and_nothing_is_loaded(r50, tmp_path):
    # the last key a gn load needs: every other tensor was ready before the failure
    key = "resnet/group_norm/beta"
    path = write_npz(tmp_path / "missing.npz", r50[1], drop=(key,))
    model = bit_convert.resnet_v2("r50x1", norm="gn")
    before = snapshot(model)
    assert key in load_error(path, model)
    assert_unchanged(model, before)


@pytest.mark.heavy
def test_r101x1_file_into_r50x1_names_a_unit_that_has_no_place(tmp_path):
    arrays = zero_bit_arrays(R101)
    assert len(arrays) == 153 + 17 * 9
    path = write_npz(tmp_path / "BiT-M-R101x1.npz", arrays)
    model = bit_convert.resnet_v2("r50x1", norm="gn")
    before = snapshot(model)
    message = load_error(path, model)
    unit = re.search(r"resnet/block3/unit(\d\d)/", message)
    assert unit and int(unit.group(1)) >= 7 and "r101x1" in message
    assert_unchanged(model, before)


def test_r50x3_root_kernel_into_r50x1_reports_both_shapes(r50, tmp_path):
    path = write_npz(tmp_path / "root.npz", r50[1], **{ROOT_KEY: np.zeros((7, 7, 3, 192), np.float32)})
    message = load_error(path)
    assert ROOT_KEY in message and "(7, 7, 3, 64)" in message and "(7, 7, 3, 192)" in message


def test_head_of_another_size_reports_both_shapes(r50, tmp_path):
    path = write_npz(
        tmp_path / "head10.npz",
        r50[1],
        **{HEAD_KERNEL: np.ones((1, 1, 2048, 10), np.float32), HEAD_BIAS: np.ones(10, np.float32)},
    )
    model = bit_convert.resnet_v2("r50x1", norm="gn", head_size=7)
    message = load_error(path, model, load_head=True)
    assert HEAD_KERNEL in message and "(1, 1, 2048, 7)" in message and "(1, 1, 2048, 10)" in message


@pytest.mark.heavy
def test_head_bias_mismatch_is_caught_and_nothing_is_loaded(r50, tmp_path):
    """The bias is the last tensor checked: a loader that copied as it went would have changed everything
    else."""
    path = write_npz(
        tmp_path / "bias.npz",
        r50[1],
        **{HEAD_KERNEL: np.ones((1, 1, 2048, 7), np.float32), HEAD_BIAS: np.ones(10, np.float32)},
    )
    model = bit_convert.resnet_v2("r50x1", norm="gn", head_size=7)
    before = snapshot(model)
    message = load_error(path, model, load_head=True)
    assert HEAD_BIAS in message and "(7,)" in message and "(10,)" in message
    assert_unchanged(model, before)


# ----------------------------------------------------------------------- 9: backbone files and build_backbone


@pytest.mark.heavy
def test_save_and_load_backbone_round_trip(tmp_path):
    model = randomize_(bit_convert.resnet_v2("r50x1", norm="bn", head_size=3), seed=1)
    bit_convert.save_backbone(model, tmp_path / "b.pt", source="x.npz", epoch=7)
    loaded, meta = bit_convert.load_backbone(tmp_path / "b.pt")
    assert meta == dict(
        arch="r50x1", norm="bn", cifar_stem=False, head_size=3, ws=True, whiten=False, source="x.npz", epoch=7
    )
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["b.pt"]


def test_save_atomic_leaves_the_old_file_and_no_temporary_when_the_write_fails(tmp_path, monkeypatch):
    def half_write_then_fail(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    out = tmp_path / "out.pt"
    out.write_bytes(b"an earlier result")
    monkeypatch.setattr(bit_common.torch, "save", half_write_then_fail)
    with pytest.raises(OSError):
        bit_common.save_atomic({"a": 1}, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"] and out.read_bytes() == b"an earlier result"


def test_load_backbone_rejects_a_foreign_pt_and_garbage(tmp_path):
    torch.save({"a": 1}, tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    for name in ("other.pt", "garbage.pt", "absent.pt"):
        with pytest.raises(bit_common.WeightsError, match=re.escape(str(tmp_path / name))):
            bit_convert.load_backbone(tmp_path / name)


@pytest.mark.heavy
@pytest.mark.parametrize(
    "asked",
    [
        dict(arch="r50x1", norm="gn"),
        dict(arch="r101x1", norm="bn"),
        dict(arch="r50x1", norm="bn", cifar_stem=True),
    ],
)
def test_build_backbone_refuses_a_pt_of_another_kind(saved_bn_pt, asked):
    with pytest.raises(bit_common.WeightsError, match=re.escape(str(saved_bn_pt))):
        bit_convert.build_backbone(str(saved_bn_pt), **asked)


@pytest.mark.heavy
def test_build_backbone_bit_m_not_cached_and_offline_names_url_and_cache_path(tmp_path, monkeypatch):
    url = closed_port_url()
    monkeypatch.setattr(bit_convert, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(bit_convert, "BIT_MODELS_URL", url)
    with pytest.raises(bit_common.UserError) as e:
        bit_convert.build_backbone("bit-m")
    assert f"{url}BiT-M-R50x1.npz" in str(e.value)
    assert str(tmp_path / "BiT-M-R50x1.npz") in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.heavy
def test_build_backbone_bit_s_loads_the_cached_file(r50, tmp_path, monkeypatch):
    monkeypatch.setattr(bit_convert, "CACHE_DIR", tmp_path)
    (tmp_path / "BiT-S-R50x1.npz").symlink_to(r50[0])
    model = bit_convert.build_backbone("bit-s", norm="bn")
    for key, t in model_tensors(model).items():
        if key.endswith("/kernel") and key != HEAD_KERNEL:
            assert torch.equal(t, hwio_to_oihw(r50[1][key])), key


# --------------------------------------------------------------------------------------- 10: the command line


def cli(*args, cache, url=None):
    env = dict(os.environ, BIT_CACHE=str(cache), BIT_MODELS_URL=url or closed_port_url())
    return subprocess.run(
        [sys.executable, "bit_convert.py", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_in_process(monkeypatch, *args, cache, url=None):
    """bit_convert.py's main with this command line, in this process: what `cli` runs, less the interpreter
    and the imports (seconds); $BIT_CACHE and $BIT_MODELS_URL as bit_convert read them at import."""
    monkeypatch.setattr(sys, "argv", ["bit_convert.py", *map(str, args)])
    monkeypatch.setattr(bit_convert, "CACHE_DIR", cache)
    monkeypatch.setattr(bit_convert, "BIT_MODELS_URL", url or closed_port_url())
    return bit_convert.main()


@pytest.fixture(scope="module")
def overwrite_runs(r50, tmp_path_factory):
    """With out.pt already there, the CLI run without --force, then with it: (out, refused, bytes after it,
    forced)."""
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "out.pt"
    out.write_bytes(b"an earlier result")
    refused = cli(r50[0], "--norm", "bn", "-o", out, cache=folder / "cache")
    kept = out.read_bytes()
    forced = cli(r50[0], "--norm", "bn", "-o", out, "--force", cache=folder / "cache")
    return out, refused, kept, forced


@pytest.mark.script
def test_cli_refuses_to_overwrite_without_force(overwrite_runs):
    out, refused, kept, _ = overwrite_runs
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and str(out) in lines[0] and "--force" in lines[0]
    assert kept == b"an earlier result"


@pytest.mark.script
def test_cli_with_force_writes_a_loadable_bn_backbone_with_its_source(overwrite_runs, r50):
    out, _, _, forced = overwrite_runs
    assert forced.returncode == 0, forced.stderr
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    model = bit_convert.resnet_v2("r50x1", norm="bn")
    model.load_state_dict(ckpt["state_dict"], strict=True)
    assert (ckpt["arch"], ckpt["norm"], ckpt["source"]) == ("r50x1", "bn", r50[0].name)
    assert ckpt["sha256"] == hashlib.sha256(r50[0].read_bytes()).hexdigest()
    assert torch.equal(model.stem.conv.weight, hwio_to_oihw(r50[1][ROOT_KEY]))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.pt"]  # no temporary file left beside it


@pytest.mark.script
def test_cli_head_and_copied_norms(r50, tmp_path, monkeypatch):
    """--head loads BiT's classifier, --copy-norm puts GroupNorm's gamma/beta into the BatchNorms."""
    cli_in_process(
        monkeypatch,
        r50[0],
        "--norm",
        "bn",
        "--head",
        "--copy-norm",
        "-o",
        tmp_path / "out.pt",
        cache=tmp_path,
    )
    ckpt = torch.load(tmp_path / "out.pt", weights_only=True)
    assert ckpt["head_size"] == 1000 and ckpt["copy_norm"] is True
    model = bit_convert.resnet_v2("r50x1", norm="bn", head_size=1000)
    model.load_state_dict(ckpt["state_dict"])
    assert torch.equal(model.head.weight, hwio_to_oihw(r50[1][HEAD_KERNEL]))
    assert torch.equal(model.head.bias, torch.from_numpy(r50[1][HEAD_BIAS]))
    gamma = r50[1]["resnet/block3/unit04/b/group_norm/gamma"]
    assert torch.equal(model.blocks[2][3].norm2.weight, torch.from_numpy(gamma))


@pytest.mark.script
def test_cli_bad_input_leaves_no_output(tmp_path, monkeypatch):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    message = failure(lambda: cli_in_process(monkeypatch, bad, "-o", tmp_path / "out.pt", cache=tmp_path))
    assert str(bad) in message
    assert [p.name for p in tmp_path.iterdir()] == ["bad.npz"]


@pytest.mark.script
def test_cli_download_offline_fails_naming_url_and_target(tmp_path):
    cache, url = tmp_path / "cache", closed_port_url()
    run = cli("--download", "BiT-M-R50x1", cache=cache, url=url)
    assert run.returncode != 0 and run.stderr.count("\n") == 1
    assert f"{url}BiT-M-R50x1.npz" in run.stderr
    assert str(cache / "BiT-M-R50x1.npz") in run.stderr
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.script
def test_cli_download_of_an_unknown_name_lists_the_valid_ones(tmp_path, monkeypatch):
    message = failure(
        lambda: cli_in_process(monkeypatch, "--download", "NotAModel", cache=tmp_path / "cache")
    )
    assert "NotAModel" in message
    assert all(name in message for name in ("BiT-S-R50x1", "BiT-M-R50x1", "BiT-M-R152x4", "BiT-S-R101x3"))
