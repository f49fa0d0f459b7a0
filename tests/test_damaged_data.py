"""The second audit's data rows (issue 16): DermaMNIST arrays that do not fit, the decoded-image and feature
caches damaged on disk, EXIF orientation, a signal while caching, a broken symbolic link, a full disk, and
CIFAR-10 batches that would run code.

Each bad input is written into tmp_path as a user would have it and handed over as a script does
(datasets.load_data, or a script's main); test_bad_inputs's `failure` asserts a one-line error and a non-zero
exit, its `untouched` that the user's files did not change.
"""

import errno
import os
import pickle
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import bit_common
import bit_convert
import datasets
import eval_common
import pretrain
from helpers import REPO, RunsCode, data_args, failure, tiny_args, untouched, write_cifar, write_dermamnist

SIZE = 16


def image_folder(root, per_class=4):
    """Random RGB PNGs of SIZE px, `per_class` in each of two class folders: {id: pixels}."""
    rng, pixels = np.random.default_rng(0), {}
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels[f"{name}/{k}.png"] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels[f"{name}/{k}.png"]).save(root / name / f"{k}.png")
    return pixels


def folder_argv(root, tmp, *extra):
    return [
        "--data",
        "folder",
        "--data-root",
        root,
        "--image-size",
        SIZE,
        "--cache-dir",
        tmp / "cache",
        *extra,
    ]


def folder_args(root, tmp, *extra):
    return data_args(*folder_argv(root, tmp, *extra))


def count_decoding(monkeypatch):
    """The paths that bit_common.read_rgb decodes from now on."""
    decoded, read_rgb = [], bit_common.read_rgb
    monkeypatch.setattr(
        bit_common, "read_rgb", lambda path, size: decoded.append(path) or read_rgb(path, size)
    )
    return decoded


# ---------------------------------------------------------------------------------------------- DermaMNIST


def dermamnist_with(path, **replaced):
    """A MedMNIST-style .npz with some of its arrays replaced."""
    parts = write_dermamnist(path)
    arrays = {f"{p}_{k}": a for p, pair in parts.items() for k, a in zip(("images", "labels"), pair)}
    np.savez(path, **{**arrays, **replaced})


def test_dermamnist_images_and_labels_of_different_lengths_are_refused(tmp_path):
    """Row 5: 140 images and 100 labels loaded as 205 images with shifted labels."""
    path = tmp_path / "dermamnist.npz"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (140, 28, 28, 3), dtype=np.uint8)
    dermamnist_with(path, train_images=images, train_labels=(np.arange(100) % 7).astype(np.uint8)[:, None])
    with untouched(path):
        message = failure(
            lambda: datasets.data_from_args(data_args("--data", "dermamnist", "--data-root", path))
        )
    assert str(path) in message and "train_images" in message and "train_labels" in message


@pytest.mark.parametrize("kind", ["float32", "four_channels"])
def test_dermamnist_float_or_four_channel_images_are_refused(tmp_path, kind):
    """Row 14: datasets.py accepted them and pretrain.py crashed. Refused, not converted: a float array's
    scale (0..1 or 0..255) and a fourth channel's meaning would be guesses."""
    path, rng = tmp_path / "dermamnist.npz", np.random.default_rng(0)
    channels, dtype = (4, np.uint8) if kind == "four_channels" else (3, np.float32)
    sizes = {"train": 42, "val": 14, "test": 21}  # write_dermamnist's
    images = {
        f"{p}_images": rng.integers(0, 256, (n, 28, 28, channels)).astype(dtype) for p, n in sizes.items()
    }
    dermamnist_with(path, **images)
    with untouched(path):
        message = failure(
            lambda: datasets.data_from_args(data_args("--data", "dermamnist", "--data-root", path))
        )
    assert str(path) in message and "train_images" in message and "uint8" in message


# ------------------------------------------------------------------------------------- decoded-image cache


