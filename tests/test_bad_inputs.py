"""The catalogue of bad inputs: one test per bad input that the other test files do not already cover.

docs/CATALOGUE.md lists every item, with the test that covers it here or in test_datasets.py,
test_pretrain.py, test_linear_eval_and_tsne.py or test_bit_convert.py. Each stand-in is written into tmp_path
in the real format (the writers of helpers.py) and handed over as a user would: datasets.load_data /
load_split, or a script's main(argv).
A test then asserts three things:

- the failure is one line that names the file, key or flag. The scripts turn a UserError (DataError and
  WeightsError among them) into "NAME.py: error: MESSAGE" and exit status 1, and an argparse exit has status
  2, so `failure()` checks in-process that the message is one line and the exit non-zero. test_cli_* call
  two scripts' main as their command lines do (the scripts' own processes run in test_datasets.py,
  test_linear_eval_and_tsne.py and test_signals_and_processes.py): a UserError, which `run` prints as one
  line and exits 1 on;
- nothing the user had was changed (`untouched`: bytes and mtime of every file before and after);
- readable oddities (a PNG named .jpg, a 48-bit PNG) load with the right pixels, computed here with PIL and
  numpy.

"""

import errno
import json
import math
import os
import pickle
import shutil
import signal
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bit_common
import datasets
import linear_eval
import pretrain
import tsne
from bit_convert import read_npz
from helpers import (
    SAMPLE,
    RunsCode,
    TinyBackbone,
    data_args,
    eval_args,
    failure,
    hand_edit,
    not_writable,
    read_rows,
    tiny_args,
    untouched,
    write_cifar,
    write_dermamnist,
    write_ham,
    write_isic,
)

SIZE = 16
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


# ---------------------------------------------------------------------------------------------------- helpers


def ham_args(root, tmp, *extra):
    return data_args(
        "--data", "ham10000", "--data-root", root, "--image-size", SIZE, "--cache-dir", tmp / "cache", *extra
    )


@pytest.fixture(scope="module")
def rows():
    """Two real rows of each class from the committed metadata sample."""
    every = read_rows(SAMPLE)
    return [r for dx in HAM_CLASSES for r in [x for x in every if x["dx"] == dx][:2]]


@pytest.fixture
def ham(tmp_path, rows):
    return write_ham(tmp_path / "HAM10000", rows)


def image_of(root, row):
    return next(root.rglob(f"{row['image_id']}.*"))


