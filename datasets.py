"""The data sources of every script: HAM10000 (or its ISIC 2018 layout), CIFAR-10, an image folder,
DermaMNIST, and scikit-learn's digits, which need no download.

Every source becomes a `Data`: all its images as one uint8 array (N, H, W, 3) with their labels, ids and
groups (the lesion each HAM10000 image shows). Small sources live in memory; image files are decoded once, at
the working resolution, into a memory-mapped cache (bit_common.decode_all). Then the leakage-free split, and
the views: SimSiam's, the evaluation's, and the dataset and sampler that seed them per image and epoch.

    python datasets.py --data ham10000 --download          # fetch HAM10000 into HAM10000_ROOT (2.6 GB), once
    python datasets.py --data ham10000 --data-root PATH    # write (or check) the split, print its summary
"""

import argparse
import csv
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from torchvision.transforms import v2
from tqdm import tqdm

from bit_common import (
    IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    NON_NEGATIVE_INT,
    SEED,
    SEED_LIMIT,
    ArgumentParser,
    DataError,
    Stopped,
    decode_all,
    disk_full,
    path_arg,
    require_regular_file,
    run,
    what_stopped,
    write_atomic,
)
from bit_convert import download

SOURCES = ("digits", "cifar10", "ham10000", "folder", "dermamnist")
DEFAULT_SIZE = {"digits": 8, "cifar10": 32, "dermamnist": 28, "ham10000": 224, "folder": 224}
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # alphabetical: DermaMNIST's label ids too
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_DIR = Path.home() / ".cache" / "bit-simsiam"

# HAM10000's root when --data-root is not given, shared by every script; $HAM10000_ROOT moves it.
HAM10000_ROOT = Path(os.environ.get("HAM10000_ROOT") or CACHE_DIR / "data" / "HAM10000")
HAM_METADATA, ISIC_TRUTH = "HAM10000_metadata.csv", "ISIC2018_Task3_Training_GroundTruth.csv"

# The ISIC 2018 Task 3 training release: HAM10000's 10,015 images, public, licence CC BY-NC 4.0, as the
# challenge's data page lists them (challenge.isic-archive.com/data/#2018, whose source is the repository
# ImageMarkup/stade, stade/core/templates/data/2018.html).
# $ISIC2018_URL names a mirror instead; the count stays checked whatever the URL.
ISIC2018_URL = os.environ.get("ISIC2018_URL") or "https://isic-challenge-data.s3.amazonaws.com/2018/"
ISIC_IMAGES = "ISIC2018_Task3_Training_Input.zip"  # 2.6 GB: ISIC2018_Task3_Training_Input/ISIC_*.jpg
ISIC_TRUTH_ZIP = "ISIC2018_Task3_Training_GroundTruth.zip"  # 36 KB: ISIC2018_Task3_Training_GroundTruth/*.csv
ISIC_GROUPS = "ISIC2018_Task3_Training_LesionGroupings.csv"  # 481 KB: image, lesion_id, how dx was confirmed
ISIC_IMAGE_COUNT = 10015


@dataclass
class Data:
    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, indices into `classes`
    ids: list  # image ids, or indices for sources without ids
    classes: tuple
    # images of one group never go to two parts (HAM10000: lesion_id); None: every image alone
    groups: list = None
    official_test: np.ndarray = None  # bool mask of a test set that the source fixes
    bad: dict = field(default_factory=dict)  # {id: reason} of the images skipped with --skip-bad-images


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
    require_regular_file(path, DataError)
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


