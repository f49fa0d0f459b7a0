"""The self-supervised methods that pretrain.py trains, each one class: its heads, its loss, its per-step
extras.

Every method is an nn.Module built around a backbone, with the same small interface, so that pretrain.py's
loop knows none of them by name:

    views                 the augmentation of each view, by name (views.VIEWS)
    defaults              its flags (add_method_args) and their defaults for our setting: one GPU, batch 128,
                          a few thousand images; "lr" is the base lr per 256 images, "weight_decay" the
                          optimiser's
    optimizer             "sgd" or "lars" (LARS, below), both with --momentum
    sync_batch_norm       whether pretrain.py makes its BatchNorms SyncBatchNorm on GPUs under torchrun (False
                          for MoCo v2, whose shuffling BN needs each process's own statistics)
    forward(views)        -> (loss, z): z the output whose spread is the collapse signal (normalised_std)
    out_dim               the width of z
    param_groups()        the optimiser's groups; a group with fixed_lr keeps the peak lr (SimSiam)
    start_epoch(epoch)    before the epoch's first step (default: nothing)
    before_step(epoch)    after backward, before the optimiser steps (default: nothing)
    after_step(progress)  after the optimiser steps, progress = fraction of all steps done (default: nothing)

Momentum encoders, queues and prototypes are parameters or buffers of the method, hence in its state dict and
in every checkpoint; a momentum encoder never requires grad, so that neither the optimiser nor DDP sees it.
Under torchrun, queues hold the embeddings of every process (the same on all of them, so process 0's
checkpoint holds the whole queue), SimCLR's negatives come from every process, Sinkhorn sums over all, and
MoCo's key encoder shuffles the global batch over the processes (encode_shuffled).
"""

import copy
import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from common import UserError, finite_float


class Method(nn.Module):
    """The defaults of the interface above."""

    optimizer = "sgd"  # SGD with --momentum; "lars" for a method whose recipe is LARS's (SwAV)
    sync_batch_norm = True  # BN statistics over the global batch on GPUs, as main_simsiam.py's SyncBN

    def param_groups(self):
        return [{"params": [p for p in self.parameters() if p.requires_grad], "fixed_lr": False}]

    def start_epoch(self, epoch):
        pass

    def before_step(self, epoch):
        pass

    def after_step(self, progress):
        pass


def float32(loss):
    """Run a loss in float32 with autocast off: softmaxes over thousands of logits divided by 0.1 or 0.2, and
    Sinkhorn's exp(s / 0.05), lose too much in bf16."""

    @functools.wraps(loss)
    def in_float32(*tensors, **options):
        device = next(t for t in tensors if torch.is_tensor(t)).device.type
        with torch.autocast(device, enabled=False):
            return loss(
                *(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors),
                **options,
            )

    return in_float32


def mlp(width, hidden, out, batch_norm=True):
    """The heads of SimCLR, BYOL, MoCo v2 and SwAV: Linear, (BN), ReLU, Linear."""
    norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
    return nn.Sequential(nn.Linear(width, hidden), *norm, nn.ReLU(inplace=True), nn.Linear(hidden, out))


# ---------------------------------------------------------------------------------------------------- SimSiam


class SimSiam(Method):
    """Chen & He, "Exploring Simple Siamese Representation Learning" (CVPR 2021): backbone f, projector and
    predictor h (Fig. 1, §4.4); L = D(p1, z2)/2 + D(p2, z1)/2 with D(p, z) = -cos(p, stopgrad(z)) (Eq.
    1-3)."""

    views = ("simsiam", "simsiam")
    # lr and weight decay: Lu et al. §4.1; the projector and the widths: the authors' code (BiT-SimSiam
    # models/simsiam.py, proj_layers 2 in its HAM configs), whose predictor is Chen & He's (§4.4)
    defaults = {"lr": 0.03, "weight_decay": 5e-4, "projector": "paper"}

    def __init__(self, backbone, projector="paper", dim=2048, pred_dim=512):
        super().__init__()
        self.backbone, width = backbone, backbone.num_features
        if projector == "paper":  # what the paper's authors ran (BiT-SimSiam): two layers
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


