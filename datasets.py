"""Data for every script: the sources, one leakage-free split shared by all, and the views of
the self-supervised methods.

Every source becomes a `Data`: all its images as one uint8 array (N, H, W, 3) with their labels, ids and
groups (the lesion each HAM10000 image shows). Small sources live in memory; image files are decoded once, at
the working resolution, into a memory-mapped cache. The split file assigns every id to one of four disjoint
parts:

    pretrain   unlabelled images for SimSiam
    train/val  the labelled part: the linear classifier and its model selection; the kNN monitor's data
    test       touched once, by the final evaluation

    python datasets.py --data ham10000 --data-root PATH    # write (or check) the split, print its summary
"""

import argparse
import csv
import functools
import hashlib
import json
import os
import pickle
import signal
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from torchvision.transforms import v2

from common import UserError, embed, estimate_bn_statistics, run, save_atomic, write_atomic

SOURCES = ("digits", "cifar10", "ham10000", "folder", "dermamnist")
DEFAULT_SIZE = {"digits": 8, "cifar10": 32, "dermamnist": 28, "ham10000": 224, "folder": 224}
PARTS = ("pretrain", "train", "val", "test")
OFFICIAL = "official"  # --split official: the source's own train/test protocol (see official_split)
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # alphabetical: DermaMNIST's label ids too
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_DIR = Path.home() / ".cache" / "bit-simsiam"


class DataError(UserError):
    """Data that cannot be used as asked; the message names the file, id or flag."""


@dataclass
class Data:
    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, indices into `classes`
    ids: list  # image ids, or indices for sources without ids
    classes: tuple
    groups: list = (
        None  # images of one group never go to two parts (HAM10000: lesion_id); None: every image alone
    )
    official_test: np.ndarray = None  # bool mask of a test set that the source fixes
    bad: dict = field(default_factory=dict)  # {id: reason} of the images skipped with --skip-bad-images


# ---------------------------------------------------------------------------------------------------- sources


def load_digits():
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels): real images that ship inside an installed
    package, so that every script runs on a fresh machine with no download. Native 8 px by default; the views
    upscale their random crops to --image-size."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return Data(
        "digits",
        np.repeat(grey[..., None], 3, axis=3),
        digits.target.astype(np.int64),
        list(range(len(grey))),
        tuple(str(d) for d in range(10)),
    )


def load_cifar10(root, download=False):
    """The torchvision layout, root/cifar-10-batches-py/; the official test batch stays the test part."""
    base = root / "cifar-10-batches-py"
    if not base.is_dir():
        if not download:
            raise DataError(
                f"{base} not found: pass --download, or unpack cifar-10-python.tar.gz "
                f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {root}"
            )
        try:
            torchvision.datasets.CIFAR10(root, download=True)  # fetches and checks the archive's md5
        except OSError as e:
            raise DataError(
                f"cannot download CIFAR-10 into {root} ({e}); fetch cifar-10-python.tar.gz from "
                "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there"
            ) from None
    batches = [read_pickle(base / f"data_batch_{i}", ("data", "labels")) for i in range(1, 6)]
    batches.append(read_pickle(base / "test_batch", ("data", "labels")))
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([b["labels"] for b in batches]).astype(np.int64)
    classes = tuple(read_pickle(base / "batches.meta", ("label_names",))["label_names"])
    test = np.arange(len(labels)) >= len(labels) - len(batches[-1]["labels"])
    data = Data(
        "cifar10", np.ascontiguousarray(images), labels, list(range(len(labels))), classes, official_test=test
    )
    check_classes(data, base)
    return data


def read_pickle(path, keys):
    """A CIFAR-10 batch, through CifarUnpickler: a pickle that asks for anything else is refused unrun."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing from the CIFAR-10 directory") from None
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or any(k not in batch for k in keys):
        raise DataError(f"{path}: expected a CIFAR-10 pickle with the keys {', '.join(keys)}")
    shape, dtype = np.shape(batch.get("data")), np.asarray(batch.get("data")).dtype
    if "data" in keys and (shape != (len(batch["labels"]), 3072) or dtype != np.uint8):
        raise DataError(
            f"{path}: expected 'data' as {len(batch['labels'])} uint8 rows of 3072 bytes (one per "
            f"label), found {dtype} {shape}"
        )
    return batch


class CifarUnpickler(pickle.Unpickler):
    """The unpickler of a CIFAR-10 batch: Python 2's cPickle of a dict of strings, lists of int and string and
    one NumPy uint8 array (https://www.cs.toronto.edu/~kriz/cifar.html). The only callables it may name are
    those that rebuild that array (numpy.core.multiarray._reconstruct, numpy._core.multiarray under NumPy 2,
    numpy.ndarray, numpy.dtype) and, in a protocol-2 pickle written by Python 3, _codecs.encode of latin-1
    bytes. A pickle that names anything else (os.system, a class whose __reduce__ runs code) is refused before
    any of it runs."""

    RECONSTRUCT = np.empty(0).__reduce__()[0]  # what an array pickles with, wherever this NumPy keeps it
    ARRAY = {
        ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return latin1_bytes
        if (module, name) not in self.ARRAY:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-10 batch never does")
        return self.ARRAY[module, name]


def latin1_bytes(text, encoding):
    """bytes as Python 3 pickles them in protocol 2, _codecs.encode(text, "latin1"); no other codec."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it asks for _codecs.encode(..., {encoding!r}), not latin1 bytes")
    return text.encode("latin1")


