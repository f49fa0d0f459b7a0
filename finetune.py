"""Fine-tuning strategies (Khan & Fang 2023, "Revisiting Fine-Tuning Strategies for Self-supervised Medical
Imaging Analysis", arXiv 2307.10915; our reading): end-to-end, one quarter of the network at a time, the
shallower network of the first three quarters, and several backbones combined under one head.

    python finetune.py --ckpt runs/ham-bit-m/backbone.pt --data ham10000 --data-root PATH --tune q2
    python finetune.py --ckpt ... --tune all | q1 | q2 | q3 | q4 | 0-75 | q1,q2      # one strategy per run
    python finetune.py --init bit-m --data ham10000 --data-root PATH --tune all       # a baseline as released
    python finetune.py --combine A/backbone.pt B/backbone.pt --tune q2 0-75 ...       # one head over both
    python finetune.py --out DIR --resume                                            # after a crash or Ctrl-C
    python linear_eval.py --compare runs/*/finetune-*/results.json runs/*/linear/results.json --out figures

As linear_eval.py: the same data and split file (refused unless the backbone was pretrained with it), focal
loss, the epoch chosen on `val` by balanced accuracy, `test` scored once with it, --trials seeds, and a
results.json with the same keys, which `linear_eval.py --compare` draws beside the linear ones. DIR receives
args.json, metrics.csv (a row per trial and epoch), last.pt (everything to resume) and results.json.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from torchvision.transforms import v2
from tqdm import tqdm

import bit_common
import datasets
import eval_common
import linear_eval
from bit_common import (
    FRACTION,
    MOMENTUM,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    ArgumentParser,
    UserError,
    check_finite,
    device_name,
    path_arg,
    run,
    to_json,
)
from bit_convert import (
    IterNorm,
    add_backbone_args,
    amp_dtype,
    autocast,
    check_flags_against,
    forward_in_batches,
    read_backbone_file,
    resolve_backbone_args,
    to_input,
)
from eval_common import check_trial_seeds, initial_backbone, saved_backbone
from linear_eval import focal_loss, scores, write_results

# On --resume the run's own args.json is used, but for these, which come from the machine and the command line
NOT_RESTORED = {"resume", "force", "device", "workers", "out"}

MAY_CHANGE = NOT_RESTORED | {"download", "data_root", "cache_dir"}  # any other difference is an error

RUN_FILES = ("args.json", "last.pt", "metrics.csv", "results.json")  # set aside by a new run in --out

# our choice, not tuned: BiT-HyperRule (Kolesnikov et al. §3.3; big_transfer bit_hyperrule.py and
# bit_common.py) is SGD lr 0.003 at batch 512, 100 warm-up steps, then x0.1 at steps 200, 300 and 400 of 500
RESOLVED = {"arch", "norm", "cifar_stem", "ws", "image_size", "lr"}  # a run records a value for each

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-4}

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, IterNorm)  # every kind, frozen in eval


def quarter_bounds(units_per_block):
    """Where each quarter of the network starts and ends, in units counted through all four blocks: four
    groups by depth (our reading), the first (units mod 4) of them one unit longer. R50's 16 units give
    (0, 4, 8, 12, 16); R101's 33 give 9, 8, 8, 8; R152's 50 give 13, 13, 12, 12."""
    n = sum(units_per_block)
    sizes = [n // 4 + (q < n % 4) for q in range(4)]
    return tuple(int(b) for b in np.cumsum([0] + sizes))


def quarters(backbone):
    """The units of each quarter, in order. The stem goes with q1 and the final norm with q4 (see Body)."""
    units = [unit for block in backbone.blocks for unit in block]
    bounds = quarter_bounds([len(block) for block in backbone.blocks])
    return [units[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def tune_strategy(text):
    """--tune: 'all' (end-to-end), '0-75' (the shallower network, all of it trained), or quarters joined by
    commas ('q2', 'q1,q2'). Returned in a canonical spelling, so that equal strategies have equal names."""
    if text in ("all", "0-75"):
        return text
    parts = text.split(",")
    if not all(p in ("q1", "q2", "q3", "q4") for p in parts):
        raise UserError(
            f"--tune {text}: expected all, 0-75, or quarters q1 to q4 joined by commas (q2, q1,q2)"
        )
    return ",".join(sorted(set(parts)))


class Body(nn.Module):
    """The part of one backbone that the head sees, with only the chosen parameters trainable.

    Quarter q (surgical fine-tuning, Lee et al. ICLR 2023): every parameter but those of quarter q's units
    (plus the stem for q1, the final norm for q4) is frozen, and every frozen normalisation layer stays in
    eval mode (NORMS: BatchNorm, a --whiten backbone's IterNorm, whose batch whitening and running whitening
    matrix would otherwise move, and GroupNorm, for which the mode changes nothing), so that what they compute
    and their statistics do not move either. '0-75': the last quarter is removed and all that
    remains trains. A pre-activation unit's output is not normalised (He et al. 2016, Fig. 4e): at the 75 %
    point the features go through the first removed unit's own input norm and ReLU, the pretrained norm of
    that width that the full network applies there, instead of the final norm, whose width is block 4's."""

    def __init__(self, backbone, strategy):
        super().__init__()
        groups, shallow = quarters(backbone), strategy == "0-75"
        self.stem = backbone.stem
        self.units = nn.Sequential(*[unit for group in groups[: 3 if shallow else 4] for unit in group])
        self.norm = groups[3][0].norm1 if shallow else backbone.norm
        self.width = self.norm.weight.numel()
        tuned = {"all": "q1,q2,q3,q4", "0-75": "q1,q2,q3"}.get(strategy, strategy).split(",")
        self.requires_grad_(shallow)
        for q in (int(name[1]) - 1 for name in tuned):
            nn.ModuleList(groups[q]).requires_grad_(True)
            extra = {0: self.stem, 3: self.norm}.get(q)
            if extra is not None:
                extra.requires_grad_(True)
        self.frozen_norms = [
            m
            for m in self.modules()
            if isinstance(m, NORMS) and not any(p.requires_grad for p in m.parameters())
        ]

    def train(self, mode=True):
        super().train(mode)
        for layer in self.frozen_norms:
            layer.train(False)
        return self

    def forward(self, x):
        return F.relu(self.norm(self.units(self.stem(x)))).mean((2, 3))


