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


# ------------------------------------------------------------- Hassanpour et al. 2024: local feature learning


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
