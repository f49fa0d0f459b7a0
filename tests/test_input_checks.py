"""The third audit's inputs (issue 26, the input-validation half; issue 22 item 2): every flag and every
value that --resume restores checked by one validation, checkpoints and args.json checked as flags are,
non-finite weights and features refused, every field a backbone file records checked, a backbone file's own
weight standardisation, image folders with odd names and links, a HAM10000 id found twice, split files that
leave images out or contradict the flags, a NaN image, a cache too large for its disk, and the catalogue's
test names.

The helpers of test_bad_inputs.py are used as they are there: `failure()` (one line, a non-zero exit),
`untouched` (the user's bytes and mtimes), `before_data` (refused before the data loads) and TinyBackbone (a
two-epoch run in seconds). Expected values come from NumPy, PIL and torch directly.
"""

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import bit_common
import bit_convert
import datasets
import eval_common
import finetune
import linear_eval
import pretrain
import tsne
from bit_convert import resnet_v2, save_backbone
from helpers import (
    R50,
    REPO,
    SAMPLE,
    TinyBackbone,
    eval_args,
    failure,
    read_rows,
    run_script,
    tiny_args,
    untouched,
    write_ham,
    write_npz,
    zero_bit_arrays,
)

SIZE = 16


def resume_argv(run, *extra):
    return ["--out", str(run), "--resume", "--workers", "0", "--device", "cpu", *map(str, extra)]


def edit_json(path, **changes):
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, **changes}, indent=1))


def backbone_file(path, **fields):
    """A backbone file as save_backbone writes it, with `fields` replaced, written with torch.save directly
    (save_backbone refuses bad fields)."""
    record = {"arch": "r50x1", "norm": "bn", "cifar_stem": True, "head_size": 0, "ws": True, "whiten": False}
    record["state_dict"] = resnet_v2("r50x1", "bn", cifar_stem=True).state_dict()
    torch.save({**record, **fields}, path)
    return path