def load_ham10000(root, size, cache_dir, skip_bad=False):
    """HAM10000_metadata.csv (or the ISIC 2018 Task 3 ground truth) and its images anywhere below `root`."""
    ids, dx, lesions, source = read_ham_metadata(root)
    found = {p.stem: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [image_id for image_id in ids if image_id not in found]
    if missing and not skip_bad:
        raise DataError(
            f"{root}: image {missing[0]} (listed in {source.name}) not found below it; {len(missing)} "
            f"of {len(ids)} missing (--skip-bad-images skips them)"
        )
    rows = [k for k, image_id in enumerate(ids) if image_id in found]
    return from_files(
        "ham10000",
        [found[ids[k]] for k in rows],
        [ids[k] for k in rows],
        [HAM_CLASSES.index(dx[k]) for k in rows],
        HAM_CLASSES,
        [lesions[k] for k in rows] if lesions else None,
        size,
        cache_dir,
        skip_bad,
        source,
        missing,
    )


def read_ham_metadata(root):
    """(image ids, dx, lesion ids or None, the file read). Columns are found by name; CRLF, `80.0` ages and an
    extra `dataset` column, all seen in the wild, read fine."""
    metadata, isic = (
        find(root, "HAM10000_metadata.csv"),
        find(root, "ISIC2018_Task3_Training_GroundTruth.csv"),
    )
    if metadata.exists():
        rows = read_csv(metadata, ("image_id", "lesion_id", "dx"))
        for line, row in enumerate(rows, 2):
            if row["dx"] not in HAM_CLASSES:
                raise DataError(
                    f"{metadata}: line {line}: unknown dx {row['dx']!r}; "
                    f"expected one of {', '.join(HAM_CLASSES)}"
                )
            if not (row["lesion_id"] or "").strip():  # else every such image would share one lesion ""
                raise DataError(f"{metadata}: line {line}: image {row['image_id']} has no lesion_id")
        return (
            [r["image_id"] for r in rows],
            [r["dx"] for r in rows],
            [r["lesion_id"] for r in rows],
            metadata,
        )
    if isic.exists():  # one-hot columns MEL, NV, ... in any order; lesion ids come in a file of their own
        rows = read_csv(isic, ("image",) + tuple(c.upper() for c in HAM_CLASSES))
        dx = []
        for line, row in enumerate(rows, 2):
            try:
                hot = [c for c in HAM_CLASSES if float(row[c.upper()]) == 1.0]
            except ValueError:
                hot = "a value that is not a number"
            if len(hot) != 1:
                raise DataError(
                    f"{isic}: line {line}: expected exactly one class column equal to 1, found {hot}"
                )
            dx.append(hot[0])
        groupings = find(root, "ISIC2018_Task3_Training_LesionGroupings.csv")
        lesions = None
        if groupings.exists():
            lesion_of = {r["image"]: r["lesion_id"] for r in read_csv(groupings, ("image", "lesion_id"))}
            unknown = [image for image, lesion in lesion_of.items() if not (lesion or "").strip()]
            if unknown:
                raise DataError(f"{groupings}: image {unknown[0]} has no lesion_id")
            lesions = [lesion_of.get(r["image"], r["image"]) for r in rows]
        return [r["image"] for r in rows], dx, lesions, isic
    if not root.is_dir():
        raise DataError(f"--data-root {root}: no such directory")
    raise DataError(
        f"{root}: neither HAM10000_metadata.csv nor ISIC2018_Task3_Training_GroundTruth.csv is there"
    )


def find(root, name):
    """root/name, or root/*/name as the ISIC archives unpack (ISIC2018_Task3_Training_GroundTruth/...csv)."""
    return root / name if (root / name).exists() else min(root.glob(f"*/{name}"), default=root / name)


def read_csv(path, required):
    """The rows of a CSV file whose first required column names each image once."""
    # newline="": CRLF files; utf-8-sig: a leading BOM
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or ()
            rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as e:  # UTF-16 from a spreadsheet, a binary file, NUL bytes
            raise DataError(
                f"{path}: not a UTF-8 CSV file ({type(e).__name__}); save it as CSV UTF-8"
            ) from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(fields) or 'none'}"
        )
    seen = set()
    for line, row in enumerate(rows, 2):
        if row[required[0]] in seen:
            raise DataError(f"{path}: line {line}: image {row[required[0]]} is listed twice")
        seen.add(row[required[0]])
    return rows


