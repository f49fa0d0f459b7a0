"""What every script shares that is neither the data (datasets.py) nor the network (bit_convert.py).

Errors a user can fix, one atomic write, the input scaling and mixed precision, embedding with a frozen
backbone, BatchNorm statistics for a network that never trained, and the measurements: weighted kNN, the
embedding spectrum and RankMe, focal loss, and the classification scores.
"""

import argparse
import errno
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score


class UserError(ValueError):
    """Something the user gave (a flag, a file, a key in it) that cannot be used; the message names it."""


def run(main):
    """A script's entry point: a UserError, or a loss that stopped being finite, ends it with one line."""
    try:
        sys.exit(main())
    except (UserError, FloatingPointError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")


def write_atomic(path, write):
    """Create or replace `path` whole or not at all: `write(tmp)` fills a temporary file beside it, which is
    renamed onto `path` once complete. A crash or a full disk leaves whatever was at `path` as it was; a full
    disk is a UserError that names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        full = disk_full(e)
        if full:
            raise UserError(
                f"cannot write {path}: the disk is full ({full.strerror}); nothing was replaced"
            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(error):
    """The OSError ENOSPC (or EDQUOT, a full quota) behind `error`, or None. torch.save into a file object
    reports the OSError of its write as the context of a RuntimeError, hence the walk along the chain."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__context__
    return None


def save_atomic(obj, path):
    """torch.save, atomically. Into a file object that Python writes, so that a full disk is an OSError that
    write_atomic recognises; torch.save into a path reports it only as "unexpected pos" (PyTorch 2.x)."""

    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomic(path, save)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag ends in one line (`script.py: error: argument --lr: ...`, exit 2) as
    every other error of the scripts do; --help still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text):
    """argparse type of every float flag: a number, but not nan or inf, which every range check lets through
    (nan < 0 and nan > 0 are both false)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def device_name(text):
    """argparse type of --device: cpu, cuda or cuda:N, one that this machine has. The name itself is kept
    (args.json holds strings)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has no such GPU ({gpus} found); use --device cpu"
        )
    return text


def output_dir(path, flag="--out"):
    """Make `path` a directory that takes files, before any computing: a file there, or a place that cannot
    be written, is one line now rather than a traceback after the work."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    return path


def to_json(args):
    """The arguments as JSON values (paths as strings): args.json, results.json, checkpoints."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


# --------------------------------------------------------------------------------------- inputs and precision


def to_input(images, device):
    """uint8 images -> float in [-1, 1] on `device`. BiT was trained on [-1, 1] inputs; every init uses the
    same scaling, so that one checkpoint means one thing in every script. Scaling on the device moves 4x fewer
    bytes."""
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.float() / 127.5 - 1.0


def amp_dtype(device):
    """Mixed precision: bf16 on GPUs that compute in it (Ampere and newer), fp16 with a GradScaler on older
    ones (V100, T4: they report bf16 "supported" through a slow emulation, hence including_emulation=False),
    float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device):
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype, enabled=dtype != torch.float32)


# ------------------------------------------------------------------------------------------- frozen backbones


@torch.no_grad()
def embed(backbone, images, device, batch_size=256):
    """Backbone features (N, D), float32, of uint8 images (N, 3, H, W), in eval mode."""
    backbone.eval()
    with autocast(device):
        features = [
            backbone(to_input(images[i : i + batch_size], device)).float()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(features)


@torch.no_grad()
def estimate_bn_statistics(backbone, images, device, batch_size=256):
    """Fresh BatchNorm statistics (mean 0, var 1) make an untrained or BiT-initialised BN network meaningless
    in eval mode: replace them by their average over `images`, taken in train mode. Training itself never
    reads them. Plain BatchNorm only: a SyncBatchNorm would all-gather, a collective that one process must not
    start alone."""
    norms = [m for m in backbone.modules() if hasattr(m, "reset_running_stats")]  # BatchNorm, IterNorm
    if any(isinstance(m, nn.SyncBatchNorm) for m in norms):
        raise ValueError("estimate_bn_statistics before convert_sync_batchnorm, not after")
    momenta, was_training = [m.momentum for m in norms], backbone.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    backbone.train()
    with autocast(device):
        for i in range(0, len(images), batch_size):
            backbone(to_input(images[i : i + batch_size], device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    backbone.train(was_training)


# ----------------------------------------------------------------------------------------------- measurements


def knn_predict(queries, bank, bank_labels, n_classes, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar bank features vote for their class with weight
    exp(similarity / temperature); the class with the largest sum wins."""
    similarity = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    weights, neighbours = similarity.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), n_classes, device=queries.device, dtype=weights.dtype)
    votes.scatter_add_(1, bank_labels[neighbours], (weights / temperature).exp())
    return votes.argmax(1)


