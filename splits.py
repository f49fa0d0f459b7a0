"""The split every script shares: each image id in one of four disjoint parts, stratified by class and,
for HAM10000, grouped by lesion, so that no lesion's images sit on both sides of an evaluation.

    pretrain   unlabelled images for the self-supervised method
    train/val  the labelled part: the linear classifier and its model selection; the kNN monitor's data
    test       touched once, by the final evaluation

A split is a JSON file (splits/DATA-BY-FRACTIONS-seedN.json by default; a run keeps its own as DIR/split.json)
that records the data it was made from; a backbone records the split's digest, so that its evaluation uses the
split it was pretrained with.
"""

import argparse
import hashlib
import json
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from common import SEED_LIMIT, DataError, require_regular_file, write_atomic

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


# The arguments that settings() fills in from the split file: a run's args.json records the file's, which
# runs written before it did may not have (--split-by lesion on digits, which has no lesions: the file says
# image). The split itself is checked by its digest (last.pt, a backbone file), not by these.
SETTINGS = {"split", "split_seed", "split_by"}


def settings(split):
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
    recorded = dict(zip(("split", "split_seed", "split_by"), settings(split)))
    given = {
        "split": fractions,
        "split_seed": seed,
        "split_by": by if by is None or data.groups is not None else "image",  # no lesions: split by image
    }
    for flag, value in given.items():
        same = value == recorded[flag]
        if flag == "split" and value is not None and recorded[flag] is not None:
            same = parse_fractions(value) == parse_fractions(recorded[flag])
        if value is not None and not same:
            raise DataError(
                f"--{flag.replace('_', '-')} {value}: the split file {path} decides the split, and it was "
                f"made with {recorded[flag] if recorded[flag] is not None else 'no such setting recorded'}; "
                "leave the flag out to use the file, or pass a new --split-file"
            )


def selects_on_val(split):
    """Whether `val` is free for model selection: not under the official protocol, where val is the test
    set."""
    return split.get("fractions") != OFFICIAL


def pretraining_split(data, path, ckpt=None, metas=(), fractions=None, seed=None, by=None):
    """The split that the backbones were pretrained with: `path` (--split-file) where given, else split.json
    beside the first checkpoint `ckpt`, else the default split file, made with `fractions`, `seed` and `by`
    if absent. It must be the one every checkpoint in `metas` records, and hold a usable train/val/test."""
    path = path or (
        ckpt.parent / "split.json" if ckpt else default_split_file(data.name, fractions, seed, by)
    )
    if ckpt and not path.exists():
        raise DataError(
            f"split file {path} not found: pass the --split-file the backbone was pretrained with"
        )
    split = load_split(data, path, fractions, seed, by)
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