def load_folder(root, size, cache_dir, skip_bad=False):
    """One sub-folder per class (torchvision's ImageFolder layout); ids are the paths relative to `root`."""
    if not root.is_dir():
        raise DataError(f"--data-root {root}: no such directory")
    try:
        classes, class_to_idx = torchvision.datasets.folder.find_classes(root)
        samples = torchvision.datasets.folder.make_dataset(
            root, class_to_idx, extensions=torchvision.datasets.folder.IMG_EXTENSIONS
        )
    except FileNotFoundError as e:  # a class folder without images, or no class folders at all
        raise DataError(f"{root}: {e}") from None
    paths = [Path(p) for p, _ in samples]
    return from_files(
        "folder",
        paths,
        [p.relative_to(root).as_posix() for p in paths],
        [k for _, k in samples],
        classes,
        None,
        size,
        cache_dir,
        skip_bad,
        root,
    )


def load_dermamnist(root):
    """MedMNIST's DermaMNIST .npz (the file, or a directory holding one dermamnist*.npz). Its train and val
    parts are re-split into pretrain/train/val; its test part stays the test part."""
    files = [root] if root.is_file() else sorted(root.glob("dermamnist*.npz")) if root.is_dir() else []
    if len(files) != 1:
        raise DataError(
            f"--data-root {root}: expected a dermamnist .npz file or a directory with exactly one"
        )
    try:
        with np.load(files[0]) as npz:
            parts = [(npz[f"{p}_images"], npz[f"{p}_labels"].reshape(-1)) for p in ("train", "val", "test")]
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # BadZipFile: a truncated file
        raise DataError(
            f"{files[0]}: not a MedMNIST .npz with train/val/test _images and _labels ({e})"
        ) from None
    for part, (images, labels) in zip(("train", "val", "test"), parts):
        check_medmnist_part(files[0], part, images, labels, parts[0][0].shape[1:])
    images = np.concatenate([p[0] for p in parts])
    if images.ndim == 3:  # the greyscale MedMNIST sets; DermaMNIST itself is RGB
        images = np.repeat(images[..., None], 3, axis=3)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    test = np.arange(len(labels)) >= len(labels) - len(parts[2][1])
    data = Data("dermamnist", images, labels, list(range(len(labels))), HAM_CLASSES, official_test=test)
    check_classes(data, files[0])
    return data


def check_medmnist_part(path, part, images, labels, shape):
    """MedMNIST's arrays (Yang et al. 2023, Scientific Data, and medmnist/dataset.py): uint8 images (N, H, W)
    or (N, H, W, 3), one label per image, every part at one size. A float or 4-channel array would leave
    their scale or their alpha to a guess: refused, not converted."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[3:] not in ((), (3,)):
        raise DataError(
            f"{path}: {part}_images is {images.dtype} {images.shape}; expected uint8 images (N, H, W) or "
            "(N, H, W, 3), as MedMNIST writes them"
        )
    if images.shape[1:] != shape:
        raise DataError(f"{path}: {part}_images are {images.shape[1:]}, the train_images {shape}")
    if len(images) != len(labels) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: {part}_images holds {len(images)} images but {part}_labels {len(labels)} "
            f"{labels.dtype} labels; expected one integer label per image"
        )


def from_files(name, paths, ids, labels, classes, groups, size, cache_dir, skip_bad, source, missing=()):
    """The Data of image files, decoded through the cache; with skip_bad, the unreadable ones (and the
    `missing` ids) are left out and listed in `bad`."""
    images, broken = decode_all(paths, size, cache_dir, skip_bad)
    keep = [j for j in range(len(paths)) if j not in broken]
    data = Data(
        name,
        images[keep] if broken else images,
        np.array([labels[j] for j in keep], dtype=np.int64),
        [ids[j] for j in keep],
        tuple(classes),
        [groups[j] for j in keep] if groups else None,
        bad={**{i: "not found" for i in missing}, **{ids[j]: reason for j, reason in broken.items()}},
    )
    check_classes(data, source)
    return data


def check_classes(data, source):
    if len(data.labels) and (data.labels.min() < 0 or data.labels.max() >= len(data.classes)):
        raise DataError(f"{source}: labels must lie in 0..{len(data.classes) - 1}")
    empty = [c for k, c in enumerate(data.classes) if not np.any(data.labels == k)]
    if empty:
        raise DataError(f"{source}: class {empty[0]} has no images")


# ------------------------------------------------------------------------------------------ decode-once cache


def read_rgb(path, size):
    """An image file as a (size, size, 3) uint8 array: every mode becomes RGB, 16-bit and float images are
    stretched from their own min..max, and the image is resized to a square, as the paper resized HAM10000
    (§3)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at the smallest scale that is still >= size
        # the EXIF orientation of a photo taken with the camera turned (phones, dermatoscopes on phones): the
        # pixels as the photo is shown, as PIL's own exif_transpose turns them
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(
                np.round((a - a.min()) / max(a.max() - a.min(), 1e-12) * 255).astype(np.uint8)
            )
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def decode_all(paths, size, cache_dir, skip_bad):
    """All `paths` decoded at `size` into a memory-mapped .npy, built once and reused while no file changes.
    Returns (images, {position: reason} of unreadable files). Unreadable files are an error unless
    skip_bad."""
    stamp = "\n".join(map(file_stamp, paths))
    key = hashlib.sha256(f"{size}\n{stamp}".encode()).hexdigest()[:20]
    cache, index = cache_dir / "images" / f"{size}px-{key}.npy", cache_dir / "images" / f"{size}px-{key}.json"
    shape = (len(paths), size, size, 3)
    entry = cached(cache, index, shape)
    if entry is None:  # absent, or damaged since it was written
        broken, digest = {}, {}

        def decode_into(tmp):
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            preallocate(tmp)

            def decode(j):
                try:
                    images[j] = read_rgb(paths[j], size)
                except Exception as e:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError
                    return j, f"{type(e).__name__}: {e}"

            pool = ThreadPoolExecutor(os.cpu_count())  # PIL decodes with the GIL released
            try:
                broken.update(b for b in pool.map(decode, range(len(paths))) if b)
            finally:  # stopped: the images not yet begun are not decoded
                pool.shutdown(cancel_futures=True)
            images.flush()
            digest["sha256"] = hashlib.sha256(images).hexdigest()

        try:
            with stopped_by_signals(cache_dir):
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cache, decode_into)
                record = json.dumps({"size": size, "count": len(paths), "bad": broken, **digest}, indent=1)
                write_atomic(index, lambda tmp: tmp.write_text(record))  # last: the array is complete
        except OSError as e:
            raise DataError(f"--cache-dir {cache_dir}: cannot write the decoded images there ({e})") from None
        entry = cached(cache, index, shape)
    images, broken = entry
    if broken and not skip_bad:
        j, reason = next(iter(broken.items()))
        raise DataError(
            f"{paths[j]}: unreadable image ({reason}); {len(broken)} such file(s), "
            "--skip-bad-images skips them"
        )
    return images, broken


