"""The self-supervised methods that pretrain.py trains, each one class: its heads, its loss, its per-step
extras.

Every method is an nn.Module built around a backbone, with the same small interface, so that pretrain.py's
loop knows none of them by name:

    views                 the augmentation of each view, by name (datasets.VIEWS)
    forward(views)        -> (loss, z): z the output whose spread is the collapse signal (normalised_std)
    out_dim               the width of z
    param_groups()        the optimiser's groups; a group with fixed_lr keeps the peak lr (SimSiam)
    before_step(epoch)    after backward, before the optimiser steps (default: nothing)
    after_step(progress)  after the optimiser steps, progress = fraction of all steps done (default: nothing)

Buffers (queues, momentum encoders) are part of the state dict, hence of every checkpoint.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from common import UserError


class Method(nn.Module):
    """The defaults of the interface above."""

    def param_groups(self):
        return [{"params": [p for p in self.parameters() if p.requires_grad], "fixed_lr": False}]

    def before_step(self, epoch):
        pass

    def after_step(self, progress):
        pass


class SimSiam(Method):
    """Chen & He, "Exploring Simple Siamese Representation Learning" (CVPR 2021): backbone f, projector and
    predictor h (Fig. 1, §4.4); L = D(p1, z2)/2 + D(p2, z1)/2 with D(p, z) = -cos(p, stopgrad(z)) (Eq.
    1-3)."""

    views = ("simsiam", "simsiam")

    def __init__(self, backbone, projector="paper", dim=2048, pred_dim=512):
        super().__init__()
        self.backbone, width = backbone, backbone.num_features
        if projector == "paper":  # what the paper's authors ran (REFERENCE §1): two layers
            self.projector = nn.Sequential(
                nn.Linear(width, dim, bias=False),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),  # no bias before a BN
                nn.Linear(dim, dim, bias=False),
                nn.BatchNorm1d(dim),
            )
        else:  # SimSiam's builder.py: three layers, the output BN without affine
            self.projector = nn.Sequential(
                nn.Linear(width, dim, bias=False),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),
                nn.Linear(dim, dim, bias=False),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),
                nn.Linear(dim, dim, bias=False),
                nn.BatchNorm1d(dim, affine=False),
            )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )
        self.out_dim = dim

    def forward(self, views):
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return simsiam_loss(p1, p2, z1, z2), z1

    def param_groups(self):
        """The predictor keeps a constant lr (Chen & He §4.4: it works better than a decaying one)."""
        predictor = {id(p) for p in self.predictor.parameters()}
        return [
            {"params": [p for p in self.parameters() if id(p) not in predictor], "fixed_lr": False},
            {"params": list(self.predictor.parameters()), "fixed_lr": True},
        ]


def simsiam_loss(p1, p2, z1, z2):
    """Chen & He Eq. 3: the symmetric negative cosine, the stop-gradient on z where D puts it. Minimum -1."""
    return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2


METHODS = {"simsiam": SimSiam}


# -------------------------------------------------- Hassanpour et al. 2024: feature decorrelation, local loss


class IterNorm(nn.Module):
    """Iterative Normalization (Huang et al., CVPR 2019, Algorithm 1): ZCA whitening of a (N, C, H, W) input
    over all N*H*W positions, one group of all C channels (as Hassanpour et al.'s code, REFERENCE §7), then a
    learnable per-channel affine. Sigma = cov + eps I is divided by its trace, so that Newton's iterations
    P_(k+1) = 1.5 P_k - 0.5 P_k^3 Sigma_N from P_0 = I converge (every eigenvalue of Sigma_N is in (0, 1]);
    Sigma^(-1/2) ~ P_T / sqrt(tr Sigma). With T = 5 the whitening is partial along the smallest eigenvalues, a
    trade-off Huang et al. chose: only matrix products, whose gradient stays stable where an
    eigendecomposition's does not, and no exact whitening of a small batch. Keep T small: this (uncoupled)
    Newton iteration amplifies rounding errors; in float32, on a 6 x 6 covariance of condition number 6, its
    error fell to 1e-5 after 10 iterations, rose to 0.08 after 20 and was NaN after 40; at condition number
    430 it blew up within 10 (measured). Eval mode uses running averages of the mean and of the whitening
    matrix (momentum 0.1; None: a cumulative average, as BatchNorm's, for estimating them over a dataset).
    Computed in float32 under autocast; over the local batch under DDP (nothing is gathered)."""

    def __init__(self, num_features, iterations=5, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.iterations, self.eps, self.momentum = num_features, iterations, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_whitening", torch.eye(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.running_whitening.copy_(torch.eye(self.num_features))
        self.num_batches_tracked.zero_()

    def forward(self, x):
        n, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            columns = x.float().transpose(0, 1).reshape(c, -1)  # (C, N*H*W): one column per position
            if self.training:
                mean = columns.mean(1, keepdim=True)
                centred = columns - mean
                eye = torch.eye(c, device=x.device)
                sigma = centred @ centred.T / centred.shape[1] + self.eps * eye
                whitening = inverse_sqrt_newton(sigma, self.iterations)
                self.update_running_stats(mean, whitening)
            else:
                centred = columns - self.running_mean[:, None]
                whitening = self.running_whitening
            out = (whitening @ centred).reshape(c, n, h, w).transpose(0, 1)
        return (out * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)

    @torch.no_grad()
    def update_running_stats(self, mean, whitening):
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean[:, 0], momentum)
        self.running_whitening.lerp_(whitening, momentum)


def inverse_sqrt_newton(sigma, iterations):
    """Sigma^(-1/2) by Newton's iterations on the trace-normalised Sigma (Huang et al. 2019, Algorithm 1)."""
    trace = sigma.diagonal().sum()
    sigma_n, p = sigma / trace, torch.eye(len(sigma), device=sigma.device, dtype=sigma.dtype)
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
    return p / trace.sqrt()


def whiten(backbone, iterations=5):
    """Hassanpour et al.'s feature decorrelation: the backbone's final norm, before the ReLU and the pooling,
    becomes an IterNorm of its width. In their post-activation ResNet it is the last norm of the last
    bottleneck; in BiT's pre-activation one nothing is normalised after the last addition, and the final norm
    takes that place. A GroupNorm backbone is refused: --norm gn means BiT as released, whose features depend
    on each image alone, in train and eval mode alike; a whitening layer brings batch statistics and running
    averages into it, which is the BatchNorm network's way (--norm bn: the kind Hassanpour et al. whiten)."""
    if backbone.norm_kind == "gn":
        raise UserError("--whiten: needs a BatchNorm backbone (--norm bn); --norm gn is BiT as released")
    backbone.norm = IterNorm(backbone.num_features, iterations).to(backbone.norm.weight.device)
    return backbone


def matched_regions(box1, flip1, box2, flip2, grid):
    """The same image regions in two views: the overlap of the two crops (boxes (N, 4) as x0, y0, x1, y1 in
    the source image's normalised coordinates, datasets.LocatedCrop), cut into grid x grid regions, row by
    row. Returns (regions1, regions2, overlaps): each view's regions (N, grid*grid, 4) in that view's
    normalised coordinates, x mirrored where the view was flipped (a feature map of size (h, w) covering the
    view has them at (x * w, y * h)); overlaps (N,) False where the crops do not overlap."""
    lo, hi = torch.maximum(box1[:, :2], box2[:, :2]), torch.minimum(box1[:, 2:], box2[:, 2:])
    overlaps = (hi > lo).all(1)
    steps = torch.linspace(0, 1, grid + 1, dtype=box1.dtype, device=box1.device)
    edges = lo[:, None, :] + steps[None, :, None] * (hi - lo)[:, None, :]  # (N, grid + 1, 2): x and y edges
    x0, x1 = edges[:, :-1, 0], edges[:, 1:, 0]  # (N, grid)
    y0, y1 = edges[:, :-1, 1], edges[:, 1:, 1]
    source = torch.stack(  # (N, grid, grid, 4): row i (y), column j (x)
        torch.broadcast_tensors(x0[:, None, :], y0[:, :, None], x1[:, None, :], y1[:, :, None]), dim=-1
    ).flatten(1, 2)
    return in_view(source, box1, flip1), in_view(source, box2, flip2), overlaps


def in_view(regions, box, flip):
    """Regions (N, R, 4) in source coordinates -> in the normalised coordinates of the view cut at `box`."""
    origin, size = box[:, None, :2].repeat(1, 1, 2), (box[:, None, 2:] - box[:, None, :2]).repeat(1, 1, 2)
    view = (regions - origin) / size
    mirrored = torch.stack([1 - view[..., 2], view[..., 1], 1 - view[..., 0], view[..., 3]], dim=-1)
    return torch.where(flip[:, None, None].bool(), mirrored, view)


def local_infonce(map1, map2, regions1, regions2, overlaps, temperature=0.2):
    """Hassanpour et al.'s local loss, as intended (REFERENCE §7): each region (matched_regions) is average-
    pooled from each view's feature map (torchvision's roi_align, one output cell, aligned=True: a box edge
    at x * w falls on the map's cell edges), L2-normalised, with no projection (as their code); InfoNCE with
    the same region in the other view as the positive and the image's other regions as the negatives,
    temperature 0.2; symmetric, the mean over regions and over images whose crops overlap (0 if none do).
    The gradient flows into both maps: detach one for a momentum encoder's keys."""
    if not overlaps.any():
        return (map1.sum() + map2.sum()) * 0.0
    f1 = pool_regions(map1[overlaps], regions1[overlaps])
    f2 = pool_regions(map2[overlaps], regions2[overlaps])
    logits = torch.einsum("nrc,nsc->nrs", f1, f2) / temperature  # (n, R, R): region r of view 1, s of view 2
    target = torch.arange(f1.shape[1], device=f1.device).repeat(len(f1))
    loss12 = F.cross_entropy(logits.flatten(0, 1), target)
    loss21 = F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target)
    return (loss12 + loss21) / 2


def pool_regions(feature_map, regions):
    """(n, R, C) L2-normalised means of the feature map (n, C, h, w) over regions (n, R, 4) in normalised
    coordinates."""
    n, r = regions.shape[:2]
    h, w = feature_map.shape[2:]
    boxes = regions.float() * regions.new_tensor([w, h, w, h], dtype=torch.float32)
    pooled = roi_align(feature_map.float(), list(boxes), output_size=1, aligned=True)  # (n * R, C, 1, 1)
    return F.normalize(pooled.flatten(1), dim=1).view(n, r, -1)
