"""The second audit's rows about the scripts (issue 16): a run that a kill cannot leave without its backbone,
an --out that a failed --force leaves as it was, a resumed run on its own split, every float flag finite,
every scored part with two classes, and one line for each bad flag or file that was a traceback.

The helpers of test_bad_inputs.py are used as they are there: `failure()` (one line, non-zero exit),
`untouched` (the user's bytes and mtimes), `before_data` (refused before the data loads) and TinyBackbone (a
two-epoch run in seconds).
"""

import argparse
import errno
import gc
import json
import shutil
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import bit_common
import bit_convert
import datasets
import finetune
import linear_eval
import pretrain
import tsne
from bit_convert import resnet_v2, save_backbone
from helpers import (
    R50,
    TinyBackbone,
    eval_args,
    failure,
    hand_edit,
    not_writable,
    run_script,
    tiny_args,
    untouched,
    write_npz,
    zero_bit_arrays,
)


class Killed(BaseException):
    """A kill -9 in-process: nothing catches it, nothing after it runs."""


def pretrain_tiny(tmp, *extra, epochs=2):
    """A pretraining run of TinyBackbone (see test_bad_inputs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
        return pretrain.main(tiny_args(tmp, epochs) + ["--eval-every", "5", *extra])


def resume(run, *extra):
    return pretrain.main(["--out", str(run), "--resume", "--workers", "0", "--device", "cpu", *extra])


def backbone_weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run with a snapshot at epoch 2, never interrupted: the reference."""
    tmp = tmp_path_factory.mktemp("finished")
    assert pretrain_tiny(tmp, "--save-at", "2") == 0
    return tmp / "run"


@pytest.fixture
def copy_of(finished, tmp_path, monkeypatch):
    """A copy of the finished run, to resume (with the TinyBackbone it was made with)."""
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------- row 1: a kill between saves


@pytest.mark.script
def test_resume_writes_the_backbone_files_a_killed_run_never_wrote(copy_of, finished):
    """The state older versions left when killed after the final last.pt: resume writes what is missing."""
    (copy_of / "backbone.pt").unlink()
    (copy_of / "backbone_ep2.pt").unlink()
    assert resume(copy_of) == 0
    model = torch.load(copy_of / "last.pt", weights_only=True)["model"]
    trained = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    for name in ("backbone.pt", "backbone_ep2.pt"):
        assert_same_weights(backbone_weights(copy_of / name), trained)
        assert_same_weights(backbone_weights(copy_of / name), backbone_weights(finished / name))
        assert torch.load(copy_of / name, weights_only=True)["epoch"] == 2


@pytest.mark.script
@pytest.mark.parametrize("killed_at", ["backbone_ep2.pt", "backbone.pt", "last.pt"])
def test_a_kill_while_the_last_epoch_saves_resumes_to_the_complete_run(tmp_path, finished, killed_at):
    """Killed just before the final epoch's `killed_at` is written: --resume ends with every file, and the
    backbones are those of the run that was never interrupted."""
    saves = {"backbone_ep2.pt": "save_backbone", "backbone.pt": "save_backbone", "last.pt": "save_atomic"}
    module = bit_common if killed_at == "last.pt" else pretrain  # last.pt: bit_common.save_last's save_atomic
    real = getattr(module, saves[killed_at])

    def save(obj, path, *args, **kwargs):
        if path.name == killed_at and (killed_at != "last.pt" or obj["progress"]["epoch"] == 3):
            raise Killed
        return real(obj, path, *args, **kwargs)

    with mock.patch.object(module, saves[killed_at], save):
        try:
            pretrain_tiny(tmp_path, "--save-at", "2")
        except Killed:
            pass
    gc.collect()  # the killed frames release the run's lock, as the OS does for a dead process
    with mock.patch.object(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone()):
        assert resume(tmp_path / "run") == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in finished.iterdir() if not p.name.startswith(".")
    )
    for name in ("backbone.pt", "backbone_ep2.pt"):
        assert_same_weights(backbone_weights(run / name), backbone_weights(finished / name))


