"""The backbone a script asks for: the flags every script shares (--arch, --norm, --cifar-stem, --no-ws),
resolved against what a checkpoint records, and the network that --init names (scratch, BiT-S, BiT-M, a BiT
.npz or a backbone .pt)."""

import argparse

from bit_convert import ARCHS, bit_file, load_backbone, load_npz, resnet_v2, zero_init_last
from common import WeightsError
from interventions import whiten, whiten_placement


def build_backbone(init="scratch", arch="r50x1", norm="bn", cifar_stem=False, ws=True, zero_init=False):
    """The backbone that `--init scratch | bit-s | bit-m | FILE.npz | FILE.pt` names, for every script; BiT-S
    and BiT-M are fetched into $BIT_CACHE when they are not there (bit_file)."""
    model = resnet_v2(arch, norm, cifar_stem, ws=ws)
    if init.endswith(".pt"):
        loaded, meta = load_backbone(init)
        found = (meta["arch"], meta["norm"], meta["cifar_stem"], meta["ws"])
        asked = (arch, norm, cifar_stem, ws)
        if found != asked:
            raise WeightsError(
                f"{init} holds (arch, norm, cifar_stem, ws) = {found}, but {asked} was asked for"
            )
        if meta.get("whiten"):  # the file's own network: a whitened one loads with its IterNorm
            whiten(model, at=whiten_placement(meta["whiten"]))
        model.load_state_dict({k: v for k, v in loaded.state_dict().items() if not k.startswith("head.")})
    elif init in ("bit-s", "bit-m"):
        load_npz(model, bit_file(f"BiT-{init[-1].upper()}-R{arch[1:]}"))
    elif init.endswith(".npz"):
        load_npz(model, init)
    elif init != "scratch":
        raise WeightsError(
            f"--init {init!r}: expected scratch, bit-s, bit-m, a BiT .npz or a .pt backbone file"
        )
    return zero_init_last(model) if zero_init else model


def add_backbone_args(parser, norm_default):
    """--arch, --norm, --cifar-stem, --no-ws: the same flags, with the same meaning, in every script. A
    checkpoint records its own; see resolve_backbone_args. Each is None where not given, so that a flag can be
    told from the checkpoint's value."""
    group = parser.add_argument_group("backbone")
    group.add_argument("--arch", choices=ARCHS, help="BiT size (default r50x1, or the checkpoint's)")
    group.add_argument(
        "--norm",
        choices=("bn", "gn"),
        help=f"default {norm_default} (or the checkpoint's). bn: the paper's fix; gn: BiT as released, "
        "which collapses inside SimSiam (paper Fig. 1)",
    )
    group.add_argument(
        "--cifar-stem",
        action=argparse.BooleanOptionalAction,
        help="3x3 stride-1 root conv, no max-pool (paper §4.2); default: on for images <= 64 px",
    )
    group.add_argument(
        "--no-ws",
        dest="ws",
        action="store_const",
        const=False,
        help="plain convs instead of weight-standardised (default: standardised, or the checkpoint's)",
    )


def resolve_backbone_args(args, norm_default, default_size, recorded=None, source=None):
    """Fill in --arch, --norm, --cifar-stem, --no-ws and --image-size: what the flag says, else what the
    checkpoint `source` records (`recorded`: its metadata), else the script's default."""
    recorded = recorded or {}
    check_flags_against(recorded, source, args.arch, args.norm, args.cifar_stem, args.ws, args.image_size)
    if args.image_size is None:
        args.image_size = recorded.get("image_size", default_size)
    args.arch = args.arch or recorded.get("arch", "r50x1")
    args.norm = args.norm or recorded.get("norm", norm_default)
    if args.cifar_stem is None:
        args.cifar_stem = recorded.get("cifar_stem", args.image_size <= 64)
    if args.ws is None:  # BiT standardises every conv (google-research/big_transfer, bit_pytorch/models.py)
        args.ws = recorded.get("ws", True)


def check_flags_against(recorded, source, arch=None, norm=None, cifar_stem=None, ws=None, image_size=None):
    """The backbone flags given (None: not given) against what the checkpoint `source` records: one that
    contradicts it is an error for the network's shape; for the image size, a warning (evaluating at another
    resolution can be deliberate)."""
    for flag, given in (("arch", arch), ("norm", norm), ("cifar_stem", cifar_stem), ("ws", ws)):
        if flag in recorded and given is not None and given != recorded[flag]:
            spelt = {"cifar_stem": f"--{'' if given else 'no-'}cifar-stem", "ws": "--no-ws"}
            raise WeightsError(
                f"{spelt.get(flag, f'--{flag} {given}')}: {source} holds a backbone with "
                f"{flag} = {recorded[flag]}; leave the flag out to use it"
            )
    if image_size is not None and recorded.get("image_size", image_size) != image_size:
        print(
            f"warning: --image-size {image_size}, but {source} was pretrained at {recorded['image_size']} px"
        )
