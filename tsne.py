"""t-SNE of test-image embeddings (paper Fig. 4, Fig. 5) and their covariance spectra (dimensional collapse).

    python tsne.py --ckpt runs/ham-bit-m/backbone_ep25.pt runs/ham-bit-m/backbone.pt --init bit-s bit-m \\
                   --data ham10000 --data-root PATH --out figures --spectrum

One row per model: "Binary" colours the most frequent class against all others (nv vs non-nv on HAM10000, as
the paper); "Sub-classes" runs t-SNE on the other classes alone (the six non-nv lesion types). --spectrum adds
spectrum.png: the eigenvalues of each model's embedding covariance on a log scale (Jing et al. 2022), with
RankMe.
"""

import argparse
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.manifold import TSNE

import datasets
import eval_common
from bit_common import SEED, ArgumentParser, UserError, device_name, output_dir, path_arg, run, write_atomic
from bit_convert import add_backbone_args, rankme, read_backbone_file, resolve_backbone_args
from eval_common import initial_backbone, saved_backbone

matplotlib.use("Agg")


def tsne_2d(features, seed):
    """2-d t-SNE (van der Maaten & Hinton 2008) with scikit-learn's defaults, PCA init and a fixed seed."""
    perplexity = min(30.0, (len(features) - 1) / 3)  # scikit-learn needs perplexity < n
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features.numpy())


def scatter(ax, points, labels, names, title):
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        chosen = labels == k
        ax.scatter(
            points[chosen, 0], points[chosen, 1], s=6, color=colours(k), label=f"{name} ({chosen.sum()})"
        )
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets.add_data_args(parser)
    add_backbone_args(parser, norm_default="gn")
    models = parser.add_argument_group("models: any number of --ckpt files and --init networks")
    models.add_argument(
        "--ckpt", type=path_arg, nargs="*", default=[], help="backbone files from pretrain.py"
    )
    models.add_argument(
        "--init",
        nargs="*",
        default=[],
        choices=("bit-s", "bit-m", "scratch"),
        help="networks as released (with the backbone flags)",
    )
    parser.add_argument("--spectrum", action="store_true", help="also draw spectrum.png")
    parser.add_argument("--out", type=path_arg, default=Path("figures"))
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.ckpt and not args.init:
        raise UserError("give at least one --ckpt FILE or --init bit-s|bit-m|scratch")
    records = [read_backbone_file(c) for c in args.ckpt]
    for path, record in zip(args.ckpt, records):  # a flag that contradicts a file is refused, as everywhere
        resolve_backbone_args(argparse.Namespace(**vars(args)), "gn", 0, record, path)
    sizes = {record.get("image_size") for record in records} - {None}
    if len(sizes) > 1 and not args.image_size:
        raise UserError(f"the --ckpt files were pretrained at {sorted(sizes)} px: give one --image-size")
    recorded = {"image_size": sizes.pop()} if sizes else None  # the --init networks take the backbone flags
    resolve_backbone_args(
        args, "gn", datasets.DEFAULT_SIZE[args.data], recorded, args.ckpt[0] if args.ckpt else None
    )
    output_dir(args.out)  # before the embeddings are computed
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    data = datasets.data_from_args(args)
    models = [saved_backbone(c) for c in args.ckpt] + [
        initial_backbone(i, args.arch, args.norm, args.cifar_stem, args.ws, args.seed) for i in args.init
    ]
    split, split_file = eval_common.pretraining_split(
        data,
        args.split_file,
        args.ckpt[0] if args.ckpt else None,
        [m[1] for m in models],
        args.split,
        args.split_seed,
        args.split_by,
    )
    majority = int(np.bincount(data.labels, minlength=len(data.classes)).argmax())
    others_in_test = int(np.sum(data.labels[datasets.indices(data, split, "test")] != majority))
    if others_in_test < 2:  # t-SNE's perplexity must be below the number of points, and above 0
        raise UserError(
            f"split file {split_file}: the test part holds {others_in_test} image(s) outside the most "
            f"frequent class ({data.classes[majority]}); the Sub-classes t-SNE needs two or more"
        )
    embeddings = []
    for backbone, meta, name, digest in models:
        backbone.to(device)
        eval_common.estimate_statistics_if_untrained(backbone, meta, data, split, args.image_size, device)
        features, labels = eval_common.part_features(
            backbone, digest, data, split, "test", args.image_size, args.cache_dir, args.workers, device
        )
        embeddings.append((name, features, labels.numpy()))
        backbone.cpu()

    others = [k for k in range(len(data.classes)) if k != majority]
    fig, axes = plt.subplots(len(embeddings), 2, figsize=(10, 4.6 * len(embeddings)), squeeze=False)
    for row, (name, features, labels) in zip(axes, embeddings):
        binary = (labels != majority).astype(int)
        scatter(
            row[0],
            tsne_2d(features, args.seed),
            binary,
            [data.classes[majority], f"not {data.classes[majority]}"],
            f"{name}\nBinary",
        )
        rest = binary == 1
        sub_labels = np.searchsorted(others, labels[rest])
        scatter(
            row[1],
            tsne_2d(features[rest], args.seed),
            sub_labels,
            [data.classes[k] for k in others],
            f"{name}\nSub-classes",
        )
    fig.suptitle(f"t-SNE of {data.name} test embeddings", fontsize=11)
    fig.tight_layout()
    write_atomic(args.out / "tsne.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    print(f"wrote {args.out / 'tsne.png'}")
    if args.spectrum:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for name, features, _ in embeddings:
            label = f"{name} (RankMe {rankme(features):.1f})"
            ax.semilogy(covariance_spectrum(features).clamp(min=1e-12).numpy(), label=label)
        title = (
            f"embedding covariance spectrum, {data.name} test\n(a tail falling to ~0: collapsed dimensions)"
        )
        ax.set(xlabel="rank", ylabel="eigenvalue", title=title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        write_atomic(args.out / "spectrum.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        print(f"wrote {args.out / 'spectrum.png'}")


def covariance_spectrum(features):
    """Eigenvalues, largest first, of the covariance of L2-normalised features: the spectrum whose tail
    falling to zero shows a dimensional collapse (Jing et al., ICLR 2022, §3 and their spectrum.py)."""
    z = F.normalize(features.double(), dim=1)
    z = z - z.mean(0)
    spectrum = torch.linalg.svdvals(z) ** 2 / len(
        z
    )  # the covariance z'z/N has the squares of z's singular values
    return spectrum[: len(z) - 1]  # centring removes one dimension: N points span at most N - 1


if __name__ == "__main__":
    run(main)