# ------------------------------------------------------------- row 2: a --force that fails touches nothing


@pytest.mark.script
@pytest.mark.parametrize("bad", ["empty_data_root", "split_with_an_unknown_id", "batch_above_pretrain"])
def test_a_failed_force_leaves_the_old_run_as_it_was_and_resumable(copy_of, tmp_path, bad):
    (tmp_path / "empty").mkdir()
    (tmp_path / "split.json").write_text(
        json.dumps({p: ["no-such-image"] for p in ("pretrain", "train", "val", "test")})
    )
    extra = {
        "empty_data_root": ["--data", "folder", "--data-root", str(tmp_path / "empty")],
        "split_with_an_unknown_id": [],
        "batch_above_pretrain": ["--split-file", str(tmp_path / "fresh.json"), "--batch-size", "1000"],
    }[bad]
    with untouched(copy_of):
        failure(lambda: pretrain.main(tiny_args(tmp_path) + ["--out", str(copy_of), "--force", *extra]))
    assert resume(copy_of) == 0


# ------------------------------------------------------------------------------------ row 3: --cosine-epochs


@pytest.mark.script
@pytest.mark.parametrize("horizon", ["-5", "0", "1.5"])
@pytest.mark.usefixtures("before_data")
def test_a_cosine_horizon_not_positive_or_short_of_the_run_is_refused(tmp_path, capsys, horizon):
    message = failure(lambda: pretrain.main(tiny_args(tmp_path) + ["--cosine-epochs", horizon]), capsys)
    assert f"--cosine-epochs {float(horizon):g}" in message and "at least --epochs (2)" in message


# -------------------------------------------------------------------- row 4: nan and inf in float flags


def parser_of(script):
    """The parser that a script's entry point builds: caught as it starts to parse."""

    class Caught(Exception):
        pass

    def catch(parser, *args, **kwargs):
        raise Caught(parser)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", catch),
        mock.patch.object(sys, "argv", [script]),
    ):
        try:
            ENTRIES[script]()
        except Caught as caught:
            return caught.args[0]
    raise AssertionError(f"{script} built no parser")


def takes_a_float(action):
    """Whether a flag's argparse type makes a float of "0.5": float, or any checking type built on it."""
    try:
        return callable(action.type) and isinstance(action.type("0.5"), float)
    except Exception:  # noqa: BLE001 (a type that refuses "0.5" takes no float)
        return False


ENTRIES = {
    "pretrain.py": lambda: pretrain.parse_args([]),
    "linear_eval.py": lambda: linear_eval.parse_args([]),
    "finetune.py": lambda: finetune.parse_args([]),
    "tsne.py": lambda: tsne.parse_args([]),
    "bit_convert.py": bit_convert.main,
    "datasets.py": datasets.main,
}
FLOAT_FLAGS = [
    (script, action.option_strings[0])
    for script in ENTRIES
    for action in parser_of(script)._actions
    if takes_a_float(action)
]


def test_the_float_flags_were_found():
    assert ("pretrain.py", "--knn-t") in FLOAT_FLAGS and ("linear_eval.py", "--gamma") in FLOAT_FLAGS
    assert ("pretrain.py", "--temperature") in FLOAT_FLAGS and (
        "finetune.py",
        "--train-fraction",
    ) in FLOAT_FLAGS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("script, flag", FLOAT_FLAGS)
def test_every_float_flag_of_every_script_refuses_nan_and_inf(capsys, script, flag, value):
    with pytest.raises(SystemExit) as exit:
        parser_of(script).parse_args([f"{flag}={value}"])
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"{script}: error: argument {flag}: expected a finite number, not '{value}'"]


@pytest.mark.script
@pytest.mark.parametrize("script, flag", [("pretrain.py", "--knn-t"), ("linear_eval.py", "--gamma")])
def test_cli_nan_flag_is_one_error_line_and_exit_2(tmp_path, script, flag):
    done = run_script(
        script, *eval_args(tmp_path, "--init", "scratch", "--out", tmp_path / "out"), flag, "nan"
    )
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if "error" in line] == [
        f"{script}: error: argument {flag}: expected a finite number, not 'nan'"
    ]
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- row 6: a resumed run's own split