# ----------------------------------------------------------------------------------------------------- SimCLR


class SimCLR(Method):
    """Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML 2020): a
    projector g (2048-2048-128, §B.9) and NT-Xent over the 2N views of the batch (Alg. 1), its negatives
    gathered from every process, as a global batch would hold them. The projector is SimCLR v1's two layers
    (google-research/simclr at tag 1.0, model_util.projection_head with num_nlh_layers 1): every layer
    Linear-BN, ReLU inside, the output BN scaled but not centred (no bias, no ReLU). tf2/model.py's
    ProjectionHead is SimCLR v2's, three such layers by default (num_proj_layers 3)."""

    views = ("simclr", "simclr")  # Chen et al. App. A (views.simclr_view)
    # SGD lr 0.06 at batch 128 (0.12 per 256) and weight decay 5e-4: lightly's CIFAR-10 benchmark
    # (SimCLRModel); temperature 0.5: the default of its NTXentLoss, and google-research/simclr's CIFAR-10
    # command (README: --temperature=0.5; Chen et al. App. B.9)
    defaults = {"lr": 0.12, "weight_decay": 5e-4, "temperature": 0.5}

    def __init__(self, backbone, temperature=0.5, dim=128, hidden=2048):
        super().__init__()
        output_norm = nn.BatchNorm1d(dim)
        output_norm.bias.requires_grad_(False)  # TensorFlow's center=False: beta stays 0, never trained
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(backbone.num_features, hidden, bias=False),  # no bias before a BN
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False),
            output_norm,
        )
        self.temperature, self.out_dim = temperature, dim

    def forward(self, views):
        z1, z2 = (self.projector(self.backbone(x)) for x in views)
        return nt_xent_loss(z1, z2, self.temperature), z1


@float32
def nt_xent_loss(z1, z2, temperature):
    """SimCLR Eq. 1, averaged over all 2N views: -log of the softmax, over every other view (its own
    excluded), of the cosine to its positive / temperature. Under DDP the candidates are the views of all
    processes; the gradient flows back to each process's own (gather)."""
    n = len(z1)
    local = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = local @ gather(local, keep_grad=True).T / temperature
    rows, offset = torch.arange(2 * n, device=local.device), 2 * n * rank()
    logits = logits.masked_fill(F.one_hot(rows + offset, logits.shape[1]).bool(), float("-inf"))
    return F.cross_entropy(logits, offset + (rows + n) % (2 * n))


# ------------------------------------------------------------------------------------------------------- BYOL


class BYOL(Method):
    """Grill et al., "Bootstrap Your Own Latent" (NeurIPS 2020): an online network (backbone, projector
    2048-4096-256, predictor 256-4096-256) predicts the projection of the other view by a target network, the
    exponential moving average of the online backbone and projector (§3.1, Eq. 1-2, App. J.2); the target
    receives no gradient and its momentum rises from tau_0 to 1 along a cosine (§3.2)."""

    views = ("byol1", "byol2")  # asymmetric blur and solarisation (Table 6)
    # SGD lr 0.06 at batch 128 (0.12 per 256) and weight decay 5e-4: lightly's CIFAR-10 benchmark (BYOLModel),
    # whose loss scale byol_loss takes; tau_0 0.99: deepmind's preset for 100 and 300 epochs
    # (byol/configs/byol.py, _EMA_PRESETS; lightly's benchmark keeps 0.99 constant)
    defaults = {"lr": 0.12, "weight_decay": 5e-4, "target_momentum": 0.99}

    def __init__(self, backbone, target_momentum=0.99, dim=256, hidden=4096):
        super().__init__()
        self.backbone, self.projector = backbone, mlp(backbone.num_features, hidden, dim)
        self.predictor = mlp(dim, hidden, dim)
        self.target = copy.deepcopy(nn.ModuleList([self.backbone, self.projector])).requires_grad_(False)
        self.target_momentum, self.out_dim = target_momentum, dim

    def forward(self, views):
        z1, z2 = (self.projector(self.backbone(x)) for x in views)
        with torch.no_grad():
            target_backbone, target_projector = self.target
            t1, t2 = (target_projector(target_backbone(x)) for x in views)
        return byol_loss(self.predictor(z1), self.predictor(z2), t1, t2), z1

    def after_step(self, progress):
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        momentum_update(online, self.target.parameters(), cosine_momentum(self.target_momentum, progress))