class FineTuned(nn.Module):
    """One or several Bodies, their pooled features concatenated, and one new linear head over all of them,
    initialised as linear_eval.py's classifier (normal, std 0.01; a zero head, as BiT's own fine-tuning uses,
    would give the backbone no gradient at the first step)."""

    def __init__(self, bodies, n_classes, seed):
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.head = nn.Linear(sum(body.width for body in bodies), n_classes)
        nn.init.normal_(self.head.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(torch.cat([body(x) for body in self.bodies], 1))


def train_subset(data, split, fraction, seed):
    """--train-fraction: a stratified subset of the `train` part (scikit-learn's train_test_split), drawn from
    the trial's seed alone, so that every strategy at that seed trains on the same images."""
    index = datasets.indices(data, split, "train")
    if fraction == 1:
        return index
    try:
        kept, _ = train_test_split(index, train_size=fraction, stratify=data.labels[index], random_state=seed)
    except ValueError:
        raise UserError(
            f"--train-fraction {fraction}: too few of the {len(index)} train images to keep one of each "
            f"of the {len(data.classes)} classes"
        ) from None
    return np.sort(kept)


def train_view(size):
    """The usual augmentation of supervised training: a random resized crop (scale 0.08-1) and a horizontal
    flip, as the authors' classifier training (BiT-SimSiam augmentations/eval_aug.py, train=True); BiT's own
    fine-tuning resizes, then crops at random (bit_pytorch/train.py)."""
    return v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()])


def train_loader(data, index, seed, args, device):
    """Batches of augmented train images in the order and with the views that the trial's seed and the epoch
    fix (SeededSampler): a resumed run sees the batches it would have seen."""
    images = datasets.ImageSet(data, index, [train_view(args.image_size)])
    if len(images) < args.batch_size:
        raise UserError(
            f"--batch-size {args.batch_size}: more than the {len(images)} train images fine-tuned on"
        )
    sampler = datasets.SeededSampler(images, 1, 0, shuffle=True, seed=seed)
    loader = torch.utils.data.DataLoader(
        images,
        args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,  # a batch of one would break BatchNorm in train mode
        pin_memory=device.type == "cuda",
        worker_init_fn=bit_common.ignore_signals,
    )
    return loader, sampler, len(images) // args.batch_size


