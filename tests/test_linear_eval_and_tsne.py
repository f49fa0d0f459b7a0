"""linear_eval.py and tsne.py: the focal loss, the metrics, model selection on val alone, the feature cache,
the figures, and the errors."""

import json

import numpy as np
import pytest
import torch

import bit_common
import bit_convert
import datasets
import eval_common
import linear_eval
import tsne
from bit_convert import estimate_bn_statistics, resnet_v2, save_backbone
from eval_common import saved_backbone
from helpers import eval_args, failure, run_script


def trained_looking_backbone(seed):
    """A random BN backbone with real BatchNorm statistics, as a trained one has (fresh ones are mean 0, var
    1)."""
    torch.manual_seed(seed)
    backbone = resnet_v2("r50x1", "bn", cifar_stem=True)
    images = datasets.eval_images(datasets.load_digits(), np.arange(256), 8)
    estimate_bn_statistics(backbone, images, torch.device("cpu"))
    return backbone


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A backbone file as pretrain.py leaves it: DIR/backbone.pt beside DIR/split.json, the split digest
    inside."""
    tmp = tmp_path_factory.mktemp("pretrained")
    (tmp / "run").mkdir()
    data = datasets.load_digits()
    split = datasets.load_split(data, tmp / "run" / "split.json")
    save_backbone(
        trained_looking_backbone(0),
        tmp / "run" / "backbone.pt",
        epoch=3,
        split_digest=datasets.split_digest(split),
    )
    return tmp


# ------------------------------------------------------------------------------------------------- the pieces


def synthetic_features(seed, n=120, d=16, classes=4, noise=2.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 2
    return centres[y] + noise * torch.randn(n, d, generator=g), y


@pytest.mark.script
def test_model_selection_uses_val_alone(tmp_path, monkeypatch, pretrained):
    """Run the whole evaluation twice, the second time with the test labels scrambled: if test took any part
    in choosing the epoch, the choice would move. One step an epoch: a small --lr, so that the val accuracy
    still moves after the first."""
    parts = {"train": synthetic_features(0), "val": synthetic_features(1), "test": synthetic_features(2)}
    chosen = []
    for scramble in (False, True):
        features = dict(parts)
        if scramble:
            x, y = parts["test"]
            features["test"] = (x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))])
        monkeypatch.setattr(
            eval_common, "part_features", lambda b, i, d, s, part, *rest, features=features: features[part]
        )
        out = tmp_path / f"scrambled-{scramble}"
        linear_eval.main(
            eval_args(
                tmp_path,
                "--ckpt",
                pretrained / "run" / "backbone.pt",
                "--epochs",
                "30",
                "--lr",
                "0.05",
                "--trials",
                "2",
                "--out",
                out,
            )
        )
        trials = json.loads((out / "results.json").read_text())["trials"]
        chosen.append([(t["best_epoch"], t["val_balanced_accuracy"]) for t in trials])
    assert chosen[0] == chosen[1]
    assert 1 < chosen[0][0][0] < 30 or chosen[0][1][0] > 1  # a real choice was made somewhere along the way


def test_train_linear_returns_the_first_epoch_with_the_best_val_score(monkeypatch):
    args = linear_eval.parse_args(["--init", "scratch", "--epochs", "25", "--batch-size", "32"])
    train, val = synthetic_features(0), synthetic_features(1, noise=4.0)
    seen, score = [], linear_eval.balanced_accuracy_score
    monkeypatch.setattr(
        linear_eval, "balanced_accuracy_score", lambda *a: seen.append((a[0], score(*a))) or seen[-1][1]
    )
    classify, epoch = linear_eval.train_linear(train, val, 4, args, seed=0)
    assert len(seen) == 25 and all(
        np.array_equal(truth, val[1].numpy()) for truth, _ in seen
    )  # val, every epoch
    assert epoch == int(np.argmax([s for _, s in seen])) + 1
    with torch.no_grad():
        assert score(val[1].numpy(), classify(val[0]).argmax(1).numpy()) == max(s for _, s in seen)


def test_the_probe_trains_with_the_authors_recipe(monkeypatch):
    """The authors' evaluation code (BiT-SimSiam linear_re_eval.py with the eval section of its HAM configs):
    SGD, momentum 0.9, no weight decay, base lr 3 x batch/256 = 1.5 at its batch of 128, 60 epochs, the lr a
    cosine to 0 over all steps without warm-up: step k of K at 1.5 (1 + cos(pi k / K)) / 2. 300 images make
    3 steps an epoch, the last of 44."""
    args = linear_eval.parse_args(["--init", "scratch"])
    recipe = (args.epochs, args.batch_size, args.lr, args.momentum, args.weight_decay)
    assert recipe == (60, 128, 3.0, 0.9, 0.0)
    args.epochs = 4
    seen, step = [], torch.optim.SGD.step

    def recording(optimiser, *rest, **options):
        group = optimiser.param_groups[0]
        seen.append((group["lr"], group["momentum"], group["weight_decay"]))
        return step(optimiser, *rest, **options)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    linear_eval.train_linear(synthetic_features(0, n=300), synthetic_features(1), 4, args, seed=0)
    total = 4 * 3
    assert [lr for lr, *_ in seen] == pytest.approx(
        [0.75 * (1 + np.cos(np.pi * k / total)) for k in range(total)]
    )
    assert {(momentum, decay) for _, momentum, decay in seen} == {(0.9, 0.0)}
    assert len(seen) == total


@pytest.mark.script
def test_features_are_cached_and_recomputed_when_the_checkpoint_changes(tmp_path, pretrained, monkeypatch):
    args = linear_eval.parse_args(eval_args(tmp_path, "--ckpt", pretrained / "run" / "backbone.pt"))
    data = datasets.data_from_args(args)
    ckpt = tmp_path / "backbone.pt"
    ckpt.write_bytes((pretrained / "run" / "backbone.pt").read_bytes())
    split = datasets.load_split(data, pretrained / "run" / "split.json")
    calls = []
    embed = bit_convert.embed
    monkeypatch.setattr(bit_convert, "embed", lambda *a, **k: calls.append(1) or embed(*a, **k))

    def features():
        backbone, _, _, digest = saved_backbone(ckpt)
        return eval_common.part_features(
            backbone, digest, data, split, "val", args.image_size, args.cache_dir, 0, torch.device("cpu")
        )

    first, again = features(), features()
    assert len(calls) == 1 and torch.isfinite(first[0]).all() and torch.equal(first[0], again[0])
    save_backbone(trained_looking_backbone(1), ckpt, epoch=4)  # the run went on: new weights, new features
    changed = features()
    assert len(calls) == 2 and not torch.equal(changed[0], first[0])
    assert torch.equal(changed[1], torch.as_tensor(data.labels[datasets.indices(data, split, "val")]))


# ------------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def evaluated(pretrained):
    out = pretrained / "run" / "linear"
    run = run_script(
        "linear_eval.py",
        *eval_args(pretrained, "--ckpt", pretrained / "run" / "backbone.pt", "--epochs", "20"),
    )
    assert run.returncode == 0, run.stderr
    return out, run


@pytest.mark.script
def test_linear_eval_writes_results_and_confusion(evaluated, pretrained):
    out, run = evaluated
    results = json.loads((out / "results.json").read_text())
    assert len(results["trials"]) == 3 and [t["seed"] for t in results["trials"]] == [0, 1, 2]
    for metric in ("balanced_accuracy", "macro_f1", "accuracy"):
        values = [t[metric] for t in results["trials"]]
        assert results["mean"][metric] == pytest.approx(np.mean(values))
        assert results["std"][metric] == pytest.approx(np.std(values, ddof=1))
    trial = results["trials"][0]
    test_labels = datasets.load_digits().labels[
        datasets.indices(
            datasets.load_digits(), json.loads((pretrained / "run" / "split.json").read_text()), "test"
        )
    ]
    assert np.sum(trial["confusion"]) == len(test_labels)
    assert np.sum(trial["confusion"], axis=1).tolist() == np.bincount(test_labels, minlength=10).tolist()
    assert trial["balanced_accuracy"] > 0.2  # random features of a random network still beat chance (0.1)
    assert results["split_file"] == str(pretrained / "run" / "split.json")
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "test balanced accuracy" in run.stdout


@pytest.mark.script
def test_augment_embeds_new_views_every_epoch(pretrained, tmp_path, monkeypatch):
    train_features = []
    train = linear_eval.train_linear

    def recording(train_part, val, n_classes, args, seed, augmented=None, select=True):
        train_features.extend(augmented() for _ in range(2))
        return train(train_part, val, n_classes, args, seed, augmented, select)

    monkeypatch.setattr(linear_eval, "train_linear", recording)
    linear_eval.main(
        eval_args(
            tmp_path,
            "--ckpt",
            pretrained / "run" / "backbone.pt",
            "--augment",
            "--epochs",
            "2",
            "--trials",
            "1",
            "--out",
            tmp_path / "augmented",
        )
    )
    first, second = train_features
    assert first.shape == (len(json.loads((pretrained / "run" / "split.json").read_text())["train"]), 2048)
    assert not torch.equal(first, second)  # random crops and flips: new features each call
    assert json.loads((tmp_path / "augmented" / "results.json").read_text())["args"]["augment"] is True


@pytest.mark.script
def test_compare_draws_the_figure(evaluated, tmp_path, capsys):
    out, _ = evaluated
    other = json.loads((out / "results.json").read_text())
    other["model"] = "another model"
    (tmp_path / "other.json").write_text(json.dumps(other))
    linear_eval.main(
        [
            "--compare",
            str(out / "results.json"),
            str(tmp_path / "other.json"),
            "--out",
            str(tmp_path / "figures"),
        ]
    )
    assert (tmp_path / "figures" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "another model" in capsys.readouterr().out


@pytest.mark.script
def test_tsne_and_spectrum_figures(pretrained, tmp_path):
    """In this process (tsne.py's command line runs in test_layout.py and test_signals_and_processes.py)."""
    tsne.main(
        eval_args(
            pretrained,
            "--ckpt",
            pretrained / "run" / "backbone.pt",
            "--init",
            "scratch",
            "--norm",
            "bn",
            "--spectrum",
            "--out",
            tmp_path,
        )
    )
    for figure in ("tsne.png", "spectrum.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------------- errors


def one_line_error(argv, *fragments):
    """linear_eval.main(argv) fails with one line that holds every fragment (what its command line prints
    after `linear_eval.py: error: `, exit 1; the one real process of linear_eval.py is `evaluated`'s)."""
    message = failure(lambda: linear_eval.main(argv))
    assert all(f in message for f in fragments), message


@pytest.mark.script
def test_a_file_that_is_not_a_backbone_is_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / "last.pt")
    one_line_error(eval_args(tmp_path, "--ckpt", tmp_path / "last.pt"), "last.pt", "not a backbone file")


@pytest.mark.script
def test_a_missing_or_foreign_split_is_refused(tmp_path, pretrained):
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "backbone.pt").write_bytes((pretrained / "run" / "backbone.pt").read_bytes())
    one_line_error(eval_args(tmp_path, "--ckpt", alone / "backbone.pt"), "split.json not found")
    datasets.load_split(datasets.load_digits(), tmp_path / "other.json", seed=1)
    one_line_error(
        eval_args(tmp_path, "--ckpt", alone / "backbone.pt", "--split-file", tmp_path / "other.json"),
        "is not the split a backbone was pretrained with",
    )