def load_ham10000(root, size, cache_dir, skip_bad=False, download=False):
    """HAM10000_metadata.csv (or the ISIC 2018 Task 3 ground truth) and its images anywhere below `root`;
    with download=True, the ISIC 2018 Task 3 release is fetched there first if neither file is there."""
    if download and not any(find(root, name).exists() for name in (HAM_METADATA, ISIC_TRUTH)):
        download_ham10000(root)
    ids, dx, lesions, source = read_ham_metadata(root)
    found = images_below(root, ids)
    missing = [image_id for image_id in ids if image_id not in found]
    if missing and not skip_bad:
        raise DataError(
            f"{root}: image {missing[0]} (listed in {source.name}) not found below it; {len(missing)} "
            f"of {len(ids)} missing (--skip-bad-images skips them)"
        )
    rows = [k for k, image_id in enumerate(ids) if image_id in found]
    paths, labels = [found[ids[k]] for k in rows], [HAM_CLASSES.index(dx[k]) for k in rows]
    groups = [lesions[k] for k in rows] if lesions else None
    files = ("ham10000", paths, [ids[k] for k in rows], labels, HAM_CLASSES, groups)
    return from_files(*files, size, cache_dir, skip_bad, source, missing)


def images_below(root, ids=None):
    """{image id: path} of the image files anywhere below `root` (of `ids` alone, where given). An id found
    twice is an error: a stale copy (old_backup/ISIC_0000007.png) must not stand in for the image."""
    found, listed = {}, None if ids is None else set(ids)
    for path in sorted(root.rglob("*")):  # rglob does not follow links to folders: no loops, no copies
        if path.suffix.lower() in IMAGE_SUFFIXES and (listed is None or path.stem in listed):
            if path.stem in found:
                raise DataError(
                    f"{root}: image {path.stem} is both {found[path.stem]} and {path}; keep one of them"
                )
            found[path.stem] = path
    return found


def read_ham_metadata(root):
    """(image ids, dx, lesion ids or None, the file read). Columns are found by name; CRLF, `80.0` ages and an
    extra `dataset` column, all seen in the wild, read fine."""
    metadata, isic = find(root, HAM_METADATA), find(root, ISIC_TRUTH)
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
        groupings = find(root, ISIC_GROUPS)
        lesions = None
        if groupings.exists():
            lesion_of = {r["image"]: r["lesion_id"] for r in read_csv(groupings, ("image", "lesion_id"))}
            unknown = [image for image, lesion in lesion_of.items() if not (lesion or "").strip()]
            if unknown:
                raise DataError(f"{groupings}: image {unknown[0]} has no lesion_id")
            lesions = [lesion_of.get(r["image"], r["image"]) for r in rows]
        return [r["image"] for r in rows], dx, lesions, isic
    raise DataError(
        f"no HAM10000 in {root} (neither {HAM_METADATA} nor {ISIC_TRUTH} there): --download fetches the ISIC "
        f"2018 Task 3 training release into it (HAM10000's {ISIC_IMAGE_COUNT:,} images, 2.6 GB, licence CC "
        f"BY-NC 4.0) from {ISIC2018_URL}, or --data-root names where a copy is"
    )