def file_stamp(path):
    """What changes when an image file does: its real path, size and modification time. A file that cannot be
    stat'ed (a broken symbolic link) is stamped as such; decoding it then fails, and says why."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path} unreadable"
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"


def preallocate(path):
    """Reserve the blocks of a memory-mapped file before writing into it. A page of a sparse mapping that the
    full disk cannot back kills the process with SIGBUS; reserved first, the full disk is an OSError (ENOSPC)
    here."""
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


class Stopped(Exception):
    """A signal that stops the decoding into the cache."""


@contextmanager
def stopped_by_signals(cache_dir):
    """Ctrl-C or SIGTERM while the cache is written: a one-line DataError, and no temporary file left behind
    (write_atomic removes it as the exception passes). A second signal cannot interrupt that clean-up."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum, _frame):
        for s in saved:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    saved = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Stopped as e:
        raise DataError(
            f"--cache-dir {cache_dir}: stopped by {e} while decoding the images into it; nothing was kept"
        ) from None
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def cached(cache, index, shape):
    """(images, {position: reason}) of a complete cache entry, or None where it is absent or damaged (a .npy
    truncated, overwritten or replaced after it was written, an unreadable index): such an entry is built
    again, never read. The SHA-256 of the pixels, recorded when the entry was written, is checked once here
    (measured: 0.26 - 0.6 s for 450 MB on a 2-core machine)."""
    try:
        record = json.loads(index.read_text())
        broken = {int(j): reason for j, reason in record["bad"].items()}
        images = np.load(cache, mmap_mode="r")  # numpy refuses a file shorter than its header says
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if images.shape != shape or images.dtype != np.uint8:
        return None
    return (images, broken) if hashlib.sha256(images).hexdigest() == record.get("sha256") else None


# ------------------------------------------------------------------------------------------------------ split


def parse_fractions(text):
    """--split 0.6,0.1,0.1,0.2: the fractions of pretrain, train, val and test, in steps of 0.01 (or
    "official")."""
    if text == OFFICIAL:
        return OFFICIAL
    try:
        fractions = [Fraction(f) for f in text.split(",")]
    except ValueError:
        raise DataError(f"--split {text}: expected four numbers like 0.6,0.1,0.1,0.2") from None
    if (
        len(fractions) != 4
        or min(fractions[:3]) <= 0
        or fractions[3] < 0
        or sum(fractions) != 1
        or any((100 * f).denominator != 1 for f in fractions)
    ):
        raise DataError(
            f"--split {text}: expected four fractions (pretrain, train, val, test) in steps of 0.01, "
            f"the first three positive, adding up to 1 (these add up to {float(sum(fractions)):g})"
        )
    return fractions


def official_split(data):
    """The protocol of SimSiam's CIFAR-10 experiments and the paper's Fig. 1: pretrain on every training
    image, kNN bank = the training images, queries = the official test set. val IS test here, so the scripts
    do no model selection on it (linear_eval.py tests its last epoch): numbers to set beside published ones,
    nothing else."""
    if data.official_test is None:
        raise DataError(f"--split {OFFICIAL}: {data.name} has no official test set; give fractions instead")
    train = [data.ids[i] for i in np.flatnonzero(~data.official_test)]
    test = [data.ids[i] for i in np.flatnonzero(data.official_test)]
    return {"pretrain": train, "train": train, "val": test, "test": test}