# ---------------------------------------------------------------------------------- a pretraining run to edit


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A finished two-epoch run of TinyBackbone: args.json, split.json, last.pt."""
    tmp = tmp_path_factory.mktemp("pretrained_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
        assert pretrain.main(tiny_args(tmp) + ["--eval-every", "5"]) == 0
    return tmp / "run"


@pytest.fixture
def run_copy(pretrained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    shutil.copytree(pretrained_run, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------- rows 3, 24, 27: one validation of every flag

BAD_FLAGS = [
    ("pretrain", "--momentum", "1.5"),
    ("pretrain", "--eval-every", "0"),
    ("pretrain", "--batch-size", "2.5"),
    ("pretrain", "--seed", str(2**64 + 1)),
    ("pretrain", "--image-size", "100000"),
    ("pretrain", "--knn-t", "0.01"),
    ("linear_eval", "--gamma", "-3"),
    ("linear_eval", "--seed", "-1"),
    ("finetune", "--momentum", "5"),
    ("finetune", "--gamma", "-3"),
    ("finetune", "--seed", str(2**24)),
    ("tsne", "--seed", str(2**64 + 1)),
    ("tsne", "--split-seed", str(2**32)),
]


@pytest.mark.script
@pytest.mark.parametrize("script, flag, value", BAD_FLAGS)
@pytest.mark.usefixtures("before_data")
def test_a_flag_out_of_its_range_is_one_line_in_every_script(tmp_path, capsys, script, flag, value):
    """One type per kind of flag (bit_common.bounded), shared by every script: the same flag, the same
    check."""
    argv = tiny_args(tmp_path) if script == "pretrain" else eval_args(tmp_path, "--init", "scratch")
    parse = {"pretrain": pretrain, "linear_eval": linear_eval, "finetune": finetune, "tsne": tsne}[script]
    message = failure(lambda: parse.parse_args(argv + [flag, value]), capsys)
    assert f"argument {flag}: {value}: expected a " in message or f"argument {flag}: expected " in message
    assert not (tmp_path / "run").exists()


def test_the_bounds_of_momentum_and_seed():
    assert bit_common.MOMENTUM("0") == 0.0 and bit_common.MOMENTUM("0.999") == 0.999
    assert bit_common.SEED("0") == 0 and bit_common.SEED(str(2**24 - 1)) == 2**24 - 1
    for kind, text in (
        (bit_common.MOMENTUM, "1"),
        (bit_common.MOMENTUM, "-0.1"),
        (bit_common.SEED, str(2**24)),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{text}: expected a ")):
            kind(text)


def test_the_knn_temperature_bound_keeps_the_votes_finite():
    """KNN_TEMPERATURE: a vote is exp(cosine / t) in float32; from t = 0.02, 10**16 votes of cosine 1 sum to a
    finite number; at t = 0.01 one vote is already infinite (the control)."""
    assert bit_common.KNN_TEMPERATURE("0.02") == 0.02
    assert torch.isfinite(torch.tensor(1 / 0.02).exp() * 1e16)
    assert not torch.isfinite(torch.tensor(1 / 0.01).exp())


@pytest.mark.heavy
def test_the_largest_seed_seeds_every_view_of_a_long_run():
    """SEED_LIMIT: a SeededSampler of the largest seed, in a run's millionth epoch, gives view seeds that
    torch.manual_seed takes (2**64 would overflow it: the control)."""
    sampler = datasets.SeededSampler(range(1000), 1, 0, shuffle=True, seed=bit_common.SEED_LIMIT - 1)
    sampler.set_epoch(10**6)
    keys = [key for key, _ in sampler]
    assert max(keys) < 2**64
    for key in keys:
        torch.manual_seed(key)
    with pytest.raises(ValueError):
        torch.manual_seed(2**64)


@pytest.mark.usefixtures("before_data")
def test_trials_whose_last_seed_is_past_the_limit_are_refused(tmp_path):
    argv = eval_args(tmp_path, "--init", "scratch", "--seed", bit_common.SEED_LIMIT - 2, "--trials", 3)
    message = failure(lambda: linear_eval.parse_args(argv))
    assert f"the last trial's seed {bit_common.SEED_LIMIT} is above {bit_common.SEED_LIMIT - 1}" in message


@pytest.mark.script
@pytest.mark.parametrize("flag, value", [("--eval-every", "0"), ("--workers", "-1"), ("--save-at", "99")])
def test_resume_checks_the_flags_it_may_change_as_a_new_run_does(run_copy, capsys, flag, value):
    with untouched(run_copy):
        message = failure(lambda: pretrain.main(resume_argv(run_copy, flag, value)), capsys)
    assert flag in message


ARGS_JSON_EDITS = {  # id: (key, value, what the error says)
    "lr": ("lr", -1.0, "lr = -1.0: -1.0: expected a number in (0, inf)"),
    "epochs_0": ("epochs", 0, "epochs = 0: 0: expected a whole number in [1, inf)"),
    "epochs_2.5": ("epochs", 2.5, "epochs = 2.5: expected a whole number"),
    "momentum": ("momentum", 1.5, "momentum = 1.5: 1.5: expected a number in [0, 1)"),
    "seed_a_string": ("seed", "0", 'seed = "0": expected 0'),
    "split": ("split", "0.1,0.1", 'split = "0.1,0.1": --split 0.1,0.1: expected four fractions'),
    "cifar_stem": ("cifar_stem", "yes", 'cifar_stem = "yes": expected true or false'),
    "save_at": ("save_at", [0], "--save-at 0: expected epochs from 1"),
    "init": ("init", 5, "init = 5: expected a string"),
    "another_method": ("temperature", 0.5, "--temperature 0.5: --method simsiam has no such setting"),
    "nan": ("warmup_epochs", float("nan"), "warmup_epochs = NaN: expected a finite number, not 'nan'"),
    "unknown_key": ("learning_rate", 0.1, "'learning_rate' is not an argument of this script"),
    "arch_null": ("arch", None, "arch = null: expected one of r50x1"),
    "ws_null": ("ws", None, "ws = null: expected true or false"),  # would build plain convs: null is falsy
    "lr_null": ("lr", None, "lr = null: expected a value of --lr"),
    "compile": ("compile", "yes", 'compile = "yes": expected true or false'),  # null: not given, off
}


@pytest.mark.script
@pytest.mark.parametrize("edit", ARGS_JSON_EDITS)
def test_args_json_edited_to_a_value_no_flag_takes_is_refused_as_the_flag_is(run_copy, edit):
    """Rows 12 and 24: args.json's values go through the flags' own types and the checks of a new run."""
    key, value, expected = ARGS_JSON_EDITS[edit]
    edit_json(run_copy / "args.json", **{key: value})
    (run_copy / "last.pt").unlink()  # "epochs": 0 before the first last.pt exited 0 with no outputs
    with untouched(run_copy):
        message = failure(lambda: pretrain.main(resume_argv(run_copy)))
    assert expected in message


@pytest.mark.script
def test_a_run_recorded_by_the_earlier_code_still_resumes(run_copy):
    """The code before issue 26 recorded the --split-by flag (lesion, on digits that have no lesions), not
    the split file's (image), in args.json and last.pt: such a run resumes, and then records the file's."""
    edit_json(run_copy / "args.json", split_by="lesion")
    state = torch.load(run_copy / "last.pt", weights_only=True)
    state["args"]["split_by"] = "lesion"
    torch.save(state, run_copy / "last.pt")
    assert pretrain.main(resume_argv(run_copy)) == 0
    assert json.loads((run_copy / "args.json").read_text())["split_by"] == "image"


@pytest.mark.script
def test_args_json_missing_a_key_is_refused(run_copy):
    saved = json.loads((run_copy / "args.json").read_text())
    del saved["arch"]
    (run_copy / "args.json").write_text(json.dumps(saved))
    with untouched(run_copy):
        message = failure(lambda: pretrain.main(resume_argv(run_copy)))
    assert f"{run_copy / 'args.json'} lacks arch" in message


# ------------------------------------------------------------------------------------ row 12: last.pt checked


def last_pt_of_another_kind(run, kind):
    last, state = run / "last.pt", torch.load(run / "last.pt", weights_only=True)
    if kind == "backbone":
        shutil.copyfile(backbone_file(run.parent / "backbone.pt"), last)
    elif kind == "list":
        torch.save([1, 2, 3], last)
    elif kind == "args_a_string":
        torch.save({**state, "args": "epochs=2"}, last)
    elif kind == "wrong_shape":
        model = dict(state["model"])
        model["backbone.conv.weight"] = torch.zeros(3, 3)
        torch.save({**state, "model": model}, last)
    elif kind == "nan_weight":
        model = dict(state["model"])
        model["backbone.conv.weight"] = torch.full_like(model["backbone.conv.weight"], float("nan"))
        torch.save({**state, "model": model}, last)
    elif kind == "momentum_buffer_shape":
        optimizer = state["optimizer"]
        optimizer["state"][0]["momentum_buffer"] = torch.zeros(5)
        torch.save(state, last)
    elif kind == "progress_step_a_string":
        torch.save({**state, "progress": {**state["progress"], "step": "0"}}, last)
    elif kind == "rng_of_another_size":
        torch.save({**state, "rng": torch.zeros(3, dtype=torch.uint8)}, last)
    elif kind == "weights_as_integers":  # load_state_dict would cast them into the float weights
        model = dict(state["model"])
        model["backbone.conv.weight"] = model["backbone.conv.weight"].long()
        torch.save({**state, "model": model}, last)
    elif kind in ("history_not_rows", "loss_sum_of_another_shape", "step_beyond_the_epoch"):
        change = {
            "history_not_rows": {"history": [1, 2]},
            "loss_sum_of_another_shape": {"loss_sum": torch.zeros(3, dtype=torch.float64)},
            "step_beyond_the_epoch": {"step": 7},
        }[kind]
        torch.save({**state, "progress": {**state["progress"], **change}}, last)
    return last


LAST_PT_KINDS = {  # what last_pt_of_another_kind writes: what the error says
    "backbone": "is not a last.pt of this script",
    "list": "is not a last.pt of this script",
    "args_a_string": "is not a last.pt of this script",
    "wrong_shape": "its model does not fit this run",
    "nan_weight": "backbone.conv.weight holds 432 value(s) that are NaN or infinite",
    "momentum_buffer_shape": "its optimizer does not fit this run",
    "progress_step_a_string": "progress step is a str, not what a run records there",
    "rng_of_another_size": "its random state does not fit this run",
    "history_not_rows": "progress history is a list, not what a run records there",
    "loss_sum_of_another_shape": "progress loss_sum is a Tensor of shape (3,), not what a run records there",
    "step_beyond_the_epoch": "progress step = 7, beyond the 6 steps of an epoch",
    "weights_as_integers": "its model does not fit this run (ValueError: backbone.conv.weight is torch.int64",
}


@pytest.mark.script
@pytest.mark.parametrize("kind", LAST_PT_KINDS)
def test_a_last_pt_of_another_kind_is_one_line(run_copy, kind):
    last = last_pt_of_another_kind(run_copy, kind)
    with untouched(run_copy):
        message = failure(lambda: pretrain.main(resume_argv(run_copy)))
    assert str(last) in message and LAST_PT_KINDS[kind] in message


# ------------------------------------------------------------------------ rows 12, 23, 27: finetune's own run


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A finished one-epoch fine-tuning of a backbone file: (its backbone.pt, the run's directory)."""
    tmp = tmp_path_factory.mktemp("finetuned")
    (tmp / "pre").mkdir()
    split = datasets.load_split(datasets.load_digits(), tmp / "pre" / "split.json", "0.8,0.1,0.05,0.05")
    torch.manual_seed(0)
    save_backbone(
        resnet_v2("r50x1", "gn", cifar_stem=True),
        tmp / "pre" / "backbone.pt",
        epoch=1,
        split_digest=datasets.split_digest(split),
    )
    argv = eval_args(tmp, "--ckpt", tmp / "pre" / "backbone.pt", "--epochs", 1, "--trials", 1, "--tune", "q4")
    assert (
        finetune.main(argv + ["--batch-size", "16", "--train-fraction", "0.2", "--out", str(tmp / "ft")]) == 0
    )
    return tmp / "pre" / "backbone.pt", tmp / "ft"