@float32
def byol_loss(p1, p2, t1, t2):
    """BYOL Eq. 2, ||p/|p| - t/|t|||^2 = 2 - 2 cos(p, t) with the target t without gradient, averaged over the
    two directions and halved: 1 - cos, d loss / d cos = -1/2 per direction, the gradient of lightly's
    benchmark loss 0.5 (-cos - cos), whose lr and weight decay are our defaults (the paper's sum of both
    directions has 4 times that gradient: 4 times the step). 0 when every prediction points along its target,
    2 at most."""
    return (
        (1 - F.cosine_similarity(p1, t2.detach())).mean() + (1 - F.cosine_similarity(p2, t1.detach())).mean()
    ) / 2


# ---------------------------------------------------------------------------------------------------- MoCo v2


class MoCoV2(Method):
    """Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning" (2020), on MoCo (He
    et al., CVPR 2020, Alg. 1): a query q of view 1 by the encoder (backbone, MLP 2048-2048-128 without BN),
    its key k of view 2 by the momentum encoder, InfoNCE against a queue of earlier keys (Eq. 1-2), then the
    keys of every process are enqueued. Under torchrun the key encoder runs MoCo's shuffling BN (§3.3,
    encode_shuffled), each process with its own BatchNorm statistics (sync_batch_norm False: no SyncBatchNorm,
    as main_moco.py has none); in one process the queries and the keys share the batch's statistics.
    local_weight > 0 adds Hassanpour et al.'s local loss (L = L_global + w L_local, their w = 0.5): the views
    then record their crops, and the query's and the key's last feature maps are compared region by region
    (matched_regions, local_infonce below); the keys' map is the momentum encoder's, without gradient."""

    # MoCo v2's augmentation (main_moco.py --aug-plus), which SimSiam took over
    views = ("simsiam", "simsiam")
    sync_batch_norm = False  # shuffling BN needs each process's own statistics (He et al. §3.3)
    # lr 0.06 at batch 128 (0.12 per 256), weight decay 5e-4, temperature 0.1, a queue of 4096 keys and a
    # constant momentum 0.99: lightly's CIFAR-10 benchmark (MocoModel: one GPU, batch 128), the one recipe
    # made for a setting like ours; FAIR's (main_moco.py at 132aea9 with MoCo v2's flags: lr 0.03 per 256,
    # weight decay 1e-4, temperature 0.2, 65536 keys, momentum 0.999) is ImageNet's, whose queue alone holds
    # 11 times HAM10000's pretrain part. local_weight: off unless asked (Hassanpour et al.'s is 0.5);
    # local_grid 3: our choice, see FLAG_HELP
    defaults = {
        "lr": 0.12,
        "weight_decay": 5e-4,
        "temperature": 0.1,
        "target_momentum": 0.99,
        "queue_size": 4096,
        "local_weight": 0.0,
        "local_grid": 3,
    }

    def __init__(
        self,
        backbone,
        temperature=0.1,
        target_momentum=0.99,
        queue_size=4096,
        local_weight=0.0,
        local_grid=3,
        dim=128,
        hidden=2048,
    ):
        super().__init__()
        self.backbone, self.projector = backbone, mlp(backbone.num_features, hidden, dim, batch_norm=False)
        self.target = copy.deepcopy(nn.ModuleList([self.backbone, self.projector])).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        # the generator of shuffling BN's permutations, seeded from the global one (pretrain.py seeds that
        # with --seed); its state is a buffer, so that a resumed run draws the permutations it would have
        seed = int(torch.randint(2**62, ()))
        self.register_buffer("shuffle_state", torch.Generator().manual_seed(seed).get_state())
        self.temperature, self.target_momentum, self.out_dim = temperature, target_momentum, dim
        self.local_weight, self.local_grid = local_weight, local_grid
        if local_weight:
            self.views = ("located", "located")  # each view with its crop box and flip

    def forward(self, views):
        if self.local_weight:
            return self.forward_with_regions(views)
        x1, x2 = views
        q = self.projector(self.backbone(x1))
        (k,) = self.keys(x2)
        return self.global_loss(q, k), q

    def global_loss(self, q, k):
        loss = info_nce_loss(q, k, self.queue.clone(), self.temperature)  # a copy: the queue changes below
        enqueue(self.queue, gather(k))
        return loss

    def forward_with_regions(self, views):
        (x1, where1), (x2, where2) = views  # where: (x0, y0, x1, y1, flipped) of each view's crop
        query_map = self.backbone.feature_map(x1)
        q = self.projector(query_map.mean((2, 3)))
        k, key_map = self.keys(x2, with_map=True)
        regions = matched_regions(where1[:, :4], where1[:, 4], where2[:, :4], where2[:, 4], self.local_grid)
        local = local_infonce(query_map, key_map, *regions)
        return self.global_loss(q, k) + self.local_weight * local, q

    @torch.no_grad()
    def keys(self, x2, with_map=False):
        """(k,) or, with_map, (k, its last feature map): the momentum encoder's L2-normalised keys of view 2.
        Under torchrun through shuffling BN, so that each key's BatchNorm statistics come from another subset
        of the global batch than its query's (He et al. §3.3)."""
        key_backbone, key_projector = self.target

        def encode(x):
            key_map = key_backbone.feature_map(x) if with_map else None
            features = key_backbone(x) if key_map is None else key_map.mean((2, 3))
            k = F.normalize(key_projector(features).float(), dim=1)
            return (k,) if key_map is None else (k, key_map)

        if world() == 1:
            return encode(x2)
        return encode_shuffled(encode, x2, self.key_permutation(len(x2) * world(), x2.device))

    def key_permutation(self, n, device):
        """A random order of the global batch's n key images, drawn from the method's own generator and
        broadcast from process 0, as moco's builder.py broadcasts its randperm."""
        generator = torch.Generator()
        generator.set_state(self.shuffle_state.cpu())
        order = torch.randperm(n, generator=generator).to(device)
        self.shuffle_state.copy_(generator.get_state())
        dist.broadcast(order, src=0)
        return order

    def after_step(self, progress):
        """The key encoder follows the encoder with a constant momentum (MoCo Eq. 2)."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        momentum_update(online, self.target.parameters(), self.target_momentum)


@torch.no_grad()
def encode_shuffled(encode, x, order):
    """MoCo's shuffling BN (He et al. §3.3; moco/builder.py at 132aea9, _batch_shuffle_ddp and
    _batch_unshuffle_ddp): the images x of every process are gathered in rank order, this process encodes its
    share of them in the random order `order` (the same on every process) with its own BatchNorm statistics,
    and the outputs of all shares are gathered and put back in the original order, each process keeping those
    of its own images. encode: images -> a tuple of tensors with a row per image."""
    share = order.view(world(), -1)[rank()]
    back = order.argsort().view(world(), -1)[rank()]
    return tuple(gather(out)[back] for out in encode(gather(x)[share]))


@float32
def info_nce_loss(q, k, queue, temperature):
    """MoCo Eq. 1: -log exp(q.k+/T) / (exp(q.k+/T) + sum over the queue of exp(q.k-/T)), q and k
    L2-normalised, the queue's keys too; k+ without gradient."""
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