def download_ham10000(root):
    """The ISIC 2018 Task 3 training release fetched and unpacked into `root` (absent or empty): its two zips
    and the lesion groupings, each resumable (bit_convert.download), kept in a hidden folder beside `root`
    until the release is unpacked and checked, then deleted. `root` appears whole, by a rename, or not at
    all."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"--data-root {root}: holds other files but no HAM10000 metadata; --download unpacks only into a "
            "new or empty folder"
        )
    print(
        f"HAM10000: downloading the ISIC 2018 Task 3 training release ({ISIC_IMAGE_COUNT:,} images, 2.6 GB; "
        f"licence CC BY-NC 4.0, cite Tschandl et al., Sci. Data 2018) from {ISIC2018_URL} into {root}"
    )
    staging = root.parent / f".{root.name}.download"
    by_hand = f"fetch it elsewhere; unpack {ISIC_IMAGES}, {ISIC_TRUTH_ZIP} and {ISIC_GROUPS} into {root}"
    for name, check in ((ISIC_IMAGES, open_zip), (ISIC_TRUTH_ZIP, open_zip), (ISIC_GROUPS, read_groups)):
        if not (staging / name).exists():
            download(ISIC2018_URL + name, staging / name, check, by_hand)
    unpacked = Path(tempfile.mkdtemp(prefix=f".{root.name}.unpacking-", dir=root.parent))
    try:
        for name in (ISIC_IMAGES, ISIC_TRUTH_ZIP):
            unzip(staging / name, unpacked)
        shutil.copyfile(staging / ISIC_GROUPS, unpacked / ISIC_GROUPS)
        check_release(unpacked)
        unpacked.rename(root)  # onto an empty folder too (rename(2))
    except (KeyboardInterrupt, Stopped) as e:
        raise DataError(
            f"stopped by {what_stopped(e)} while unpacking into {unpacked}; nothing was kept (the downloaded "
            f"files are, in {staging}): run the same command again"
        ) from None
    except DataError as e:
        shutil.rmtree(staging)  # the files as served do not make the release: a new run fetches them anew
        raise DataError(f"{ISIC2018_URL}: {e}; nothing was kept") from None
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    shutil.rmtree(staging)
    print(f"HAM10000: {ISIC_IMAGE_COUNT:,} images and their lesion groups in {root}")


def open_zip(path):
    """A DataError unless `path` opens as a zip archive (its central directory read, at its end): an HTML
    page or a truncated file is refused before anything is unpacked."""
    try:
        zipfile.ZipFile(path).close()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path.name} is not a zip archive ({e})") from None


def read_groups(path):
    """The image ids of the lesion groupings, a DataError unless it is their CSV."""
    return {row["image"] for row in read_csv(path, ("image", "lesion_id"))}


def unzip(archive, into):
    """Unpack `archive` into the folder `into`, refusing first a member that would land outside it and an
    archive that would expand more than 100 times or beyond the free space (a zip bomb: the sizes that its
    directory declares bind what zipfile writes); every member's CRC is checked as it is written. The
    release's JPEGs do not compress, and its CSV about 12 times."""
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        for member in members:
            if member.filename.startswith("/") or ".." in PurePosixPath(member.filename).parts:
                raise DataError(f"{archive.name}: member {member.filename} would land outside the data root")
        size, packed = sum(m.file_size for m in members), archive.stat().st_size
        free = shutil.disk_usage(into).free
        if size > 100 * packed:
            raise DataError(f"{archive.name}: {packed:,} bytes would unpack into {size:,} (a zip bomb?)")
        if size > free:
            raise DataError(
                f"{archive.name} unpacks into {size / 1e9:.1f} GB, but {into} has {free / 1e9:.1f} GB free"
            )
        try:
            for member in tqdm(members, desc=f"unpacking {archive.name}", unit="file"):
                z.extract(member, into)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DataError(f"{archive.name} is corrupt ({e})") from None
        except OSError as e:
            if disk_full(e):
                raise DataError(f"cannot unpack {archive.name} into {into}: the disk is full") from None
            raise


def check_release(root):
    """A DataError unless the unpacked `root` is the whole release: every image of the ground truth there as a
    JPEG and in a lesion group, nothing else, and ISIC_IMAGE_COUNT of them. The ground truth and the groupings
    are read as every script reads them (read_ham_metadata)."""
    if not find(root, ISIC_TRUTH).exists():
        raise DataError(f"{ISIC_TRUTH_ZIP} holds no {ISIC_TRUTH}")
    ids, _, _, truth = read_ham_metadata(root)
    listed = set(ids)
    for name, found in (
        (ISIC_IMAGES, set(images_below(root))),
        (ISIC_GROUPS, read_groups(root / ISIC_GROUPS)),
    ):
        for holder, lacker, extra in ((truth.name, name, listed - found), (name, truth.name, found - listed)):
            if extra:
                raise DataError(f"{holder} lists {min(extra)}, which {lacker} lacks ({len(extra)} such)")
    if len(listed) != ISIC_IMAGE_COUNT:
        raise DataError(f"{truth.name} lists {len(listed):,} images; the release has {ISIC_IMAGE_COUNT:,}")