@pytest.mark.script
def test_a_class_absent_from_train_is_refused(tmp_path):
    data = datasets.load_digits()
    split = json.loads(json.dumps(datasets.load_split(data, tmp_path / "split.json")))
    nines = [i for i in split["train"] if data.labels[i] == 9]
    split["train"] = [i for i in split["train"] if i not in nines]
    split["pretrain"] += nines
    (tmp_path / "split.json").write_text(json.dumps(split))
    one_line_error(
        eval_args(tmp_path, "--init", "scratch", "--split-file", tmp_path / "split.json"), "class 9"
    )


# ----------------------------------------------------------------------------- fixes of issue 12, pinned here


def test_a_feature_dead_on_train_does_not_wreck_the_probe():
    """A ReLU unit that is 0 on every train image (std 0) but not on test: dividing by std + 1e-6 multiplied
    it by a million and the test predictions became one class. StandardScaler's rule gives it the scale 1."""
    args = linear_eval.parse_args(["--init", "scratch", "--epochs", "20", "--batch-size", "32"])
    (x, y), val, (test_x, test_y) = synthetic_features(0), synthetic_features(1), synthetic_features(2)

    def dead(features, value):  # a last feature that is `value` on every image
        return torch.cat([features, torch.full((len(features), 1), value)], 1)

    classify, _ = linear_eval.train_linear((dead(x, 0.0), y), (dead(val[0], 0.0), val[1]), 4, args, seed=0)
    with torch.no_grad():
        accuracy = (classify(dead(test_x, 0.0)).argmax(1) == test_y).float().mean().item()
        awake = (classify(dead(test_x, 3.0)).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.6 and awake == pytest.approx(accuracy, abs=0.05)
    mean, scale = linear_eval.standardiser(dead(x, 0.0))
    assert scale[-1] == 1.0 and torch.allclose(scale[:-1], x.std(0, correction=0), rtol=1e-5)


def test_the_official_cifar10_protocol_pretrains_on_all_training_images_and_queries_the_test_set(tmp_path):
    from helpers import write_cifar

    write_cifar(tmp_path, n=20)
    data = datasets.load_cifar10(tmp_path)
    split = datasets.load_split(data, tmp_path / "split.json", "official")
    train = [data.ids[i] for i in np.flatnonzero(~data.official_test)]
    test = [data.ids[i] for i in np.flatnonzero(data.official_test)]
    assert split["pretrain"] == split["train"] == train and split["val"] == split["test"] == test
    assert not eval_common.selects_on_val(split)
    assert datasets.load_split(data, tmp_path / "split.json") == split  # read back as written
    edited = {**split, "pretrain": train + test}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(bit_common.DataError, match="edited.json: not the official split"):
        datasets.load_split(data, tmp_path / "edited.json")
    with pytest.raises(bit_common.DataError, match="--split official: digits has no official test set"):
        datasets.load_split(datasets.load_digits(), tmp_path / "digits.json", "official")
    args = linear_eval.parse_args(["--init", "scratch", "--epochs", "7"])
    train_features, val_features = synthetic_features(0), synthetic_features(1)
    assert (
        linear_eval.train_linear(train_features, val_features, 4, args, 0, select=False)[1] == 7
    )  # the last


@pytest.mark.script
def test_evaluation_takes_the_image_size_the_backbone_was_pretrained_at(tmp_path, pretrained, capsys):
    ckpt = tmp_path / "run" / "backbone.pt"
    ckpt.parent.mkdir()
    save_backbone(resnet_v2("r50x1", "bn", cifar_stem=True), ckpt, epoch=1, image_size=12)
    assert linear_eval.parse_args(["--ckpt", str(ckpt)]).image_size == 12  # digits' own default is 8

    assert tsne.parse_args(["--ckpt", str(ckpt), "--init", "scratch"]).image_size == 12
    assert linear_eval.parse_args(["--ckpt", str(ckpt), "--image-size", "16"]).image_size == 16
    assert "warning: --image-size 16, but" in capsys.readouterr().out
    with pytest.raises(
        bit_common.UserError, match="--norm gn: .*backbone.pt holds a backbone with norm = bn"
    ):
        linear_eval.parse_args(["--ckpt", str(ckpt), "--norm", "gn"])
