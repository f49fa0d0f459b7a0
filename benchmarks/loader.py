"""How fast the pretraining loader delivers SimSiam's two views at steady state: pretrain.py's own DataLoader
(pretrain.pretrain_loader: datasets.ImageSet, datasets.SeededSampler, persistent workers), epoch after epoch,
on a stand-in of HAM10000's size; from the decode-once cache that the scripts read, and, for comparison, with
every JPEG decoded again each time it is read.

    python benchmarks/loader.py                          # 6,009 stand-in 600x450 JPEGs, 3 epochs, batch 128
    python benchmarks/loader.py --images 512 --batch-size 64 --workers 2     # a quick run on a small machine
    python benchmarks/loader.py --data-root PATH_TO_HAM10000                # the real images

Prints images per second (two 224-px views each) of the first epoch, which starts the workers and fills the
pipeline, apart from the epochs after it (the steady state, each epoch and all of them together), and the
fraction of each epoch's time spent waiting for the next batch, as pretrain.py's `data_wait`: after each batch
the main process stands in for a model step of --step-img-per-s images per second (it sleeps, as it does while
a GPU computes, leaving the CPUs to the workers; 0: no step, the loader alone, which then waits all the time).
Also how long building the cache took, and the milliseconds one process spends decoding an image and making
its two views. The epochs after the first must give each worker at least 4 batches, so that the figure is not
the filling of the pipeline again.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bit_common  # noqa: E402
import datasets  # noqa: E402
import pretrain  # noqa: E402
from bit_common import ArgumentParser, UserError, device_name, run  # noqa: E402

HAM10000_PRETRAIN = 6009  # 60 % of HAM10000's 10,015 images pretrain (Lu et al. §3)
DISTINCT = 64  # stand-in pictures; the other files are copies (each file is still read and decoded)
# SimSiam R50x1, 224 px, batch 128, bf16, channels-last, the model alone: benchmarks/gpu_check.py on an
# NVIDIA H200 (benchmarks/results/gpu_check-h200-1.json, its path model-only-channels-last)
MODEL_IMG_PER_S = 1697


def stand_in_jpegs(folder, n):
    """n files named as HAM10000's, 600x450 JPEGs of smooth images with a little noise: they compress and
    decode like photographs, unlike pure noise. DISTINCT pictures made, the rest copies of them."""
    y, x = np.mgrid[0:450, 0:600]
    rng = np.random.default_rng(0)
    paths = [folder / f"ISIC_{24306 + i:07d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        if i < DISTINCT:
            f = rng.uniform(15, 60, 3)
            image = np.stack([np.sin(x / f[c] + y / (f[c] * 1.7) + c) for c in range(3)], -1) * 70 + 128
            image += rng.normal(0, 6, image.shape)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        else:
            shutil.copyfile(paths[i % DISTINCT], path)
    return paths


class DecodedEachTime:
    """The images as a sequence that reads and decodes the file at every access (what a loader without the
    cache does); datasets.ImageSet indexes it as it indexes the cache's array."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return bit_common.read_rgb(self.paths[i], self.size)


def as_data(images):
    return datasets.Data("bench", images, np.zeros(len(images), np.int64), list(range(len(images))), ("x",))


def epochs(images, args, device):
    """(images, seconds, seconds waiting for a batch) of each epoch through pretrain.py's loader of SimSiam's
    views, a model step of args.step_img_per_s after each batch."""
    data = as_data(images)
    settings = SimpleNamespace(
        image_size=args.size, batch_size=args.batch_size, seed=0, workers=args.workers, views_on="loader"
    )
    method = SimpleNamespace(views=("simsiam", "simsiam"))
    loader, sampler, _, _ = pretrain.pretrain_loader(
        data, {"pretrain": data.ids}, method, settings, 0, 1, device
    )
    timed = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        tic, count, waited = time.perf_counter(), 0, 0.0
        batches = iter(loader)
        while True:  # as pretrain.py's loop: the wait is next()'s
            wait = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - wait
            if batch is None:
                break
            count += len(batch[0])
            if args.step_img_per_s:
                time.sleep(len(batch[0]) / args.step_img_per_s)
        timed.append((count, time.perf_counter() - tic, waited))
    return timed