def find(root, name):
    """root/name, or root/*/name as the ISIC archives unpack (ISIC2018_Task3_Training_GroundTruth/...csv)."""
    return root / name if (root / name).exists() else min(root.glob(f"*/{name}"), default=root / name)


def read_csv(path, required):
    """The rows of a CSV file whose first required column names each image once."""
    require_regular_file(path, DataError)
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
        classes, _ = torchvision.datasets.folder.find_classes(root)
    except FileNotFoundError as e:  # no class folders at all
        raise DataError(f"{root}: {e}") from None
    samples = folder_images(root, classes)
    paths, labels = [Path(p) for p, _ in samples], [k for _, k in samples]
    # a class's name is a label that figures draw: a folder name's bytes that are not UTF-8 are shown as \xNN
    # (matplotlib cannot draw the lone surrogates that os.fsdecode keeps them as)
    names = [os.fsencode(c).decode("utf-8", "backslashreplace") for c in classes]
    files = ("folder", paths, [p.relative_to(root).as_posix() for p in paths], labels, names, None)
    return from_files(*files, size, cache_dir, skip_bad, root)


def folder_images(root, classes):
    """(path, class index) of every image below each class folder, in the order of torchvision's
    make_dataset (os.walk following symbolic links, sorted), which this replaces: a folder reached twice (a
    link back up such as a/up -> .., a loop, two links to one folder) or an image file reached twice (a link
    or a hard link to another) would count images twice, perhaps under another class's label, and is an error
    naming it."""
    seen, samples = {}, []

    def reached(path, what):
        try:
            stat = os.stat(path)
            identity = (stat.st_dev, stat.st_ino)  # the same for every link to one file or folder
        except OSError:  # a broken link: its decoding fails later, and says so
            identity = os.path.realpath(path)
        if identity in seen:
            raise DataError(
                f"{path}: the same {what} as {seen[identity]} (a link); its images would count twice: "
                "remove the link"
            )
        seen[identity] = path

    reached(root, "folder")
    for k, name in enumerate(classes):
        top = os.path.join(root, name)
        reached(top, "folder")
        walked = []
        for folder, subfolders, names in os.walk(top, followlinks=True):
            for sub in subfolders:  # before os.walk goes down into it
                reached(os.path.join(folder, sub), "folder")
            walked.append((folder, names))
        images = [
            os.path.join(folder, n)
            for folder, names in sorted(walked)
            for n in sorted(names)
            if torchvision.datasets.folder.has_file_allowed_extension(
                n, torchvision.datasets.folder.IMG_EXTENSIONS
            )
        ]
        if not images:
            raise DataError(
                f"{root}: class folder {name} holds no image "
                f"({', '.join(torchvision.datasets.folder.IMG_EXTENSIONS)})"
            )
        for path in images:
            reached(path, "image file")
            samples.append((path, k))
    return samples


