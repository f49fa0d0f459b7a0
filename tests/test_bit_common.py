"""bit_common.py: the measurements against independent references (NumPy formulas, brute-force loops,
scikit-learn), the atomic write, and the choice of mixed precision."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bit_common
import bit_convert
import linear_eval
import pretrain
import tsne

# -------------------------------------------------------------------------------------------- kNN and spectra


def test_knn_matches_a_brute_force_vote():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(300, 12)), rng.normal(size=(40, 12))
    bank_labels = rng.integers(0, 5, 300)
    for k, t in ((200, 0.1), (7, 0.5), (1000, 0.07)):
        predicted = pretrain.knn_predict(
            torch.tensor(queries), torch.tensor(bank), torch.tensor(bank_labels), 5, k, t
        )
        expected = []
        for q in queries:
            sims = [q @ b / np.linalg.norm(q) / np.linalg.norm(b) for b in bank]
            votes = np.zeros(5)
            for j in np.argsort(sims)[::-1][:k]:
                votes[bank_labels[j]] += np.exp(sims[j] / t)
            expected.append(votes.argmax())
        assert predicted.tolist() == expected


def test_covariance_spectrum_against_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 6)) * np.array([5, 4, 3, 2, 1, 0.5])
    z = features / np.linalg.norm(features, axis=1, keepdims=True)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(z.T, bias=True)))[::-1]
    assert np.allclose(tsne.covariance_spectrum(torch.tensor(features)).numpy(), eigenvalues)


def test_rankme_is_garrido_et_al_eq_1_on_the_raw_singular_values():
    """RankMe takes the singular values of the embedding matrix itself; the entropy of the eigenvalues of the
    normalised features' covariance (what this project reported as "effective rank" before) is another,
    smaller number on power-law features, which this test shows too."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 1024)) * np.arange(1, 1025) ** -0.5  # a power-law spectrum
    sigma = np.linalg.svd(features, compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    expected = np.exp(-(p * np.log(p)).sum())
    got = bit_convert.rankme(torch.tensor(features))
    assert got == pytest.approx(expected, rel=1e-9)
    covariance = tsne.covariance_spectrum(torch.tensor(features)).numpy()
    q = covariance / covariance.sum()
    assert np.exp(-(q * np.log(q)).sum()) < 0.7 * got
    collapsed = torch.tensor(rng.normal(size=(500, 1)) * rng.normal(size=(1, 64)))  # one direction
    assert bit_convert.rankme(collapsed) == pytest.approx(1.0, abs=1e-3)


def test_normalised_std_is_about_one_over_sqrt_d_when_spread_and_zero_when_collapsed():
    z = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    assert pretrain.normalised_std(z).item() == pytest.approx(1 / 16, rel=0.02)
    assert pretrain.normalised_std(torch.ones(64, 256) * 3).item() == 0.0


# ----------------------------------------------------------------------------------------- focal loss, scores


def test_focal_loss_against_its_formula_and_cross_entropy_at_gamma_zero():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    pt = p[np.arange(50), target.numpy()]
    for gamma in (0.0, 1.0, 4.0):
        expected = np.mean(-((1 - pt) ** gamma) * np.log(pt))
        assert linear_eval.focal_loss(logits, target, gamma).item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(linear_eval.focal_loss(logits, target, 0.0), F.cross_entropy(logits, target))


def test_scores_against_counting_by_hand():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    predicted[truth == 3] = 3  # one class always right
    s = linear_eval.scores(truth, predicted, 5)  # class 4 never occurs
    recall = [np.mean(predicted[truth == k] == k) for k in range(4)]
    assert s["balanced_accuracy"] == pytest.approx(np.mean(recall))
    f1 = []
    for k in range(5):
        tp, fp, fn = (
            np.sum((predicted == k) & (truth == k)),
            np.sum((predicted == k) & (truth != k)),
            np.sum((predicted != k) & (truth == k)),
        )
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert s["macro_f1"] == pytest.approx(np.mean(f1))
    assert s["per_class_recall"][:4] == pytest.approx(recall) and s["per_class_recall"][3] == 1.0
    assert s["confusion"] == [
        [int(np.sum((truth == a) & (predicted == b))) for b in range(5)] for a in range(5)
    ]


# --------------------------------------------------------------------------------------- writes and precision


def test_write_atomic_leaves_the_old_file_and_no_temporary_when_the_write_fails(tmp_path):
    out = tmp_path / "results.json"
    out.write_text("an earlier result")

    def half_write_then_fail(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(bit_common.UserError, match="disk is full"):
        bit_common.write_atomic(out, half_write_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"] and out.read_text() == "an earlier result"
    bit_common.write_atomic(out, lambda tmp: tmp.write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"] and out.read_text() == "new"


@pytest.mark.parametrize(
    "native, emulated, expected",
    [
        (True, True, torch.bfloat16),  # Ampere and newer
        (False, True, torch.float16),  # V100, T4: bf16 only through emulation, slow: fp16 with a GradScaler
        (False, False, torch.float16),
    ],
)
def test_bf16_only_where_the_gpu_computes_it(monkeypatch, native, emulated, expected):
    def is_bf16_supported(including_emulation=True):
        return native or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert bit_convert.amp_dtype(torch.device("cuda")) == expected
    assert bit_convert.amp_dtype(torch.device("cpu")) == torch.float32


def test_estimate_bn_statistics_restores_the_mode_and_momentum():
    norm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.3))
    norm.eval()
    images = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8)
    bit_convert.estimate_bn_statistics(norm, images, torch.device("cpu"), batch_size=3)
    assert not norm.training and norm[1].momentum == 0.3
    with torch.no_grad():
        y = norm[0](bit_convert.to_input(images, torch.device("cpu")))
    batch_means = [
        y[i : i + 3].mean((0, 2, 3)) for i in range(0, 10, 3)
    ]  # a cumulative average: batches alike
    assert torch.allclose(norm[1].running_mean, torch.stack(batch_means).mean(0), atol=1e-6)