@pytest.fixture
def finetuned_copy(finetuned, tmp_path):
    ckpt, out = finetuned
    shutil.copytree(ckpt.parent, tmp_path / "pre")
    shutil.copytree(out, tmp_path / "ft")
    edit_json(tmp_path / "ft" / "args.json", ckpt=str(tmp_path / "pre" / "backbone.pt"))
    state = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    state["args"]["ckpt"] = str(tmp_path / "pre" / "backbone.pt")
    torch.save(state, tmp_path / "ft" / "last.pt")
    return tmp_path / "pre" / "backbone.pt", tmp_path / "ft"


@pytest.mark.script
def test_finetune_resume_refuses_a_replaced_ckpt(finetuned_copy):
    """Row 23: the later trials would start from the new file without a word."""
    ckpt, out = finetuned_copy
    torch.manual_seed(1)
    record = torch.load(ckpt, weights_only=True)
    save_backbone(
        resnet_v2("r50x1", "gn", cifar_stem=True), ckpt, **{k: record[k] for k in ("epoch", "split_digest")}
    )
    with untouched(out):
        message = failure(lambda: finetune.main(resume_argv(out)))
    assert f"{ckpt} is not the backbone file the run in {out} started from" in message


@pytest.mark.script
def test_finetune_resumes_its_own_unchanged_run(finetuned_copy):
    _, out = finetuned_copy
    assert finetune.main(resume_argv(out)) == 0