def make_split(data, fractions, seed, by="lesion"):
    """Four disjoint parts, stratified by class and grouped by lesion where the source has lesions:
    scikit-learn cuts the data into n equal folds, n the least that makes every fraction a whole number of
    folds."""
    if fractions == OFFICIAL:
        return official_split(data)
    if by == "lesion" and data.name == "ham10000" and data.groups is None:
        raise DataError(
            "ham10000: splitting by lesion needs lesion ids (HAM10000_metadata.csv or "
            "ISIC2018_Task3_Training_LesionGroupings.csv); pass --split-by image to split by image"
        )
    grouped = by == "lesion" and data.groups is not None
    groups = np.array(data.groups if grouped else data.ids)
    pool = (
        np.flatnonzero(~data.official_test) if data.official_test is not None else np.arange(len(data.labels))
    )
    parts = PARTS if data.official_test is None else PARTS[:3]
    shares = [f / sum(fractions[: len(parts)]) for f in fractions[: len(parts)]]
    n_folds = next(n for n in range(1, 101) if all((s * n).denominator == 1 for s in shares))  # steps of 0.01
    folds = (StratifiedGroupKFold if grouped else StratifiedKFold)(n_folds, shuffle=True, random_state=seed)
    try:
        with (
            warnings.catch_warnings()
        ):  # "the least populated class has fewer members than n_splits": fine here
            warnings.simplefilter("ignore", UserWarning)
            fold_of = np.empty(len(pool), dtype=np.int64)
            for k, (_, members) in enumerate(folds.split(pool, data.labels[pool], groups[pool])):
                fold_of[members] = k
    except ValueError as e:
        raise DataError(
            f"{data.name}: {len(set(groups[pool]))} groups cannot make {n_folds} folds ({e})"
        ) from None
    bounds = np.cumsum([0] + [int(s * n_folds) for s in shares])
    split = {
        part: sorted(data.ids[i] for i in pool[(fold_of >= lo) & (fold_of < hi)])
        for part, lo, hi in zip(parts, bounds[:-1], bounds[1:])
    }
    if data.official_test is not None:
        split["test"] = [data.ids[i] for i in np.flatnonzero(data.official_test)]
    return split


def fingerprint(data):
    """What identifies the data a split was made from: ids, labels, groups and classes (not the pixels)."""
    content = json.dumps([data.name, list(data.ids), data.labels.tolist(), data.groups, list(data.classes)])
    return hashlib.sha256(content.encode()).hexdigest()


def split_digest(split):
    """What identifies the parts themselves: a backbone records it, so that its evaluation uses the same
    split."""
    return hashlib.sha256(json.dumps([split[p] for p in PARTS]).encode()).hexdigest()


def default_split_file(args):
    parsed = parse_fractions(args.split)
    fractions = OFFICIAL if parsed == OFFICIAL else "-".join(str(round(float(f) * 100)) for f in parsed)
    by = args.split_by if args.data == "ham10000" else "image"  # only HAM10000 has lesions to group by
    return Path("splits") / f"{args.data}-{by}-{fractions}-seed{args.split_seed}.json"


def load_split(data, path, fractions="0.6,0.1,0.1,0.2", seed=0, by="lesion"):
    """The split in `path`, made and written there first if the file does not exist. An existing file is used
    as it is (its own seed and fractions), after checking that it was made from this very data."""
    path = Path(path)
    if not path.exists():
        parsed = parse_fractions(fractions)
        shares = OFFICIAL if parsed == OFFICIAL else dict(zip(PARTS, map(str, parsed)))
        split = {
            "data": data.name,
            "fingerprint": fingerprint(data),
            "seed": seed,
            "split_by": by if data.groups is not None else "image",
            "fractions": shares,
            **make_split(data, parsed, seed, by),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: tmp.write_text(json.dumps(split, indent=1) + "\n"))
        except OSError as e:
            raise DataError(f"split file {path}: cannot write it ({e.strerror})") from None
        return split
    try:
        split = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"split file {path}: not readable JSON ({e})") from None
    absent = [p for p in PARTS if not isinstance(split, dict) or not isinstance(split.get(p), list)]
    if absent:
        raise DataError(f"split file {path}: no list {absent[0]!r}; expected the lists {', '.join(PARTS)}")
    if split.get("fingerprint") != fingerprint(data):
        raise DataError(
            f"split file {path} was made from other data than this {data.name} (the ids, labels or "
            f"lesions differ); pass a new --split-file to make a split for this data"
        )
    if split.get("fractions") == OFFICIAL:
        if split != {**split, **official_split(data)}:
            raise DataError(f"split file {path}: not the official split of {data.name} (hand-edited?)")
        return split
    known, seen = set(data.ids), {}
    for part in PARTS:
        for image_id in split[part]:
            if not isinstance(image_id, (str, int)) or image_id not in known:
                raise DataError(
                    f"split file {path}: part {part} lists image {image_id!r}, which the data lacks"
                )
            if image_id in seen:
                where = "twice" if seen[image_id] == part else f"in another part too ({seen[image_id]})"
                raise DataError(f"split file {path}: part {part} lists image {image_id!r} {where}")
            seen[image_id] = part
    return split


def selects_on_val(split):
    """Whether `val` is free for model selection: not under the official protocol, where val is the test
    set."""
    return split.get("fractions") != OFFICIAL


