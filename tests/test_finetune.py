"""finetune.py: the quarters by depth, exactly the chosen parameters training, the shallower network, the
stratified train fraction, one head over combined backbones, model selection on val alone, an exact resume,
results.json drawn by linear_eval.py --compare, and the errors."""

import argparse
import copy
import json

import numpy as np
import pytest
import torch

import bit_common
import datasets
import eval_common
import finetune
import linear_eval
from bit_common import UserError
from bit_convert import ARCHS, IterNorm, estimate_bn_statistics, resnet_v2, save_backbone, whiten
from helpers import run_script

SPLIT = "0.8,0.1,0.05,0.05"  # a small val and test: every whole run below evaluates them each epoch


def ft_args(tmp, *extra):
    """digits at 8 px, 35 train images (a fifth of the train part's 179, rounded down as scikit-learn does),
    2 steps of 16 an epoch, 2 epochs."""
    common = ["--data", "digits", "--image-size", "8", "--cache-dir", tmp / "cache", "--workers", "0"]
    common += ["--device", "cpu", "--batch-size", "16", "--epochs", "2", "--trials", "1"]
    return list(map(str, common + ["--train-fraction", "0.2", *extra]))


def trained_looking_backbone(seed, norm="bn"):
    """A random backbone with real BatchNorm statistics, as a pretrained one has (fresh ones are mean 0, var
    1)."""
    torch.manual_seed(seed)
    backbone = resnet_v2("r50x1", norm, cifar_stem=True)
    if norm == "bn":
        images = datasets.eval_images(datasets.load_digits(), np.arange(64), 8)
        estimate_bn_statistics(backbone, images, torch.device("cpu"))
    return backbone


def pretrained_file(directory, backbone, split_seed=0):
    """DIR/backbone.pt beside DIR/split.json, the split's digest inside, as pretrain.py leaves them."""
    directory.mkdir(parents=True)
    split = datasets.load_split(datasets.load_digits(), directory / "split.json", SPLIT, split_seed)
    save_backbone(backbone, directory / "backbone.pt", epoch=3, split_digest=datasets.split_digest(split))
    return directory / "backbone.pt"


@pytest.fixture(scope="module")
def backbone():
    return trained_looking_backbone(0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, backbone):
    return pretrained_file(tmp_path_factory.mktemp("pretrained") / "run", backbone)


# ------------------------------------------------------------------------------------------------- the pieces

# R50's units by block: (3, 4, 6, 3). Our reading: q1 = the stem, block 1 and block 2's first unit, and so
# on; the final norm goes with q4.
R50_QUARTERS = {
    "q1": ("stem.", "blocks.0.", "blocks.1.0."),
    "q2": ("blocks.1.1.", "blocks.1.2.", "blocks.1.3.", "blocks.2.0."),
    "q3": ("blocks.2.1.", "blocks.2.2.", "blocks.2.3.", "blocks.2.4."),
    "q4": ("blocks.2.5.", "blocks.3.", "norm."),
}


def test_quarters_by_depth_for_every_bit_size():
    expected = {  # by hand: 16 units in fours; 33 and 50 units, the first (units mod 4) quarters one longer
        (3, 4, 6, 3): (0, 4, 8, 12, 16),
        (3, 4, 23, 3): (0, 9, 17, 25, 33),
        (3, 8, 36, 3): (0, 13, 26, 38, 50),
    }
    for units, _ in ARCHS.values():
        assert finetune.quarter_bounds(units) == expected[units]
    model = resnet_v2("r50x1", "bn", cifar_stem=True)
    b = model.blocks
    assert [[id(u) for u in q] for q in finetune.quarters(model)] == [
        [id(u) for u in units]
        for units in (
            [b[0][0], b[0][1], b[0][2], b[1][0]],
            [b[1][1], b[1][2], b[1][3], b[2][0]],
            [b[2][1], b[2][2], b[2][3], b[2][4]],
            [b[2][5], b[3][0], b[3][1], b[3][2]],
        )
    ]