@pytest.mark.script
@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"momentum": 5}, "momentum = 5: 5: expected a number in [0, 1)"),
        ({"gamma": -3}, "gamma = -3: -3: expected a number in [0, inf)"),
        ({"lr": -1.0}, "lr = -1.0: -1.0: expected a number in (0, inf)"),
        ({"tune": ["q5"]}, "--tune q5: expected all, 0-75"),
        ({"trials": 0}, "trials = 0: 0: expected a whole number in [1, inf)"),
    ],
)
def test_finetune_args_json_edited_to_a_value_no_flag_takes(finetuned_copy, edit, expected):
    _, out = finetuned_copy
    edit_json(out / "args.json", **edit)
    with untouched(out):
        message = failure(lambda: finetune.main(resume_argv(out)))
    assert expected in message


@pytest.mark.script
@pytest.mark.parametrize("kind", ["list", "args_a_string", "best_state_nan", "epoch_beyond_the_run"])
def test_finetune_last_pt_of_another_kind_is_one_line(finetuned_copy, kind):
    _, out = finetuned_copy
    state = torch.load(out / "last.pt", weights_only=True)
    if kind == "list":
        torch.save([state], out / "last.pt")
    elif kind == "args_a_string":
        torch.save({**state, "args": "x"}, out / "last.pt")
    elif kind == "epoch_beyond_the_run":  # its best weights then never came: a traceback at the trial's end
        torch.save({**state, "progress": {**state["progress"], "epoch": 5}}, out / "last.pt")
    else:
        best = {
            k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
            for k, v in state["progress"]["best_state"].items()
        }
        torch.save({**state, "progress": {**state["progress"], "best_state": best}}, out / "last.pt")
    with untouched(out):
        message = failure(lambda: finetune.main(resume_argv(out)))
    assert str(out / "last.pt") in message


# ------------------------------------------------------------------------ row 11: a batch of one, a huge seed


@pytest.mark.script
def test_pretrain_batch_of_one_per_process_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    message = failure(lambda: pretrain.main(tiny_args(tmp_path) + ["--batch-size", "1"]))
    assert "--batch-size 1: " in message and "two images or more each" in message
    assert not (tmp_path / "run" / "args.json").exists()


@pytest.mark.script
def test_finetune_batch_of_one_with_batchnorm_is_one_line(tmp_path):
    argv = eval_args(
        tmp_path, "--init", "scratch", "--norm", "bn", "--batch-size", 1, "--out", tmp_path / "ft"
    )
    message = failure(lambda: finetune.main(argv))
    assert "--batch-size 1: a BatchNorm backbone trains on batches of two images or more" in message
    assert not (tmp_path / "ft").exists()


# ------------------------------------------------------------------- rows 13, 14: weights and backbone fields


@pytest.mark.heavy
@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 10**9),
        ("epoch", "abc"),
        ("head_size", 10**9),
        ("split_digest", "not a digest"),
        ("ws", 1),
        ("sha256", 5),
        ("notes", "an unknown field"),
    ],
)
def test_every_field_a_backbone_file_records_is_checked(tmp_path, field, value):
    path = backbone_file(tmp_path / "b.pt", **{field: value})
    message = failure(lambda: bit_convert.read_backbone_file(path))
    assert str(path) in message and repr(field if field == "notes" else value)[:20] in message
    model = resnet_v2("r50x1", "bn", cifar_stem=True)
    with pytest.raises(bit_common.WeightsError, match=re.escape(f"cannot write {tmp_path / 'c.pt'}")):
        save_backbone(model, tmp_path / "c.pt", **{field: value})  # the same check before writing
    assert not (tmp_path / "c.pt").exists()