def pretraining_split(args, data, ckpt=None, metas=()):
    """The split that the backbones were pretrained with (split.json beside the first checkpoint) unless
    --split-file; it must be the one every checkpoint in `metas` records, and hold a usable train/val/test."""
    path = args.split_file or (ckpt.parent / "split.json" if ckpt else default_split_file(args))
    if ckpt and not path.exists():
        raise DataError(
            f"split file {path} not found: pass the --split-file the backbone was pretrained with"
        )
    split = load_split(data, path, args.split, args.split_seed, args.split_by)
    if any(meta.get("split_digest", split_digest(split)) != split_digest(split) for meta in metas):
        raise DataError(
            f"split file {path} is not the split a backbone was pretrained with: its test images "
            "may have been seen in pretraining; use the split.json of the pretraining run"
        )
    check_scored_parts(data, split, path)
    return split, path


def check_scored_parts(data, split, path, parts=("train", "val", "test")):
    """The parts of the split that a classifier learns from or is scored on: none empty, every class in
    train, and two classes or more in each (a score on one class measures nothing: any constant prediction
    has balanced accuracy 1)."""
    empty = [part for part in parts if not split[part]]
    if empty:
        raise DataError(f"split file {path}: part {empty[0]} is empty")
    train_labels = data.labels[indices(data, split, "train")]
    absent = [c for k, c in enumerate(data.classes) if not np.any(train_labels == k)]
    if absent:
        raise DataError(f"split file {path}: class {absent[0]} has no image in the train part")
    for part in parts:
        present = np.unique(data.labels[indices(data, split, part)])
        if len(present) < 2:
            raise DataError(
                f"split file {path}: part {part} holds images of {len(present)} class only "
                f"({data.classes[present[0]]}); scoring needs two classes or more"
            )


def indices(data, split, part):
    """Positions in `data` of the images of one part of the split."""
    position = {image_id: i for i, image_id in enumerate(data.ids)}
    return np.array([position[i] for i in split[part]], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ views


class RandomGaussianBlur:
    """PIL's Gaussian blur with sigma drawn from [lo, hi] (SimSiam's loader.py does the same). torchvision's
    GaussianBlur gives the same augmentation but measured 50x slower on a 224-px image on the CPU (130 ms vs
    2.5 ms)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(float(torch.empty(1).uniform_(*self.sigma))))


def simsiam_view(size):
    """One SimSiam augmentation (Chen & He 2021, §4 and their main_simsiam.py) of a PIL image: no blur at <=
    32 px, as in SimSiam's CIFAR recipe."""
    blur = [v2.RandomApply([RandomGaussianBlur()], p=0.5)] if size > 32 else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
            v2.RandomHorizontalFlip(),
        ]
    )


def simclr_view(size):
    """One SimCLR augmentation (Chen et al. 2020, App. A; google-research/simclr data_util.py): a crop of
    scale (0.08, 1), a flip, colour distortion of strength 1 (jitter 0.8, 0.8, 0.8, 0.2 with p = 0.8, grey
    p = 0.2), blur with p = 0.5 (ImageNet's; none at <= 32 px, as for CIFAR-10, App. B.9, and in
    simsiam_view)."""
    blur = [v2.RandomApply([RandomGaussianBlur()], p=0.5)] if size > 32 else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
        ]
    )


def byol_view(size, blur, solarise):
    """One of BYOL's two asymmetric augmentations (Grill et al. 2020, Table 6): view 1 blurred always and
    never solarised, view 2 blurred with p = 0.1 and solarised with p = 0.2; no blur at <= 32 px, as in
    simsiam_view."""
    blurred = [v2.RandomApply([RandomGaussianBlur()], p=blur)] if size > 32 else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blurred,
            v2.RandomSolarize(128, p=solarise),
        ]
    )


def swav_view(size, small=False):
    """One SwAV crop (Caron et al. 2020, §3.2 and main_swav.py): a large crop of scale (0.14, 1) at the full
    size, or a small one of scale (0.05, 0.14) at 96/224 of it (multi-crop); colour distortion of strength 1,
    blur with p = 0.5 (none at <= 32 px, as in simsiam_view)."""
    blur = [v2.RandomApply([RandomGaussianBlur()], p=0.5)] if size > 32 else []
    crop_size, scale = (max(1, round(size * 96 / 224)), (0.05, 0.14)) if small else (size, (0.14, 1.0))
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, scale=scale),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
        ]
    )


def eval_view(size):
    return v2.Compose([v2.Resize(size), v2.CenterCrop(size)])


class ImageSet(torch.utils.data.Dataset):
    """Images `index` of `data`, each through every transform in `views`: items (view_1, ..., view_k, label),
    the views uint8 (3, H, W) tensors. A key may come as (seed, i), from a SeededSampler: that image's
    augmentation is then drawn from a generator seeded with `seed`, so a run's views depend on its seed, epoch
    and image alone."""

    def __init__(self, data, index, views):
        self.images, self.labels, self.index, self.views = data.images, data.labels, index, views

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        seed, i = key if isinstance(key, tuple) else (None, key)
        image = Image.fromarray(np.asarray(self.images[self.index[i]]))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            views = [as_tensors(view(image)) for view in self.views]
        return (*views, int(self.labels[self.index[i]]))


