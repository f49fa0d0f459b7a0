"""BiT ResNet-V2 and the loading of BiT's released .npz weights into it, with GroupNorm or BatchNorm.

BiT (Kolesnikov et al., "Big Transfer", ECCV 2020) is a pre-activation ResNet (He et al. 2016) whose
convolutions are weight-standardised (Qiao et al. 2019) and whose norms are GroupNorm(32). Lu, Jha & Huo
(2021, §2.3) found that this network collapses inside SimSiam, and fixed it by replacing every GroupNorm with
a BatchNorm while keeping BiT's kernels. `norm="gn"` builds BiT exactly as released; `norm="bn"` builds the
paper's fix.

    python bit_convert.py --download BiT-M-R50x1              # into $BIT_CACHE (~/.cache/bit-simsiam/weights)
    python bit_convert.py BiT-M-R50x1.npz --norm bn -o bit-m-r50x1-bn.pt

    model = resnet_v2("r50x1", norm="bn")
    load_npz(model, "BiT-M-R50x1.npz")
    features = model(images)                  # (N, 2048), images scaled to [-1, 1] as BiT expects

Also what every user of the network shares: the inputs scaled to [-1, 1] and mixed precision (to_input,
autocast), the collectives of IterNorm and the methods (all_sum, gather), and the resumable download that
fetches BiT's weights here and HAM10000's release in datasets.py (download).
"""

import argparse
import fcntl
import functools
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from bit_common import (
    MAX_IMAGE_SIZE,
    ArgumentParser,
    Stopped,
    UserError,
    WeightsError,
    check_finite,
    disk_full,
    output_dir,
    require_regular_file,
    run,
    save_atomic,
    what_stopped,
)

ARCHS = {  # name: (units in each of the four blocks, width factor)
    "r50x1": ((3, 4, 6, 3), 1),
    "r50x3": ((3, 4, 6, 3), 3),
    "r101x1": ((3, 4, 23, 3), 1),
    "r101x3": ((3, 4, 23, 3), 3),
    "r152x2": ((3, 8, 36, 3), 2),
    "r152x4": ((3, 8, 36, 3), 4),
}

BIT_NAMES = [f"BiT-{s}-R{a[1:]}" for s in "SM" for a in ARCHS]  # BiT-S: ImageNet-1k, BiT-M: ImageNet-21k

# Where the released .npz files are (google-research/big_transfer, README, "How to fine-tune BiT");
# $BIT_MODELS_URL names a mirror instead.
BIT_MODELS_URL = os.environ.get("BIT_MODELS_URL") or "https://storage.googleapis.com/bit_models/"

