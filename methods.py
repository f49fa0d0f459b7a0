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

import torch.nn as nn
import torch.nn.functional as F


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
