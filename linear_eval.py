"""Linear evaluation (paper §4.4, Fig. 3): a linear classifier on frozen backbone features, trained with focal loss on
the `train` part, selected by balanced accuracy on `val`, and scored once on `test`; --trials seeds, mean and std.

    python linear_eval.py --ckpt runs/ham-bit-m/backbone.pt --data ham10000 --data-root PATH   # after pretrain.py
    python linear_eval.py --init bit-m --data ham10000 --data-root PATH    # BiT-M as released (GroupNorm, frozen)
    python linear_eval.py --compare runs/*/linear/results.json --out figures                   # the Fig. 3 chart

The features of each part are computed once and cached (keyed by the checkpoint's bytes, the split and the image
size), so the classifier trains in seconds. Writes results.json and confusion.png under --out.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import ConfusionMatrixDisplay, balanced_accuracy_score, confusion_matrix, f1_score, recall_score

import datasets
from bit_convert import ARCHS, WeightsError, build_backbone, load_backbone, save_atomic, sha256
from pretrain import embed, estimate_bn_statistics, to_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def focal_loss(logits, target, gamma=4.0):
    """Multi-class focal loss, FL = -(1 - p_t)^gamma log p_t, p_t the softmax probability of the true class
    (Lin et al. 2017, Eq. 4); gamma = 0 is cross-entropy. Mean over the batch."""
    log_pt = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return (-(1 - log_pt.exp()) ** gamma * log_pt).mean()


def scores(truth, predictions, n_classes):
    labels = list(range(n_classes))
    return {"balanced_accuracy": float(balanced_accuracy_score(truth, predictions)),
            "macro_f1": float(f1_score(truth, predictions, labels=labels, average="macro", zero_division=0)),
            "accuracy": float(np.mean(truth == predictions)),
            "per_class_recall": recall_score(truth, predictions, labels=labels, average=None, zero_division=0).tolist(),
            "confusion": confusion_matrix(truth, predictions, labels=labels).tolist()}


def train_linear(train, val, n_classes, args, seed, augmented=None):
    """A linear classifier on standardised features, Adam, --epochs passes over `train` (features, labels), or over
    augmented() if given, new train features each epoch. Returns the classifier of the epoch with the best balanced
    accuracy on `val`, and that epoch. It never sees test data."""
    generator = torch.Generator().manual_seed(seed)
    (x, y), (val_x, val_y) = train, val
    mean, std = x.mean(0), x.std(0) + 1e-6  # features of BN/GN backbones live on very different scales
    classifier = nn.Linear(x.shape[1], n_classes)
    nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, args.epochs + 1):
        epoch_x = augmented() if augmented else x
        for batch in torch.randperm(len(y), generator=generator).split(args.batch_size):
            loss = focal_loss(classifier((epoch_x[batch] - mean) / std), y[batch], args.gamma)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predictions = classifier((val_x - mean) / std).argmax(1)
        score = balanced_accuracy_score(val_y.numpy(), predictions.numpy())
        if score > best:  # the first epoch of the best score
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in classifier.state_dict().items()}
    classifier.load_state_dict(best_state)
    return lambda features: classifier((features - mean) / std), best_epoch


def load_model(args, ckpt=None, init=None):
    """The frozen backbone in a checkpoint (or as --init names it), its metadata, a name for figures, and what
    identifies it for the feature cache."""
    if ckpt:
        backbone, meta = load_backbone(ckpt)
        name = f"{ckpt.parent.name}/{ckpt.stem}" + (f", epoch {meta['epoch']}" if "epoch" in meta else "")
        return backbone, meta, name, sha256(ckpt)
    cifar_stem = args.image_size <= 64 if args.cifar_stem is None else args.cifar_stem
    torch.manual_seed(args.seed)  # the scratch floor is one random network
    backbone = build_backbone(init, args.arch, args.norm, cifar_stem, download=args.download)
    name = {"bit-s": "BiT-S", "bit-m": "BiT-M"}.get(init, init) + (
        f" {args.norm}, untrained" if init == "scratch" else f" {args.norm}, as released")
    identity = hashlib.sha256(repr((init, args.arch, args.norm, cifar_stem, args.seed)).encode()).hexdigest()
    return backbone, {"init": init}, name, identity


def resolve_split(args, data, ckpt=None, metas=()):
    """The split that the backbones were pretrained with (split.json beside the first checkpoint) unless
    --split-file; it must be the one every checkpoint in `metas` records, and hold a usable train/val/test."""
    path = args.split_file or (ckpt.parent / "split.json" if ckpt else datasets.default_split_file(args))
    if ckpt and not path.exists():
        raise datasets.DataError(f"split file {path} not found: pass the --split-file the backbone was pretrained with")
    split = datasets.load_split(data, path, args.split, args.split_seed, args.split_by)
    if any(meta.get("split_digest", datasets.split_digest(split)) != datasets.split_digest(split) for meta in metas):
        raise datasets.DataError(f"split file {path} is not the split a backbone was pretrained with: its test images "
                                 "may have been seen in pretraining; use the split.json of the pretraining run")
    empty = [part for part in ("train", "val", "test") if not split[part]]
    if empty:
        raise datasets.DataError(f"split file {path}: part {empty[0]} is empty")
    train_labels = data.labels[datasets.indices(data, split, "train")]
    absent = [c for k, c in enumerate(data.classes) if not np.any(train_labels == k)]
    if absent:
        raise datasets.DataError(f"split file {path}: class {absent[0]} has no image in the train part")
    return split, path


def estimate_statistics_if_untrained(backbone, meta, data, split, args, device):
    """A BatchNorm backbone that never trained (--init ... --norm bn, a converted BiT file) has no statistics yet:
    take them from the train part's images. Pretrained ones record their epoch and keep their own."""
    if "epoch" not in meta and backbone.norm_kind == "bn":
        images = datasets.eval_images(data, datasets.indices(data, split, "train"), args.image_size)
        estimate_bn_statistics(backbone, images, device)


