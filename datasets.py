"""The data sources of every script: HAM10000 (or its ISIC 2018 layout), CIFAR-10, an image folder,
DermaMNIST, and scikit-learn's digits, which need no download.

Every source becomes a `Data`: all its images as one uint8 array (N, H, W, 3) with their labels, ids and
groups (the lesion each HAM10000 image shows). Small sources live in memory; image files are decoded once, at
the working resolution, into a memory-mapped cache (image_cache.py). The split lives in splits.py, the views
in views.py.

    python datasets.py --data ham10000 --download          # fetch HAM10000 into HAM10000_ROOT (2.6 GB), once
    python datasets.py --data ham10000 --data-root PATH    # write (or check) the split, print its summary
"""

import argparse
import csv
import os
import pickle
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torchvision
from tqdm import tqdm

from common import (
    IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    NON_NEGATIVE_INT,
    SEED,
    DataError,
    Stopped,
    disk_full,
    download,
    path_arg,
    require_regular_file,
    run,
    what_stopped,
)
from image_cache import decode_all
from splits import DEFAULT_FRACTIONS, default_split_file, fractions_text, load_split, summary

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
    and the lesion groupings, each resumable (common.download), kept in a hidden folder beside `root` until
    the release is unpacked and checked, then deleted. `root` appears whole, by a rename, or not at all."""
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
    by_hand = (
        f"fetch it elsewhere, and unpack {ISIC_IMAGES} and {ISIC_TRUTH_ZIP} with {ISIC_GROUPS} into {root}"
    )
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
    paths = [Path(p) for p, _ in samples]
    return from_files(
        "folder",
        paths,
        [p.relative_to(root).as_posix() for p in paths],
        [k for _, k in samples],
        # a class's name is a label that figures draw: a folder name's bytes that are not UTF-8 are shown as
        # \xNN (matplotlib cannot draw the lone surrogates that os.fsdecode keeps them as)
        [os.fsencode(c).decode("utf-8", "backslashreplace") for c in classes],
        None,
        size,
        cache_dir,
        skip_bad,
        root,
    )


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


# ------------------------------------------------------------------------------------------ decode-once cache


# ------------------------------------------------------------------------------------------------------ split


# ------------------------------------------------------------------------------------------------------ views


# ----------------------------------------------------------------------------- embedded parts, for evaluation


# -------------------------------------------------------------------------------------------------- arguments


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
    # its own, and a flag that contradicts it is an error (splits.load_split): hence no default here
    group.add_argument(
        "--split",
        type=fractions_text,
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


def main():
    parser = argparse.ArgumentParser(
        description="Write (or check) the split file and print what each part holds."
    )
    add_data_args(parser)
    args = parser.parse_args()
    args.image_size = args.image_size or DEFAULT_SIZE[args.data]
    data = load_data(
        args.data, args.data_root, args.image_size, args.cache_dir, args.skip_bad_images, args.download
    )
    path = args.split_file or default_split_file(args.data, args.split, args.split_seed, args.split_by)
    split = load_split(data, path, args.split, args.split_seed, args.split_by)
    print(summary(data, split, path))


if __name__ == "__main__":
    run(main)