def load_dermamnist(root):
    """MedMNIST's DermaMNIST .npz (the file, or a directory holding one dermamnist*.npz). Its train and val
    parts are re-split into pretrain/train/val; its test part stays the test part."""
    files = [root] if root.is_file() else sorted(root.glob("dermamnist*.npz")) if root.is_dir() else []
    if len(files) != 1:
        raise DataError(
            f"--data-root {root}: expected a dermamnist .npz file or a directory with exactly one"
        )
    require_regular_file(files[0], DataError)
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


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=SOURCES, default="digits", help="digits (default) needs no download")
    group.add_argument(
        "--data-root",
        type=path_arg,
        help=f"where the data lies (not for digits; ham10000: $HAM10000_ROOT, default {HAM10000_ROOT})",
    )
    group.add_argument(
        "--download",
        action="store_true",
        help="fetch the data if missing (ham10000: the ISIC 2018 Task 3 release, 2.6 GB; cifar10)",
    )
    group.add_argument(
        "--image-size",
        type=IMAGE_SIZE,
        help=f"pixels, at most {MAX_IMAGE_SIZE}; default "
        + ", ".join(f"{s} for {d}" for d, s in DEFAULT_SIZE.items()),
    )
    group.add_argument(
        "--split-file",
        type=path_arg,
        help="the split every script shares; default splits/DATA-BY-FRACTIONS-seedN.json",
    )
    # --split, --split-seed and --split-by make a split file that does not exist yet; an existing one records
    # its own, and a flag that contradicts it is an error (load_split): hence no default here
    group.add_argument(
        "--split",
        type=fractions_text,
        metavar="FRACTIONS",
        help=f"fractions pretrain,train,val,test (default {DEFAULT_FRACTIONS} as paper §3); a source "
        "with an official test set keeps it and shares the rest by the first three. 'official': "
        "that source's own protocol (CIFAR-10: pretrain on all 50k, kNN queries = the test set)",
    )
    group.add_argument("--split-seed", type=SEED, help="default 0")
    group.add_argument(
        "--split-by",
        choices=("lesion", "image"),
        help="lesion: no lesion in two parts (default); image: the paper's image-level split",
    )
    group.add_argument(
        "--skip-bad-images", action="store_true", help="skip (and count) unreadable or missing images"
    )
    group.add_argument(
        "--workers",
        type=NON_NEGATIVE_INT,
        default=min(16, os.cpu_count()),
        help="data loading processes (per GPU in pretrain.py)",
    )
    group.add_argument(
        "--cache-dir",
        type=path_arg,
        default=CACHE_DIR,
        help=f"decoded images and features (default {CACHE_DIR})",
    )


def data_from_args(args):
    """The `Data` that the flags of add_data_args name."""
    return load_data(
        args.data, args.data_root, args.image_size, args.cache_dir, args.skip_bad_images, args.download
    )


def split_from_args(data, args):
    """(the split, its file) that the flags of add_data_args name: --split-file, else the default file of
    --split, --split-seed and --split-by, made first if absent."""
    flags = (args.split, args.split_seed, args.split_by)
    path = args.split_file or default_split_file(args.data, *flags)
    return load_split(data, path, *flags), path


def load_data(source, root=None, image_size=None, cache_dir=CACHE_DIR, skip_bad=False, download=False):
    """The `Data` of one of SOURCES; image files are decoded at `image_size` into `cache_dir`."""
    if source == "digits":
        return load_digits()
    if source == "ham10000":
        return load_ham10000(root or HAM10000_ROOT, image_size, cache_dir, skip_bad, download)
    if root is None:
        raise DataError(f"--data {source} needs --data-root")
    if source != "cifar10" and not root.exists():
        raise DataError(f"--data-root {root}: no such file or directory")
    if source == "cifar10":
        return load_cifar10(root, download)
    if source == "folder":
        return load_folder(root, image_size, cache_dir, skip_bad)
    return load_dermamnist(root)


PARTS = ("pretrain", "train", "val", "test")
DEFAULT_FRACTIONS = "0.6,0.1,0.1,0.2"  # paper §3: 60 % pretrain, 10 % train, 10 % val, 20 % test
OFFICIAL = "official"  # --split official: the source's own train/test protocol (see official_split)


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