# ------------------------------------------------------------------------------------------------------- SwAV


class SwAV(Method):
    """Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (NeurIPS
    2020): a projector (2048-2048-128, BN) onto the unit sphere, K prototypes (unit vectors), codes of the two
    large crops by Sinkhorn-Knopp (§3.1, Eq. 3), each crop predicting the codes of the others (Eq. 1-2), with
    --multi-crop 6 small crops more (§3.2). The prototypes stay frozen for the first --freeze-prototypes
    epochs; a queue of the large crops' earlier embeddings is filled from the first step and joins Sinkhorn
    from epoch --queue-start on (as solo-learn's solo/methods/swav.py), once it is full (as main_swav.py: an
    empty row would be a zero embedding in Sinkhorn)."""

    # every number from one recipe, solo-learn's for CIFAR (scripts/pretrain/cifar/swav.yaml: batch 256 on
    # one GPU): LARS, lr 0.6 per 256, weight decay 1e-6, temperature 0.1, 3000 prototypes frozen for 2 epochs,
    # a queue of 3840 per large crop used from epoch_queue_starts 50, which counts epochs from 0: our epoch 51
    optimizer = "lars"
    defaults = {
        "lr": 0.6,
        "weight_decay": 1e-6,
        "temperature": 0.1,
        "prototypes": 3000,
        "freeze_prototypes": 2,
        "queue_size": 3840,
        "queue_start": 51,
        "multi_crop": False,
    }

    def __init__(
        self,
        backbone,
        temperature=0.1,
        prototypes=3000,
        freeze_prototypes=2,
        queue_size=3840,
        queue_start=51,
        multi_crop=False,
    ):
        super().__init__()
        dim = self.out_dim = 128
        self.backbone, self.projector = backbone, mlp(backbone.num_features, 2048, dim)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(prototypes, dim), dim=1))  # on the sphere
        self.register_buffer("queue", torch.zeros(2, queue_size, dim))  # full once its last row is written
        self.views = ("swav", "swav") + ("swav_small",) * (6 if multi_crop else 0)
        self.temperature, self.freeze_prototypes = temperature, freeze_prototypes
        self.queue_start, self.queue_in_use = queue_start, False

    def forward(self, views):
        # as main_swav.py: the backbone once per resolution, the head once over all crops (its BN sees all)
        large, small = views[:2], views[2:]
        features = torch.cat([self.backbone(torch.cat(crops)) for crops in (large, small) if crops])
        z = torch.stack(F.normalize(self.projector(features).float(), dim=1).chunk(len(views)))
        in_use = self.queue_in_use and self.queue[:, -1].any()
        queued = self.queue[:, rank() :: world()] if in_use else None  # a share each: every embedding once
        loss = swav_loss(z, self.prototypes, self.temperature, queued)
        if self.queue.shape[1]:
            for queue, embeddings in zip(self.queue, z[:2]):
                enqueue(queue, gather(embeddings.detach()))
        return loss, z[0]

    def start_epoch(self, epoch):
        self.queue_in_use = epoch >= self.queue_start

    def before_step(self, epoch):
        if epoch <= self.freeze_prototypes:  # SGD skips a parameter without a gradient, its weight decay too
            self.prototypes.grad = None

    @torch.no_grad()
    def after_step(self, progress):
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))  # back on the sphere