def covariance_spectrum(features):
    """Eigenvalues, largest first, of the covariance of L2-normalised features: the spectrum whose tail
    falling to zero shows a dimensional collapse (Jing et al., ICLR 2022, §3 and their spectrum.py)."""
    z = F.normalize(features.double(), dim=1)
    z = z - z.mean(0)
    spectrum = torch.linalg.svdvals(z) ** 2 / len(
        z
    )  # the covariance z'z/N has the squares of z's singular values
    return spectrum[: len(z) - 1]  # centring removes one dimension: N points span at most N - 1


def rankme(features, eps=1e-7):
    """RankMe (Garrido et al., ICML 2023, Eq. 1): exp(entropy of p), p_k = sigma_k / sum(sigma) + eps, sigma
    the singular values of the raw embedding matrix (neither centred nor normalised). About 1 when every
    embedding lies on one line (collapse), up to min(N, D) when they fill every dimension."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def normalised_std(z):
    """The collapse signal of SimSiam (Chen & He 2021, §4.1): the std over the batch of z/|z|, averaged over
    the channels; about 1/sqrt(d) when the outputs spread over the sphere, 0 when they have collapsed to one
    point."""
    return F.normalize(z.float(), dim=1).std(0).mean()


def write_results(out, results, trials):
    """OUT/results.json, the file `linear_eval.py --compare` draws: `results` (model, checkpoint, data, ...),
    the trials, and the mean and sample std of their test scores. Returns the line that summarises it."""
    metrics = ("balanced_accuracy", "macro_f1", "accuracy")
    mean = {m: float(np.mean([t[m] for t in trials])) for m in metrics}
    std = {m: float(np.std([t[m] for t in trials], ddof=1)) if len(trials) > 1 else 0.0 for m in metrics}
    text = json.dumps({**results, "trials": trials, "mean": mean, "std": std}, indent=1) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(text))
    return (
        f"{results['model']}: test balanced accuracy {mean['balanced_accuracy']:.4f} ± "
        f"{std['balanced_accuracy']:.4f}, macro F1 {mean['macro_f1']:.4f} ± {std['macro_f1']:.4f} over "
        f"{len(trials)} trial(s); wrote {out / 'results.json'}"
    )


def focal_loss(logits, target, gamma=4.0):
    """Multi-class focal loss, FL = -(1 - p_t)^gamma log p_t, p_t the softmax probability of the true class
    (Lin et al. 2017, Eq. 4); gamma = 0 is cross-entropy. Mean over the batch."""
    log_pt = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def scores(truth, predictions, n_classes):
    """The paper's metrics (§4.4: balanced accuracy, macro F1) and what explains them, from scikit-learn."""
    labels = list(range(n_classes))
    return {
        "balanced_accuracy": float(balanced_accuracy_score(truth, predictions)),
        "macro_f1": float(f1_score(truth, predictions, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(np.mean(truth == predictions)),
        "per_class_recall": recall_score(
            truth, predictions, labels=labels, average=None, zero_division=0
        ).tolist(),
        "confusion": confusion_matrix(truth, predictions, labels=labels).tolist(),
    }