def nan_backbone(path):
    state = resnet_v2("r50x1", "bn", cifar_stem=True).state_dict()
    state["blocks.0.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    return backbone_file(path, state_dict=state)


@pytest.mark.heavy
def test_non_finite_weights_are_refused_in_every_weights_file(tmp_path):
    path = nan_backbone(tmp_path / "nan.pt")
    for load in (bit_convert.load_backbone, eval_common.saved_backbone):
        assert "blocks.0.0.conv1.weight holds 1 value(s) that are NaN or infinite" in failure(
            lambda: load(path)
        )
    arrays = zero_bit_arrays(R50)
    arrays["resnet/block1/unit01/a/standardized_conv2d/kernel"][0, 0, 0, 0] = np.inf
    npz = write_npz(tmp_path / "inf.npz", arrays)
    message = failure(lambda: bit_convert.load_npz(resnet_v2("r50x1", "gn"), npz))
    assert "resnet/block1/unit01/a/standardized_conv2d/kernel holds 1 value(s)" in message
    model = resnet_v2("r50x1", "bn", cifar_stem=True)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    assert "norm.weight holds 1" in failure(lambda: save_backbone(model, tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.script
def test_a_nan_backbone_is_one_line_through_pretrain_init_and_tsne_spectrum(tmp_path):
    path = nan_backbone(tmp_path / "nan.pt")
    args = pretrain.parse_args(tiny_args(tmp_path) + ["--init", str(path)])
    message = failure(
        lambda: pretrain.build_backbone(args.init, args.arch, args.norm, args.cifar_stem, args.ws)
    )
    assert str(path) in message and "NaN or infinite" in message
    argv = eval_args(tmp_path, "--ckpt", path, "--spectrum", "--out", tmp_path / "figures")
    message = failure(lambda: tsne.main(argv))
    assert str(path) in message and "NaN or infinite" in message
    assert not list((tmp_path / "figures").iterdir())


# -------------------------------------------------------------------------------- row 21: features and scores


def overflowing_backbone(path, split_digest):
    """Finite weights whose features are infinite: the final norm's scale at 1e38 overflows float32."""
    model = resnet_v2("r50x1", "gn", cifar_stem=True)
    with torch.no_grad():
        model.norm.weight.fill_(1e38)
        model.norm.bias.fill_(1e38)
    save_backbone(model, path, epoch=1, split_digest=split_digest)
    return path


@pytest.mark.script
def test_linear_eval_refuses_features_that_are_not_finite(tmp_path):
    (tmp_path / "run").mkdir()
    split = datasets.load_split(datasets.load_digits(), tmp_path / "run" / "split.json")
    path = overflowing_backbone(tmp_path / "run" / "backbone.pt", datasets.split_digest(split))
    message = failure(lambda: linear_eval.main(eval_args(tmp_path, "--ckpt", path, "--trials", 1)))
    assert "features of the train part hold" in message and "NaN or infinite" in message
    assert not (tmp_path / "run" / "linear" / "results.json").exists()


@pytest.mark.script
def test_compare_of_a_model_name_that_is_not_text_is_one_line(tmp_path):
    scores = {"balanced_accuracy": 0.5, "macro_f1": 0.4}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"model": ["m"], "data": "digits", "mean": scores, "std": scores}))
    message = failure(lambda: linear_eval.main(["--compare", str(path), "--out", str(tmp_path / "fig")]))
    assert f"--compare {path}: not a results.json" in message and "data (strings)" in message


@pytest.mark.script
@pytest.mark.parametrize("score", [float("nan"), -5.0, 1.5])
def test_compare_of_a_score_that_is_not_one_is_one_line(tmp_path, score):
    scores = {"balanced_accuracy": score, "macro_f1": 0.4}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"model": "m", "data": "digits", "mean": scores, "std": scores}))
    message = failure(lambda: linear_eval.main(["--compare", str(path), "--out", str(tmp_path / "fig")]))
    assert f"--compare {path}: mean is not a dict with the numbers" in message and "from 0 to 1" in message
    assert not (tmp_path / "fig").exists()


# ------------------------------------------------------------------- row 22: the split file decides the split


@pytest.fixture
def digits_split(tmp_path):
    data = datasets.load_digits()
    return (
        data,
        datasets.load_split(data, tmp_path / "split.json", "0.6,0.1,0.1,0.2", 3),
        tmp_path / "split.json",
    )


@pytest.mark.parametrize("given", [("0.2,0.1,0.1,0.6", None), (None, 0), ("official", 3)])
def test_flags_that_contradict_an_existing_split_file_are_refused(digits_split, given):
    data, _, path = digits_split
    with untouched(path):
        message = failure(lambda: datasets.load_split(data, path, *given))
    flag, value = ("--split", given[0]) if given[0] else ("--split-seed", given[1])
    assert message.startswith(f"{flag} {value}: the split file {path} decides the split")


@pytest.mark.parametrize(
    "given", [(None, None, None), ("0.60,0.10,0.10,0.20", 3, "image"), (None, 3, "lesion")]
)
def test_flags_that_agree_with_an_existing_split_file_load_it(digits_split, given):
    """The same fractions in other words; --split-by lesion on a source without lesions splits by image."""
    data, split, path = digits_split
    assert datasets.load_split(data, path, *given) == split