@torch.no_grad()
def predict(model, images, device, batch_size=256):
    model.eval()
    return torch.cat(forward_in_batches(model, images, device, batch_size)).argmax(1).cpu().numpy()


def build_model(backbones, args, n_classes, seed, device):
    """Fresh copies of the loaded backbones, each cut and frozen as its --tune says, under one new head."""
    strategies = args.tune * len(backbones) if len(args.tune) == 1 else args.tune
    bodies = [Body(copy.deepcopy(backbone), s) for backbone, s in zip(backbones, strategies)]
    model = FineTuned(bodies, n_classes, seed).to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def make_optimizer(model, args):
    trained = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adam":
        return torch.optim.Adam(trained, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(trained, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def learning_rate(done, total, args):
    """A cosine from --lr to 0 over the trial's steps, no warm-up."""
    return linear_eval.cosine_lr(args.lr, done, total)


def train_step(model, images, labels, optimizer, scaler, args, device):
    """One step of focal loss (Lin et al. 2017, gamma --gamma, paper §4.4) on a batch of uint8 images."""
    with autocast(device):
        logits = model(to_input(images, device))
    loss = focal_loss(logits, labels.to(device), args.gamma)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


class RunState:
    """Where the run stands, saved in last.pt: the trial (its seed), the next epoch and step, this epoch's
    loss sum, the best val score so far with its epoch and weights, the finished trials and the metrics
    rows."""

    def __init__(self, seed):
        self.seed, self.trials, self.history = seed, [], []
        self.new_trial(seed)

    def new_trial(self, seed):
        self.seed, self.epoch, self.step, self.loss_sum = seed, 1, 0, 0.0
        self.best_score, self.best_epoch, self.best_val, self.best_state = -1.0, 0, None, None

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def save_checkpoint(args, state, model, optimizer, scaler, digests):
    """DIR/last.pt, with the digest (SHA-256) of each backbone file, which --resume checks the files
    against."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": state.state_dict(),
        "args": to_json(args),
        "backbones": digests,
    }
    bit_common.save_last(checkpoint, args.out)


def read_checkpoint(args, state, files, digests):
    """--resume: DIR/last.pt checked (bit_common.read_checkpoint, the progress against a fresh one's, the best
    weights finite), made with the very backbone files given (a file replaced since is refused: the later
    trials would start from other weights); its progress loaded into `state`."""
    path = args.out / "last.pt"
    keys = ("model", "optimizer", "scaler", "progress", "args")
    saved = bit_common.read_checkpoint(args, MAY_CHANGE | datasets.SPLIT_FLAGS, keys)
    bit_common.check_progress(saved["progress"], state.state_dict(), path)
    changed = [f for f, a, b in zip(files, saved.get("backbones", digests), digests) if a != b]
    if changed:
        raise UserError(
            f"--resume: {changed[0]} is not the backbone file the run in {args.out} started from (its "
            "SHA-256 differs: replaced since?); put the original back, or start afresh with --force"
        )
    best, epoch, seed = (saved["progress"][k] for k in ("best_state", "epoch", "seed"))
    if best is not None and not (isinstance(best, dict) and all(map(torch.is_tensor, best.values()))):
        raise UserError(f"--resume: {path}: its progress best_state is not a dict of tensors")
    if epoch - 1 > args.epochs or (best is None) != (epoch == 1) or not 0 <= seed - args.seed < args.trials:
        raise UserError(
            f"--resume: {path}: progress at trial seed {seed}, epoch {epoch}, best weights "
            f"{'absent' if best is None else 'present'}: not a point of a run of --seed {args.seed}, "
            f"--trials {args.trials}, --epochs {args.epochs}"
        )
    check_finite(best or {}, f"--resume: {path}: best_state")
    state.load_state_dict(saved["progress"])
    return saved


def claim_output(args, run_files):
    """Make --out the run's own (lock_output); a new run then sets aside the files (`run_files`, names and
    patterns) of the run it replaces and writes DIR/args.json. Returns the open lock file: keep a reference
    to it."""
    lock = bit_common.lock_output(args)
    if not args.resume:  # at once: a run killed while it starts can be resumed
        bit_common.set_aside_earlier_run(args.out, run_files)
        bit_common.write_args(args)
    return lock


def train_trial(model, data, split, parts, args, state, stop, device, digests, resumed=None):
    """Fine-tune for --epochs, choosing the epoch by balanced accuracy on `val` (the last epoch where `val` is
    the test set, under an official protocol), then score `test` once with it. Returns the trial's record, or
    None when a signal stopped the run (last.pt then holds everything to continue)."""
    (val_images, val_labels), (test_images, test_labels) = parts
    index = train_subset(data, split, args.train_fraction, state.seed)
    loader, sampler, steps = train_loader(data, index, state.seed, args, device)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    if resumed:  # the best weights first: loaded into the model, they show that they fit it
        best = [("best_state", lambda: bit_common.load_module(model, state.best_state))]
        bit_common.load_parts(
            args.out / "last.pt",
            best * (state.best_state is not None)
            + [
                ("model", lambda: bit_common.load_module(model, resumed["model"])),
                ("optimizer", lambda: bit_common.load_optimizer(optimizer, resumed["optimizer"])),
                ("scaler", lambda: scaler.load_state_dict(resumed["scaler"])),
            ],
        )
    for epoch in range(state.epoch, args.epochs + 1):
        model.train()
        sampler.set_epoch(epoch, start=state.step * args.batch_size)
        batches, tic = iter(loader), time.perf_counter()
        for _ in tqdm(range(state.step, steps), desc=f"trial {state.seed}, epoch {epoch}", leave=False):
            images, labels = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate((epoch - 1) * steps + state.step, args.epochs * steps, args)
            state.loss_sum += train_step(model, images, labels, optimizer, scaler, args, device).item()
            state.step += 1
            if not math.isfinite(state.loss_sum):
                raise FloatingPointError(f"the loss became {state.loss_sum} in epoch {epoch}; stopped")
            if stop.requested(state.step, steps):
                save_checkpoint(args, state, model, optimizer, scaler, digests)
                print(f"stopped by signal in epoch {epoch}, step {state.step}; saved; continue with --resume")
                return None
        val_score = float(balanced_accuracy_score(val_labels, predict(model, val_images, device)))
        end_epoch(state, epoch, val_score, steps, time.perf_counter() - tic, model, args, split)
        save_checkpoint(args, state, model, optimizer, scaler, digests)
        bit_common.write_csv(args.out / "metrics.csv", state.history)
    model.load_state_dict(state.best_state)
    return {
        "seed": state.seed,
        "best_epoch": state.best_epoch,
        "val_balanced_accuracy": state.best_val,
        "train_images": len(index),
        **scores(test_labels, predict(model, test_images, device), len(data.classes)),
    }


def end_epoch(state, epoch, val_score, steps, seconds, model, args, split):
    """The epoch's metrics row; the model's weights kept if its val score is the best so far (the first epoch
    of the best score), or always where val may not select."""
    score = val_score if eval_common.selects_on_val(split) else epoch
    if score > state.best_score:
        state.best_score, state.best_epoch, state.best_val = score, epoch, val_score
        state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    row = {"trial": state.seed, "epoch": epoch, "loss": state.loss_sum / steps}
    row |= {"lr": learning_rate(epoch * steps, args.epochs * steps, args), "val_bacc": val_score}
    state.history.append(row | {"epoch_s": seconds})
    print(f"trial {state.seed}, epoch {epoch}: loss {row['loss']:.4f}, val balanced accuracy {val_score:.4f}")
    state.epoch, state.step, state.loss_sum = epoch + 1, 0, 0.0


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets.add_data_args(parser)
    add_backbone_args(parser, norm_default="gn")
    model = parser.add_argument_group("model: --ckpt, --init for a network as released, or --combine")
    model.add_argument(
        "--ckpt", type=path_arg, help="backbone.pt or a backbone_epN.pt snapshot from pretrain.py"
    )
    model.add_argument("--init", choices=("bit-s", "bit-m", "scratch"), help="instead of --ckpt")
    model.add_argument(
        "--combine",
        nargs="+",
        metavar="BACKBONE",
        help="two backbone files or more, pretrained with one split: each fine-tuned with its --tune, "
        "their pooled features concatenated under one head, all trained together",
    )
    model.add_argument(
        "--tune",
        nargs="+",
        default=["all"],  # end-to-end, the "de-facto standard" Khan & Fang compare their strategies with
        help="all (end-to-end, default); q1, q2, q3, q4 (that quarter of the units by depth and the head "
        "train, the rest is frozen, its BatchNorm in eval mode; q1 holds the stem, q4 the final norm); "
        "quarters joined by commas (q1,q2); 0-75 (the last quarter removed, all the rest trains). With "
        "--combine: one strategy for every file, or one per file",
    )
    tuning = parser.add_argument_group("fine-tuning")
    tuning.add_argument(
        "--train-fraction",
        type=FRACTION,
        default=1.0,
        help="fine-tune on a stratified fraction of the train part, the same images for every strategy "
        "at one seed (default 1: all)",
    )
    # 40 epochs of batches of 64: our choice, about 600 steps on HAM10000's train part (about 1000 images),
    # the order of BiT-HyperRule's 500 steps for data sets below 20k images (bit_hyperrule.get_schedule)
    tuning.add_argument("--epochs", type=POSITIVE_INT, default=40)
    tuning.add_argument(
        "--batch-size", type=POSITIVE_INT, default=64, help="two or more for a BatchNorm backbone"
    )
    tuning.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")  # SGD: BiT-HyperRule's
    tuning.add_argument(
        "--lr", type=POSITIVE, help="peak of the cosine; default 0.01 for sgd (momentum 0.9), 1e-4 for adam"
    )
    # momentum 0.9 and no weight decay: BiT-HyperRule's (bit_pytorch/train.py: SGD(lr, momentum=0.9))
    tuning.add_argument("--momentum", type=MOMENTUM, default=0.9, help="SGD's, in [0, 1)")
    tuning.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    tuning.add_argument(
        "--gamma", type=NON_NEGATIVE, default=4.0, help="focal loss gamma (paper §4.4); 0: cross-entropy"
    )
    tuning.add_argument(
        "--trials", type=POSITIVE_INT, default=3, help="seeds --seed, --seed+1, ... (3: the paper's §4.4)"
    )
    run_group = parser.add_argument_group("run (figures: linear_eval.py --compare .../results.json ...)")
    run_group.add_argument(
        "--out", type=path_arg, help="default: finetune-TUNE/ beside --ckpt, else runs/finetune-INIT-TUNE"
    )
    run_group.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run_group.add_argument(
        "--force", action="store_true", help="start afresh in an --out that holds another run"
    )
    run_group.add_argument("--seed", type=SEED, default=0)
    run_group.add_argument(
        "--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = parser.parse_args(argv)
    if args.resume:  # the run's own arguments, but for those the command line may change
        if args.out is None:
            raise UserError("--resume needs --out DIR, the directory of the run to continue")
        args, saved = bit_common.restored_args(parser, argv, args.out, NOT_RESTORED, RESOLVED)
        bit_common.refuse_changes(args, saved, MAY_CHANGE)
        check_args(args)  # the same checks as a new run's
        return args
    check_args(args)
    resolve_backbones(args)
    args.lr = args.lr or DEFAULT_LR[args.optimizer]
    strategy = "_".join(t.replace(",", "+") for t in args.tune)
    strategy += f"-f{args.train_fraction:g}" if args.train_fraction < 1 else ""
    if args.ckpt:
        args.out = args.out or args.ckpt.parent / f"finetune-{strategy}"
    else:
        args.out = args.out or Path("runs") / f"finetune-{args.init or 'combine'}-{strategy}"
    return args


def check_args(args):
    """What the flags' types cannot check alone, for a new run and a resumed one alike."""
    args.tune = [tune_strategy(text) for text in args.tune]
    if sum(x is not None for x in (args.ckpt, args.init, args.combine)) != 1:
        raise UserError("give one of --ckpt FILE, --init bit-s|bit-m|scratch, --combine FILE FILE ...")
    if args.combine is not None and len(args.combine) < 2:
        raise UserError(f"--combine {args.combine[0]}: give two backbone files or more (one: --ckpt)")
    if len(args.tune) > 1 and len(args.tune) != len(args.combine or [None]):
        raise UserError(
            f"--tune {' '.join(args.tune)}: give one strategy, or one for each --combine file "
            f"({len(args.combine or [None])})"
        )
    check_trial_seeds(args.seed, args.trials)


def resolve_backbones(args):
    """--arch, --norm, --cifar-stem and --image-size from the flags, else from the (first) checkpoint; a flag
    that contradicts any of the checkpoints is refused (e.g. --norm bn for a GroupNorm file)."""
    files = [args.ckpt] if args.ckpt else [Path(f) for f in args.combine or []]
    records = [read_backbone_file(path) for path in files]
    given = (args.arch, args.norm, args.cifar_stem, args.ws)  # the flags, before the first file fills them
    default_size = datasets.DEFAULT_SIZE[args.data]
    resolve_backbone_args(
        args, "gn", default_size, records[0] if files else None, files[0] if files else None
    )
    for path, record in zip(files[1:], records[1:]):  # each file keeps its own network; the image size is one
        check_flags_against(record, path, *given, args.image_size)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    data = datasets.data_from_args(args)
    files = [args.ckpt] if args.ckpt else [Path(f) for f in args.combine or []]
    loaded = [saved_backbone(path) for path in files] or [
        initial_backbone(args.init, args.arch, args.norm, args.cifar_stem, args.ws, args.seed)
    ]
    metas = [meta for _, meta, _, _ in loaded]
    if args.batch_size < 2 and any(backbone.norm_kind == "bn" for backbone, _, _, _ in loaded):
        raise UserError(
            f"--batch-size {args.batch_size}: a BatchNorm backbone trains on batches of two images or more"
        )
    split, split_file = eval_common.pretraining_split(
        data, args.split_file, files[0] if files else None, metas, args.split, args.split_seed, args.split_by
    )
    args.split, args.split_seed, args.split_by = datasets.split_settings(
        split
    )  # args.json records those used
    lock = claim_output(args, RUN_FILES)  # noqa: F841 (held until the process ends)
    backbones = [backbone.to(device) for backbone, _, _, _ in loaded]
    for backbone, meta in zip(backbones, metas):
        eval_common.estimate_statistics_if_untrained(backbone, meta, data, split, args.image_size, device)
    parts = []
    for part in ("val", "test"):
        index = datasets.indices(data, split, part)
        parts.append((datasets.eval_images(data, index, args.image_size, args.workers), data.labels[index]))
    state, resumed = RunState(args.seed), None
    digests = [digest for _, _, _, digest in loaded]
    if args.resume and (args.out / "last.pt").exists():
        resumed = read_checkpoint(args, state, files, digests)
    print(datasets.summary(data, split, split_file))
    stop = bit_common.StopSignal()
    while state.seed < args.seed + args.trials:
        model = build_model(backbones, args, len(data.classes), state.seed, device)
        if state.seed == args.seed and not resumed:
            announce(model, args, device)
        trial = train_trial(model, data, split, parts, args, state, stop, device, digests, resumed)
        if trial is None:
            return 128 + stop.signum
        state.trials.append(trial)
        state.new_trial(state.seed + 1)
        resumed = None
        print(
            f"trial {trial['seed']}: epoch {trial['best_epoch']} chosen on val; test balanced accuracy "
            f"{trial['balanced_accuracy']:.4f}, macro F1 {trial['macro_f1']:.4f}"
        )
    names = [name for _, _, name, _ in loaded]
    save_results(args, " + ".join(names), data, split_file, state.trials)
    return 0


def announce(model, args, device):
    stem, precision = " cifar-stem" if args.cifar_stem else "", str(amp_dtype(device)).removeprefix("torch.")
    for body, strategy in zip(
        model.bodies, args.tune * len(model.bodies) if len(args.tune) == 1 else args.tune
    ):
        trained = sum(p.numel() for p in body.parameters() if p.requires_grad)
        total = sum(p.numel() for p in body.parameters())
        print(f"--tune {strategy}: {trained:,} of the {total:,} parameters train, {body.width} features")
    print(
        f"{args.arch}/{args.norm}{stem} on {device}, {args.optimizer} lr {args.lr:g}, "
        f"batch {args.batch_size}, {args.epochs} epochs, {args.trials} trial(s), {precision}"
    )


def save_results(args, name, data, split_file, trials):
    """results.json with linear_eval.py's keys, so that its --compare draws both kinds side by side."""
    fraction = f", {args.train_fraction:g} of train" if args.train_fraction < 1 else ""
    results = {
        "model": f"{name}, fine-tuned {' / '.join(args.tune)}{fraction}",
        "checkpoint": str(args.ckpt or args.init or " ".join(args.combine)),
        "data": data.name,
        "split_file": str(split_file),
        "classes": list(data.classes),
        "args": to_json(args),
    }
    print(write_results(args.out, results, trials))


if __name__ == "__main__":
    run(main)