def png_bytes(width, height, depth, colour_type, raw_rows):
    """A PNG written by hand (PIL cannot write 16-bit RGB): filter byte 0 before each row."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw_rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb():
    """A grey PNG just over twice PIL's MAX_IMAGE_PIXELS (its DecompressionBombError limit), ~200 kB on
    disk."""
    side = math.isqrt(2 * Image.MAX_IMAGE_PIXELS) + 10
    packer, row = zlib.compressobj(9), b"\0" * (side + 1)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png_bytes(side, side, 8, 0, body)


@pytest.fixture
def evil(tmp_path):
    """(a backbone-looking .pt whose unpickling creates `marker`, marker). The payload is shown to work."""
    marker, path = tmp_path / "code-ran", tmp_path / "evil.pt"
    torch.save(
        {
            "arch": "r50x1",
            "norm": "bn",
            "cifar_stem": True,
            "head_size": 0,
            "ws": True,
            "state_dict": {},
            "payload": RunsCode(marker),
        },
        path,
    )
    torch.load(path, weights_only=False)  # the control: an unsafe load does run it
    assert marker.exists()
    marker.unlink()
    return path, marker


# ----------------------------------------------------------------------------------------------------- images


def test_zero_byte_image(ham, rows, tmp_path):
    path = image_of(ham, rows[3])
    path.write_bytes(b"")
    with untouched(ham):
        message = failure(lambda: datasets.data_from_args(ham_args(ham, tmp_path)))
        data = datasets.data_from_args(ham_args(ham, tmp_path, "--skip-bad-images"))
    assert str(path) in message and "--skip-bad-images" in message
    assert list(data.bad) == [rows[3]["image_id"]] and rows[3]["image_id"] not in data.ids


def test_png_named_jpg_loads_as_its_pixels(ham, rows, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = image_of(ham, rows[5])
    Image.fromarray(pixels).save(path, format="PNG")
    assert path.suffix == ".jpg" and path.read_bytes()[:4] == b"\x89PNG"
    data = datasets.data_from_args(ham_args(ham, tmp_path))
    expected = np.asarray(Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_array_equal(data.images[data.ids.index(rows[5]["image_id"])], expected)


def test_48_bit_png_loads_as_its_high_bytes(ham, rows, tmp_path):
    """16 bits per RGB channel (PIL opens it as RGB, keeping the high byte of each sample)."""
    wide = np.random.default_rng(1).integers(0, 65536, (10, 12, 3)).astype(">u2")
    image_of(ham, rows[2]).unlink()
    raw = b"".join(b"\0" + row.tobytes() for row in wide)
    (ham / "HAM10000_images_part_1" / f"{rows[2]['image_id']}.png").write_bytes(
        png_bytes(12, 10, 16, 2, zlib.compress(raw))
    )
    data = datasets.data_from_args(ham_args(ham, tmp_path))
    expected = np.asarray(Image.fromarray((wide >> 8).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_array_equal(data.images[data.ids.index(rows[2]["image_id"])], expected)


@pytest.mark.heavy
def test_huge_image_is_named_not_decoded(ham, rows, tmp_path, bomb):
    path = image_of(ham, rows[1])
    path.write_bytes(bomb)
    with untouched(ham):
        message = failure(lambda: datasets.data_from_args(ham_args(ham, tmp_path)))
        data = datasets.data_from_args(ham_args(ham, tmp_path, "--skip-bad-images"))
    assert str(path) in message and "DecompressionBombError" in message
    assert list(data.bad) == [rows[1]["image_id"]] and len(data.ids) == len(rows) - 1


# --------------------------------------------------------------------------------------------------- metadata


def test_metadata_with_a_bom_loads(ham, rows, tmp_path):
    metadata = ham / "HAM10000_metadata.csv"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    data = datasets.data_from_args(ham_args(ham, tmp_path))
    assert data.ids == [r["image_id"] for r in rows] and data.groups == [r["lesion_id"] for r in rows]


@pytest.mark.parametrize(
    "content",
    [b"", b"lesion_id,image_id,dx,dx_type,age,sex,localization\r\n"],
    ids=["zero_bytes", "header_only"],
)
def test_empty_metadata_file(ham, tmp_path, content):
    metadata = ham / "HAM10000_metadata.csv"
    metadata.write_bytes(content)
    with untouched(ham):
        assert str(metadata) in failure(lambda: datasets.data_from_args(ham_args(ham, tmp_path)))


def test_metadata_cut_mid_row(ham, rows, tmp_path):
    metadata = ham / "HAM10000_metadata.csv"
    metadata.write_bytes(metadata.read_bytes()[:-40])
    with untouched(ham):
        message = failure(lambda: datasets.data_from_args(ham_args(ham, tmp_path)))
    assert f"{metadata}: line {len(rows) + 1}" in message


def test_metadata_saved_as_utf16(ham, tmp_path):
    metadata = ham / "HAM10000_metadata.csv"
    metadata.write_bytes(metadata.read_bytes().decode().encode("utf-16"))
    with untouched(ham):
        message = failure(lambda: datasets.data_from_args(ham_args(ham, tmp_path)))
    assert str(metadata) in message and "UTF-8" in message


def test_metadata_row_without_lesion_id(ham, rows, tmp_path):
    """Else all such images would form one lesion "" and be kept together in one part."""
    metadata = ham / "HAM10000_metadata.csv"
    lines = metadata.read_bytes().split(b"\r\n")
    lines[4] = lines[4].replace(rows[3]["lesion_id"].encode(), b"")
    metadata.write_bytes(b"\r\n".join(lines))
    with untouched(ham):
        message = failure(lambda: datasets.data_from_args(ham_args(ham, tmp_path)))
    assert f"{metadata}: line 5: image {rows[3]['image_id']} has no lesion_id" in message


def test_isic_groupings_row_without_lesion_id(tmp_path, rows):
    root = write_isic(tmp_path / "isic", rows, groupings=True)
    groupings = root / "ISIC2018_Task3_Training_LesionGroupings.csv"
    line = f"{rows[6]['image_id']},{rows[6]['lesion_id']},".encode()
    groupings.write_bytes(groupings.read_bytes().replace(line, f"{rows[6]['image_id']},,".encode()))
    with untouched(root):
        message = failure(lambda: datasets.data_from_args(ham_args(root, tmp_path)))
    assert str(groupings) in message and rows[6]["image_id"] in message


# ------------------------------------------------------------------------------------------------ split files


@pytest.fixture
def digits_split(tmp_path):
    data, path = datasets.load_digits(), tmp_path / "split.json"
    return data, path, datasets.load_split(data, path, "0.6,0.1,0.1,0.2", 0, "image")


def test_split_file_with_an_unknown_id(digits_split):
    data, path, split = digits_split
    hand_edit(path, split, train=split["train"] + [5000])
    with untouched(path):
        message = failure(lambda: datasets.load_split(data, path))
    assert f"split file {path}: part train lists image 5000" in message


def test_split_file_with_an_id_twice_in_one_part(digits_split):
    data, path, split = digits_split
    hand_edit(path, split, val=split["val"] + [split["val"][0]])
    with untouched(path):
        message = failure(lambda: datasets.load_split(data, path))
    assert f"part val lists image {split['val'][0]} twice" in message


def test_split_file_missing_a_part_names_it(digits_split):
    data, path, split = digits_split
    hand_edit(path, split, val=None)
    with untouched(path):
        assert f"split file {path}: no list 'val'" in failure(lambda: datasets.load_split(data, path))


def test_split_file_that_cannot_be_written(tmp_path):
    (tmp_path / "splits").write_text("a file where the split's folder should be")
    path = tmp_path / "splits" / "split.json"
    with untouched(tmp_path):
        assert f"split file {path}" in failure(lambda: datasets.load_split(datasets.load_digits(), path))


@pytest.mark.parametrize("source", ["digits", "cifar10", "dermamnist", "folder"])
def test_split_file_of_a_source_without_lesions_is_named_by_image(source):
    assert datasets.default_split_file(source, "0.6,0.1,0.1,0.2", 0, "lesion") == Path(
        f"splits/{source}-image-60-10-10-20-seed0.json"
    )


def test_split_of_a_source_without_lesions_says_by_image(tmp_path):
    assert datasets.default_split_file("ham10000", "0.6,0.1,0.1,0.2", 0, "lesion") == Path(
        "splits/ham10000-lesion-60-10-10-20-seed0.json"
    )
    data = datasets.load_digits()
    split = datasets.load_split(data, tmp_path / "split.json", by="lesion")  # the default --split-by
    assert split["split_by"] == json.loads((tmp_path / "split.json").read_text())["split_by"] == "image"
    assert "by image" in datasets.summary(data, split, tmp_path / "split.json")


# ------------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("text", ["0.7,0.2,0.2,-0.1", "nan,0.1,0.1,0.2", "60,10,10,20"])
def test_bad_split_fractions(text):
    assert f"--split {text}" in failure(lambda: datasets.parse_fractions(text))


@pytest.mark.parametrize(
    "flag, value", [("--image-size", 0), ("--image-size", -8), ("--workers", -1), ("--split-seed", -1)]
)
def test_zero_or_negative_data_flag(capsys, flag, value):
    message = failure(lambda: data_args("--data", "digits", flag, value), capsys)
    assert f"argument {flag}: {value}: expected a whole number in [" in message


@pytest.mark.script
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--epochs", 0),
        ("--batch-size", -30),
        ("--eval-every", 0),
        ("--lr", -0.1),
        ("--weight-decay", -5e-4),
        ("--momentum", -0.9),
        ("--warmup-epochs", -1),
        ("--knn-k", 0),
        ("--knn-t", 0),
    ],
)
def test_zero_or_negative_pretrain_flag(tmp_path, capsys, before_data, flag, value):
    assert flag in failure(lambda: pretrain.main(tiny_args(tmp_path) + [flag, str(value)]), capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.script
@pytest.mark.parametrize(
    "flag, value", [("--epochs", 0), ("--trials", 0), ("--lr", -0.001), ("--gamma", -1), ("--momentum", -0.9)]
)
def test_zero_or_negative_linear_eval_flag(tmp_path, capsys, before_data, flag, value):
    assert flag in failure(
        lambda: linear_eval.main(eval_args(tmp_path, "--init", "scratch", flag, value)), capsys
    )


# ----------------------------------------------------------------------------------------- the run directory


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    """A two-epoch run (TinyBackbone) whose disk fills while it saves epoch 2's last.pt (torch.save writes
    part of the file, then raises ENOSPC): (its directory, what main() raised, last.pt's bytes before). It
    remains a run to resume."""
    tmp, saves, seen = tmp_path_factory.mktemp("disk_full"), [], {}
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f.name).name.startswith(".last.pt"):  # save_atomic saves into a file object
            saves.append(f)
            if len(saves) == 2:
                seen["before"] = (tmp / "run" / "last.pt").read_bytes()
                f.write(b"the first bytes of a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", save)
        patch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
        try:
            pretrain.main(tiny_args(tmp, epochs=2) + ["--eval-every", "5"])
            raised = None
        except BaseException as e:  # noqa: BLE001 (kept for the tests to judge)
            raised = e
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    assert len(saves) == 2
    return tmp / "run", raised, seen["before"]


@pytest.mark.script
def test_disk_full_while_saving_keeps_the_previous_last_pt(disk_full):
    run, raised, before = disk_full
    assert raised is not None
    assert (run / "last.pt").read_bytes() == before
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (2, 0)
    assert sorted(p.name for p in run.iterdir()) == [  # epoch 2's files come before its last.pt (issue 16)
        ".lock",
        "args.json",
        "backbone.pt",
        "curves.png",
        "last.pt",
        "metrics.csv",
        "split.json",
    ]


@pytest.mark.script
def test_disk_full_while_saving_is_one_line_naming_last_pt(disk_full):
    run, raised, _ = disk_full

    def rethrow():
        raise raised

    assert str(run / "last.pt") in failure(rethrow)


@pytest.fixture
def run(disk_full, tmp_path, monkeypatch):
    """A copy of a run that stopped after epoch 1, to resume from (with the TinyBackbone it was made with)."""
    monkeypatch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
    shutil.copytree(disk_full[0], tmp_path / "run")
    return tmp_path / "run"


def resume(run):
    return lambda: pretrain.main(["--out", str(run), "--resume", "--workers", "0", "--device", "cpu"])


@pytest.mark.script
@pytest.mark.parametrize("damage", ["truncated", "runs_code"])
def test_resume_with_an_unreadable_last_pt(run, damage):
    last = run / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        torch.save({"model": RunsCode(run.parent / "code-ran")}, last)
    with untouched(run):
        assert str(last) in failure(resume(run))
    assert not (run.parent / "code-ran").exists()


@pytest.mark.script
def test_resume_with_args_json_that_is_not_json(run, capsys):
    (run / "args.json").write_text('{"epochs": 2,')
    with untouched(run):
        assert str(run / "args.json") in failure(resume(run), capsys)


@pytest.mark.script
def test_resume_with_args_json_edited_to_disagree_with_last_pt(run, capsys):
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, "epochs": 1}, indent=1))
    with untouched(run):
        message = failure(resume(run), capsys)
    assert "args.json" in message and "epochs" in message


@pytest.mark.script
def test_resume_with_args_json_edited_to_a_value_no_flag_takes(run, capsys):
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, "data": "imagenet"}, indent=1))
    with untouched(run):
        message = failure(resume(run), capsys)
    assert "args.json" in message and "imagenet" in message


@pytest.mark.script
@pytest.mark.parametrize("kind", ["a_file", "not_writable"])
def test_pretrain_out_that_cannot_hold_a_run(tmp_path, capsys, before_data, kind):
    (tmp_path / "results.txt").write_text("the user's own file")
    out = tmp_path / "results.txt" if kind == "a_file" else not_writable(tmp_path)
    with untouched(tmp_path / "results.txt"):
        assert str(out) in failure(lambda: pretrain.main(tiny_args(tmp_path) + ["--out", str(out)]), capsys)


@pytest.mark.script
def test_linear_eval_out_that_is_a_file(tmp_path, capsys, before_data):
    (tmp_path / "results.txt").write_text("the user's own file")
    with untouched(tmp_path / "results.txt"):
        message = failure(
            lambda: linear_eval.main(
                eval_args(tmp_path, "--init", "scratch", "--out", tmp_path / "results.txt")
            ),
            capsys,
        )
    assert str(tmp_path / "results.txt") in message


def test_cache_dir_that_is_a_file(ham, tmp_path):
    (tmp_path / "cache").write_text("the user's own file")
    with untouched(ham, tmp_path / "cache"):
        message = failure(lambda: datasets.data_from_args(ham_args(ham, tmp_path)))
    assert f"--cache-dir {tmp_path / 'cache'}" in message


# ---------------------------------------------------------------------------------------- files that run code


@pytest.mark.script
@pytest.mark.parametrize("entry", ["pretrain_init", "linear_eval_ckpt", "tsne_ckpt"])
def test_pt_whose_unpickling_would_run_code_is_not_run(evil, tmp_path, entry):
    path, marker = evil
    calls = {
        "pretrain_init": lambda: pretrain.main(tiny_args(tmp_path) + ["--init", str(path)]),
        "linear_eval_ckpt": lambda: linear_eval.main(eval_args(tmp_path, "--ckpt", path)),
        "tsne_ckpt": lambda: tsne.main(eval_args(tmp_path, "--ckpt", path)),
    }
    with untouched(path), pytest.raises(Exception):  # noqa: B017 (which one is the next test's business)
        calls[entry]()
    assert not marker.exists()


@pytest.mark.script
def test_last_pt_whose_unpickling_would_run_code_is_not_run(evil, run):
    path, marker = evil
    shutil.copyfile(path, run / "last.pt")
    with untouched(run), pytest.raises(Exception):  # noqa: B017
        resume(run)()
    assert not marker.exists()


@pytest.mark.script
@pytest.mark.parametrize("entry", ["pretrain_init", "linear_eval_ckpt"])
def test_pt_whose_unpickling_would_run_code_is_one_line(evil, tmp_path, entry):
    path, marker = evil
    call = (
        (lambda: pretrain.main(tiny_args(tmp_path) + ["--init", str(path)]))
        if entry == "pretrain_init"
        else (lambda: linear_eval.main(eval_args(tmp_path, "--ckpt", path)))
    )
    with untouched(path):
        assert str(path) in failure(call)
    assert not marker.exists()


def object_array(marker):
    array = np.empty(1, dtype=object)
    array[0] = RunsCode(marker)
    return array


def test_npz_whose_unpickling_would_run_code_is_not_run(tmp_path):
    """A BiT .npz and a DermaMNIST .npz that hold a pickled object array."""
    marker = tmp_path / "code-ran"
    np.savez(
        tmp_path / "BiT-M-R50x1.npz", **{"resnet/root_block/standardized_conv2d/kernel": object_array(marker)}
    )
    parts = write_dermamnist(tmp_path / "dermamnist.npz")
    np.savez(
        tmp_path / "dermamnist.npz",
        train_images=object_array(marker),
        train_labels=parts["train"][1],
        **{f"{p}_{k}": a for p in ("val", "test") for k, a in zip(("images", "labels"), parts[p])},
    )
    with untouched(tmp_path):
        assert str(tmp_path / "BiT-M-R50x1.npz") in failure(lambda: read_npz(tmp_path / "BiT-M-R50x1.npz"))
        args = data_args("--data", "dermamnist", "--data-root", tmp_path / "dermamnist.npz")
        assert str(tmp_path / "dermamnist.npz") in failure(lambda: datasets.data_from_args(args))
    assert not marker.exists()


# -------------------------------------------------------------------------------------- --compare and sources


def not_results(tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    if kind == "png":
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")
    else:
        content = {
            "args_json": {"epochs": 2, "lr": 0.03},
            "list": [1, 2, 3],
            "mean_only": {"mean": {"balanced_accuracy": 0.5, "macro_f1": 0.4}},
        }[kind]
        path.write_text(json.dumps(content))
    return path


@pytest.mark.script
@pytest.mark.parametrize("kind", ["args_json", "list", pytest.param("png"), pytest.param("mean_only")])
def test_compare_of_a_file_that_is_not_a_results_json(tmp_path, kind):
    path = not_results(tmp_path, kind)
    with untouched(path):
        message = failure(
            lambda: linear_eval.main(["--compare", str(path), "--out", str(tmp_path / "figures")])
        )
    assert f"--compare {path}" in message
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize("damage", ["without_val_labels", "truncated"])
def test_dermamnist_file_without_its_keys(tmp_path, damage):
    path = tmp_path / "dermamnist.npz"
    parts = write_dermamnist(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        arrays = {f"{p}_{k}": a for p, pair in parts.items() for k, a in zip(("images", "labels"), pair)}
        np.savez(path, **{k: a for k, a in arrays.items() if k != "val_labels"})
    with untouched(path):
        message = failure(
            lambda: datasets.data_from_args(data_args("--data", "dermamnist", "--data-root", path))
        )
    assert str(path) in message and (damage == "truncated" or "val_labels" in message)


@pytest.mark.parametrize("damage", ["truncated", "not_a_batch", "short_rows"])
def test_corrupt_cifar_batch(tmp_path, damage):
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    else:
        content = (
            [1, 2, 3]
            if damage == "not_a_batch"
            else {"labels": [0] * 20, "data": np.zeros((20, 3000), np.uint8), "batch_label": "x"}
        )
        batch.write_bytes(pickle.dumps(content, protocol=2))
    with untouched(tmp_path):
        message = failure(
            lambda: datasets.data_from_args(data_args("--data", "cifar10", "--data-root", tmp_path))
        )
    assert str(batch) in message


# ---------------------------------------------------------------------------------------- decoded-image cache


@pytest.mark.parametrize("damage", ["npy_half", "npy_in_its_header", "npy_empty", "index_cut"])
def test_decoded_image_cache_damaged_after_it_was_built_is_rebuilt(ham, tmp_path, monkeypatch, damage):
    first = np.array(datasets.data_from_args(ham_args(ham, tmp_path)).images)
    (npy,) = (tmp_path / "cache" / "images").glob("*.npy")
    whole = npy.stat().st_size
    target = npy.with_suffix(".json") if damage == "index_cut" else npy
    keep = {"npy_half": whole // 2, "npy_in_its_header": 50, "npy_empty": 0}.get(damage, 10)
    target.write_bytes(target.read_bytes()[:keep])
    decoded, read_rgb = [], bit_common.read_rgb
    monkeypatch.setattr(
        bit_common, "read_rgb", lambda path, size: decoded.append(path) or read_rgb(path, size)
    )
    again = datasets.data_from_args(ham_args(ham, tmp_path))
    assert len(decoded) == len(first)  # rebuilt, not read
    np.testing.assert_array_equal(again.images, first)
    assert npy.stat().st_size == whole


# --------------------------------------------------------------------------------------- two real processes


@pytest.mark.script
def test_cli_huge_image_is_one_line_and_exit_1(ham, rows, tmp_path, bomb, monkeypatch):
    path = image_of(ham, rows[1])
    path.write_bytes(bomb)
    argv = [
        "--data",
        "ham10000",
        "--data-root",
        ham,
        "--image-size",
        SIZE,
        "--cache-dir",
        tmp_path / "cache",
        "--split-file",
        tmp_path / "split.json",
    ]
    monkeypatch.setattr(sys, "argv", ["datasets.py", *map(str, argv)])
    with untouched(ham), pytest.raises(bit_common.UserError) as refused:
        datasets.main()
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    assert not (tmp_path / "split.json").exists()


@pytest.mark.script
def test_cli_compare_of_args_json_is_one_line_and_exit_1(tmp_path):
    path = not_results(tmp_path, "args_json")
    with untouched(path), pytest.raises(bit_common.UserError) as refused:
        linear_eval.main(["--compare", str(path), "--out", str(tmp_path / "figures")])
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"--compare {path}")