@pytest.mark.heavy
@pytest.mark.parametrize("script", ["linear_eval", "tsne", "finetune"])
def test_a_split_flag_that_contradicts_the_ckpt_split_is_refused(tmp_path, script):
    (tmp_path / "run").mkdir()
    split = datasets.load_split(datasets.load_digits(), tmp_path / "run" / "split.json", "0.8,0.1,0.05,0.05")
    path = tmp_path / "run" / "backbone.pt"
    save_backbone(
        resnet_v2("r50x1", "gn", cifar_stem=True), path, epoch=1, split_digest=datasets.split_digest(split)
    )
    main = {"linear_eval": linear_eval.main, "tsne": tsne.main, "finetune": finetune.main}[script]
    argv = eval_args(tmp_path, "--ckpt", path, "--split", "0.2,0.1,0.1,0.6", "--out", tmp_path / "out")
    message = failure(lambda: main(argv))
    assert "--split 0.2,0.1,0.1,0.6: the split file" in message and "0.8,0.1,0.05,0.05" in message
    assert not list(tmp_path.glob("out/*"))  # linear_eval and tsne make --out before computing; nothing in it


def test_what_a_split_file_records_is_recorded_only_where_a_flag_takes_it():
    """A hand-made split file's settings must not reach args.json as values that --resume would refuse."""
    made = {"fractions": {"pretrain": "3/5", "train": "1/10", "val": "1/10", "test": "1/5"}, "seed": 3}
    assert datasets.split_settings({**made, "split_by": "image"}) == ("0.6,0.1,0.1,0.2", 3, "image")
    assert datasets.split_settings({"fractions": "official", "seed": 0, "split_by": "lesion"}) == (
        "official",
        0,
        "lesion",
    )
    odd = {"fractions": "x", "seed": "0", "split_by": "diagonal"}
    assert datasets.split_settings(odd) == datasets.split_settings({}) == (None, None, None)
    assert datasets.split_settings({"fractions": {"pretrain": "1/2"}, "seed": True})[:2] == (None, None)


@pytest.mark.script
def test_pretrain_records_the_split_settings_the_file_holds(tmp_path, digits_split):
    _, _, path = digits_split
    args = pretrain.parse_args(tiny_args(tmp_path) + ["--split-file", str(path)])
    args.split = None  # as if --split were not given: tiny_args gives one
    pretrain.load_data_and_split(args, 0)
    assert (args.split, args.split_seed, args.split_by) == ("0.6,0.1,0.1,0.2", 3, "image")


# -------------------------------------------------------------------- row 25: every image in exactly one part


@pytest.mark.parametrize("edit", ["test_emptied", "one_id_deleted"])
def test_a_split_file_that_leaves_images_out_is_refused(digits_split, edit):
    data, split, path = digits_split
    on_disk = json.loads(path.read_text())
    lost = on_disk["test"] if edit == "test_emptied" else on_disk["val"][:1]
    on_disk["test" if edit == "test_emptied" else "val"] = (
        [] if edit == "test_emptied" else on_disk["val"][1:]
    )
    path.write_text(json.dumps(on_disk))
    with untouched(path):
        message = failure(lambda: datasets.load_split(data, path))
    assert f"split file {path}: image {min(lost, key=data.ids.index)!r} is in no part" in message
    assert f"{len(lost)} of the data's {len(data.ids)} images are missing" in message


@pytest.mark.parametrize("stand_in", [True, 3.0])
def test_a_split_id_of_another_type_is_refused(digits_split, stand_in):
    """true == 1 and 3.0 == 3 in Python: they would stand in for the ids 1 and 3."""
    data, _, path = digits_split
    on_disk = json.loads(path.read_text())
    real = int(stand_in)
    part = next(p for p in datasets.PARTS if real in on_disk[p])
    on_disk[part] = [stand_in if i == real else i for i in on_disk[part]]
    path.write_text(json.dumps(on_disk))
    message = failure(lambda: datasets.load_split(data, path))
    assert f"part {part} lists image {stand_in!r}, which the data lacks" in message


def test_images_skipped_as_bad_need_no_part(tmp_path):
    """--skip-bad-images leaves images out of the data, and out of the split made from it: it loads."""
    full = datasets.load_digits()
    kept = slice(5, None)
    data = dataclasses.replace(full, images=full.images[kept], labels=full.labels[kept], ids=full.ids[kept])
    data.bad = {i: "unreadable" for i in full.ids[:5]}
    split = datasets.load_split(data, tmp_path / "split.json")
    assert datasets.load_split(data, tmp_path / "split.json") == split


# ----------------------------------------------------------------------------- rows 15, 19, 26: image folders


