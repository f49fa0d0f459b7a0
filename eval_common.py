"""What the evaluation scripts share (linear_eval.py, tsne.py, finetune.py), and a pretraining run does not
read: the split that the backbones were pretrained with, the backbones to evaluate (a pretrained file, or the
network that --init names, as built before any pretraining), and a frozen backbone's features of the split's
parts, cached on disk by the backbone's bytes, the split and the image size.
"""

import hashlib

import torch

import bit_convert
from bit_common import SEED_LIMIT, DataError, UserError, WeightsError, require_regular_file, save_atomic
from bit_convert import build_backbone, load_backbone, sha256
from datasets import (
    OFFICIAL,
    check_scored_parts,
    default_split_file,
    eval_images,
    indices,
    load_split,
    split_digest,
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


def check_trial_seeds(seed, trials):
    """--seed and --trials: the trials run with the seeds seed .. seed + trials - 1, each a valid --seed."""
    if seed + trials > SEED_LIMIT:
        raise UserError(
            f"--seed {seed} --trials {trials}: the last trial's seed {seed + trials - 1} is above "
            f"{SEED_LIMIT - 1}, the largest seed"
        )


def saved_backbone(path):
    """(backbone, metadata, a name for figures, the file's SHA-256, which keys the feature cache) of a
    backbone file that pretrain.py or bit_convert.py wrote."""
    backbone, meta = load_backbone(path)
    name = f"{path.parent.name}/{path.stem}" + (f", epoch {meta['epoch']}" if "epoch" in meta else "")
    return backbone, meta, name, sha256(path)


def initial_backbone(init, arch, norm, cifar_stem, ws, seed):
    """The same for the network that --init names (scratch, bit-s, bit-m, FILE.npz), as built before any
    pretraining; `seed` draws the scratch network."""
    torch.manual_seed(seed)  # the scratch floor is one random network
    backbone = build_backbone(init, arch, norm, cifar_stem, ws)
    name = {"bit-s": "BiT-S", "bit-m": "BiT-M"}.get(init, init) + (
        f" {norm}, untrained" if init == "scratch" else f" {norm}, as released"
    )
    digest = hashlib.sha256(repr((init, arch, norm, cifar_stem, ws, seed)).encode())
    return backbone, {"init": init}, name, digest.hexdigest()


def estimate_statistics_if_untrained(backbone, meta, data, split, image_size, device):
    """A backbone whose BatchNorm statistics are not its own (untrained_statistics) gets them from the train
    part's images."""
    if bit_convert.untrained_statistics(backbone, meta):
        bit_convert.estimate_bn_statistics(
            backbone, eval_images(data, indices(data, split, "train"), image_size), device
        )


def part_features(backbone, digest, data, split, part, image_size, cache_dir, workers, device):
    """(features, labels) of one part with the evaluation view, from the cache when the same backbone
    (`digest`), split and image size were embedded before; a changed checkpoint has other bytes, hence
    another key."""
    key = hashlib.sha256(f"{digest} {split_digest(split)} {image_size}".encode()).hexdigest()[:24]
    path = cache_dir / "features" / f"{key}-{part}.pt"
    index = indices(data, split, part)
    labels = torch.as_tensor(data.labels[index])
    features = cached_features(path, labels)
    if features is not None:
        return check_features(features, part), labels
    images = eval_images(data, index, image_size, workers)
    features = check_features(bit_convert.embed(backbone, images, device).cpu(), part)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"features": features, "labels": labels, "sha256": checksum(features)}, path)
    except OSError as e:  # a full disk is a UserError of save_atomic's already
        raise DataError(f"--cache-dir {cache_dir}: cannot write the features there ({e.strerror})") from None
    return features, labels


def check_features(features, part):
    """Features with a NaN or an infinity would train and score a classifier on nothing (a balanced accuracy
    of one class in n, as if it were a result): refused."""
    bad = int((~torch.isfinite(features)).sum())
    if bad:
        raise WeightsError(
            f"the backbone's features of the {part} part hold {bad} value(s) that are NaN or infinite "
            "(weights or BatchNorm statistics that overflow?): nothing to evaluate"
        )
    return features


def cached_features(path, labels):
    """The features cached at `path` for images with these `labels`, or None where the file is absent or
    damaged (truncated, overwritten, a pickle that would run code: weights_only refuses it unread): such a
    cache is embedded again, never read. torch.load does not check the bytes of a tensor, hence the SHA-256
    recorded beside them."""
    try:
        require_regular_file(path)  # a FIFO there: embedded again, not waited on
        cached = torch.load(path, weights_only=True)
        features, whole = cached["features"], torch.equal(cached["labels"], labels)
        return features if whole and cached["sha256"] == checksum(features) else None
    except Exception:  # noqa: BLE001 (a damaged file fails in many ways; each means "embed again")
        return None


def checksum(features):
    return hashlib.sha256(features.contiguous().numpy()).hexdigest()
