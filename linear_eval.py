"""Linear evaluation (paper §4.4, Fig. 3): a linear classifier on frozen backbone features, trained with focal
loss on the `train` part as the authors' evaluation code trains it (SGD, lr 3 x batch/256, batch 128, 60
epochs), selected by balanced accuracy on `val`, and scored once on `test`; --trials seeds, mean and std.

    python linear_eval.py --ckpt runs/ham-bit-m/backbone.pt --data ham10000 --data-root PATH   # pretrained
    python linear_eval.py --init bit-m --data ham10000 --data-root PATH      # BiT-M as released (GN, frozen)
    python linear_eval.py --compare runs/*/linear/results.json --out figures   # the Fig. 3 chart

The features of each part are computed once and cached (keyed by the checkpoint's bytes, the split and the
image size), so the classifier trains in seconds. Writes results.json and confusion.png under --out.
"""

import argparse
import json
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
)
from sklearn.preprocessing import StandardScaler
from torchvision.transforms import v2

import datasets
import eval_common
from bit_common import (
    MOMENTUM,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    ArgumentParser,
    UserError,
    device_name,
    output_dir,
    path_arg,
    require_regular_file,
    run,
    to_json,
    write_atomic,
)
from bit_convert import add_backbone_args, embed, read_backbone_file, resolve_backbone_args
from eval_common import check_trial_seeds, initial_backbone, saved_backbone

matplotlib.use("Agg")


def standardiser(features):
    """(mean, scale) of the train features, from scikit-learn's StandardScaler: features of BN and GN
    backbones live on very different scales. A feature constant on train (a dead ReLU unit) gets the scale 1,
    not a tiny one that would blow up its values on other images."""
    scaler = StandardScaler().fit(features.double().numpy())
    return torch.tensor(scaler.mean_, dtype=features.dtype), torch.tensor(scaler.scale_, dtype=features.dtype)


def train_linear(train, val, n_classes, args, seed, augmented=None, select=True):
    """A linear classifier on standardised features, SGD with --momentum and --weight-decay, its lr a cosine
    from --lr x batch/256 to 0 over all steps, --epochs passes over `train` (features, labels) in batches of
    --batch-size, or over augmented() if given, new train features each epoch. Returns the classifier of the
    epoch with the best balanced accuracy on `val` (of the last epoch if not `select`), and that epoch. It
    never sees test data."""
    generator = torch.Generator().manual_seed(seed)
    (x, y), (val_x, val_y) = train, val
    mean, std = standardiser(x)
    classifier = nn.Linear(x.shape[1], n_classes)
    nn.init.normal_(classifier.weight, std=0.01, generator=generator)  # as SimSiam's main_lincls.py
    nn.init.zeros_(classifier.bias)
    peak = args.lr * args.batch_size / 256  # the linear scaling rule, as the authors' code (base_lr x bs/256)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=peak, momentum=args.momentum, weight_decay=args.weight_decay
    )
    steps = math.ceil(len(y) / args.batch_size)  # a last, smaller batch too (their loader keeps it)
    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, args.epochs + 1):
        epoch_x = augmented() if augmented else x
        for step, batch in enumerate(torch.randperm(len(y), generator=generator).split(args.batch_size)):
            # their LR_Scheduler (warm-up 0, final lr 0) sets the lr after each step, so that its first two
            # steps both take the peak; here step k of K takes peak (1 + cos(pi k / K)) / 2
            optimizer.param_groups[0]["lr"] = cosine_lr(peak, (epoch - 1) * steps + step, args.epochs * steps)
            loss = focal_loss(classifier((epoch_x[batch] - mean) / std), y[batch], args.gamma)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predictions = classifier((val_x - mean) / std).argmax(1)
        score = balanced_accuracy_score(val_y.numpy(), predictions.numpy()) if select else epoch
        if score > best:  # the first epoch of the best score
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in classifier.state_dict().items()}
    classifier.load_state_dict(best_state)
    return lambda features: classifier((features - mean) / std), best_epoch


def augmented_features(backbone, data, split, args, device):
    """--augment: a function giving new features of randomly cropped and flipped train images at every
    call."""
    view = v2.Compose([v2.RandomResizedCrop(args.image_size), v2.RandomHorizontalFlip()])
    train_set = datasets.ImageSet(data, datasets.indices(data, split, "train"), [view])
    loader = torch.utils.data.DataLoader(train_set, batch_size=256, num_workers=args.workers)
    return lambda: eval_common.check_features(
        embed(backbone, torch.cat([images for images, _ in loader]), device).cpu(), "train"
    )