@pytest.mark.heavy
def test_the_shallower_network_ends_at_the_75_percent_point(backbone):
    reference = copy.deepcopy(backbone).eval()
    body = finetune.Body(reference, "0-75").eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # by hand: stem, 12 units, then the 13th unit's own pre-activation, and pooling
        h = reference.blocks[2][:5](reference.blocks[1](reference.blocks[0](reference.stem(x))))
        expected = torch.relu(reference.blocks[2][5].norm1(h)).mean((2, 3))
        assert torch.allclose(body(x), expected, atol=1e-5)
    assert body.width == expected.shape[1] == 1024  # block 3's width, 4 * 256
    kept = {id(p) for p in body.parameters()}
    lent = {id(p) for p in reference.blocks[2][5].norm1.parameters()}
    dropped = [
        p for n, p in reference.named_parameters() if n.startswith(R50_QUARTERS["q4"]) and id(p) not in lent
    ]
    assert len(dropped) > 30 and all(id(p) not in kept for p in dropped) and lent <= kept
    first_three = R50_QUARTERS["q1"] + R50_QUARTERS["q2"] + R50_QUARTERS["q3"]
    count = sum(p.numel() for n, p in reference.named_parameters() if n.startswith(first_three))
    assert sum(p.numel() for p in body.parameters()) == count + 2 * 1024


TUNES = {
    "all": sum(R50_QUARTERS.values(), ()),
    "q1": R50_QUARTERS["q1"],
    "q2": R50_QUARTERS["q2"],
    "q3": R50_QUARTERS["q3"],
    "q4": R50_QUARTERS["q4"],
    "q3,q1": R50_QUARTERS["q1"] + R50_QUARTERS["q3"],
    "0-75": R50_QUARTERS["q1"] + R50_QUARTERS["q2"] + R50_QUARTERS["q3"] + ("blocks.2.5.norm1.",),  # lent
}


def one_step(backbones, strategies, seed=0):
    """One optimiser step of finetune.py's on 8 digits, on copies of `backbones`: (the model, the copies,
    every tensor of each copy before the step, the head before)."""
    data = datasets.load_digits()
    args = argparse.Namespace(optimizer="adam", lr=1e-3, weight_decay=0.0, gamma=4.0)
    copies = [copy.deepcopy(b) for b in backbones]
    model = finetune.FineTuned([finetune.Body(b, s) for b, s in zip(copies, strategies)], 10, seed)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in copies]
    head = model.head.weight.detach().clone()
    images = datasets.eval_images(data, np.arange(8), 8)
    optimizer, device = finetune.make_optimizer(model, args), torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    finetune.train_step(model, images, torch.as_tensor(data.labels[:8]), optimizer, scaler, args, device)
    return model, copies, before, head


def changed(backbone, before):
    """Names of every parameter and buffer (BatchNorm statistics and batch counts) that the step changed."""
    return {k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", TUNES)
def test_exactly_the_chosen_parameters_and_statistics_change(backbone, strategy):
    """Compare every tensor, parameters and BatchNorm statistics alike: a frozen BatchNorm in eval mode keeps
    its running mean, variance and batch count."""
    model, (tuned,), (before,), head = one_step([backbone], [finetune.tune_strategy(strategy)])
    assert changed(tuned, before) == {n for n in before if n.startswith(TUNES[strategy])}
    assert not torch.equal(model.head.weight, head)
    body = model.bodies[0]
    assert all(not m.training for m in body.frozen_norms) and body.units.training
    assert len(body.frozen_norms) == sum(
        1 for n in before if n.endswith("running_mean") and not n.startswith(TUNES[strategy])
    ) - (12 if strategy == "0-75" else 0)  # the dropped quarter's 12 other norms are gone


@pytest.mark.heavy
@pytest.mark.parametrize("at", ["branch", "final"])
def test_a_frozen_iternorm_whitens_with_its_running_statistics_and_keeps_them(backbone, at):
    """--tune q1 of a --whiten backbone: its IterNorm (in q4) is frozen, so in the train-mode forward it must
    compute what eval mode computes, (x - running mean) whitened by the running matrix, and one training step
    must leave its running statistics and batch count bit-identical, as a frozen BatchNorm's."""
    whitened = whiten(copy.deepcopy(backbone), at=at)
    (iternorm,) = [m for m in whitened.modules() if isinstance(m, IterNorm)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a pretrained-looking state: not the fresh mean 0 and identity matrix
        iternorm.running_mean.copy_(torch.randn(2048, generator=g))
        iternorm.running_whitening.copy_(torch.eye(2048) + 0.01 * torch.randn(2048, 2048, generator=g))
    model, (tuned,), (before,), _ = one_step([whitened], ["q1"])
    assert changed(tuned, before) == {n for n in before if n.startswith(TUNES["q1"])}
    (iternorm,) = [m for m in tuned.modules() if isinstance(m, IterNorm)]
    seen = []
    iternorm.register_forward_hook(lambda module, inputs, out: seen.append((inputs[0], out)))
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 8, 8))
    x, out = seen[0]
    columns = (x - iternorm.running_mean[:, None, None]).transpose(0, 1).reshape(2048, -1)
    expected = (iternorm.running_whitening @ columns).reshape(2048, 4, *x.shape[2:]).transpose(0, 1)
    torch.testing.assert_close(out, expected * iternorm.weight[:, None, None] + iternorm.bias[:, None, None])


