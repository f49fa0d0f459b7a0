"""methods.py: each method's heads and loss against the formulas of its paper."""

import pytest
import torch

import methods
from bit_convert import resnet_v2


def cos(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ---------------------------------------------------------------------------------------------------- SimSiam


def test_simsiam_loss_is_symmetric_negative_cosine_with_stop_gradient():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(8, 16, generator=g, requires_grad=True) for _ in range(4))
    loss = methods.simsiam_loss(p1, p2, z1, z2)
    expected = -(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2
    assert torch.allclose(loss, expected)
    assert torch.equal(loss, methods.simsiam_loss(p2, p1, z2, z1))  # swapping the views changes nothing
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient: nothing flows into z
    assert p1.grad is not None and p2.grad is not None


def test_simsiam_loss_is_minus_one_when_predictions_match_the_other_view():
    z1, z2 = torch.randn(4, 32), torch.randn(4, 32)
    assert methods.simsiam_loss(3 * z2, 0.5 * z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("projector, linears, affine", [("paper", 2, True), ("simsiam", 3, False)])
def test_simsiam_projector_of_the_authors_and_of_simsiam(projector, linears, affine):
    """The authors' code: Linear-BN-ReLU, Linear-BN (2048-2048-2048); SimSiam's builder.py: three Linear-BN,
    the last BN without affine. Both: predictor 2048-512-2048, a bottleneck with BN-ReLU in the middle; the
    predictor keeps a fixed lr."""
    model = methods.SimSiam(resnet_v2("r50x1", "bn", cifar_stem=True), projector)
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
