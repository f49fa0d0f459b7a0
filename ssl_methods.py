"""The add-on methods of pretrain.py (--method simclr | byol | mocov2 | swav), each one class: its heads, its
loss, its per-step extras; LARS (SwAV's optimiser); Hassanpour et al.'s local loss; and their views.
pretrain.py imports this file only when --method names one of them: a SimSiam run never reads it.

Every method has the interface of bit_common.Method, so that pretrain.py's loop knows none of them by name.
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
from torchvision.transforms import v2

from bit_common import Method, UserError
from bit_convert import all_sum, float32, gather, rank, world
from datasets import RandomGaussianBlur, simsiam_view


def mlp(width, hidden, out, batch_norm=True):
    """The heads of SimCLR, BYOL, MoCo v2 and SwAV: Linear, (BN), ReLU, Linear."""
    norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
    return nn.Sequential(nn.Linear(width, hidden), *norm, nn.ReLU(inplace=True), nn.Linear(hidden, out))


class SimCLR(Method):
    """Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML 2020): a
    projector g (2048-2048-128, §B.9) and NT-Xent over the 2N views of the batch (Alg. 1), its negatives
    gathered from every process, as a global batch would hold them. The projector is SimCLR v1's two layers
    (google-research/simclr at tag 1.0, model_util.projection_head with num_nlh_layers 1): every layer
    Linear-BN, ReLU inside, the output BN scaled but not centred (no bias, no ReLU). tf2/model.py's
    ProjectionHead is SimCLR v2's, three such layers by default (num_proj_layers 3)."""

    view_names = ("simclr", "simclr")  # Chen et al. App. A (simclr_view)
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


class BYOL(Method):
    """Grill et al., "Bootstrap Your Own Latent" (NeurIPS 2020): an online network (backbone, projector
    2048-4096-256, predictor 256-4096-256) predicts the projection of the other view by a target network, the
    exponential moving average of the online backbone and projector (§3.1, Eq. 1-2, App. J.2); the target
    receives no gradient and its momentum rises from tau_0 to 1 along a cosine (§3.2)."""

    view_names = ("byol1", "byol2")  # asymmetric blur and solarisation (Table 6)
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
    view_names = ("simsiam", "simsiam")
    sync_batch_norm = False  # shuffling BN needs each process's own statistics (He et al. §3.3)
    # lr 0.06 at batch 128 (0.12 per 256), weight decay 5e-4, temperature 0.1, a queue of 4096 keys and a
    # constant momentum 0.99: lightly's CIFAR-10 benchmark (MocoModel: one GPU, batch 128), the one recipe
    # made for a setting like ours; FAIR's (main_moco.py at 132aea9 with MoCo v2's flags: lr 0.03 per 256,
    # weight decay 1e-4, temperature 0.2, 65536 keys, momentum 0.999) is ImageNet's, whose queue alone holds
    # 11 times HAM10000's pretrain part. local_weight: off unless asked (Hassanpour et al.'s is 0.5);
    # local_grid 3: our choice, see pretrain.METHOD_FLAGS
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
            self.view_names = ("located", "located")  # each view with its crop box and flip

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
        self.view_names = ("swav", "swav") + ("swav_small",) * (6 if multi_crop else 0)
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


METHODS = {"simclr": SimCLR, "byol": BYOL, "mocov2": MoCoV2, "swav": SwAV}  # by their --method names


