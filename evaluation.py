"""Measuring a backbone: embedding with it frozen, BatchNorm statistics for a network that never trained,
the weighted kNN monitor (the paper's Fig. 2), the embedding spectrum and RankMe (dimensional collapse),
focal loss, the classifiers' cosine schedule and the paper's scores (§4.4), the backbone files and
initialisations that are evaluated, and the feature cache that lets linear_eval.py and tsne.py embed each
part once."""

import hashlib
import json
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score

from backbones import build_backbone
from bit_convert import load_backbone, sha256
from common import (
    DataError,
    WeightsError,
    autocast,
    require_regular_file,
    save_atomic,
    to_input,
    write_atomic,
)
from splits import indices, split_digest
from views import eval_images


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
    reads them. Norms of one process only: a SyncBatchNorm would all-gather, a synchronised IterNorm
    all-reduce, collectives that one process must not start alone."""
    norms = [m for m in backbone.modules() if hasattr(m, "reset_running_stats")]  # BatchNorm, IterNorm
    if any(isinstance(m, nn.SyncBatchNorm) or getattr(m, "process_group", None) is not None for m in norms):
        raise ValueError(
            "estimate_bn_statistics before the model is distributed (convert_sync_batchnorm, "
            "synchronise_whitening), not after"
        )
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


def focal_loss(logits, target, gamma=4.0):
    """Multi-class focal loss, FL = -(1 - p_t)^gamma log p_t, p_t the softmax probability of the true class
    (Lin et al. 2017, Eq. 4); gamma = 0 is cross-entropy. Mean over the batch."""
    log_pt = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def cosine_lr(peak, done, total):
    """The lr of a step after `done` of `total` steps: a cosine from `peak` to 0 without warm-up (Loshchilov &
    Hutter 2017), the schedule of the linear probe and of fine-tuning."""
    return peak * 0.5 * (1 + math.cos(math.pi * done / total))


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


def untrained_statistics(backbone, meta):
    """Whether a backbone's BatchNorm statistics are not its own: a BatchNorm backbone that never trained
    (scratch, BiT, a converted BiT file) has none yet. Pretrained ones record their epoch (`meta`: what the
    backbone file records) and keep the statistics they trained with."""
    return "epoch" not in meta and backbone.norm_kind == "bn"


def estimate_statistics_if_untrained(backbone, meta, data, split, image_size, device):
    """A backbone whose BatchNorm statistics are not its own (untrained_statistics) gets them from the train
    part's images."""
    if untrained_statistics(backbone, meta):
        estimate_bn_statistics(backbone, eval_images(data, indices(data, split, "train"), image_size), device)


def part_features(backbone, identity, data, split, part, image_size, cache_dir, workers, device):
    """(features, labels) of one part with the evaluation view, from the cache when the same backbone
    (`identity`), split and image size were embedded before; a changed checkpoint has other bytes, hence
    another key."""
    key = hashlib.sha256(f"{identity} {split_digest(split)} {image_size}".encode()).hexdigest()[:24]
    path = cache_dir / "features" / f"{key}-{part}.pt"
    index = indices(data, split, part)
    labels = torch.as_tensor(data.labels[index])
    features = cached_features(path, labels)
    if features is not None:
        return check_features(features, part), labels
    images = eval_images(data, index, image_size, workers)
    features = check_features(embed(backbone, images, device).cpu(), part)
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


def saved_backbone(ckpt):
    """(backbone, metadata, a name for figures, what identifies it for the feature cache) of a backbone file
    that pretrain.py or bit_convert.py wrote."""
    backbone, meta = load_backbone(ckpt)
    name = f"{ckpt.parent.name}/{ckpt.stem}" + (f", epoch {meta['epoch']}" if "epoch" in meta else "")
    return backbone, meta, name, sha256(ckpt)


def initial_backbone(init, arch, norm, cifar_stem, ws, seed):
    """The same for the network that --init names (scratch, bit-s, bit-m, FILE.npz), as built before any
    pretraining; `seed` draws the scratch network."""
    torch.manual_seed(seed)  # the scratch floor is one random network
    backbone = build_backbone(init, arch, norm, cifar_stem, ws)
    name = {"bit-s": "BiT-S", "bit-m": "BiT-M"}.get(init, init) + (
        f" {norm}, untrained" if init == "scratch" else f" {norm}, as released"
    )
    identity = hashlib.sha256(repr((init, arch, norm, cifar_stem, ws, seed)).encode())
    return backbone, {"init": init}, name, identity.hexdigest()


class KnnMonitor:
    """The paper's Fig. 2: weighted kNN accuracy on `val`, the labelled `train` part as the bank, and RankMe
    of the bank's features (a scalar read of dimensional collapse). Process 0 only; `test` is never read."""

    def __init__(self, data, split, image_size, k, temperature, device):
        bank, queries = indices(data, split, "train"), indices(data, split, "val")
        self.bank_images = eval_images(data, bank, image_size)
        self.query_images = eval_images(data, queries, image_size)
        self.bank_labels = torch.as_tensor(data.labels[bank], device=device)
        self.truth, self.n_classes = data.labels[queries], len(data.classes)
        self.k, self.temperature, self.device = k, temperature, device

    def __call__(self, backbone):
        bank = embed(backbone, self.bank_images, self.device)
        queries = embed(backbone, self.query_images, self.device)
        predicted = knn_predict(queries, bank, self.bank_labels, self.n_classes, self.k, self.temperature)
        predicted = predicted.cpu().numpy()
        return {
            "knn_acc": float(np.mean(predicted == self.truth)),
            "knn_bacc": float(balanced_accuracy_score(self.truth, predicted)),
            "rankme": rankme(bank),
        }

    def initial(self, backbone, meta):
        """The network as initialised, the floor that training must rise above. One whose BatchNorm statistics
        are not its own (untrained_statistics; `meta`: what its backbone file records) gets them estimated on
        the bank first, before the model is distributed: fresh ones are meaningless in eval mode. A pretrained
        one is measured with the statistics it trained with."""
        if untrained_statistics(backbone, meta):
            estimate_bn_statistics(backbone, self.bank_images, self.device)
        return self(backbone)
