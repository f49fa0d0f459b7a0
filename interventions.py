"""The interventions of two related studies, applied to a backbone before a (second) pretraining:

- Ciga, Xu & Martel (2021, arXiv 2109.01721): "weight scaling" and "filter selection", reconstructions (the
  paper defines neither and no code is public): shrink, select_filters;
- Hassanpour et al. (2024, arXiv 2402.14611; code Jamshidhsp/med_selfsup): feature decorrelation by an
  IterNorm layer (Huang et al., CVPR 2019), whiten.

`intervene` applies them in one call, in the order pretrain.py uses. (Their local loss is in methods.py.)
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from common import UserError, autocast, to_input

WHITEN_AT = ("branch", "final")  # where whiten puts the IterNorm


class IterNorm(nn.Module):
    """Iterative Normalization (Huang et al., CVPR 2019, Algorithm 1): ZCA whitening of a (N, C, H, W) input
    over all N*H*W positions, one group of all C channels (Hassanpour et al.'s code, Jamshidhsp/med_selfsup:
    IterNorm(2048) with its defaults num_groups=1, T=5, eps 1e-5, momentum 0.1), then a
    learnable per-channel affine. Sigma = cov + eps I is divided by its trace, so that Newton's iterations
    P_(k+1) = 1.5 P_k - 0.5 P_k^3 Sigma_N from P_0 = I converge (every eigenvalue of Sigma_N is in (0, 1]);
    Sigma^(-1/2) ~ P_T / sqrt(tr Sigma). With T = 5 the whitening is partial along the smallest eigenvalues, a
    trade-off Huang et al. chose: only matrix products, whose gradient stays stable where an
    eigendecomposition's does not, and no exact whitening of a small batch. Keep T small: this (uncoupled)
    Newton iteration amplifies rounding errors; in float32, on a 6 x 6 covariance of condition number 6, its
    error fell to 1e-5 after 10 iterations, rose to 0.08 after 20 and was NaN after 40; at condition number
    430 it blew up within 10 (measured). Eval mode uses running averages of the mean and of the whitening
    matrix (momentum 0.1; None: a cumulative average, as BatchNorm's, for estimating them over a dataset).
    Computed in float32 under autocast. Under DDP the mean and the covariance are those of the global batch,
    as SyncBatchNorm's statistics are (see batch_moments): 4 GPUs x 32 images x 49 positions of a 7 x 7 map
    give each process 1,568 samples for 2,048 channels, a covariance of deficient rank, and results would
    change with the number of GPUs. As SyncBatchNorm, it all-reduces only once it is distributed
    (synchronise_whitening gives it a process group, as convert_sync_batchnorm makes a SyncBatchNorm): before
    that, when process 0 alone estimates the statistics of the epoch-0 row, it whitens its own batch."""

    def __init__(self, num_features, iterations=5, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.iterations, self.eps, self.momentum = num_features, iterations, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_whitening", torch.eye(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))
        self.process_group = None  # the processes whose batches it whitens together (synchronise_whitening)

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.running_whitening.copy_(torch.eye(self.num_features))
        self.num_batches_tracked.zero_()

    def forward(self, x):
        n, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            columns = x.float().transpose(0, 1).reshape(c, -1)  # (C, N*H*W): one column per position
            if self.training:
                mean, centred, covariance = batch_moments(columns, self.process_group)
                sigma = covariance + self.eps * torch.eye(c, device=x.device)
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


def synchronise_whitening(module, process_group=None):
    """IterNorm's convert_sync_batchnorm: from now on every IterNorm in `module` whitens the batch of all the
    processes of `process_group` (default: all of them). pretrain.distribute calls it as it makes the model
    DDP, so that the IterNorm's collectives run only in the distributed model's forward, which every process
    runs; code that process 0 runs alone (the epoch-0 row) meets an IterNorm that issues none, and
    evaluation.estimate_bn_statistics refuses a synchronised one as it refuses a SyncBatchNorm. Returns the
    module."""
    for norm in module.modules():
        if isinstance(norm, IterNorm):
            norm.process_group = dist.group.WORLD if process_group is None else process_group
    return module


class AllReduce(torch.autograd.Function):
    """The sum of a tensor over the processes of `group`; its gradient is the sum of the processes'
    gradients, since every process's loss depends on the sum."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return AllReduce.apply(grad, ctx.group), None


def batch_moments(columns, process_group=None):
    """(mean, centred columns, biased covariance) of the columns (C, M), over the columns of every process of
    `process_group` where one is given (None: this process's alone): the sums and the count, then the centred
    scatter matrix, are all-reduced (two passes: no cancellation of E[xx^T] - mm^T). The all_reduce's backward
    all-reduces the gradient (AllReduce), so each process's positions receive the gradient of every process's
    loss, as SyncBatchNorm's backward does."""
    sums = torch.cat([columns.sum(1), columns.new_tensor([columns.shape[1]])])
    if process_group is not None:
        sums = AllReduce.apply(sums, process_group)
    mean = (sums[:-1] / sums[-1])[:, None]
    centred = columns - mean
    scatter = centred @ centred.T
    if process_group is not None:
        scatter = AllReduce.apply(scatter, process_group)
    return mean, centred, scatter / sums[-1]


def inverse_sqrt_newton(sigma, iterations):
    """Sigma^(-1/2) by Newton's iterations on the trace-normalised Sigma (Huang et al. 2019, Algorithm 1)."""
    trace = sigma.diagonal().sum()
    sigma_n, p = sigma / trace, torch.eye(len(sigma), device=sigma.device, dtype=sigma.dtype)
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
    return p / trace.sqrt()


def whiten(backbone, iterations=5, at="branch"):
    """Hassanpour et al.'s feature decorrelation, an IterNorm in the backbone. Their code (Jamshidhsp/
    med_selfsup, mmselfsup/models/backbones/resnet.py: `self.layer4[-1].bn3 = IterNorm(2048)`) replaces the
    last BatchNorm of the last bottleneck's residual branch of a post-activation ResNet-50: that unit outputs
    relu(IterNorm(branch) + identity). BiT's units are pre-activation: the branch ends with conv3, whose
    output is added to the shortcut un-normalised, and the norm in front of conv3 (norm3) normalises the
    512-channel middle of the branch, not its 2048-channel output. at="branch" (the default, the source's
    placement mapped onto BiT) puts the IterNorm at the end of the last unit's branch, on conv3's output:
    the unit outputs IterNorm(branch) + shortcut, the same tensor of the same width whitened as in the source,
    and the final norm (BatchNorm) and ReLU follow as in every BiT. at="final" (this project's earlier
    placement, kept to load the files it wrote) replaces the final norm, so that the pooled features
    themselves are whitened. A GroupNorm backbone is refused: --norm gn means BiT as released, whose features
    depend on each image alone, in train and eval mode alike; a whitening layer brings batch statistics and
    running averages into it, which is the BatchNorm network's way (--norm bn: the kind Hassanpour et al.
    whiten)."""
    if backbone.norm_kind == "gn":
        raise UserError("--whiten: needs a BatchNorm backbone (--norm bn); --norm gn is BiT as released")
    device = backbone.norm.weight.device
    if at == "branch":
        last = backbone.blocks[-1][-1]
        last.branch_norm = IterNorm(last.conv3.out_channels, iterations).to(device)
    elif at == "final":
        backbone.norm = IterNorm(backbone.num_features, iterations).to(device)
    else:
        raise UserError(f"--whiten {at}: expected one of {', '.join(WHITEN_AT)}")
    backbone.whitened = at  # recorded by save_backbone, so that load_backbone builds the same network
    return backbone


def whiten_placement(recorded):
    """Where a backbone file's or a run's `whiten` puts the IterNorm: files and runs written before the
    placement could be chosen record True, and whitened the final norm."""
    return "final" if recorded is True else recorded


def shrink(model, factor, noise_std=0.0, generator=None):
    """Ciga, Xu & Martel (2021)'s "weight scaling", as reconstructed (arXiv 2109.01721 does not
    define it): Ash & Adams's "shrink and perturb" (NeurIPS 2020), theta <- factor * theta + noise,
    noise ~ N(0, noise_std^2), on every parameter of the backbone: conv kernels and norm gamma/beta alike.
    Buffers (BatchNorm statistics) are left as they are. Returns the model.

    What it does to BiT. (1) The kernels: a weight-standardised conv divides its kernel's scale out, so
    scaling them leaves the forward pass unchanged, while the gradient of a scale-invariant function scales as
    1/factor and the relative step of SGD on it as 1/factor^2: the pretrained filters become easier to move,
    the first effect Ash & Adams describe, here exact and without touching the function. (2) The norms: each
    norm's output becomes factor times what it was (gamma and beta both scaled, and ReLU commutes with a
    positive factor), so every residual branch (through norm3 and conv3) and every projection shortcut
    (through norm1) is multiplied by factor: the network moves toward identity shortcuts, i.e. toward the
    zero-init-last start (Goyal et al. 2017), which is the "shrink toward a fresh start" of Ash & Adams.
    norm2's factor is removed again by norm3, and the final norm's only scales the features (cosines and kNN
    do not see it). With --no-ws the kernels of conv3 and of the projections scale the branches too. Noise on
    a standardised kernel acts relative to each filter's own spread, which differs between layers: keep
    noise_std small. BatchNorm running statistics no longer match the scaled inputs: estimate them again
    (evaluation.estimate_bn_statistics) before anything runs in eval mode.
    """
    if not 0 < factor <= 1:
        raise UserError(f"--shrink {factor}: expected a factor in (0, 1] (1 leaves the weights as they are)")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(factor)
            if noise_std:
                param.add_(noise_std * torch.randn(param.shape, generator=generator).to(param))
    return model


def bottleneck_convs(model):
    """{name: (conv, the norm that normalises its output alone)}: conv1 -> norm2 and conv2 -> norm3 of every
    unit. conv3, the projections and the stem write into the residual stream, where a channel is the sum of
    many convs' outputs: no single filter owns it, so they are not selected."""
    return {
        f"blocks.{b}.{u}.{name}": (getattr(unit, name), norm)
        for b, block in enumerate(model.blocks)
        for u, unit in enumerate(block)
        for name, norm in (("conv1", unit.norm2), ("conv2", unit.norm3))
    }


@torch.no_grad()
def filter_scores(model, images, device, batch_size=256):
    """{conv name: mean |output| of each filter} over uint8 `images` (N, 3, H, W), with the batch statistics
    of these images (train mode), the BatchNorm running statistics kept as they were. Measured before the
    norm: after a BatchNorm in train mode every channel has mean 0 and variance 1 over the batch, so its mean
    |activation| is the same for every filter and selects nothing; a standardised kernel has unit spread, so
    the output's magnitude is the filter's response to these images."""
    convs, sums, counts = bottleneck_convs(model), {}, {}

    def hook(name):
        def accumulate(conv, inputs, out):
            sums[name] = sums.get(name, 0) + out.float().abs().sum((0, 2, 3))
            counts[name] = counts.get(name, 0) + out.numel() // out.shape[1]

        return accumulate

    handles = [conv.register_forward_hook(hook(name)) for name, (conv, _) in convs.items()]
    statistics, was_training = {k: v.clone() for k, v in model.named_buffers()}, model.training
    model.train()
    try:
        with autocast(device):
            for i in range(0, len(images), batch_size):
                model(to_input(images[i : i + batch_size], device))
    finally:
        for handle in handles:
            handle.remove()
        model.load_state_dict(statistics, strict=False)
        model.train(was_training)
    return {name: sums[name] / counts[name] for name in convs}


def select_filters(model, images, fraction, device, generator=None):
    """Ciga, Xu & Martel (2021)'s "filter selection", as reconstructed (arXiv 2109.01721 does not
    define it): score every filter of conv1 and conv2 in each unit on target-domain images (filter_scores),
    keep the top `fraction` of each conv (rounded, at least one filter), and re-initialise the rest as a fresh
    resnet_v2 would: the dropped filters' kernel rows drawn as PyTorch draws a Conv2d's kernel
    (kaiming_uniform_, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))), their norm's gamma 1 and beta 0 and,
    for BatchNorm, running mean 0 and variance 1. The next conv's weights that read a dropped channel are
    kept. Returns {conv name: the kept filters' indices}, for the log."""
    if not 0 < fraction <= 1:
        raise UserError(f"--select-filters {fraction}: expected a fraction in (0, 1] of the filters to keep")
    scores, kept = filter_scores(model, images, device), {}
    with torch.no_grad():
        for name, (conv, norm) in bottleneck_convs(model).items():
            n_keep = max(1, round(fraction * conv.out_channels))
            order = scores[name].argsort(descending=True).cpu()
            kept[name], dropped = order[:n_keep].sort().values, order[n_keep:]
            fresh = torch.empty(conv.weight.shape)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            conv.weight[dropped] = fresh[dropped].to(conv.weight)
            norm.weight[dropped], norm.bias[dropped] = 1.0, 0.0
            if getattr(norm, "running_mean", None) is not None:
                norm.running_mean[dropped], norm.running_var[dropped] = 0.0, 1.0
    return kept


def intervene(
    backbone, device, select_fraction=None, images=None, shrink_factor=None, whiten_at=None, seed=0
):
    """The related studies' changes to a pretrained backbone before its second pretraining, in this order:
    Ciga et al.'s filter selection (scored on `images`, the target domain's; re-drawn filters from `seed`) and
    weight scaling, then Hassanpour et al.'s whitening at `whiten_at` (branch or final; a backbone whitened
    already, by an --init file, stays as it is). Each checks its own value."""
    if select_fraction:
        generator = torch.Generator().manual_seed(seed)
        kept = select_filters(backbone, images, select_fraction, device, generator)
        print(f"--select-filters: kept {sum(map(len, kept.values()))} of the filters of {len(kept)} convs")
    if shrink_factor:
        shrink(backbone, shrink_factor)
    if whiten_at and not getattr(backbone, "whitened", False):
        whiten(backbone, at=whiten_at)
    return backbone