def as_tensors(view):
    """A view as a uint8 (3, H, W) tensor; a located view's (image, box, flipped) as that tensor and its
    geometry, one float tensor (x0, y0, x1, y1, flipped)."""
    if isinstance(view, tuple):
        image, box, flipped = view
        return v2.functional.pil_to_tensor(image), torch.cat([box, torch.tensor([float(flipped)])])
    return v2.functional.pil_to_tensor(view)


class SeededSampler(torch.utils.data.DistributedSampler):
    """The DistributedSampler's shuffle (for one process too), each index i paired with the seed of that
    image's augmentation in this epoch, (seed * 100_003 + epoch) * 10_000_019 + i: distinct for every (seed,
    epoch, image) while there are fewer than 10_000_019 images and 100_003 epochs. An ImageSet seeds its views
    with it, so that they do not depend on which worker made them, and a resumed run sees the views it would
    have seen."""

    start = 0

    def set_epoch(self, epoch, start=0):
        """Shuffle for `epoch` and skip its first `start` items (a resumed run has trained on them
        already)."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        order = list(super().__iter__())[self.start :]
        return iter([((self.seed * 100_003 + self.epoch) * 10_000_019 + i, i) for i in order])


def eval_images(data, index, size, workers=0):
    """The evaluation view of the images `index` as one uint8 tensor (N, 3, size, size): made once, then
    reused."""
    loader = torch.utils.data.DataLoader(
        ImageSet(data, index, [eval_view(size)]), batch_size=256, num_workers=workers
    )
    if not len(index):
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.cat([images for images, _ in loader])


class LocatedCrop:
    """A random resized crop and a horizontal flip that say where the view came from, for losses that match
    regions between views (methods.matched_regions). The crop is torchvision's RandomResizedCrop (its own
    parameter sampling, so the same distribution); `then` (e.g. the colour steps) runs on the result. Returns
    (image, box, flipped): box the crop as (x0, y0, x1, y1) in the source image's normalised coordinates, a
    float32 tensor, and flipped whether the view was mirrored. Flipping before the colour steps rather than
    after, as simsiam_view does, draws the same views: colour, grey and blur do not see left from right."""

    def __init__(self, size, scale=(0.2, 1.0), then=None):
        self.crop, self.size, self.then = v2.RandomResizedCrop(size, scale=scale), size, then

    def __call__(self, image):
        width, height = image.size
        p = self.crop.make_params([image])
        top, left, h, w = p["top"], p["left"], p["height"], p["width"]
        view = v2.functional.resized_crop(image, top, left, h, w, [self.size] * 2)
        box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
        flipped = bool(torch.rand(1) < 0.5)
        if flipped:
            view = v2.functional.horizontal_flip(view)
        return (self.then(view) if self.then else view), box, flipped


def located_view(size):
    """A MoCo v2 view (Chen et al. 2020, "Improved Baselines"; SimSiam's too: simsiam main_simsiam.py)
    that records its crop and flip: LocatedCrop, then simsiam_view's own colour, grey and blur steps (the
    steps between its crop and its flip), so that the two recipes cannot drift apart."""
    return LocatedCrop(size, then=v2.Compose(simsiam_view(size).transforms[1:-1]))


VIEWS = {  # the augmentations a method's views name (methods.py)
    "simsiam": simsiam_view,
    "simclr": simclr_view,
    "byol1": functools.partial(byol_view, blur=1.0, solarise=0.0),
    "byol2": functools.partial(byol_view, blur=0.1, solarise=0.2),
    "swav": swav_view,
    "swav_small": functools.partial(swav_view, small=True),
    "located": located_view,
}


# ----------------------------------------------------------------------------- embedded parts, for evaluation


def estimate_statistics_if_untrained(backbone, meta, data, split, image_size, device):
    """A BatchNorm backbone that never trained (--init ... --norm bn, a converted BiT file) has no statistics
    yet: take them from the train part's images. Pretrained ones record their epoch and keep their own."""
    if "epoch" not in meta and backbone.norm_kind == "bn":
        estimate_bn_statistics(backbone, eval_images(data, indices(data, split, "train"), image_size), device)


def part_features(backbone, identity, data, split, part, args, device):
    """(features, labels) of one part with the evaluation view, from the cache when the same backbone
    (`identity`), split and image size were embedded before; a changed checkpoint has other bytes, hence
    another key."""
    key = hashlib.sha256(f"{identity} {split_digest(split)} {args.image_size}".encode()).hexdigest()[:24]
    path = args.cache_dir / "features" / f"{key}-{part}.pt"
    index = indices(data, split, part)
    labels = torch.as_tensor(data.labels[index])
    features = cached_features(path, labels)
    if features is not None:
        return features, labels
    images = eval_images(data, index, args.image_size, args.workers)
    features = embed(backbone, images, device).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"features": features, "labels": labels, "sha256": checksum(features)}, path)
    return features, labels