CACHE_DIR = Path(os.environ.get("BIT_CACHE") or Path.home() / ".cache" / "bit-simsiam" / "weights")


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: each output channel's kernel is scaled to zero mean and unit
    (biased) variance over (in, kh, kw) at every forward pass, eps 1e-10 as in BiT. The file stores the raw
    kernels."""

    def __init__(self, *args, standardize=True, **kwargs):
        super().__init__(*args, bias=False, **kwargs)
        self.standardize = standardize

    def forward(self, x):
        w = self.weight
        if self.standardize:
            var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
            w = (w - mean) / torch.sqrt(var + 1e-10)
        return F.conv2d(x, w, None, self.stride, self.padding)


class PreActBottleneck(nn.Module):
    """One BiT unit: norm-ReLU-conv three times (1x1, 3x3 carrying the stride, 1x1). The projection shortcut
    takes the pre-activated input, and nothing is normalised after the addition (He et al. 2016, "Identity
    Mappings", Fig. 4e)."""

    def __init__(self, cin, cmid, cout, stride, make_norm, conv):
        super().__init__()
        self.norm1, self.conv1 = make_norm(cin), conv(cin, cmid, 1)
        self.norm2, self.conv2 = make_norm(cmid), conv(cmid, cmid, 3, stride=stride, padding=1)
        self.norm3, self.conv3 = make_norm(cmid), conv(cmid, cout, 1)
        self.proj = conv(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else None
        self.branch_norm = None  # BiT has none; whiten(at="branch") puts an IterNorm there in the last unit

    def forward(self, x):
        out = F.relu(self.norm1(x))
        shortcut = self.proj(out) if self.proj is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        out = self.conv3(F.relu(self.norm3(out)))
        if self.branch_norm is not None:
            out = self.branch_norm(out)
        return out + shortcut


class ResNetV2(nn.Module):
    def __init__(self, arch="r50x1", norm="bn", cifar_stem=False, head_size=0, ws=True):
        super().__init__()
        if arch not in ARCHS or norm not in ("bn", "gn"):
            raise ValueError(
                f"arch must be one of {', '.join(ARCHS)} and norm bn or gn, got {arch!r}, {norm!r}"
            )
        self.arch, self.norm_kind, self.cifar_stem, self.head_size, self.ws = (
            arch,
            norm,
            cifar_stem,
            head_size,
            ws,
        )
        units, width = ARCHS[arch]
        make_norm = partial(nn.GroupNorm, 32) if norm == "gn" else nn.BatchNorm2d
        conv = partial(StdConv2d, standardize=ws)
        root = 64 * width
        if cifar_stem:  # paper §4.2: 32-px images keep their resolution, a 3x3 stride-1 conv and no pooling
            self.stem = nn.Sequential(OrderedDict(conv=conv(3, root, 3, padding=1)))
        # BiT pads with zeros before the pool; MaxPool2d(padding=1) would pad with -inf, a different function
        else:
            self.stem = nn.Sequential(
                OrderedDict(
                    conv=conv(3, root, 7, stride=2, padding=3),
                    pad=nn.ConstantPad2d(1, 0.0),
                    pool=nn.MaxPool2d(3, stride=2),
                )
            )
        blocks, cin = [], root
        for b, (n, stride) in enumerate(zip(units, (1, 2, 2, 2))):
            cmid = root * 2**b
            blocks.append(
                nn.Sequential(
                    *[
                        PreActBottleneck(
                            cin if u == 0 else 4 * cmid,
                            cmid,
                            4 * cmid,
                            stride if u == 0 else 1,
                            make_norm,
                            conv,
                        )
                        for u in range(n)
                    ]
                )
            )
            cin = 4 * cmid
        self.blocks = nn.Sequential(*blocks)
        self.norm = make_norm(cin)  # the body ends un-normalised (pre-activation): norm + ReLU before pooling
        self.num_features = cin
        self.head = nn.Conv2d(cin, head_size, 1) if head_size else None
        if self.head is not None:  # BiT's fine-tuning starts its new head at zero
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def feature_map(self, x):
        """The body's output after its final norm and ReLU, before pooling: (N, num_features, H/32, W/32)."""
        return F.relu(self.norm(self.blocks(self.stem(x))))

    def forward(self, x):
        x = self.feature_map(x).mean((2, 3), keepdim=True)
        if self.head is not None:
            x = self.head(x)
        return x.flatten(1)


def resnet_v2(name="r50x1", norm="bn", cifar_stem=False, head_size=0, ws=True):
    """A BiT ResNet-V2. It returns pooled features (N, 2048 * width), or logits when head_size > 0."""
    return ResNetV2(name, norm, cifar_stem, head_size, ws)


def add_zero_init_last(group):
    """--zero-init-last, in the scripts that build a network to train or to write (pretrain.py, this one)."""
    group.add_argument(
        "--zero-init-last",
        action="store_true",
        help="zero the norm before each unit's last conv, as the authors' code did",
    )


def zero_init_last(model):
    """Zero the scale of the norm in front of each unit's last conv, so every residual branch starts switched
    off (Goyal et al. 2017), as the authors' code did (BiT-SimSiam). Done after loading weights, so it always
    holds."""
    for block in model.blocks:
        for unit in block:
            nn.init.zeros_(unit.norm3.weight)
    return model


def bit_keys(model, copy_norm, load_head):
    """{key in a BiT .npz: the model's tensor that it fills} for everything the load takes from the file."""
    keys = {}
    if not model.cifar_stem:  # the CIFAR stem's 3x3 conv has no counterpart in BiT: it starts random
        keys["resnet/root_block/standardized_conv2d/kernel"] = model.stem.conv.weight
    for b, block in enumerate(model.blocks, 1):
        for u, unit in enumerate(block, 1):
            prefix = f"resnet/block{b}/unit{u:02d}/"
            for part, norm_layer, conv in (
                ("a", unit.norm1, unit.conv1),
                ("b", unit.norm2, unit.conv2),
                ("c", unit.norm3, unit.conv3),
            ):
                keys[prefix + part + "/standardized_conv2d/kernel"] = conv.weight
                if copy_norm:
                    keys[prefix + part + "/group_norm/gamma"] = norm_layer.weight
                    keys[prefix + part + "/group_norm/beta"] = norm_layer.bias
            if unit.proj is not None:
                keys[prefix + "a/proj/standardized_conv2d/kernel"] = unit.proj.weight
    if copy_norm:
        keys["resnet/group_norm/gamma"] = model.norm.weight
        keys["resnet/group_norm/beta"] = model.norm.bias
    if load_head:
        keys["resnet/head/conv2d/kernel"] = model.head.weight
        keys["resnet/head/conv2d/bias"] = model.head.bias
    return keys


def read_npz(path):
    """All arrays of a .npz file, or WeightsError for anything that is not a readable, uncorrupted one."""
    require_regular_file(path, WeightsError)
    try:
        npz = np.load(path, allow_pickle=False)
        if isinstance(npz, np.lib.npyio.NpzFile):
            with npz:  # reading each array checks its CRC: corrupt files fail here
                return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    raise WeightsError(f"{path}: a single .npy array, not a BiT .npz archive")


def npz_arch(arrays, path):
    """The BiT architecture an .npz holds, from its root kernel's width and the units in each block."""
    root = arrays.get("resnet/root_block/standardized_conv2d/kernel")
    if root is None or root.ndim != 4:
        raise WeightsError(
            f"{path}: not a BiT .npz (no 4-d key resnet/root_block/standardized_conv2d/kernel)"
        )
    units = tuple(
        len({k.split("/")[2] for k in arrays if k.startswith(f"resnet/block{b}/")}) for b in range(1, 5)
    )
    for name, spec in ARCHS.items():
        if spec == (units, root.shape[3] // 64):
            return name
    raise WeightsError(
        f"{path}: units per block {units} and root width {root.shape[3]} match no BiT architecture"
    )


def load_npz(model, path, copy_norm=None, load_head=False):
    """Load BiT weights from `path` into `model` and return it.

    Conv kernels go from HWIO to OIHW. GroupNorm's gamma/beta are copied by default only into a GroupNorm
    model: a BatchNorm model keeps PyTorch's default init (paper §2.3) unless copy_norm=True. The .npz has no
    BatchNorm statistics, so a BatchNorm model always starts with fresh ones. The head is loaded only if
    load_head=True. Nothing is changed unless every key is present and every shape fits (a WeightsError says
    which does not).
    """
    copy_norm = model.norm_kind == "gn" if copy_norm is None else copy_norm
    if load_head and model.head is None:
        raise WeightsError(f"{path}: load_head asked for a model built without a head (head_size=0)")
    arrays = read_npz(path)
    file_arch = npz_arch(arrays, path)  # fails early and clearly on files that are not BiT at all
    wanted = bit_keys(model, copy_norm, load_head)
    tensors = {}
    for key, param in wanted.items():
        if key not in arrays:
            raise WeightsError(
                f"{path}: missing key {key} (the file holds a {file_arch}, the model is {model.arch})"
            )
        array = arrays[key]
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        if array.shape != tuple(param.shape):
            expected = tuple(param.shape[i] for i in (2, 3, 1, 0)) if param.ndim == 4 else tuple(param.shape)
            found = arrays[key].shape
            raise WeightsError(f"{path}: key {key} has shape {found}, {model.arch} expects {expected}")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    check_finite(tensors, path)
    extra = sorted(
        k for k in arrays if k.startswith("resnet/block") and k not in bit_keys(model, True, False)
    )
    if extra:
        raise WeightsError(
            f"{path}: key {extra[0]} has no place in a {model.arch} (the file holds a {file_arch})"
        )
    with torch.no_grad():
        for key, param in wanted.items():
            param.copy_(tensors[key])
    return model


HEX_DIGEST = set("0123456789abcdef")

# The fields a backbone file records (save_backbone), what each may hold, and what that is in words: checked
# once here, as a file is written and as it is read, for every script that reads one.
BACKBONE_FIELDS = {
    "arch": (lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}"),
    "norm": (lambda v: v in ("bn", "gn"), "bn or gn"),
    "cifar_stem": (lambda v: isinstance(v, bool), "true or false"),
    "ws": (lambda v: isinstance(v, bool), "true or false"),
    "whiten": (lambda v: v in (False, True, "branch", "final"), "branch, final, true or false"),
    # the largest head BiT released: BiT-M's, ImageNet-21k's 21,843 classes (bit_pytorch/models.py, head_size)
    "head_size": (lambda v: type(v) is int and 0 <= v <= 21843, "a whole number from 0 to 21843"),
    "image_size": (
        lambda v: type(v) is int and 1 <= v <= MAX_IMAGE_SIZE,
        f"a whole number from 1 to {MAX_IMAGE_SIZE}",
    ),
    "epoch": (lambda v: type(v) is int and v >= 0, "a whole number >= 0"),
    "init": (lambda v: isinstance(v, str), "a string"),
    "data": (lambda v: isinstance(v, str), "a string"),
    "method": (lambda v: isinstance(v, str), "a string"),
    "split_digest": (
        lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= HEX_DIGEST,
        "a SHA-256 in hex",
    ),
    "source": (lambda v: isinstance(v, str), "a string"),
    "sha256": (lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= HEX_DIGEST, "a SHA-256 in hex"),
    "copy_norm": (lambda v: isinstance(v, bool), "true or false"),
    "zero_init_last": (lambda v: isinstance(v, bool), "true or false"),
    "state_dict": (
        lambda v: (
            isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items())
        ),
        "a dict of tensors",
    ),
}

NEEDED = ("arch", "norm", "cifar_stem", "head_size", "ws", "state_dict")


def check_backbone_fields(saved, path):
    """A backbone file's dict: the keys that rebuild the network present, every key one that save_backbone
    writes, every value of its kind and within its bounds."""
    if not isinstance(saved, dict) or any(k not in saved for k in NEEDED):
        raise WeightsError(
            f"{path}: not a backbone file from bit_convert.py or pretrain.py "
            f"(expected the keys {', '.join(NEEDED)})"
        )
    unknown = [k for k in saved if k not in BACKBONE_FIELDS]
    if unknown:
        raise WeightsError(f"{path}: {str(unknown[0])[:60]!r} is not a field of a backbone file")
    for key, value in saved.items():
        fits, expected = BACKBONE_FIELDS[key]
        if not fits(value):
            shown = type(value).__name__ if key == "state_dict" else repr(value)
            raise WeightsError(f"{path}: {key} = {shown[:60]}, expected {expected}")


def save_backbone(model, path, state_dict=None, **meta):
    """The model's state dict (or `state_dict`, one of the model's copied earlier) with what is needed to
    rebuild it (see load_backbone), written atomically; a record that read_backbone_file would refuse is never
    written."""
    arch = dict(arch=model.arch, norm=model.norm_kind, cifar_stem=model.cifar_stem, head_size=model.head_size)
    arch |= dict(ws=model.ws, whiten=getattr(model, "whitened", False))
    saved = {**arch, **meta, "state_dict": model.state_dict() if state_dict is None else state_dict}
    check_backbone_fields(saved, f"cannot write {path}")
    check_finite(saved["state_dict"], f"cannot write {path}")
    save_atomic(saved, path)


def read_backbone_file(path):
    """The dict that save_backbone wrote, its fields checked (check_backbone_fields). weights_only: a .pt is a
    pickle, and one from elsewhere must not run code; mmap: reading the metadata of a large file costs no more
    than its header."""
    require_regular_file(path, WeightsError)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except Exception as e:  # a pickle from elsewhere can fail in many ways; all of them mean "not ours"
        raise WeightsError(
            f"{path}: not a readable .pt file ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    check_backbone_fields(saved, path)
    return saved


def load_backbone(path, head=True):
    """(model, metadata) from a file written by save_backbone (bit_convert.py -o, pretrain.py's
    backbone.pt): the file's own network, its IterNorm included, built once; without its classifier head
    where `head` is False. Weights that are not finite are refused."""
    saved = read_backbone_file(path)
    check_finite(saved["state_dict"], path)
    head_size = saved["head_size"] if head else 0
    model = resnet_v2(saved["arch"], saved["norm"], saved["cifar_stem"], head_size, saved["ws"])
    if saved.get("whiten"):
        whiten(model, at=whiten_placement(saved["whiten"]))
    state = {k: v for k, v in saved["state_dict"].items() if head or not k.startswith("head.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(
            f"{path}: its state_dict does not fit a {saved['arch']}/{saved['norm']}: "
            + " ".join(str(e).split())
        ) from None
    return model, {k: v for k, v in saved.items() if k != "state_dict"}


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bit_file(name):
    """The cached path of a released BiT model (e.g. BiT-M-R50x1). Naming it asks for it, as timm's
    pretrained=True does: a file not in the cache is fetched from the BiT bucket, with a progress bar, and
    kept only once check_bit_file has passed."""
    if name not in BIT_NAMES:
        raise WeightsError(f"unknown BiT model {name!r}; expected one of {', '.join(BIT_NAMES)}")
    path, url = CACHE_DIR / f"{name}.npz", f"{BIT_MODELS_URL}{name}.npz"
    if path.exists():
        return path
    return download(url, path, partial(check_bit_file, name), f"fetch it elsewhere and put it at {path}")


def check_bit_file(name, path):
    """A WeightsError unless `path` is a complete BiT .npz of the architecture that `name` says: every array
    readable with its CRC right (read_npz), every key of the backbone there with its shape (load_npz, into
    the network built on PyTorch's meta device, which takes no memory)."""
    with torch.device("meta"):
        model = resnet_v2("r" + name.split("-R")[1], "gn")
    load_npz(model, path)


# A connection silent for this long counts as broken: the download stops, resumable. Long enough for a slow
# server to answer, short enough that a dead connection does not hang a script.
DOWNLOAD_TIMEOUT_S = 60


def download(url, path, check, by_hand):
    """Fetch `url` into `path` with a progress bar, and keep it only once `check(file)` has passed.

    The bytes go to PATH.part beside it, renamed onto `path` once complete and checked, so `path` never holds
    a partial file. A transfer that stops (a broken connection, fewer bytes than Content-Length, a timeout,
    Ctrl-C, a full disk) keeps PATH.part, and the next call asks for the rest alone (an HTTP Range request);
    a server that ignores Range sends the whole file again, which replaces the part. A file that fails
    `check` (a UserError) is deleted. Processes that fetch the same file at once (torchrun's, on a fresh
    machine) take turns on a lock of PATH.part: the first fetches, the others find the file there. Written
    here rather than torch.hub.download_url_to_file, which deletes its temporary file when the transfer breaks
    (no resume) and keeps a body shorter than Content-Length. `by_hand`: what to do without network, ending
    the errors that the network causes. Returns `path`."""
    part = path.with_name(path.name + ".part")
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # removed if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(part, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that downloads {url} into {part}")
                fcntl.flock(f, fcntl.LOCK_EX)
            if path.exists():  # the process that held the lock fetched it
                return path
            if os.fstat(f.fileno()).st_nlink == 0:  # the holder deleted this part (nothing had arrived)
                return download(url, path, check, by_hand)
            transfer(url, f, part, by_hand)
            try:
                check(part)
            except UserError as e:
                part.unlink()
                raise UserError(
                    f"{url} arrived, but it is not what was asked for: {e}; it was deleted (run the same "
                    f"command again to fetch it anew, or {by_hand})"
                ) from None
            os.replace(part, path)
    except (KeyboardInterrupt, Stopped) as e:
        why = what_stopped(e)
        raise UserError(f"the download of {url} was stopped by {why}; run the same command again") from None
    finally:
        if part.exists() and part.stat().st_size == 0:  # nothing arrived: leave nothing behind
            part.unlink()
        for folder in made:
            if any(folder.iterdir()):
                break
            folder.rmdir()
    return path


def transfer(url, f, part, by_hand):
    """The bytes of `url` appended to the open file `f` (the part file `part`): the rest of them where `f`
    holds the start already and the server answers the Range request (206), all of them otherwise."""
    start = f.seek(0, os.SEEK_END)
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if (
            e.code == 416 and start
        ):  # "range not satisfiable": the part is whole (RFC 9110 §15.5.17) or longer
            if e.headers.get("Content-Range") == f"bytes */{start}":
                return  # complete already: a run stopped between its last byte and its check
            f.truncate(0)
            return transfer(url, f, part, by_hand)
        raise UserError(
            f"cannot download {url}: the server answered {e.code} {e.reason}; {by_hand}"
        ) from None
    except (OSError, http.client.HTTPException) as e:  # URLError (no network, refused), a timeout
        raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); {by_hand}") from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if start and response.status == 206:
            answered = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not answered or int(answered[1]) != start:
                raise UserError(
                    f"{url}: asked for the bytes from {start} on, the server answered Content-Range "
                    f"{response.headers.get('Content-Range')!r}; delete {part} and run the same command again"
                )
            total = int(answered[2]) if answered[2] != "*" else None
        else:
            if start:
                print(f"{url}: the server does not resume (it ignored the Range request); fetching it whole")
                f.truncate(0)
                start = 0
        received, why = start, None
        with tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.stem
        ) as bar:
            try:
                while chunk := response.read1(1 << 20):  # what has arrived, up to 1 MiB
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
            except (KeyboardInterrupt, Stopped) as e:
                why = f"stopped by {what_stopped(e)}"
            except (OSError, http.client.HTTPException) as e:
                if disk_full(e):
                    raise UserError(
                        f"cannot write {part}: the disk is full ({received:,} bytes kept); free some space "
                        "and run the same command again to resume"
                    ) from None
                why = f"{type(e).__name__}: {e}"
        if why is None and total is not None and received < total:
            why = "the connection closed early"
        if why:
            of = f" of {total:,}" if total is not None else ""
            raise UserError(
                f"the download of {url} stopped after {received:,}{of} bytes ({why}); "
                f"{part} is kept: run the same command again to resume"
            )


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
    estimate_bn_statistics refuses a synchronised one as it refuses a SyncBatchNorm. Returns the
    module."""
    for layer in module.modules():
        if isinstance(layer, IterNorm):
            layer.process_group = dist.group.WORLD if process_group is None else process_group
    return module


def batch_moments(columns, process_group=None):
    """(mean, centred columns, biased covariance) of the columns (C, M), over the columns of every process of
    `process_group` where one is given (None: this process's alone): the sums and the count, then the centred
    scatter matrix, are all-reduced (two passes: no cancellation of E[xx^T] - mm^T) by PyTorch's
    differentiable all_reduce, whose backward all-reduces the gradient: each process's positions receive the
    gradient of every process's loss, as SyncBatchNorm's backward does."""
    sums = torch.cat([columns.sum(1), columns.new_tensor([columns.shape[1]])])
    if process_group is not None:
        sums = torch.distributed.nn.functional.all_reduce(sums, group=process_group)
    mean = (sums[:-1] / sums[-1])[:, None]
    centred = columns - mean
    scatter = centred @ centred.T
    if process_group is not None:
        scatter = torch.distributed.nn.functional.all_reduce(scatter, group=process_group)
    return mean, centred, scatter / sums[-1]


def inverse_sqrt_newton(sigma, iterations):
    """Sigma^(-1/2) by Newton's iterations on the trace-normalised Sigma (Huang et al. 2019, Algorithm 1)."""
    trace = sigma.diagonal().sum()
    sigma_n, p = sigma / trace, torch.eye(len(sigma), device=sigma.device, dtype=sigma.dtype)
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
    return p / trace.sqrt()


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
    reaching each piece goes back to the process that made it, summed over the processes (PyTorch's
    differentiable all_gather, whose backward is a reduce-scatter)."""
    if world() == 1:
        return x
    if keep_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


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


def build_backbone(init="scratch", arch="r50x1", norm="bn", cifar_stem=False, ws=True):
    """The backbone that `--init scratch | bit-s | bit-m | FILE.npz | FILE.pt` names, for every script; BiT-S
    and BiT-M are fetched into $BIT_CACHE when they are not there (bit_file)."""
    if init.endswith(".pt"):  # the file's own network (a whitened one with its IterNorm)
        model, meta = load_backbone(init, head=False)
        found = (meta["arch"], meta["norm"], meta["cifar_stem"], meta["ws"])
        asked = (arch, norm, cifar_stem, ws)
        if found != asked:
            raise WeightsError(
                f"{init} holds (arch, norm, cifar_stem, ws) = {found}, but {asked} was asked for"
            )
        return model
    model = resnet_v2(arch, norm, cifar_stem, ws=ws)
    if init in ("bit-s", "bit-m"):
        load_npz(model, bit_file(f"BiT-{init[-1].upper()}-R{arch[1:]}"))
    elif init.endswith(".npz"):
        load_npz(model, init)
    elif init != "scratch":
        raise WeightsError(
            f"--init {init!r}: expected scratch, bit-s, bit-m, a BiT .npz or a .pt backbone file"
        )
    return model


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


def resolve_backbone_args(args, norm_default, default_size, meta=None, source=None):
    """Fill in --arch, --norm, --cifar-stem, --no-ws and --image-size: what the flag says, else what the
    checkpoint `source` records (`meta`: its metadata), else the script's default."""
    meta = meta or {}
    check_flags_against(meta, source, args.arch, args.norm, args.cifar_stem, args.ws, args.image_size)
    if args.image_size is None:
        args.image_size = meta.get("image_size", default_size)
    args.arch = args.arch or meta.get("arch", "r50x1")
    args.norm = args.norm or meta.get("norm", norm_default)
    if args.cifar_stem is None:
        args.cifar_stem = meta.get("cifar_stem", args.image_size <= 64)
    if args.ws is None:  # BiT standardises every conv (google-research/big_transfer, bit_pytorch/models.py)
        args.ws = meta.get("ws", True)


def check_flags_against(meta, source, arch=None, norm=None, cifar_stem=None, ws=None, image_size=None):
    """The backbone flags given (None: not given) against what the checkpoint `source` records: one that
    contradicts it is an error for the network's shape; for the image size, a warning (evaluating at another
    resolution can be deliberate)."""
    for flag, given in (("arch", arch), ("norm", norm), ("cifar_stem", cifar_stem), ("ws", ws)):
        if flag in meta and given is not None and given != meta[flag]:
            spelt = {"cifar_stem": f"--{'' if given else 'no-'}cifar-stem", "ws": "--no-ws"}
            raise WeightsError(
                f"{spelt.get(flag, f'--{flag} {given}')}: {source} holds a backbone with "
                f"{flag} = {meta[flag]}; leave the flag out to use it"
            )
    if image_size is not None and meta.get("image_size", image_size) != image_size:
        print(f"warning: --image-size {image_size}, but {source} was pretrained at {meta['image_size']} px")


def to_input(images, device):
    """uint8 images -> float in [-1, 1] on `device`. BiT was trained on [-1, 1] inputs; every init uses the
    same scaling, so that one checkpoint means one thing in every script. Scaling on the device moves 4x fewer
    bytes."""
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.float() / 127.5 - 1.0


def on_device(view, device):
    """One view of a batch on `device`: its images scaled to [-1, 1], with their crop geometry where the view
    records it (ssl_methods.located_view)."""
    if isinstance(view, (list, tuple)):  # a list from the loader, a tuple from device_views.render
        images, geometry = view
        return to_input(images, device), geometry.to(device)
    return to_input(view, device)


def forward_in_batches(model, images, device, batch_size=256):
    """`model`'s outputs on uint8 images (N, 3, H, W), a batch at a time, under autocast; in the mode the
    model is in."""
    with autocast(device):
        return [
            model(to_input(images[i : i + batch_size], device)) for i in range(0, len(images), batch_size)
        ]


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


@torch.no_grad()
def embed(backbone, images, device, batch_size=256):
    """Backbone features (N, D), float32, of uint8 images (N, 3, H, W), in eval mode."""
    backbone.eval()
    return torch.cat(forward_in_batches(backbone, images, device, batch_size)).float()


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
    for layer in norms:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
    backbone.train()
    forward_in_batches(backbone, images, device, batch_size)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    backbone.train(was_training)


def rankme(features, eps=1e-7):
    """RankMe (Garrido et al., ICML 2023, Eq. 1): exp(entropy of p), p_k = sigma_k / sum(sigma) + eps, sigma
    the singular values of the raw embedding matrix (neither centred nor normalised). About 1 when every
    embedding lies on one line (collapse), up to min(N, D) when they fill every dimension."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def untrained_statistics(backbone, meta):
    """Whether a backbone's BatchNorm statistics are not its own: a BatchNorm backbone that never trained
    (scratch, BiT, a converted BiT file) has none yet. Pretrained ones record their epoch (`meta`: what the
    backbone file records) and keep the statistics they trained with."""
    return "epoch" not in meta and backbone.norm_kind == "bn"


def main():
    parser = ArgumentParser(
        description="Convert BiT .npz weights into a PyTorch state dict for resnet_v2.",
        epilog=f"Cache: {CACHE_DIR} (set BIT_CACHE to move it).",
    )
    parser.add_argument(
        "npz",
        nargs="?",
        help="a BiT .npz file, or a BiT name (BiT-M-R50x1), fetched into the cache if missing",
    )
    parser.add_argument("-o", "--output", help="the .pt file to write")
    parser.add_argument(
        "--download", metavar="NAME", help="fetch NAME (e.g. BiT-M-R50x1) from the BiT bucket"
    )
    parser.add_argument(
        "--norm",
        choices=("bn", "gn"),
        default="bn",
        help="bn: every GroupNorm becomes BatchNorm (the paper's fix); gn: BiT as released",
    )
    parser.add_argument(
        "--cifar-stem", action="store_true", help="3x3 stride-1 root conv, no pooling (paper §4.2)"
    )
    parser.add_argument("--head", action="store_true", help="also load the classification head")
    init = parser.add_mutually_exclusive_group()
    init.add_argument(
        "--copy-norm", action="store_true", help="bn: copy BiT's GroupNorm gamma/beta into BatchNorm"
    )
    add_zero_init_last(init)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args()
    output = Path(args.output) if args.output else None
    if output and output.exists() and not args.force:
        raise WeightsError(f"{output} exists; pass --force to overwrite it")
    if output and not output.parent.is_dir():
        raise WeightsError(f"-o {output}: the directory {output.parent} does not exist")
    if output and output.is_dir():
        raise WeightsError(f"-o {output}: a directory; expected the path of the .pt file to write")
    if output:
        output_dir(output.parent, f"-o {output}: its directory")  # before the conversion
    if args.download:
        print(bit_file(args.download))
    source = args.npz or args.download
    if source is None or output is None:
        if args.download and output is None:
            return
        parser.error("give a BiT .npz (or --download NAME) and -o OUTPUT.pt")
    path = Path(source) if Path(source).exists() or source not in BIT_NAMES else bit_file(source)
    arrays = read_npz(path)
    arch = npz_arch(arrays, path)
    if args.head and "resnet/head/conv2d/bias" not in arrays:
        raise WeightsError(f"{path}: --head asked for, but the file has no key resnet/head/conv2d/bias")
    head = len(arrays["resnet/head/conv2d/bias"]) if args.head else 0
    del arrays  # load_npz reads the file again; keep one copy of a large model in memory, not two
    model = resnet_v2(arch, args.norm, args.cifar_stem, head_size=head)
    load_npz(model, path, copy_norm=True if args.copy_norm else None, load_head=args.head)
    if args.zero_init_last:
        zero_init_last(model)
    save_backbone(
        model,
        output,
        source=path.name,
        sha256=sha256(path),
        copy_norm=args.copy_norm,
        zero_init_last=args.zero_init_last,
    )
    print(
        f"{path.name} ({arch}) -> {output}: norm {args.norm}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters"
    )


if __name__ == "__main__":
    run(main)