def fractions_text(text):
    """argparse type of --split: the text, once parse_fractions accepts it (checked as a flag, and as a value
    that --resume restores from args.json)."""
    try:
        parse_fractions(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


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
    pool = np.arange(len(data.labels)) if data.official_test is None else np.flatnonzero(~data.official_test)
    parts = PARTS if data.official_test is None else PARTS[:3]
    shares = [f / sum(fractions[: len(parts)]) for f in fractions[: len(parts)]]
    n_folds = next(n for n in range(1, 101) if all((s * n).denominator == 1 for s in shares))  # steps of 0.01
    folds = (StratifiedGroupKFold if grouped else StratifiedKFold)(n_folds, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits": fine
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


def default_split_file(source, fractions=None, seed=None, by=None):
    """splits/SOURCE-BY-FRACTIONS-seedN.json: where a split made with these settings (None: the defaults of
    --split, --split-seed and --split-by) is kept by default."""
    parsed, seed, by = parse_fractions(fractions or DEFAULT_FRACTIONS), seed or 0, by or "lesion"
    shares = OFFICIAL if parsed == OFFICIAL else "-".join(str(round(float(f) * 100)) for f in parsed)
    by = by if source == "ham10000" else "image"  # only HAM10000 has lesions to group by
    return Path("splits") / f"{source}-{by}-{shares}-seed{seed}.json"


def load_split(data, path, fractions=None, seed=None, by=None):
    """The split in `path`, made and written there first if the file does not exist, with `fractions`,
    `seed` and `by` (None: the defaults of --split, --split-seed, --split-by). An existing file is used as it
    is, after checking that it was made from this very data, that it puts every image in one part, and that
    the settings given (not None) are those it records: the file decides the split, and a flag that says
    otherwise is an error, not ignored."""
    path = Path(path)
    if not path.exists():
        parsed, seed, by = parse_fractions(fractions or DEFAULT_FRACTIONS), seed or 0, by or "lesion"
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
    require_regular_file(path, DataError)
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
    check_settings(data, split, path, fractions, seed, by)
    if split.get("fractions") == OFFICIAL:
        if split != {**split, **official_split(data)}:
            raise DataError(f"split file {path}: not the official split of {data.name} (hand-edited?)")
        return split
    known, seen = set(data.ids), {}
    for part in PARTS:
        for image_id in split[part]:
            if type(image_id) not in (str, int) or image_id not in known:  # true or 3.0 would pass for 1, 3
                raise DataError(
                    f"split file {path}: part {part} lists image {image_id!r}, which the data lacks"
                )
            if image_id in seen:
                where = "twice" if seen[image_id] == part else f"in another part too ({seen[image_id]})"
                raise DataError(f"split file {path}: part {part} lists image {image_id!r} {where}")
            seen[image_id] = part
    if len(seen) < len(known):  # --skip-bad-images leaves images out of the data, and so of its fingerprint
        lost = next(image_id for image_id in data.ids if image_id not in seen)
        raise DataError(
            f"split file {path}: image {lost!r} is in no part ({len(known) - len(seen)} of the data's "
            f"{len(known)} images are missing; every image belongs to exactly one part: hand-edited?)"
        )
    return split


# The arguments that split_settings() fills in from the split file: a run's args.json records the file's,
# which runs written before it did may not have (--split-by lesion on digits, which has no lesions: the file
# says image). The split itself is checked by its digest (last.pt, a backbone file), not by these.
SPLIT_FLAGS = {"split", "split_seed", "split_by"}


def split_settings(split):
    """(--split, --split-seed, --split-by) as the split file records them, each None where it records none
    that the flag takes: what a script that used the file records in its args.json and results.json."""
    fractions, seed, by = split.get("fractions"), split.get("seed"), split.get("split_by")
    if isinstance(fractions, dict):  # {"pretrain": "3/5", ...}
        try:
            fractions = ",".join(f"{float(Fraction(fractions[p])):g}" for p in PARTS)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            fractions = None
    if isinstance(fractions, str):
        try:
            parse_fractions(fractions)
        except DataError:
            fractions = None
    return (
        fractions if isinstance(fractions, str) else None,
        seed if type(seed) is int and 0 <= seed < SEED_LIMIT else None,
        by if by in ("lesion", "image") else None,
    )


def check_settings(data, split, path, fractions, seed, by):
    """--split, --split-seed and --split-by, where given, against what the existing split file `path`
    records."""
    made_with = dict(zip(("split", "split_seed", "split_by"), split_settings(split)))
    by = by if by is None or data.groups is not None else "image"  # no lesions: split by image
    given = {"split": fractions, "split_seed": seed, "split_by": by}
    for flag, value in given.items():
        same = value == made_with[flag]
        if flag == "split" and value is not None and made_with[flag] is not None:
            same = parse_fractions(value) == parse_fractions(made_with[flag])
        if value is not None and not same:
            made = made_with[flag] if made_with[flag] is not None else "no such setting recorded"
            raise DataError(
                f"--{flag.replace('_', '-')} {value}: the split file {path} decides the split, and it was "
                f"made with {made}; leave the flag out to use the file, or pass a new --split-file"
            )


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


def summary(data, split, path):
    """What a user reads before a long run: images per class in each part, groups per part, skipped files."""
    parts = {p: indices(data, split, p) for p in PARTS}

    def row(name, counts, total):
        return f"{name:>12}" + "".join(f"{c:>10}" for c in counts) + f"{total:>10}"

    seed, by = split.get("seed"), split.get("split_by")
    lines = [
        f"{data.name}: {len(data.labels)} images, split {path} (seed {seed}, by {by})",
        row("class", PARTS, "all"),
    ]
    for k, name in enumerate(data.classes):
        counts = [int(np.sum(data.labels[parts[p]] == k)) for p in PARTS]
        lines.append(row(name, counts, sum(counts)))
    lines.append(row("images", [len(parts[p]) for p in PARTS], len(data.labels)))
    if data.groups is not None:
        groups = [len({data.groups[i] for i in parts[p]}) for p in PARTS]
        lines.append(row("lesions", groups, len(set(data.groups))))
    bad = "".join(f"\n  {f}: {r}" for f, r in data.bad.items())
    return "\n".join([*lines, f"bad images skipped: {len(data.bad)}{bad}"])


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
    32 px, as in SimSiam's CIFAR recipe (lightly's CIFAR-10 benchmark: SimSiamTransform with
    gaussian_blur=0.0)."""
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


def eval_view(size):
    """The whole image at `size` (the images are square already, resized as the paper's §3 resizes HAM10000,
    so the centre crop takes all of it): our choice; the authors' code resizes to 8/7 of the size and
    centre-crops (BiT-SimSiam augmentations/eval_aug.py)."""
    return v2.Compose([v2.Resize(size), v2.CenterCrop(size)])


class ImageSet(torch.utils.data.Dataset):
    """Images `index` of `data`, each through every one of `transforms`: items (view_1, ..., view_k, label),
    the views uint8 (3, H, W) tensors. A key may come as (seed, i), from a SeededSampler: that image's
    augmentation is then drawn from a generator seeded with `seed`, so a run's views depend on its seed, epoch
    and image alone."""

    def __init__(self, data, index, transforms):
        self.images, self.labels, self.index, self.transforms = data.images, data.labels, index, transforms

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        seed, i = key if isinstance(key, tuple) else (None, key)
        image = Image.fromarray(np.asarray(self.images[self.index[i]]))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            views = [as_tensors(transform(image)) for transform in self.transforms]
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
    loader = torch.utils.data.DataLoader(  # any batch size gives the same tensor
        ImageSet(data, index, [eval_view(size)]), batch_size=256, num_workers=workers
    )
    if not len(index):
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.cat([images for images, _ in loader])


def main():
    parser = ArgumentParser(description="Write (or check) the split file and print what each part holds.")
    add_data_args(parser)
    args = parser.parse_args()
    args.image_size = args.image_size or DEFAULT_SIZE[args.data]
    data = data_from_args(args)
    split, path = split_from_args(data, args)
    print(summary(data, split, path))


if __name__ == "__main__":
    run(main)