def test_decoded_image_cache_overwritten_with_zeros_is_rebuilt(tmp_path, monkeypatch):
    """Row 9: the pixels of the cache overwritten with zeros, its size and its .npy header as they were."""
    pixels = image_folder(tmp_path / "images")
    first = datasets.data_from_args(folder_args(tmp_path / "images", tmp_path))
    np.testing.assert_array_equal(np.array(first.images), [pixels[i] for i in first.ids])
    (npy,) = (tmp_path / "cache" / "images").glob("*.npy")
    whole, data_bytes = npy.stat().st_size, first.images.nbytes
    with open(npy, "r+b") as f:
        f.seek(whole - data_bytes)
        f.write(bytes(data_bytes))
    decoded = count_decoding(monkeypatch)
    again = datasets.data_from_args(folder_args(tmp_path / "images", tmp_path))
    assert len(decoded) == len(pixels)  # rebuilt, not read
    np.testing.assert_array_equal(np.array(again.images), [pixels[i] for i in again.ids])
    assert npy.stat().st_size == whole


def test_exif_orientation_is_honoured_when_decoding(tmp_path):
    """Row 10: a photo taken with the camera turned carries EXIF orientation 6, "rotate 90 degrees clockwise
    to display" (EXIF 2.32, tag 0x0112); the decoded pixels are those shown, np.rot90(stored, -1)."""
    pixels = image_folder(tmp_path / "images")
    turned = tmp_path / "images" / "a" / "0.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels["a/0.png"]).save(turned, exif=exif)
    data = datasets.data_from_args(folder_args(tmp_path / "images", tmp_path))
    np.testing.assert_array_equal(data.images[data.ids.index("a/0.png")], np.rot90(pixels["a/0.png"], -1))


CACHING_SLOWLY = """
import sys, time
import bit_common, datasets
read_rgb = bit_common.read_rgb
bit_common.read_rgb = lambda path, size: time.sleep(0.2) or read_rgb(path, size)
sys.argv = ["datasets.py", *sys.argv[1:]]
bit_common.run(datasets.main)
"""