@float32
def swav_loss(z, prototypes, temperature, queue=None, epsilon=0.05, iterations=3):
    """SwAV Eq. 1-2: for each of the two large crops i, its codes q_i (Sinkhorn over the batch and the
    queue, no gradient) are predicted by every other crop v: -sum_k q_ik log softmax(z_v . c_k / T), averaged
    over the batch, the other crops and i. z: (crops, B, D) unit vectors; prototypes c: (K, D); queue: (2, Q,
    D) or None."""
    scores = z @ prototypes.T
    loss = 0
    for i in range(2):
        with torch.no_grad():
            known = scores[i] if queue is None else torch.cat([queue[i] @ prototypes.T, scores[i]])
            codes = sinkhorn(known, epsilon, iterations)[-z.shape[1] :]
        others = [v for v in range(len(z)) if v != i]
        loss = loss - (codes * F.log_softmax(scores[others] / temperature, dim=2)).sum(2).mean()
    return loss / 2


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3):
    """SwAV §3.1 (Eq. 3-5) and App. A.1: the codes, Q = exp(scores / epsilon) transposed (K prototypes x B
    samples), scaled in turn so that its rows sum to B/K (every prototype used equally) and its columns to 1
    (each sample's code a distribution), B and the row sums over all processes. Returns (B, K). The scores
    are cosines, |s| <= 1, so exp(s / 0.05) stays far from overflow."""
    q = torch.exp(scores.float() / epsilon).T
    k, b = q.shape[0], all_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_sum(q.sum())
    for _ in range(iterations):
        q /= all_sum(q.sum(1, keepdim=True)) * k
        q /= q.sum(0, keepdim=True) * b
    return (q * b).T