def milliseconds(work, items):
    tic = time.perf_counter()
    for item in items:
        work(item)
    return 1000 * (time.perf_counter() - tic) / len(items)


def row(name, timed):
    """The first epoch's images per second and waiting fraction, then the later epochs' together, then each
    later epoch's images per second."""
    (count, seconds, waited), later = timed[0], timed[1:]
    steady = sum(c for c, _, _ in later) / sum(s for _, s, _ in later)
    steady_wait = sum(w for _, _, w in later) / sum(s for _, s, _ in later)
    each = ", ".join(f"{c / s:.0f}" for c, s, _ in later)
    return (
        f"{name:26s} {count / seconds:10.1f} {waited / seconds:6.0%} {steady:12.1f} {steady_wait:6.0%}"
        f"   (each: {each})"
    )


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="a folder of JPEGs (default: make stand-ins)")
    parser.add_argument("--images", type=int, default=HAM10000_PRETRAIN)
    parser.add_argument("--size", type=int, default=224)  # the paper's image size (§3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count()))  # the scripts' default
    parser.add_argument("--batch-size", type=int, default=128)  # the paper's batch (§4.1)
    parser.add_argument(
        "--step-img-per-s",
        type=bit_common.NON_NEGATIVE,
        default=MODEL_IMG_PER_S,
        help="the model step stood in for after each batch, in images/s "
        f"(default {MODEL_IMG_PER_S}: SimSiam R50x1 alone on an H200); 0: none",
    )
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--skip-decode-each-time", action="store_true", help="measure the decode-once cache alone"
    )
    args = parser.parse_args()
    for flag, value, least in (
        ("--images", args.images, 1),
        ("--size", args.size, 1),
        ("--epochs", args.epochs, 2),
        ("--workers", args.workers, 0),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < least:
            raise UserError(f"{flag} {value}: expected at least {least}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data_root:
            paths = sorted(args.data_root.rglob("*.jpg"))[: args.images]
            if not paths:
                raise UserError(f"--data-root {args.data_root}: no .jpg files there")
        batches = (len(paths) if args.data_root else args.images) // args.batch_size
        if batches * (args.epochs - 1) < 4 * max(args.workers, 1):
            raise UserError(
                f"batches of {args.batch_size} in {args.epochs - 1} epoch(s) after the first give "
                f"{args.workers} worker(s) fewer than 4 batches each: use more --images or --epochs, or "
                "fewer --workers"
            )
        if not args.data_root:
            (tmp / "images").mkdir()
            paths = stand_in_jpegs(tmp / "images", args.images)
        with Image.open(paths[0]) as first:
            source_size = first.size
        tic = time.perf_counter()
        images, _ = bit_common.decode_all(paths, args.size, tmp / "cache", skip_bad=False)
        built = time.perf_counter() - tic
        device = torch.device(args.device)
        cached = epochs(images, args, device)
        decoded = (
            None if args.skip_decode_each_time else epochs(DecodedEachTime(paths, args.size), args, device)
        )
        torch.set_num_threads(1)
        decode = milliseconds(lambda path: bit_common.read_rgb(path, args.size), paths[:64])
        two_views = datasets.ImageSet(
            as_data(images), np.arange(len(paths)), [datasets.simsiam_view(args.size)] * 2
        )
        per_item = milliseconds(two_views.__getitem__, range(min(64, len(paths))))
    print(
        f"{len(paths)} images of {source_size[0]}x{source_size[1]} -> two {args.size}-px SimSiam views; "
        f"workers {args.workers}, batch {args.batch_size} ({batches} batches an epoch), "
        f"{args.epochs} epochs; torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    step = f"a model step of {args.step_img_per_s:g} images/s" if args.step_img_per_s else "no model step"
    print(f"after each batch: {step}; wait: the fraction of the time spent waiting for the next batch")
    later = f"epochs 2-{args.epochs}"
    print(f"{'images/s, wait':26s} {'epoch 1':>17s} {later:>19s}")
    print(row("decode-once cache", cached))
    if decoded:
        print(row("JPEG decoded every time", decoded))
    print(f"building the cache: {built:.1f} s ({len(paths) / built:.0f} images/s, all cores)")
    print(f"one process, per image: decode + resize {decode:.1f} ms, two SimSiam views {per_item:.1f} ms")


if __name__ == "__main__":
    run(main)