def part_features(backbone, identity, data, split, part, args, device):
    """(features, labels) of one part with the evaluation view, from the cache when the same backbone, split and
    image size were embedded before; a changed checkpoint has other bytes, hence another key."""
    key = hashlib.sha256(f"{identity} {datasets.split_digest(split)} {args.image_size}".encode()).hexdigest()[:24]
    path = args.cache_dir / "features" / f"{key}-{part}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"]
    index = datasets.indices(data, split, part)
    images = datasets.eval_images(data, index, args.image_size, args.workers)
    features, labels = embed(backbone, images, device).cpu(), torch.as_tensor(data.labels[index])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"features": features, "labels": labels}, path)
    return features, labels


def augmented_features(backbone, data, split, args, device):
    """--augment: a function giving new features of randomly cropped and flipped train images at every call."""
    view = datasets.v2.Compose([datasets.v2.RandomResizedCrop(args.image_size), datasets.v2.RandomHorizontalFlip()])
    train_set = datasets.ImageSet(data, datasets.indices(data, split, "train"), view)
    loader = torch.utils.data.DataLoader(train_set, batch_size=256, num_workers=args.workers)
    return lambda: embed(backbone, torch.cat([images for images, _ in loader]), device).cpu()


def compare(paths, out):
    """The paper's Fig. 3: test balanced accuracy and macro F1 of several results.json, mean and std over trials."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise datasets.DataError(f"--compare {path}: not a readable results.json ({e})") from None
        if "mean" not in results[-1]:
            raise datasets.DataError(f"--compare {path}: not a results.json from linear_eval.py (no 'mean')")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(results), 3.8))
    x = np.arange(len(results))
    for offset, metric in ((-0.2, "balanced_accuracy"), (0.2, "macro_f1")):
        ax.bar(x + offset, [r["mean"][metric] for r in results], 0.4, yerr=[r["std"][metric] for r in results],
               capsize=3, label=metric.replace("_", " "))
    ax.set_xticks(x, [r["model"] for r in results], rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="test score", title=f"linear evaluation, {results[0]['data']} (mean ± std over trials)")
    ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "compare.png", dpi=110)
    for r in results:
        print(f"{r['model']:>40}  balanced accuracy {r['mean']['balanced_accuracy']:.4f} ± "
              f"{r['std']['balanced_accuracy']:.4f}  macro F1 {r['mean']['macro_f1']:.4f} ± {r['std']['macro_f1']:.4f}")
    print(f"wrote {out / 'compare.png'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets.add_data_args(parser)
    model = parser.add_argument_group("backbone: --ckpt, or --init for a network as released")
    model.add_argument("--ckpt", type=Path, help="backbone.pt or a backbone_epN.pt snapshot from pretrain.py")
    model.add_argument("--init", choices=("bit-s", "bit-m", "scratch"), help="instead of --ckpt")
    model.add_argument("--arch", choices=ARCHS, default="r50x1")
    model.add_argument("--norm", choices=("gn", "bn"), default="gn", help="with --init: gn (as released, default)")
    model.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, help="with --init; default: <= 64 px")
    probe = parser.add_argument_group("linear classifier")
    probe.add_argument("--gamma", type=float, default=4.0, help="focal loss gamma (paper §4.4); 0: cross-entropy")
    probe.add_argument("--epochs", type=int, default=100)
    probe.add_argument("--batch-size", type=int, default=256)
    probe.add_argument("--lr", type=float, default=1e-3, help="Adam")
    probe.add_argument("--weight-decay", type=float, default=0.0)
    probe.add_argument("--trials", type=int, default=3, help="seeds --seed, --seed+1, ...")
    probe.add_argument("--augment", action="store_true",
                       help="train on randomly cropped and flipped views, embedded anew every epoch (slow; off by "
                            "default: the paper's frozen features)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, help="default: linear/ beside --ckpt, else runs/linear-INIT")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--compare", nargs="+", type=Path, metavar="RESULTS", help="draw results.json files side by side")
    args = parser.parse_args(argv)
    if not args.compare and (args.ckpt is None) == (args.init is None):
        parser.error("give either --ckpt FILE or --init bit-s|bit-m|scratch (or --compare)")
    if min(args.epochs, args.trials, args.batch_size) < 1:
        parser.error("--epochs, --trials and --batch-size must be positive")
    args.out = args.out or (args.ckpt.parent / "linear" if args.ckpt else Path("runs") / f"linear-{args.init}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, args.out)
    device = torch.device(args.device)
    data = datasets.load_data(args)
    backbone, meta, name, identity = load_model(args, args.ckpt, args.init)
    backbone.to(device).requires_grad_(False)
    split, split_file = resolve_split(args, data, args.ckpt, [meta])
    estimate_statistics_if_untrained(backbone, meta, data, split, args, device)
    train, val, test = (part_features(backbone, identity, data, split, part, args, device)
                        for part in ("train", "val", "test"))
    augmented = augmented_features(backbone, data, split, args, device) if args.augment else None
    n_classes = len(data.classes)
    trials = []
    for seed in range(args.seed, args.seed + args.trials):
        classify, epoch = train_linear(train, val, n_classes, args, seed, augmented)
        with torch.no_grad():
            val_predictions, test_predictions = classify(val[0]).argmax(1), classify(test[0]).argmax(1)
        trials.append({"seed": seed, "best_epoch": epoch,
                       "val_balanced_accuracy": float(balanced_accuracy_score(val[1], val_predictions)),
                       **scores(test[1].numpy(), test_predictions.numpy(), n_classes)})
        print(f"trial {seed}: epoch {epoch} chosen on val; test balanced accuracy "
              f"{trials[-1]['balanced_accuracy']:.4f}, macro F1 {trials[-1]['macro_f1']:.4f}")
    metrics = ("balanced_accuracy", "macro_f1", "accuracy")
    results = {"model": name, "checkpoint": str(args.ckpt or args.init), "data": data.name,
               "split_file": str(split_file), "classes": list(data.classes), "trials": trials,
               "mean": {m: float(np.mean([t[m] for t in trials])) for m in metrics},
               "std": {m: float(np.std([t[m] for t in trials], ddof=1)) if len(trials) > 1 else 0.0 for m in metrics},
               "args": to_json(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    confusion = np.sum([t["confusion"] for t in trials], axis=0)
    recall = confusion / confusion.sum(1, keepdims=True).clip(min=1)
    display = ConfusionMatrixDisplay(recall, display_labels=data.classes)
    display.plot(values_format=".2f", cmap="Blues", colorbar=False, xticks_rotation=45)
    display.ax_.set_title(f"{name}\ntest, recall per true class, {args.trials} trial(s)", fontsize=9)
    display.figure_.tight_layout()
    display.figure_.savefig(args.out / "confusion.png", dpi=110)
    print(f"{name}: test balanced accuracy {results['mean']['balanced_accuracy']:.4f} ± "
          f"{results['std']['balanced_accuracy']:.4f}, macro F1 {results['mean']['macro_f1']:.4f} ± "
          f"{results['std']['macro_f1']:.4f} over {args.trials} trial(s); wrote {args.out}/results.json")


if __name__ == "__main__":
    try:
        main()
    except (datasets.DataError, WeightsError) as e:
        sys.exit(f"linear_eval.py: error: {e}")