def compare(paths, out):
    """The paper's Fig. 3: test balanced accuracy and macro F1 of several results.json, mean and std over
    trials."""
    results = []
    for path in paths:
        require_regular_file(path)
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--compare {path}: not a readable results.json ({type(e).__name__})") from None
        if (
            not isinstance(results[-1], dict)
            or any(k not in results[-1] for k in ("model", "data", "mean", "std"))
            or not all(isinstance(results[-1][k], str) for k in ("model", "data"))
        ):
            raise UserError(
                f"--compare {path}: not a results.json of linear_eval.py or finetune.py (expected the "
                "keys model, data (strings), mean, std)"
            )
        for key in ("mean", "std"):
            scores_of = results[-1][key]
            drawn = ("balanced_accuracy", "macro_f1")
            if not isinstance(scores_of, dict) or not all(
                type(scores_of.get(m)) in (int, float) and 0 <= scores_of[m] <= 1 for m in drawn
            ):  # scores and their std lie in [0, 1]; NaN lies nowhere
                raise UserError(
                    f"--compare {path}: {key} is not a dict with the numbers {key}.balanced_accuracy and "
                    f"{key}.macro_f1, both finite, from 0 to 1"
                )
    output_dir(out)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(results), 3.8))
    x = np.arange(len(results))
    for offset, metric in ((-0.2, "balanced_accuracy"), (0.2, "macro_f1")):
        ax.bar(
            x + offset,
            [r["mean"][metric] for r in results],
            0.4,
            yerr=[r["std"][metric] for r in results],
            capsize=3,
            label=metric.replace("_", " "),
        )
    ax.set_xticks(x, [r["model"] for r in results], rotation=20, ha="right", fontsize=8)
    ax.set(
        ylim=(0, 1), ylabel="test score", title=f"test scores, {results[0]['data']} (mean ± std over trials)"
    )
    ax.legend()
    fig.tight_layout()
    write_atomic(out / "compare.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    for r in results:
        print(
            f"{r['model']:>40}  balanced accuracy {r['mean']['balanced_accuracy']:.4f} ± "
            f"{r['std']['balanced_accuracy']:.4f}  macro F1 {r['mean']['macro_f1']:.4f} ± "
            f"{r['std']['macro_f1']:.4f}"
        )
    print(f"wrote {out / 'compare.png'}")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets.add_data_args(parser)
    add_backbone_args(parser, norm_default="gn")
    model = parser.add_argument_group("model: --ckpt, or --init for a network as released")
    model.add_argument(
        "--ckpt", type=path_arg, help="backbone.pt or a backbone_epN.pt snapshot from pretrain.py"
    )
    model.add_argument("--init", choices=("bit-s", "bit-m", "scratch"), help="instead of --ckpt")
    # the paper gives the loss, the metrics and the trials (§4.4); the optimiser and its schedule are those
    # of the authors' evaluation code (BiT-SimSiam linear_re_eval.py, the eval section of its HAM configs:
    # SGD, momentum 0.9, weight decay 0, base_lr 3 x batch_size/256, a cosine to final_lr 0 without warm-up,
    # batch 128, 60 epochs)
    probe = parser.add_argument_group("linear classifier (the authors' evaluation recipe)")
    probe.add_argument(
        "--gamma", type=NON_NEGATIVE, default=4.0, help="focal loss gamma (paper §4.4); 0: cross-entropy"
    )
    probe.add_argument("--epochs", type=POSITIVE_INT, default=60)
    probe.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    probe.add_argument(
        "--lr",
        type=POSITIVE,
        default=3.0,
        help="SGD's base lr, scaled by batch-size/256 (default 3: 1.5 at batch 128), a cosine to 0",
    )
    probe.add_argument("--momentum", type=MOMENTUM, default=0.9, help="SGD's (default 0.9)")
    probe.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    probe.add_argument(
        "--trials", type=POSITIVE_INT, default=3, help="seeds --seed, --seed+1, ... (3: the paper's §4.4)"
    )
    probe.add_argument(
        "--augment",
        action="store_true",
        help="train on randomly cropped and flipped views, embedded anew every epoch, as the authors' code "
        "(slow; off by default: the features of the evaluation view, embedded once)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=path_arg, help="default: linear/ beside --ckpt, else runs/linear-INIT")
    run.add_argument("--seed", type=SEED, default=0)
    run.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument(
        "--compare", nargs="+", type=path_arg, metavar="RESULTS", help="draw results.json files side by side"
    )
    args = parser.parse_args(argv)
    if args.compare:
        args.out = args.out or Path("figures")
        return args
    if (args.ckpt is None) == (args.init is None):
        raise UserError("give either --ckpt FILE or --init bit-s|bit-m|scratch (or --compare)")
    check_trial_seeds(args.seed, args.trials)
    recorded = read_backbone_file(args.ckpt) if args.ckpt else None
    resolve_backbone_args(args, "gn", datasets.DEFAULT_SIZE[args.data], recorded, args.ckpt)
    args.out = args.out or (
        args.ckpt.parent / "linear" if args.ckpt else Path("runs") / f"linear-{args.init}"
    )
    output_dir(args.out)  # before the features are computed
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, args.out)
    device = torch.device(args.device)
    data = datasets.data_from_args(args)
    backbone, meta, name, digest = (
        saved_backbone(args.ckpt)
        if args.ckpt
        else initial_backbone(args.init, args.arch, args.norm, args.cifar_stem, args.ws, args.seed)
    )
    backbone.to(device).requires_grad_(False)
    split, split_file = eval_common.pretraining_split(
        data, args.split_file, args.ckpt, [meta], args.split, args.split_seed, args.split_by
    )
    args.split, args.split_seed, args.split_by = datasets.split_settings(
        split
    )  # results.json records those used
    eval_common.estimate_statistics_if_untrained(backbone, meta, data, split, args.image_size, device)
    train, val, test = (
        eval_common.part_features(
            backbone, digest, data, split, part, args.image_size, args.cache_dir, args.workers, device
        )
        for part in ("train", "val", "test")
    )
    augmented = augmented_features(backbone, data, split, args, device) if args.augment else None
    n_classes = len(data.classes)
    trials = []
    for seed in range(args.seed, args.seed + args.trials):
        classify, epoch = train_linear(
            train, val, n_classes, args, seed, augmented, eval_common.selects_on_val(split)
        )
        with torch.no_grad():
            val_predictions, test_predictions = classify(val[0]).argmax(1), classify(test[0]).argmax(1)
        trials.append(
            {
                "seed": seed,
                "best_epoch": epoch,
                "val_balanced_accuracy": float(balanced_accuracy_score(val[1], val_predictions)),
                **scores(test[1].numpy(), test_predictions.numpy(), n_classes),
            }
        )
        print(
            f"trial {seed}: epoch {epoch} chosen on val; test balanced accuracy "
            f"{trials[-1]['balanced_accuracy']:.4f}, macro F1 {trials[-1]['macro_f1']:.4f}"
        )
    results = {
        "model": name,
        "checkpoint": str(args.ckpt or args.init),
        "data": data.name,
        "split_file": str(split_file),
        "classes": list(data.classes),
        "args": to_json(args),
    }
    summary = write_results(args.out, results, trials)
    confusion = np.sum([t["confusion"] for t in trials], axis=0)
    recall = confusion / confusion.sum(1, keepdims=True).clip(min=1)
    display = ConfusionMatrixDisplay(recall, display_labels=data.classes)
    display.plot(values_format=".2f", cmap="Blues", colorbar=False, xticks_rotation=45)
    display.ax_.set_title(f"{name}\ntest, recall per true class, {args.trials} trial(s)", fontsize=9)
    display.figure_.tight_layout()
    write_atomic(args.out / "confusion.png", lambda tmp: display.figure_.savefig(tmp, dpi=110, format="png"))
    print(summary)


def focal_loss(logits, target, gamma=4.0):
    """Multi-class focal loss, FL = -(1 - p_t)^gamma log p_t, p_t the softmax probability of the true class
    (Lin et al. 2017, Eq. 4); gamma = 0 is cross-entropy. Mean over the batch."""
    log_pt = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def cosine_lr(peak, done, total):
    """The lr of a step after `done` of `total` steps: a cosine from `peak` to 0 without warm-up (Loshchilov &
    Hutter 2017), the schedule of the linear probe and of fine-tuning."""
    return peak * 0.5 * (1 + math.cos(math.pi * done / total))


def scores(truth, predictions, n_classes):
    """The paper's metrics (§4.4: balanced accuracy, macro F1) and what explains them, from scikit-learn."""
    labels = list(range(n_classes))
    return {
        "balanced_accuracy": float(balanced_accuracy_score(truth, predictions)),
        "macro_f1": float(f1_score(truth, predictions, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(np.mean(truth == predictions)),
        "per_class_recall": recall_score(
            truth, predictions, labels=labels, average=None, zero_division=0
        ).tolist(),
        "confusion": confusion_matrix(truth, predictions, labels=labels).tolist(),
    }


def write_results(out, results, trials):
    """OUT/results.json, the file `linear_eval.py --compare` draws: `results` (model, checkpoint, data, ...),
    the trials, and the mean and sample std of their test scores. Returns the line that summarises it."""
    metrics = ("balanced_accuracy", "macro_f1", "accuracy")
    mean = {m: float(np.mean([t[m] for t in trials])) for m in metrics}
    std = {m: float(np.std([t[m] for t in trials], ddof=1)) if len(trials) > 1 else 0.0 for m in metrics}
    text = json.dumps({**results, "trials": trials, "mean": mean, "std": std}, indent=1) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(text))
    return (
        f"{results['model']}: test balanced accuracy {mean['balanced_accuracy']:.4f} ± "
        f"{std['balanced_accuracy']:.4f}, macro F1 {mean['macro_f1']:.4f} ± {std['macro_f1']:.4f} over "
        f"{len(trials)} trial(s); wrote {out / 'results.json'}"
    )


if __name__ == "__main__":
    run(main)