@pytest.mark.script
def test_resume_refuses_a_split_json_whose_parts_were_swapped(copy_of):
    split = json.loads((copy_of / "split.json").read_text())
    moved_in, moved_out = split["test"][:20], split["pretrain"][:20]
    split["pretrain"] = sorted(split["pretrain"][20:] + moved_in)
    split["test"] = sorted(split["test"][20:] + moved_out)
    (copy_of / "split.json").write_text(json.dumps(split, indent=1))
    with untouched(copy_of):
        message = failure(lambda: resume(copy_of))
    assert str(copy_of / "split.json") in message and "not the split the run started with" in message


# ------------------------------------------------------------------- rows 7, 18, 19: parts that cannot score


@pytest.fixture
def one_class_test(tmp_path):
    """A digits split file whose test part holds images of one class only (the others moved to pretrain)."""
    data, path = datasets.load_digits(), tmp_path / "split.json"
    split = datasets.load_split(data, path, "0.6,0.1,0.1,0.2", 0, "image")
    labels = dict(zip(data.ids, data.labels))
    ones = [i for i in split["test"] if labels[i] == 1]
    hand_edit(
        path, split, test=ones, pretrain=split["pretrain"] + [i for i in split["test"] if labels[i] != 1]
    )
    return path


@pytest.mark.parametrize("script", ["linear_eval", "finetune"])
def test_a_scored_part_with_one_class_is_refused(tmp_path, one_class_test, script):
    argv = eval_args(tmp_path, "--init", "scratch", "--split-file", one_class_test, "--out", tmp_path / "out")
    main = {"linear_eval": linear_eval.main, "finetune": finetune.main}[script]
    with untouched(one_class_test):
        message = failure(lambda: main(argv))
    assert str(one_class_test) in message and "part test holds images of 1 class only" in message
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("train", [[], "one"])
def test_pretrain_refuses_a_split_file_whose_train_part_is_empty_or_one_image(tmp_path, train):
    data, path = datasets.load_digits(), tmp_path / "split.json"
    split = datasets.load_split(data, path, "0.1,0.05,0.05,0.8", 0, "image")
    kept = split["train"][:1] if train == "one" else []
    hand_edit(path, split, train=kept, pretrain=split["pretrain"] + split["train"][len(kept) :])
    with untouched(path):
        message = failure(lambda: pretrain_tiny(tmp_path))
    assert str(path) in message and "train part" in message or "part train is empty" in message
    assert not (tmp_path / "run" / "args.json").exists()


@pytest.mark.script
def test_tsne_on_a_one_class_folder_is_refused(tmp_path):
    root = tmp_path / "folder" / "only"
    root.mkdir(parents=True)
    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), 8 * i, np.uint8)).save(root / f"{i}.png")
    argv = eval_args(tmp_path, "--init", "scratch", "--out", tmp_path / "figures")
    argv += [
        "--data",
        "folder",
        "--data-root",
        str(tmp_path / "folder"),
        "--split-file",
        str(tmp_path / "s.json"),
    ]
    message = failure(lambda: tsne.main(argv))
    assert "holds images of 1 class only" in message
    assert not (tmp_path / "figures" / "tsne.png").exists()


@pytest.mark.script
def test_tsne_with_one_test_image_outside_the_majority_class_is_refused(tmp_path):
    data, path = datasets.load_digits(), tmp_path / "split.json"
    split = datasets.load_split(data, path, "0.6,0.1,0.1,0.2", 0, "image")
    labels, majority = dict(zip(data.ids, data.labels)), int(np.bincount(data.labels).argmax())
    test = [next(i for i in split["test"] if labels[i] == majority)]
    test += [next(i for i in split["test"] if labels[i] != majority)]
    hand_edit(
        path, split, test=test, pretrain=split["pretrain"] + [i for i in split["test"] if i not in test]
    )
    argv = eval_args(tmp_path, "--init", "scratch", "--split-file", path, "--out", tmp_path / "figures")
    message = failure(lambda: tsne.main(argv))
    assert str(path) in message and "holds 1 image(s) outside the most frequent class" in message