def check_settings(args):
    """The values of --method's own flags (pretrain.METHOD_FLAGS) that their types let through: each in its
    range, or one line saying what was expected."""
    limits = {
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


def matched_regions(box1, flip1, box2, flip2, grid):
    """The same image regions in two views: the overlap of the two crops (boxes (N, 4) as x0, y0, x1, y1 in
    the source image's normalised coordinates, LocatedCrop), cut into grid x grid regions, row by
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


def simclr_view(size):
    """One SimCLR augmentation (Chen et al. 2020, App. A; google-research/simclr data_util.py): a crop of
    scale (0.08, 1), a flip, colour distortion of strength s (color_jitter: jitter 0.8 s, 0.8 s, 0.8 s, 0.2 s
    with p = 0.8, grey p = 0.2), blur with p = 0.5. ImageNet's recipe has s = 1; at <= 32 px CIFAR-10's
    (App. B.9; the repository's README trains CIFAR-10 with --color_jitter_strength=0.5 --use_blur=False):
    s = 0.5 and no blur."""
    cifar = size <= 32
    strength = 0.5 if cifar else 1.0
    blur = [] if cifar else [v2.RandomApply([RandomGaussianBlur()], p=0.5)]
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(*(0.8 * strength,) * 3, 0.2 * strength)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
        ]
    )


def byol_view(size, blur, solarise):
    """One of BYOL's two asymmetric augmentations (Grill et al. 2020, Table 6): view 1 blurred always and
    never solarised, view 2 blurred with p = 0.1 and solarised with p = 0.2; no blur at <= 32 px, as the CIFAR
    recipes of lightly's benchmark (BYOLView1Transform and BYOLView2Transform with gaussian_blur=0.0) and of
    solo-learn (scripts/pretrain/cifar/augmentations/asymmetric.yaml)."""
    blurred = [v2.RandomApply([RandomGaussianBlur()], p=blur)] if size > 32 else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blurred,
            v2.RandomSolarize(128, p=solarise),
        ]
    )


def swav_view(size, small=False):
    """One SwAV crop (Caron et al. 2020, §3.2; main_swav.py and src/multicropdataset.py): a large crop of
    scale (0.14, 1) at the full size, or a small one of scale (0.05, 0.14) at 96/224 of it (multi-crop);
    colour distortion of strength 1, blur with p = 0.5. No blur at <= 32 px: our choice, as the other
    methods' CIFAR recipes (solo-learn's cifar/swav.yaml keeps it; lightly's CIFAR-10 SwaVTransform drops it
    and halves the colour strength)."""
    blur = [v2.RandomApply([RandomGaussianBlur()], p=0.5)] if size > 32 else []
    crop_size, scale = (max(1, round(size * 96 / 224)), (0.05, 0.14)) if small else (size, (0.14, 1.0))
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, scale=scale),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
        ]
    )


class LocatedCrop:
    """A random resized crop and a horizontal flip that say where the view came from, for losses that match
    regions between views (matched_regions). The crop is torchvision's RandomResizedCrop (its own
    parameter sampling, so the same distribution); `then` (e.g. the colour steps) runs on the result. Returns
    (image, box, flipped): box the crop as (x0, y0, x1, y1) in the source image's normalised coordinates, a
    float32 tensor, and flipped whether the view was mirrored. Flipping before the colour steps rather than
    after, as simsiam_view does, draws the same views: colour, grey and blur do not see left from right."""

    def __init__(self, size, scale=(0.2, 1.0), then=None):  # MoCo v2's and SimSiam's scale (main_simsiam.py)
        self.crop, self.size, self.then = v2.RandomResizedCrop(size, scale=scale), size, then

    def __call__(self, image):
        width, height = image.size
        p = self.crop.make_params([image])
        top, left, h, w = p["top"], p["left"], p["height"], p["width"]
        view = v2.functional.resized_crop(image, top, left, h, w, [self.size] * 2)
        box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
        flipped = bool(torch.rand(1) < 0.5)
        if flipped:
            view = v2.functional.horizontal_flip(view)
        return (self.then(view) if self.then else view), box, flipped


def located_view(size):
    """A MoCo v2 view (Chen et al. 2020, "Improved Baselines"; SimSiam's too: simsiam main_simsiam.py)
    that records its crop and flip: LocatedCrop, then simsiam_view's own colour, grey and blur steps (the
    steps between its crop and its flip), so that the two recipes cannot drift apart."""
    return LocatedCrop(size, then=v2.Compose(simsiam_view(size).transforms[1:-1]))


VIEWS = {  # the augmentations that a method's `views` name
    "simsiam": simsiam_view,
    "simclr": simclr_view,
    "byol1": functools.partial(byol_view, blur=1.0, solarise=0.0),
    "byol2": functools.partial(byol_view, blur=0.1, solarise=0.2),
    "swav": swav_view,
    "swav_small": functools.partial(swav_view, small=True),
    "located": located_view,
}
