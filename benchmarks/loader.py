"""How fast the pretraining loader delivers SimSiam's two views: JPEGs decoded every epoch vs the decode-once
cache.

    python benchmarks/loader.py                  # 600x450 stand-in JPEGs, made in a temporary dir
    python benchmarks/loader.py --data-root PATH_TO_HAM10000     # the real images

Prints images per second (two 224-px views each) through a DataLoader with --workers processes, for decode
each time: read_rgb (JPEG decode at reduced scale + resize) then the views, as a loader without a cache does;
decoded cache:    the views alone, from the memory-mapped array that datasets.py builds once; how long
building the cache took, and the milliseconds one process spends on each stage of one image.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets  # noqa: E402
import image_cache  # noqa: E402
import views  # noqa: E402


class DecodeEachTime(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size, self.view = paths, size, views.simsiam_view(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.fromarray(image_cache.read_rgb(self.paths[i], self.size))
        return [v2.functional.pil_to_tensor(self.view(image)) for _ in range(2)]


def stand_in_jpegs(folder, n):
    """Smooth 600x450 images with a little noise: they compress and decode like photographs, unlike pure
    noise."""
    y, x = np.mgrid[0:450, 0:600]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        f = rng.uniform(15, 60, 3)
        image = np.stack([np.sin(x / f[c] + y / (f[c] * 1.7) + c) for c in range(3)], -1) * 70 + 128
        image += rng.normal(0, 6, image.shape)
        paths.append(folder / f"ISIC_{24306 + i:07d}.jpg")
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def images_per_second(dataset, workers, batch_size):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    next(iter(loader))  # workers started, files in the page cache
    tic, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch[0])
    return count / (time.perf_counter() - tic)


def milliseconds(work, items):
    tic = time.perf_counter()
    for item in items:
        work(item)
    return 1000 * (time.perf_counter() - tic) / len(items)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, help="a folder of JPEGs (default: make stand-ins)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data_root:
            paths = sorted(args.data_root.rglob("*.jpg"))[: args.images]
        else:
            (tmp / "images").mkdir()
            paths = stand_in_jpegs(tmp / "images", args.images)
        source_size = Image.open(paths[0]).size
        tic = time.perf_counter()
        images, _ = image_cache.decode_all(paths, args.size, tmp / "cache", skip_bad=False)
        built = time.perf_counter() - tic
        cached = views.ImageSet(
            datasets.Data("bench", images, np.zeros(len(paths), np.int64), list(range(len(paths))), ("x",)),
            np.arange(len(paths)),
            [views.simsiam_view(args.size)] * 2,
        )
        before = images_per_second(DecodeEachTime(paths, args.size), args.workers, args.batch_size)
        after = images_per_second(cached, args.workers, args.batch_size)
        torch.set_num_threads(1)
        decode = milliseconds(lambda path: image_cache.read_rgb(path, args.size), paths[:64])
        per_item = milliseconds(cached.__getitem__, range(64))
    print(
        f"{len(paths)} images of {source_size[0]}x{source_size[1]} -> two {args.size}-px "
        f"views, {args.workers} workers, batch {args.batch_size}, torch {torch.__version__}"
    )
    print(f"decode each time: {before:8.1f} images/s")
    print(f"decoded cache:    {after:8.1f} images/s   ({after / before:.2f}x)")
    print(f"building the cache: {built:.1f} s ({len(paths) / built:.0f} images/s, all cores)")
    print(f"one process, per image: decode + resize {decode:.1f} ms, two SimSiam views {per_item:.1f} ms")


if __name__ == "__main__":
    main()