# ------------------------------------------------------------------------------------------- shared pieces


@torch.no_grad()
def momentum_update(online, target, momentum):
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (MoCo Eq. 2, BYOL
    §3.1)."""
    for o, t in zip(online, target, strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)


def cosine_momentum(base, progress):
    """BYOL §3.2: tau = 1 - (1 - tau_0)(cos(pi k / K) + 1) / 2 after k of K steps: tau_0 at the start, 1 at
    the end (progress = k / K)."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def enqueue(queue, keys):
    """The newest keys first, the oldest dropped (MoCo §3.1)."""
    queue.copy_(torch.cat([keys.to(queue.dtype), queue])[: len(queue)])


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(x):
    """x summed over the processes (x itself in one process)."""
    if world() > 1:
        dist.all_reduce(x)
    return x


def gather(x, keep_grad=False):
    """x of every process, concatenated in rank order (x itself in one process); with keep_grad the gradient
    reaching each piece goes back to the process that made it."""
    if world() == 1:
        return x
    if keep_grad:
        return Gather.apply(x)
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class Gather(torch.autograd.Function):
    """all_gather with a backward: each process's loss sends gradient to every process's piece; the sum over
    the processes arrives at each piece's owner (DDP then averages: the gradient of the mean loss)."""

    @staticmethod
    def forward(ctx, x):
        return gather(x)

    @staticmethod
    def backward(ctx, grad):
        return all_sum(grad.contiguous()).chunk(world())[rank()]


# --------------------------------------------------------------------------------------------------- choosing


METHODS = {"simsiam": SimSiam, "simclr": SimCLR, "byol": BYOL, "mocov2": MoCoV2, "swav": SwAV}
FLAG_HELP = {
    "projector": "paper: the authors' 2-layer projector; simsiam: SimSiam's 3 layers",
    "temperature": "of the softmax (NT-Xent, InfoNCE, SwAV's prediction)",
    "target_momentum": "of the momentum encoder: byol's tau_0, rising by a cosine to 1 (Grill et al. §3.2); "
    "mocov2's, constant (He et al. Eq. 2)",
    "queue_size": "keys or embeddings in the queue (swav: 0 for none)",
    "queue_start": "the epoch, counted from 1, from which SwAV's Sinkhorn uses its queue (once full)",
    "prototypes": "SwAV's number of prototypes K",
    "freeze_prototypes": "SwAV's prototypes stay frozen for this many epochs from the start",
    "multi_crop": "6 small crops (96/224 of --image-size, scale 0.05-0.14) besides the 2 large ones",
    "local_weight": "Hassanpour et al.'s local loss: its weight w in L_global + w L_local (theirs: 0.5)",
    # our choice: on a 224-px view's 7 x 7 map a 3 x 3 grid of the crops' overlap gives regions of about 2 x 2
    # cells (the median over random pairs of MoCo v2's crops; at least 1 x 1 for 99 % of them), each pooling
    # cells of its own; Hassanpour et al.'s code (med_selfsup mmselfsup/models/algorithms/moco.py) cuts
    # num_regions = 20 squares, a fraction of a cell each at that size
    "local_grid": "the local loss cuts the overlap of the two crops into GRID x GRID regions",
}


def defaults_of(key):
    """'simsiam 0.03, simclr 0.12, ...': the per-method defaults of one flag, for --help."""
    return ", ".join(f"{name} {cls.defaults[key]}" for name, cls in METHODS.items() if key in cls.defaults)