# ----------------------------------------------------------------------- row 8: tsne's backbone flags checked


def test_tsne_refuses_a_norm_flag_that_contradicts_its_ckpt(tmp_path):
    save_backbone(resnet_v2("r50x1", "bn", cifar_stem=True), tmp_path / "bn.pt")
    message = failure(
        lambda: tsne.parse_args(eval_args(tmp_path, "--ckpt", tmp_path / "bn.pt", "--norm", "gn"))
    )
    assert f"--norm gn: {tmp_path / 'bn.pt'} holds a backbone with norm = bn" in message


# -------------------------------------------------------------------------------- row 10: --save-at, a nan


@pytest.mark.script
@pytest.mark.parametrize("epochs", ["0,2", "1,99"])
@pytest.mark.usefixtures("before_data")
def test_save_at_outside_the_run_is_refused(tmp_path, capsys, epochs):
    message = failure(lambda: pretrain.main(tiny_args(tmp_path) + ["--save-at", epochs]), capsys)
    assert (
        f"--save-at {epochs.split(',')[epochs.startswith('1')]}" in message
        and "from 1 to --epochs" in message
    )


class NanInTraining(TinyBackbone):
    def forward(self, x):
        return super().forward(x) * (float("nan") if self.training and torch.is_grad_enabled() else 1.0)


@pytest.mark.script
def test_a_nan_in_epoch_1_names_no_last_pt_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: NanInTraining())
    with pytest.raises(FloatingPointError) as raised:
        pretrain.main(tiny_args(tmp_path) + ["--eval-every", "5"])
    assert "in epoch 1" in str(raised.value) and "last.pt" not in str(raised.value)
    assert "No checkpoint was saved yet" in str(raised.value)
    assert not (tmp_path / "run" / "last.pt").exists()


# --------------------------------------------------------------------------------- row 11: --device absent


@pytest.mark.script
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:7"])
@pytest.mark.parametrize("script", ["pretrain", "linear_eval", "tsne", "finetune"])
@pytest.mark.usefixtures("before_data")
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, monkeypatch, script, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv = tiny_args(tmp_path) if script == "pretrain" else eval_args(tmp_path, "--init", "scratch")
    main = {"pretrain": pretrain.main, "linear_eval": linear_eval.main, "tsne": tsne.main}.get(script)
    message = failure(lambda: (main or finetune.main)(argv + ["--device", device]), capsys)
    assert f"argument --device: {device!r}" in message or f"argument --device: {device}:" in message


# ------------------------------------------------------------------------- row 13: a .pt with bad metadata


BAD_METADATA = {"arch": "r9000", "norm": "ln", "state_dict": [1, 2], "cifar_stem": "yes"}


@pytest.mark.script
@pytest.mark.parametrize("key", BAD_METADATA)
@pytest.mark.parametrize(
    "entry", ["pretrain_init", "linear_eval_ckpt", "tsne_ckpt", "finetune_ckpt", "finetune_combine"]
)
@pytest.mark.usefixtures("before_data")
def test_a_pt_with_a_bad_arch_norm_or_state_dict_is_one_line(tmp_path, capsys, key, entry):
    path = tmp_path / "bad.pt"
    good = {"arch": "r50x1", "norm": "bn", "cifar_stem": True, "head_size": 0, "ws": True, "state_dict": {}}
    torch.save({**good, key: BAD_METADATA[key]}, path)
    argv = {
        "pretrain_init": tiny_args(tmp_path) + ["--init", str(path)],
        "linear_eval_ckpt": eval_args(tmp_path, "--ckpt", path),
        "tsne_ckpt": eval_args(tmp_path, "--ckpt", path),
        "finetune_ckpt": eval_args(tmp_path, "--ckpt", path),
        "finetune_combine": eval_args(tmp_path, "--combine", path, path),
    }[entry]
    main = {"pretrain": pretrain.main, "linear": linear_eval.main, "tsne": tsne.main}.get(entry.split("_")[0])
    with untouched(path):
        message = failure(lambda: (main or finetune.main)(argv), capsys)
    assert f"{path}: {key} = " in message and "expected" in message