def cached_features(path, labels):
    """The features cached at `path` for images with these `labels`, or None where the file is absent or
    damaged (truncated, overwritten, a pickle that would run code: weights_only refuses it unread): such a
    cache is embedded again, never read. torch.load does not check the bytes of a tensor, hence the SHA-256
    recorded beside them."""
    try:
        cached = torch.load(path, weights_only=True)
        features, whole = cached["features"], torch.equal(cached["labels"], labels)
        return features if whole and cached["sha256"] == checksum(features) else None
    except Exception:  # noqa: BLE001 (a damaged file fails in many ways; each means "embed again")
        return None


def checksum(features):
    return hashlib.sha256(features.contiguous().numpy()).hexdigest()


# -------------------------------------------------------------------------------------------------- arguments


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=SOURCES, default="digits", help="digits (default) needs no download")
    group.add_argument("--data-root", type=Path, help="where the data lies (not needed for digits)")
    group.add_argument(
        "--download", action="store_true", help="fetch what is missing (CIFAR-10, BiT weights)"
    )
    group.add_argument(
        "--image-size",
        type=int,
        help="pixels; default " + ", ".join(f"{s} for {d}" for d, s in DEFAULT_SIZE.items()),
    )
    group.add_argument(
        "--split-file",
        type=Path,
        help="the split every script shares; default splits/DATA-BY-FRACTIONS-seedN.json",
    )
    group.add_argument(
        "--split",
        default="0.6,0.1,0.1,0.2",
        help="fractions pretrain,train,val,test (default 0.6,0.1,0.1,0.2 as paper §3); a source "
        "with an official test set keeps it and shares the rest by the first three. 'official': "
        "that source's own protocol (CIFAR-10: pretrain on all 50k, kNN queries = the test set)",
    )
    group.add_argument("--split-seed", type=int, default=0)
    group.add_argument(
        "--split-by",
        choices=("lesion", "image"),
        default="lesion",
        help="lesion: no lesion in two parts (default); image: the paper's image-level split",
    )
    group.add_argument(
        "--skip-bad-images", action="store_true", help="skip (and count) unreadable or missing images"
    )
    group.add_argument(
        "--workers",
        type=int,
        default=min(16, os.cpu_count()),
        help="data loading processes (per GPU in pretrain.py)",
    )
    group.add_argument(
        "--cache-dir", type=Path, default=CACHE_DIR, help=f"decoded images and features (default {CACHE_DIR})"
    )


def load_data(args):
    """The `Data` that --data, --data-root and --image-size name (the image size: files are decoded at it)."""
    for flag, least in (("image_size", 1), ("workers", 0), ("split_seed", 0)):
        value = getattr(args, flag, None)  # only what the caller's parser has
        if value is not None and value < least:
            raise DataError(f"--{flag.replace('_', '-')} {value}: must be at least {least}")
    if args.data == "digits":
        return load_digits()
    if args.data_root is None:
        raise DataError(f"--data {args.data} needs --data-root")
    if args.data != "cifar10" and not args.data_root.exists():
        raise DataError(f"--data-root {args.data_root}: no such file or directory")
    if args.data == "cifar10":
        return load_cifar10(args.data_root, args.download)
    if args.data == "ham10000":
        return load_ham10000(args.data_root, args.image_size, args.cache_dir, args.skip_bad_images)
    if args.data == "folder":
        return load_folder(args.data_root, args.image_size, args.cache_dir, args.skip_bad_images)
    return load_dermamnist(args.data_root)


def summary(data, split, path):
    """What a user reads before a long run: images per class in each part, groups per part, skipped files."""
    parts = {p: indices(data, split, p) for p in PARTS}
    lines = [
        f"{data.name}: {len(data.labels)} images, split {path} (seed {split.get('seed')}, "
        f"by {split.get('split_by')})",
        f"{'class':>12}" + "".join(f"{p:>10}" for p in PARTS) + f"{'all':>10}",
    ]
    for k, name in enumerate(data.classes):
        counts = [int(np.sum(data.labels[parts[p]] == k)) for p in PARTS]
        lines.append(f"{name:>12}" + "".join(f"{c:>10}" for c in counts) + f"{sum(counts):>10}")
    lines.append(
        f"{'images':>12}" + "".join(f"{len(parts[p]):>10}" for p in PARTS) + f"{len(data.labels):>10}"
    )
    if data.groups is not None:
        groups = {p: len({data.groups[i] for i in parts[p]}) for p in PARTS}
        lines.append(
            f"{'lesions':>12}" + "".join(f"{groups[p]:>10}" for p in PARTS) + f"{len(set(data.groups)):>10}"
        )
    lines.append(
        f"bad images skipped: {len(data.bad)}" + "".join(f"\n  {f}: {r}" for f, r in data.bad.items())
    )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description="Write (or check) the split file and print what each part holds."
    )
    add_data_args(parser)
    args = parser.parse_args()
    args.image_size = args.image_size or DEFAULT_SIZE[args.data]
    data = load_data(args)
    path = args.split_file or default_split_file(args)
    split = load_split(data, path, args.split, args.split_seed, args.split_by)
    print(summary(data, split, path))


if __name__ == "__main__":
    run(main)