def add_method_args(group):
    """--method and the flags of the methods, each for those methods only."""
    group.add_argument(
        "--method", choices=METHODS, default="simsiam", help="the self-supervised method (default simsiam)"
    )
    for key, text in FLAG_HELP.items():
        flag, kind = (
            "--" + key.replace("_", "-"),
            type(next(m.defaults[key] for m in METHODS.values() if key in m.defaults)),
        )
        options = (
            {"action": "store_true", "default": None}
            if kind is bool
            else {"type": finite_float if kind is float else kind}
        )
        group.add_argument(flag, **options, help=f"{text} (default: {defaults_of(key)})")


def resolve_method_args(args):
    """Each flag the method has takes its default where not given; one given to a method without it is an
    error, and so is a value out of range."""
    defaults = METHODS[args.method].defaults
    for key in {"lr", "weight_decay", *FLAG_HELP}:
        value, flag = getattr(args, key), "--" + key.replace("_", "-")
        if key in defaults:
            setattr(args, key, defaults[key] if value is None else value)
        elif value is not None:
            raise UserError(
                f"{flag}{'' if value is True else f' {value}'}: --method {args.method} has no such setting "
                f"(it is one of {', '.join(name for name, cls in METHODS.items() if key in cls.defaults)})"
            )
    # whether a value fits, and what was expected; --projector here, not by argparse's choices, which
    # runs.restored_args would apply to the None that a resumed non-SimSiam run holds
    limits = {
        "projector": (lambda v: v in ("paper", "simsiam"), "expected paper or simsiam"),
        "temperature": (lambda v: v > 0, "must be positive"),
        "target_momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "queue_size": (lambda v: v >= (args.method == "mocov2"), f"too small for {args.method}"),
        "queue_start": (lambda v: v >= 1, "must be at least 1"),
        "prototypes": (lambda v: v >= 2, "must be at least 2"),
        "freeze_prototypes": (lambda v: v >= 0, "must not be negative"),
        "local_weight": (lambda v: v >= 0, "must not be negative"),
        "local_grid": (lambda v: v >= 1, "must be at least 1"),
    }
    for key, (fits, expected) in limits.items():
        value = getattr(args, key)
        if value is not None and not fits(value):
            raise UserError(f"--{key.replace('_', '-')} {value}: {expected}")


def settings(args):
    """The keyword arguments of --method's class, from its flags (lr and weight decay are the optimiser's)."""
    optimiser = ("lr", "weight_decay")
    return {key: getattr(args, key) for key in METHODS[args.method].defaults if key not in optimiser}


class LARS(torch.optim.SGD):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017) as solo-learn's LARS (solo/utils/lars.py,
    with its cifar/swav.yaml settings eta 0.02, clip_lr, exclude_bias_n_norm): the gradient of each weight of
    more than one dimension, with its weight decay added, is scaled by min(eta |w| / (|g| + wd |w|) / lr, 1);
    biases and norm parameters (one dimension) take plain SGD steps without weight decay."""

    def __init__(self, params, lr, momentum, weight_decay, eta=0.02):
        super().__init__(params, lr=lr, momentum=momentum)
        self.decay, self.eta = weight_decay, eta

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.ndim == 1:
                    continue
                weight, grad = p.norm(), p.grad.norm()
                ratio = self.eta * weight / (grad + self.decay * weight + 1e-8) / group["lr"]
                scaled = (p.grad + self.decay * p) * ratio.clamp(max=1.0)
                p.grad.copy_(torch.where((weight > 0) & (grad > 0), scaled, p.grad))  # else as it is
        return super().step(closure)


# ------------------------------------------------------------- Hassanpour et al. 2024: local feature learning


def matched_regions(box1, flip1, box2, flip2, grid):
    """The same image regions in two views: the overlap of the two crops (boxes (N, 4) as x0, y0, x1, y1 in
    the source image's normalised coordinates, views.LocatedCrop), cut into grid x grid regions, row by
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


@float32
def local_infonce(map1, map2, regions1, regions2, overlaps, temperature=0.2):
    """Hassanpour et al.'s local loss, as intended (2402.14611): each region (matched_regions) is average-
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
