"""The interventions of a related study, applied to a backbone before a (second) pretraining:

- Ciga, Xu & Martel (2021, arXiv 2109.01721): "weight scaling" and "filter selection", reconstructions (the
  paper defines neither and no code is public): shrink, select_filters.

`intervene` applies them in one call, in the order pretrain.py uses. pretrain.py imports this file only for
--select-filters or --shrink. The other related study's changes live where they act: Hassanpour et al.'s
whitening (an IterNorm, which a saved backbone can hold) with the network, bit_convert.whiten; their local
loss with the methods, ssl_methods.local_infonce.
"""

import math

import torch
import torch.nn as nn

from bit_common import UserError
from bit_convert import forward_in_batches


def shrink(model, factor):
    """Ciga, Xu & Martel (2021)'s "weight scaling", as reconstructed (arXiv 2109.01721 does not
    define it): the "shrink" of Ash & Adams's "shrink and perturb" (NeurIPS 2020), theta <- factor * theta,
    on every parameter of the backbone: conv kernels and norm gamma/beta alike; no noise is added (the
    "perturb"). Buffers (BatchNorm statistics) are left as they are. Returns the model.

    What it does to BiT. (1) The kernels: a weight-standardised conv divides its kernel's scale out, so
    scaling them leaves the forward pass unchanged, while the gradient of a scale-invariant function scales as
    1/factor and the relative step of SGD on it as 1/factor^2: the pretrained filters become easier to move,
    the first effect Ash & Adams describe, here exact and without touching the function. (2) The norms: each
    norm's output becomes factor times what it was (gamma and beta both scaled, and ReLU commutes with a
    positive factor), so every residual branch (through norm3 and conv3) and every projection shortcut
    (through norm1) is multiplied by factor: the network moves toward identity shortcuts, i.e. toward the
    zero-init-last start (Goyal et al. 2017), which is the "shrink toward a fresh start" of Ash & Adams.
    norm2's factor is removed again by norm3, and the final norm's only scales the features (cosines and kNN
    do not see it). With --no-ws the kernels of conv3 and of the projections scale the branches too. BatchNorm
    running statistics no longer match the scaled inputs: estimate them again
    (bit_convert.estimate_bn_statistics) before anything runs in eval mode.
    """
    if not 0 < factor <= 1:
        raise UserError(f"--shrink {factor}: expected a factor in (0, 1] (1 leaves the weights as they are)")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(factor)
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
        forward_in_batches(model, images, device, batch_size)
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


def intervene(backbone, device, select_fraction, images, shrink_factor, seed):
    """The related studies' changes to a pretrained backbone before its second pretraining, in this order:
    Ciga et al.'s filter selection (scored on `images`, the target domain's; re-drawn filters from `seed`) and
    weight scaling (Hassanpour et al.'s whitening, which a saved backbone can hold, is bit_convert.whiten).
    Each checks its own value."""
    if select_fraction:
        generator = torch.Generator().manual_seed(seed)
        kept = select_filters(backbone, images, select_fraction, device, generator)
        print(f"--select-filters: kept {sum(map(len, kept.values()))} of the filters of {len(kept)} convs")
    if shrink_factor:
        shrink(backbone, shrink_factor)
    return backbone