@pytest.mark.heavy
def test_combine_trains_one_head_over_the_concatenated_features(backbone):
    model, copies, before, head = one_step([backbone, trained_looking_backbone(1)], ["q2", "0-75"])
    assert model.head.in_features == 2048 + 1024
    x = torch.randn(3, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        features = torch.cat([model.bodies[0](x), model.bodies[1](x)], 1)
        assert torch.allclose(model(x), features @ model.head.weight.T + model.head.bias, atol=1e-6)
    assert changed(copies[0], before[0]) == {n for n in before[0] if n.startswith(TUNES["q2"])}
    assert changed(copies[1], before[1]) == {n for n in before[1] if n.startswith(TUNES["0-75"])}
    assert not torch.equal(model.head.weight, head)


def test_the_train_fraction_is_stratified_and_reproducible(tmp_path):
    data = datasets.load_digits()
    split = datasets.load_split(data, tmp_path / "split.json")
    train = datasets.indices(data, split, "train")
    subset = finetune.train_subset(data, split, 0.3, seed=0)
    assert set(subset) <= set(train) and len(subset) == round(0.3 * len(train))
    share = np.bincount(data.labels[subset], minlength=10) / np.bincount(data.labels[train], minlength=10)
    assert np.all(np.abs(share - 0.3) < 0.06)  # each class about 0.3 of its train images (18 each)
    assert np.array_equal(finetune.train_subset(data, split, 0.3, seed=0), subset)
    assert not np.array_equal(finetune.train_subset(data, split, 0.3, seed=1), subset)
    assert np.array_equal(finetune.train_subset(data, split, 1.0, seed=0), train)


# ------------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def plain_run(pretrained):
    out = pretrained.parent / "plain"
    assert finetune.main(ft_args(pretrained.parent, "--ckpt", pretrained, "--tune", "q4", "--out", out)) == 0
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.script
def test_model_selection_never_sees_test_labels(pretrained, plain_run, monkeypatch):
    """The same run with the test labels scrambled: had test any part in the choice, the epoch would move."""
    checked = eval_common.pretraining_split

    def scrambled(data, *rest):  # after the split's check, which fingerprints the labels
        split, path = checked(data, *rest)
        test = datasets.indices(data, split, "test")
        data.labels[test] = np.random.default_rng(5).permutation(data.labels[test])
        return split, path

    monkeypatch.setattr(eval_common, "pretraining_split", scrambled)
    out = pretrained.parent / "scrambled"
    finetune.main(ft_args(pretrained.parent, "--ckpt", pretrained, "--tune", "q4", "--out", out))
    plain, _ = plain_run
    chosen = json.loads((out / "results.json").read_text())["trials"][0]
    assert (chosen["best_epoch"], chosen["val_balanced_accuracy"]) == (
        plain["trials"][0]["best_epoch"],
        plain["trials"][0]["val_balanced_accuracy"],
    )
    assert chosen["confusion"] != plain["trials"][0]["confusion"]  # the scramble did reach the test scores


@pytest.mark.script
def test_a_run_stopped_and_resumed_ends_as_one_that_was_not(pretrained, plain_run, monkeypatch):
    class StopAtThirdStep(bit_common.StopSignal):
        calls = 0

        def requested(self, step, steps_per_epoch):
            StopAtThirdStep.calls += 1
            self.signum = 15 if StopAtThirdStep.calls == 3 else None
            return self.signum is not None

    out = pretrained.parent / "resumed"
    monkeypatch.setattr(bit_common, "StopSignal", StopAtThirdStep)
    argv = ft_args(pretrained.parent, "--ckpt", pretrained, "--tune", "q4", "--out", out)
    assert finetune.main(argv) == 128 + 15 and not (out / "results.json").exists()
    assert finetune.main(["--out", str(out), "--resume", "--device", "cpu", "--workers", "0"]) == 0
    plain, _ = plain_run
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["trials"] == plain["trials"]


@pytest.mark.script
def test_compare_draws_fine_tuning_beside_linear_results(plain_run, tmp_path, capsys):
    results, out = plain_run
    assert set(results) == {
        "model",
        "checkpoint",
        "data",
        "split_file",
        "classes",
        "trials",
        "mean",
        "std",
        "args",
    }  # linear_eval.py's keys
    assert results["trials"][0]["train_images"] == 35 and results["model"].endswith(
        "fine-tuned q4, 0.2 of train"
    )
    linear = {**results, "model": "a linear probe"}
    (tmp_path / "linear.json").write_text(json.dumps(linear))
    linear_eval.main(
        ["--compare", str(out / "results.json"), str(tmp_path / "linear.json"), "--out", str(tmp_path)]
    )
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "fine-tuned q4" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def foreign_split(tmp_path_factory, backbone):
    """A backbone pretrained with another split."""
    return pretrained_file(tmp_path_factory.mktemp("foreign") / "run", backbone, split_seed=1)


@pytest.fixture(scope="module")
def group_norm(tmp_path_factory):
    return pretrained_file(tmp_path_factory.mktemp("gn") / "run", trained_looking_backbone(0, "gn"))


@pytest.mark.script
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ckpt", "PRE", "--tune", "q5"], "--tune q5: expected all, 0-75, or quarters"),
        (["--ckpt", "PRE", "--train-fraction", "0"], "--train-fraction: 0: expected a number in (0, 1]"),
        (["--ckpt", "PRE", "--train-fraction", "1.5"], "--train-fraction: 1.5: expected a number in (0, 1]"),
        (["--combine", "PRE"], "give two backbone files or more"),
        (["--combine", "PRE", "FOREIGN"], "is not the split a backbone was pretrained with"),
        (["--ckpt", "GN", "--norm", "bn"], "--norm bn: "),
        (["--combine", "PRE", "GN", "--norm", "bn"], "holds a backbone with norm = gn"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(
    flags, message, pretrained, foreign_split, group_norm, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("an earlier run's results\n")
    files = {"PRE": pretrained, "FOREIGN": foreign_split, "GN": group_norm}
    with pytest.raises((UserError, SystemExit)) as error:  # SystemExit: argparse's error, a flag's type
        finetune.main(ft_args(tmp_path, *[files.get(f, f) for f in flags], "--out", out))
    text = capsys.readouterr().err.strip() if error.type is SystemExit else str(error.value)
    assert message in text and "\n" not in text
    assert [p.name for p in out.iterdir()] == ["results.json"]
    assert (out / "results.json").read_text() == "an earlier run's results\n"


@pytest.mark.script
def test_the_script_reports_an_error_in_one_line(pretrained, foreign_split, tmp_path):
    run = run_script(
        "finetune.py", *ft_args(tmp_path, "--combine", pretrained, foreign_split, "--out", tmp_path / "out")
    )
    assert run.returncode != 0 and not (tmp_path / "out").exists()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune.py: error: split file"), run.stderr