@pytest.mark.script
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_while_caching_is_one_line_and_leaves_no_temporary_file(tmp_path, name):
    """Rows 10 and 21: Ctrl-C (SIGINT) or SIGTERM while datasets.py decodes images into the cache (each
    decoding slowed to 0.2 s). Before: a KeyboardInterrupt traceback, or death by SIGTERM with the .tmp
    left behind."""
    image_folder(tmp_path / "images", per_class=10)
    argv = folder_argv(tmp_path / "images", tmp_path, "--split-file", tmp_path / "split.json")
    process = subprocess.Popen(
        [sys.executable, "-c", CACHING_SLOWLY, *map(str, argv)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list((tmp_path / "cache").rglob("*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "it finished before it could be stopped"
    signum = signal.Signals[name]
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum  # as a shell reports a process that the signal ended
    assert stderr.strip().count("\n") == 0 and name in stderr, stderr
    assert "Traceback" not in stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no .tmp, and no entry


def test_a_broken_symbolic_link_in_an_image_folder_is_named_or_skipped(tmp_path):
    """Row 12: a link whose target is gone. One line naming it; with --skip-bad-images, skipped and
    counted."""
    pixels = image_folder(tmp_path / "images")
    link = tmp_path / "images" / "b" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with untouched(tmp_path / "images"):
        message = failure(lambda: datasets.data_from_args(folder_args(tmp_path / "images", tmp_path)))
    assert str(link) in message
    data = datasets.data_from_args(folder_args(tmp_path / "images", tmp_path, "--skip-bad-images"))
    assert list(data.bad) == ["b/gone.png"] and sorted(data.ids) == sorted(pixels)
    np.testing.assert_array_equal(np.array(data.images), [pixels[i] for i in data.ids])


# ---------------------------------------------------------------------------------------------- feature cache


class Flatten(torch.nn.Module):
    """A stand-in backbone: the mean colour of each image, (N, 3)."""

    def forward(self, x):
        return x.mean((2, 3))


@pytest.mark.parametrize("damage", ["truncated", "zeros", "features_zeroed", "runs_code"])
def test_damaged_feature_cache_is_embedded_again(tmp_path, monkeypatch, damage):
    """Row 15: a feature cache under cache/features/ truncated, overwritten with zeros (its size kept), its
    feature bytes zeroed inside the file, or replaced by a pickle that would run code: embedded again, never
    read, and the code never run."""
    data = datasets.load_digits()
    split = datasets.load_split(data, tmp_path / "split.json", "0.1,0.05,0.05,0.8")

    def features():
        return eval_common.part_features(
            Flatten(), "stand-in", data, split, "train", 8, tmp_path / "cache", 0, torch.device("cpu")
        )

    first, labels = features()
    (path,) = (tmp_path / "cache" / "features").glob("*.pt")
    content, marker = path.read_bytes(), tmp_path / "code-ran"
    if damage == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif damage == "zeros":
        path.write_bytes(bytes(len(content)))
    elif damage == "features_zeroed":
        stored = first.numpy().tobytes()
        assert content.count(stored) == 1
        path.write_bytes(content.replace(stored, bytes(len(stored))))
    else:
        torch.save({"features": RunsCode(marker), "labels": labels}, path)
    embedded, embed = [], bit_convert.embed
    monkeypatch.setattr(bit_convert, "embed", lambda *a, **k: embedded.append(1) or embed(*a, **k))
    again, _ = features()
    assert embedded == [1] and not marker.exists()
    truth = torch.as_tensor(data.images[datasets.indices(data, split, "train")]).float().mean((1, 2)) / 127.5
    torch.testing.assert_close(again, truth - 1.0)  # the mean colour, computed here from the pixels
    assert torch.equal(torch.load(path, weights_only=True)["features"], again)


# -------------------------------------------------------------------------------------------------- full disk


def full_disk():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_write_atomic_is_one_line_naming_the_path(tmp_path):
    """Row 20: results.json, tsne's figures, split.json, args.json: every writer goes through
    bit_common.write_atomic."""
    out = tmp_path / "results.json"
    out.write_text("an earlier result")

    def half_then_full(tmp):
        tmp.write_text("half")
        raise full_disk()

    with untouched(tmp_path):
        message = failure(lambda: bit_common.write_atomic(out, half_then_full))
    assert str(out) in message and "disk is full" in message


def save_on_a_full_disk(obj, f):
    """torch.save on a full disk as PyTorch 2.x does it (seen on a 2 MB tmpfs): part of the file written, the
    OSError of the write the context of a RuntimeError "unexpected pos"."""
    f = f if hasattr(f, "write") else open(f, "wb")
    f.write(b"PK\x03\x04 the first bytes")
    try:
        raise full_disk()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None


def test_a_full_disk_in_torch_save_is_one_line_naming_the_path(tmp_path, monkeypatch):
    """Row 20: backbone.pt, last.pt (pretrain and finetune), the feature cache: bit_common.save_atomic."""
    out = tmp_path / "backbone.pt"
    torch.save({"an": "earlier backbone"}, out)
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with untouched(tmp_path):
        message = failure(lambda: bit_common.save_atomic({"state_dict": {}}, out))
    assert str(out) in message and "disk is full" in message


def test_a_full_cache_dir_is_one_line_not_sigbus(tmp_path, monkeypatch):
    """Row 20: the memory-mapped image cache is a sparse file; a page the full disk cannot back killed the
    process with SIGBUS. Its blocks are now reserved first (os.posix_fallocate), where a full disk is
    ENOSPC."""
    image_folder(tmp_path / "images")

    def no_room(fd, offset, length):
        raise full_disk()

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with untouched(tmp_path / "images"):
        message = failure(lambda: datasets.data_from_args(folder_args(tmp_path / "images", tmp_path)))
    assert str(tmp_path / "cache" / "images") in message and "disk is full" in message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.mark.script
def test_a_full_disk_while_copying_the_split_into_the_run_leaves_no_split_json(tmp_path, monkeypatch):
    """Row 20: pretrain.py copied split.json into the run with shutil.copyfile; a full disk left a 0-byte
    split.json, after which --resume was refused."""
    copyfile = pretrain.shutil.copyfile

    def copy_onto_a_full_disk(src, dst, **kwargs):
        if os.path.basename(dst).startswith((".split.json", "split.json")):
            open(dst, "wb").close()
            raise full_disk()
        return copyfile(src, dst, **kwargs)

    monkeypatch.setattr(pretrain.shutil, "copyfile", copy_onto_a_full_disk)
    message = failure(lambda: pretrain.main(tiny_args(tmp_path)))
    assert str(tmp_path / "run" / "split.json") in message and "disk is full" in message
    assert not (tmp_path / "run" / "split.json").exists()
    assert not list((tmp_path / "run").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- CIFAR pickles


def python2_batch(data, labels):
    """A CIFAR-10 batch as the real files hold it: Python 2's cPickle, protocol 2, of a dict of str keys,
    the rows through numpy.core.multiarray._reconstruct and their bytes a Python 2 str (BINSTRING), the
    labels a list of int (written opcode by opcode: Python 3 cannot pickle a Python 2 str)."""

    def string(b):
        return b"T" + struct.pack("<i", len(b)) + b

    def integer(i):
        return b"J" + struct.pack("<i", i)

    dtype = b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
    dtype += b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
    array += b"\x87R(" + integer(1) + integer(len(data)) + integer(3072) + b"\x86" + dtype + b"\x89"
    array += string(data.tobytes()) + b"tb"
    label_list = b"](" + b"".join(integer(k) for k in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


@pytest.mark.parametrize("payload", ["os_system", "custom_callable"])
def test_cifar10_batch_that_would_run_code_is_refused_unrun(tmp_path, payload):
    """Row 22: a batch whose unpickling calls os.system, or a class whose __reduce__ opens a file: refused
    in one line, the payload never run. Batches written as the real files are (Python 2's cPickle) and as
    Python 3 writes them (test_datasets' write_cifar) load."""
    rows, labels, _ = write_cifar(tmp_path)
    base, marker = tmp_path / "cifar-10-batches-py", tmp_path / "code-ran"
    for k, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3"]):
        (base / name).write_bytes(python2_batch(rows[20 * k : 20 * (k + 1)], labels[20 * k : 20 * (k + 1)]))
    evil = base / "data_batch_4"
    batch = pickle.loads(evil.read_bytes())
    batch["batch_label"] = (
        RunsCode(marker)
        if payload == "custom_callable"
        else type("System", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})()
    )
    evil.write_bytes(pickle.dumps(batch, protocol=2))
    args = data_args("--data", "cifar10", "--data-root", tmp_path)
    with untouched(tmp_path):
        message = failure(lambda: datasets.data_from_args(args))
    assert str(evil) in message and not marker.exists()
    batch["batch_label"] = "training batch 4 of 5"
    evil.write_bytes(pickle.dumps(batch, protocol=2))
    data = datasets.data_from_args(args)
    np.testing.assert_array_equal(data.images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(data.labels, labels)


def test_a_feature_cache_that_cannot_be_written_is_one_line(tmp_path):
    """--cache-dir under a file (or read-only, or a directory that cannot be made): one line naming it, not a
    traceback after the embedding."""
    data = datasets.load_digits()
    split = datasets.load_split(data, tmp_path / "split.json", "0.1,0.05,0.05,0.8")
    (tmp_path / "a-file").write_text("not a directory")
    cache_dir = tmp_path / "a-file" / "cache"
    message = failure(
        lambda: eval_common.part_features(
            Flatten(), "stand-in", data, split, "train", 8, cache_dir, 0, torch.device("cpu")
        )
    )
    assert f"--cache-dir {cache_dir}" in message