def folder_of(root, per_class=3, classes=("a", "b")):
    pixels = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            rgb = np.full((SIZE, SIZE, 3), 40 * c + 10 * i, np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(root / name / f"{i}.png")
            pixels[f"{name}/{i}.png"] = rgb
    return pixels


def folder_data(root, tmp, *extra):
    args = ["--data", "folder", "--data-root", root, "--image-size", SIZE, "--cache-dir", tmp / "cache"]
    parser = bit_common.ArgumentParser()
    datasets.add_data_args(parser)
    return datasets.data_from_args(parser.parse_args([str(a) for a in [*args, *extra]]))


def test_a_file_name_that_is_not_utf8_loads(tmp_path):
    """Row 15: the image cache's key and index take any bytes a file name holds."""
    pixels = folder_of(tmp_path / "images", per_class=5)
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8: a lone surrogate in Python's str
    rgb = np.full((SIZE, SIZE, 3), 200, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "images" / "a" / name)
    data = folder_data(tmp_path / "images", tmp_path)
    assert data.ids.count(f"a/{name}") == 1
    np.testing.assert_array_equal(data.images[data.ids.index(f"a/{name}")], rgb)
    assert len(data.ids) == len(pixels) + 1
    datasets.load_split(data, tmp_path / "split.json", "0.4,0.2,0.2,0.2")  # and into a split file and back
    assert datasets.load_split(data, tmp_path / "split.json") is not None


@pytest.mark.script
def test_names_that_are_not_utf8_print_and_draw(tmp_path):
    """A class folder and a skipped image whose names are not UTF-8: datasets.py prints its summary on a
    stdout that refuses lone surrogates (PYTHONIOENCODING=utf-8, as under an en_US.UTF-8 locale), and the
    class's label is drawable text."""
    folder_of(tmp_path / "images", per_class=5, classes=("b", os.fsdecode(b"caf\xe9")))
    (tmp_path / "images" / "b" / os.fsdecode(b"bad\xff.png")).write_bytes(b"not a png")
    argv = ["--data", "folder", "--data-root", tmp_path / "images", "--image-size", SIZE, "--skip-bad-images"]
    argv += [
        "--cache-dir",
        tmp_path / "cache",
        "--split-file",
        tmp_path / "s.json",
        "--split",
        "0.4,0.2,0.2,0.2",
    ]
    done = run_script("datasets.py", *argv, env={"PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr
    assert "caf\\xe9" in done.stdout and "bad\\udcff.png" in done.stdout
    assert folder_data(tmp_path / "images", tmp_path, "--skip-bad-images").classes == ("b", "caf\\xe9")


@pytest.mark.parametrize(
    "link", ["a/up -> ..", "a/loop -> .", "b/copy -> ../a", "a/same.png -> 0.png", "b/hard.png => ../a/1.png"]
)
def test_a_link_that_reaches_images_twice_is_refused(tmp_path, link):
    """Row 19: a/up -> .. made class a grow from 20 to 2,420 images, the others' under its label. (=>: a
    hard link.)"""
    folder_of(tmp_path / "images")
    name, target = re.split(" -> | => ", link)
    if "=>" in link:
        os.link((tmp_path / "images" / name).parent / target, tmp_path / "images" / name)
    else:
        os.symlink(target, tmp_path / "images" / name)
    with untouched(tmp_path / "images"):
        message = failure(lambda: folder_data(tmp_path / "images", tmp_path))
    assert f"{tmp_path / 'images' / name}" in message and "would count twice" in message


def test_a_class_folder_linked_from_elsewhere_loads(tmp_path):
    pixels = folder_of(tmp_path / "elsewhere", classes=("a",))
    folder_of(tmp_path / "images", classes=("b",))
    os.symlink(tmp_path / "elsewhere" / "a", tmp_path / "images" / "a")
    data = folder_data(tmp_path / "images", tmp_path)
    assert data.ids == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png"]
    np.testing.assert_array_equal(data.images[0], pixels["a/0.png"])


def test_a_float_image_of_nan_is_named_or_skipped(tmp_path):
    """Row 26: a float TIFF full of NaN became garbage pixels with a NumPy warning."""
    folder_of(tmp_path / "images")
    path = tmp_path / "images" / "a" / "nan.tif"
    Image.fromarray(np.full((SIZE, SIZE), np.nan, np.float32)).save(path)
    assert Image.open(path).mode == "F"
    message = failure(lambda: folder_data(tmp_path / "images", tmp_path))
    assert f"{path}: unreadable image (ValueError: 256 pixel value(s) are NaN or infinite)" in message
    data = folder_data(tmp_path / "images", tmp_path, "--skip-bad-images")
    assert list(data.bad) == ["a/nan.tif"] and len(data.ids) == 6


# ---------------------------------------------------------------------------------- row 20: an id found twice


def test_an_id_that_matches_two_files_is_refused(tmp_path):
    rows = read_rows(SAMPLE)
    rows = [r for dx in datasets.HAM_CLASSES for r in [x for x in rows if x["dx"] == dx][:2]]
    root = write_ham(tmp_path / "HAM10000", rows)
    real = next(root.rglob(f"{rows[0]['image_id']}.jpg"))
    stale = root / "old_backup" / f"{rows[0]['image_id']}.png"
    stale.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(stale)
    with untouched(root):
        message = failure(lambda: datasets.load_ham10000(root, SIZE, tmp_path / "cache"))
    assert str(real) in message and str(stale) in message and rows[0]["image_id"] in message


# ------------------------------------------------------------------------- row 28: the cache against the disk


def test_a_cache_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    folder_of(tmp_path / "images")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    message = failure(lambda: folder_data(tmp_path / "images", tmp_path))
    assert f"--cache-dir {tmp_path / 'cache'}: the decoded images need {6 * SIZE * SIZE * 3} bytes" in message
    assert "only 1000 bytes are free there" in message
    assert not list((tmp_path / "cache").rglob("*.*"))


# -------------------------------------------------------- issue 22 item 2: a backbone file's own ws, and more


@pytest.fixture
def plain_convs(tmp_path):
    """A backbone file saved without weight standardisation."""
    model = resnet_v2("r50x1", "bn", cifar_stem=True, ws=False)
    save_backbone(model, tmp_path / "plain.pt")
    return tmp_path / "plain.pt"


@pytest.mark.script
def test_pretrain_init_takes_the_files_weight_standardisation(tmp_path, plain_convs):
    args = pretrain.parse_args(tiny_args(tmp_path) + ["--init", str(plain_convs)])
    assert args.ws is False
    backbone = pretrain.build_backbone(args.init, args.arch, args.norm, args.cifar_stem, args.ws)
    assert backbone.ws is False and not backbone.blocks[0][0].conv1.standardize
    reference = resnet_v2("r50x1", "bn", cifar_stem=True, ws=False)
    reference.load_state_dict(torch.load(plain_convs, weights_only=True)["state_dict"])
    images = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    torch.testing.assert_close(backbone.eval()(images), reference.eval()(images), rtol=0, atol=0)


@pytest.mark.script
@pytest.mark.parametrize("script", ["pretrain", "linear_eval", "tsne", "finetune", "finetune_combine"])
@pytest.mark.usefixtures("before_data")
def test_a_ws_flag_that_contradicts_the_file_is_one_line_in_every_script(tmp_path, script):
    path = tmp_path / "standardised.pt"
    save_backbone(resnet_v2("r50x1", "bn", cifar_stem=True), path)
    given = {
        "pretrain": (pretrain, tiny_args(tmp_path) + ["--init", str(path)]),
        "linear_eval": (linear_eval, eval_args(tmp_path, "--ckpt", path)),
        "tsne": (tsne, eval_args(tmp_path, "--ckpt", path)),
        "finetune": (finetune, eval_args(tmp_path, "--ckpt", path)),
        "finetune_combine": (finetune, eval_args(tmp_path, "--combine", path, path)),
    }
    module, argv = given[script]
    message = failure(lambda: module.parse_args(argv + ["--no-ws"]))
    assert message == f"--no-ws: {path} holds a backbone with ws = True; leave the flag out to use it"


@pytest.mark.heavy
def test_build_backbone_refuses_a_ws_other_than_the_files(plain_convs):
    message = failure(lambda: pretrain.build_backbone(str(plain_convs), "r50x1", "bn", True, True))
    assert "(arch, norm, cifar_stem, ws) = ('r50x1', 'bn', True, False)" in message


# ------------------------------------------------------------------------------ the catalogue names its tests


def catalogue_rows(text):
    """(section, row, {letter: test file} in force there, whether the row must name a test) for every row of
    CATALOGUE.md: numbered items and "- " entries, with their indented continuation lines. A line "X =
    tests/....py" (several may share a line) maps X from there on. The rows after a paragraph "Tried next to
    ..." are what an audit tried besides its list: they name a test where one pins them."""
    files, section, rows, notes = {}, "", [], False
    for line in text.splitlines():
        for letter, path in re.findall(r"\b([A-Z]{1,2}) = (tests/\w+\.py)", line):
            files[letter] = path
        if line.startswith("## "):
            section, notes = line[3:], False
        elif line.startswith("Tried next to"):
            notes = True
        elif re.match(r"(\d+\. |- )", line):
            rows.append([section, line, dict(files), not notes])
        elif line.startswith("  ") and rows:
            rows[-1][1] += " " + line.strip()
    return rows


def functions_of(path):
    """The test functions a file defines, at module level or in a class."""
    tree = ast.parse((REPO / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


@pytest.mark.heavy
def test_every_catalogue_row_names_tests_that_exist():
    rows = catalogue_rows((REPO / "docs" / "CATALOGUE.md").read_text())
    assert len(rows) >= 85  # the 56 items and the second audit's 29 rows, at least
    defined = {}
    for section, row, files, must_name_a_test in rows:
        named = re.findall(r"\b([A-Z]{1,2})::(test_\w+)", row)
        assert named or not must_name_a_test, f"{section}: a row names no test: {row[:80]}"
        for letter, name in named:
            assert letter in files, f"{section}: {letter}:: maps to no file: {row[:80]}"
            path = files[letter]
            if path not in defined:  # parsed once a file (setdefault would parse it for every name)
                defined[path] = functions_of(path)
            assert name in defined[path], f"{section}: {path} has no {name}"
