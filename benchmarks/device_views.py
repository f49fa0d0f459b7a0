"""How fast device_views.py draws a method's views: a batch of uint8 images already on the device (as the
decode-once cache would put them there), each image's views drawn there.

    python benchmarks/device_views.py                           # CUDA if present, else the CPU
    python benchmarks/device_views.py --device cpu --batches 2  # 128 images of 224 px, two SimSiam views
    python benchmarks/device_views.py --views simsiam,simsiam byol1,byol2 swav,swav,swav_small,swav_small

For each set of views (names of device_views.RECIPES, one per view, as the methods' views tuples), after one
batch to warm up, the mean over --batches batches of: the parameters drawn on the CPU in this one process
(device_views.draw_params: what one DataLoader worker would spend on a batch), the pixels rendered on the
device (device_views.render, the device synchronised before the clock stops), and both in turn; as images per
second and milliseconds a batch. On CUDA also the peak memory of the rendering.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import device_views  # noqa: E402
from bit_common import ArgumentParser, UserError, device_name, run  # noqa: E402


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(images, names, size, batches):
    """Seconds a batch (mean over `batches` after one to warm up) for drawing the parameters and rendering."""
    height, width = images.shape[-2:]
    draw, render = [], []
    for batch in range(batches + 1):
        seeds = range(batch * len(images), (batch + 1) * len(images))
        tic = time.perf_counter()
        params = [
            device_views.draw_params(name, size, seeds, d, height, width) for d, name in enumerate(names)
        ]
        drawn = time.perf_counter()
        synchronise(images.device)
        start = time.perf_counter()
        for name, p in zip(names, params):
            device_views.render(images, p, name, size)
        synchronise(images.device)
        if batch:  # the first batch warms up (allocator, cuDNN's choice of kernels)
            draw.append(drawn - tic)
            render.append(time.perf_counter() - start)
    return sum(draw) / batches, sum(render) / batches


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)  # the paper's batch (§4.1)
    parser.add_argument("--size", type=int, default=224)  # the paper's image size (§3)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--views",
        nargs="+",
        default=["simsiam,simsiam"],
        help="sets of views, each names of device_views.RECIPES joined by commas (default: SimSiam's two)",
    )
    args = parser.parse_args()
    numbers = {"--batch-size": args.batch_size, "--size": args.size, "--batches": args.batches}
    for flag, value in {**numbers, "--threads": args.threads or 1}.items():
        if value < 1:
            raise UserError(f"{flag} {value}: expected at least 1")
    sets = [tuple(s.split(",")) for s in args.views]
    for name in sorted({n for s in sets for n in s} - set(device_views.RECIPES)):
        raise UserError(f"--views: unknown view {name!r}; expected some of {', '.join(device_views.RECIPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    shape = (args.batch_size, 3, args.size, args.size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"CPU threads: {torch.get_num_threads()}"
    print(
        f"{args.batch_size} images of {args.size} px on {device} ({machine}), torch {torch.__version__}; "
        f"mean of {args.batches} batches after 1 to warm up"
    )
    render_column = f"render ({device.type})"
    print(f"{'views':40s} {'parameters (CPU, 1 process)':>30s} {render_column:>24s} {'both':>24s}")
    for names in sets:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        draw, render = measure(images, names, args.size, args.batches)
        figures = [
            f"{args.batch_size / s:8.1f} images/s {1000 * s:7.1f} ms" for s in (draw, render, draw + render)
        ]
        line = f"{','.join(names):40s} {figures[0]:>30s} {figures[1]:>24s} {figures[2]:>24s}"
        if device.type == "cuda":
            line += f"   peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
        print(line)


if __name__ == "__main__":
    run(main)