# ----------------------------------------------------------------------------------------- row 16: --compare


def results_json(path, **replace):
    scores = {"balanced_accuracy": 0.5, "macro_f1": 0.4}
    content = {"model": "m", "data": "digits", "mean": scores, "std": scores, **replace}
    path.write_text(json.dumps(content))
    return path


@pytest.mark.script
@pytest.mark.parametrize(
    "replace",
    [{"mean": {"macro_f1": 0.4}}, {"mean": 0.5}, {"std": {"balanced_accuracy": "x", "macro_f1": 0}}],
)
def test_compare_of_results_without_their_scores_is_one_line(tmp_path, replace):
    path = results_json(tmp_path / "results.json", **replace)
    with untouched(path):
        message = failure(
            lambda: linear_eval.main(["--compare", str(path), "--out", str(tmp_path / "figures")])
        )
    assert f"--compare {path}: {next(iter(replace))} is not a dict with the numbers" in message
    assert not (tmp_path / "figures").exists()


@pytest.mark.script
def test_compare_out_that_is_a_file_is_one_line(tmp_path):
    path, out = results_json(tmp_path / "results.json"), tmp_path / "figures"
    out.write_text("the user's own file")
    with untouched(path, out):
        message = failure(lambda: linear_eval.main(["--compare", str(path), "--out", str(out)]))
    assert f"--out {out}: a file, not a directory" in message


# ------------------------------------------------------------------------- row 17: outputs checked up front


@pytest.mark.parametrize("kind", ["a_file", "under_a_file", "not_writable"])
@pytest.mark.parametrize("script", ["linear_eval", "tsne"])
@pytest.mark.usefixtures("before_data")
def test_an_out_that_cannot_be_written_is_refused_before_computing(tmp_path, capsys, script, kind):
    (tmp_path / "results.txt").write_text("the user's own file")
    out = {
        "a_file": tmp_path / "results.txt",
        "under_a_file": tmp_path / "results.txt" / "figures",
        "not_writable": not_writable(tmp_path),
    }[kind]
    main = {"linear_eval": linear_eval.main, "tsne": tsne.main}[script]
    with untouched(tmp_path / "results.txt"):
        message = failure(lambda: main(eval_args(tmp_path, "--init", "scratch", "--out", out)), capsys)
    assert f"--out {out}: " in message


@pytest.fixture
def npz(tmp_path):
    return write_npz(tmp_path / "BiT-M-R50x1.npz", zero_bit_arrays(R50))


@pytest.mark.heavy
def test_bit_convert_output_that_is_a_directory_is_one_line(tmp_path, npz, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.pt").write_text("the user's own file")
    monkeypatch.setattr(sys, "argv", ["bit_convert.py", str(npz), "-o", str(tmp_path / "out"), "--force"])
    with untouched(tmp_path):
        message = failure(bit_convert.main)
    assert f"-o {tmp_path / 'out'}: a directory" in message


@pytest.mark.heavy
def test_bit_convert_output_that_cannot_be_written_is_one_line(tmp_path, npz, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(bit_common.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(torch, "save", read_only)  # what the old code reached, after the conversion
    monkeypatch.setattr(sys, "argv", ["bit_convert.py", str(npz), "-o", str(tmp_path / "out.pt")])
    with untouched(npz):
        message = failure(bit_convert.main)
    assert f"-o {tmp_path / 'out.pt'}" in message and "Read-only file system" in message


def test_a_bad_flag_of_datasets_py_is_one_line(monkeypatch, capsys):
    """python datasets.py parses its flags with the scripts' ArgumentParser: one line, exit 2, no usage."""
    monkeypatch.setattr(sys, "argv", ["datasets.py", "--split-seed", "x"])
    with pytest.raises(SystemExit) as exit:
        datasets.main()
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("datasets.py: error: argument --split-seed: "), err
