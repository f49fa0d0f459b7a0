"""One check of every GPU path, and the throughput figures, in one command under a time budget.

    python benchmarks/gpu_check.py                            # on a CUDA machine: 224 px, batch 128
    python benchmarks/gpu_check.py --device cpu --tiny        # the same sequence at 8 px, 3 - 4 min

It makes its own data (a HAM10000-like folder: HAM10000_metadata.csv and a JPEG per image, in a temporary
dir), then runs the real scripts as subprocesses, each a short run: pretrain.py for every --method (bf16 where
the GPU computes in it), SimSiam in fp16 with the GradScaler, --whiten, MoCo v2 with --local-weight, torchrun
over the GPUs present, a SIGTERM mid-run then --resume (compared with the run that was never stopped),
linear_eval.py and finetune.py --tune q4 on the pretrained backbone. It measures, for R50x1 BN SimSiam: images
per second end to end (pretrain.py's metrics.csv) vs model-only (the same steps on tensors already on the
device, in this process), the fraction of time spent waiting for data, peak GPU memory (model-only), and the
model-only figures again with channels-last off. SimSiam's pretraining also runs, with the loader's views and
with --views-on device, on a stand-in of HAM10000's size (6,680 JPEGs of 600x450, 3 epochs), whose epochs
after the first measure the steady state; each pretraining path projects the paper's 400 epochs of 6,009
images from its steady state (protocol_minutes) and gives the seconds of an epoch's kNN monitor and writes,
each also as a fraction of the epoch (throughput). The model-only step also runs compiled by torch.compile
(its first steps' seconds, which hold the compilation, apart), and pretrain.py --compile end to end.

Writes OUT/gpu_check.json (each path's status and seconds, every figure, device, torch and CUDA versions) and
each pretraining path's metrics.csv as OUT/PATH-metrics.csv, prints a table, and exits 1 naming any failed
path. A path that the --budget-s would not leave time for is skipped, and reported as skipped.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import datasets  # noqa: E402
import pretrain  # noqa: E402
from bit_common import device_name, finite_float, output_dir, run, write_atomic  # noqa: E402
from bit_convert import amp_dtype, autocast, to_input  # noqa: E402

# fp16 + GradScaler is what bit_convert.amp_dtype picks on a GPU without fast bf16 (V100, T4). To force it on
# any GPU, without a switch in the scripts, the script runs with torch.cuda.is_bf16_supported answering False.
FORCE_FP16 = (
    "import runpy, sys, torch; torch.cuda.is_bf16_supported = lambda *a, **k: False; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)

# The sequence, in the order it runs: the figures, the paths every run takes, then each method's own, so that
# what the budget cuts is the least shared.
PATHS = (
    "model-only-channels-last",
    "model-only-contiguous",
    "model-only-compiled",
    "pretrain-simsiam",
    "pretrain-simsiam-device-views",
    "pretrain-simsiam-ham-size",
    "pretrain-simsiam-device-views-ham-size",
    "pretrain-simsiam-compiled",
    "pretrain-simsiam-fp16",
    "torchrun",
    "sigterm-resume",
    "linear-eval",
    "finetune-q4",
    "pretrain-simclr",
    "pretrain-byol",
    "pretrain-swav",
    "pretrain-mocov2-local",
    "pretrain-whiten",
    *(f"pretrain-{m}-device-views" for m in ("simclr", "byol", "swav", "mocov2-local")),
    "model-only-max-autotune",  # last, and only where the budget leaves MAX_AUTOTUNE_S
)

# The paths of torch.compile. On the CPU inductor compiles R50's step into C++: 341 s for the first step at 8
# px on this project's 2-core machine (5.7 min, longer than the rest of the dry run), so the CPU dry run runs
# them only when --only names them; tests/test_compile.py runs pretrain.py --compile on a stand-in network.
COMPILED = ("model-only-compiled", "pretrain-simsiam-compiled", "model-only-max-autotune")

# torch.compile's mode="max-autotune" times several kernels for every convolution and matrix product, and
# records CUDA graphs: an estimate (no public figure for R50's training step was found) of its compilation
# with the steps around it, which the check must have left to start that path
MAX_AUTOTUNE_S = 300


# The paper's pretraining: HAM10000's 6,009 pretrain images (60 % of 10,015, Lu et al. §3), 400 epochs (§4.1)
PROTOCOL_IMAGES = 6009 * 400


def protocol_minutes(img_per_s):
    """The paper's pretraining at `img_per_s`, in minutes: the training steps alone."""
    return PROTOCOL_IMAGES / img_per_s / 60


def write_ham_like(root, images, height, width, seed=0):
    """HAM10000's layout (datasets.load_ham10000): the metadata CSV and height x width JPEGs named by image_id
    below `root`; 7 classes, each lesion 1-3 images, each class its own colour under noise, which a classifier
    can learn. The noise of each image is its own window of one field twice its size (drawing a field for
    each image would take most of the time), and the JPEGs are encoded on every core (PIL releases the
    GIL)."""
    rng = np.random.default_rng(seed)
    folder = root / "HAM10000_images_part_1"
    folder.mkdir(parents=True)
    lines, lesion, k = ["lesion_id,image_id,dx,dx_type,age,sex,localization"], 0, 0
    colours = rng.uniform(40, 215, (len(datasets.HAM_CLASSES), 3))
    noise = rng.normal(0, 40, (2 * height, 2 * width, 3)).astype(np.float32)

    def write(label, y, x, path):  # in a thread: numpy and PIL release the GIL on whole images
        pixels = (colours[label] + noise[y : y + height, x : x + width]).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        saved = []
        while k < images:
            label = lesion % len(datasets.HAM_CLASSES)
            for _ in range(min(rng.integers(1, 4), images - k)):
                image_id = f"ISIC_{24306 + k:07d}"
                dx = datasets.HAM_CLASSES[label]
                lines.append(f"HAM_{lesion:07d},{image_id},{dx},histo,50.0,male,back")
                where = rng.integers(0, height), rng.integers(0, width)
                saved.append(pool.submit(write, label, *where, folder / f"{image_id}.jpg"))
                k += 1
            lesion += 1
        for save in saved:
            save.result()  # raises a failed write's error
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")


class Check:
    """The paths run one after another under the budget; each records its status and seconds, and the report
    is rewritten after each, so that a check killed from outside still leaves what it had measured."""

    def __init__(self, budget_s, margin_s, report_file, header):
        self.start, self.budget_s, self.margin_s = time.perf_counter(), budget_s, margin_s
        self.report_file, self.header, self.paths = report_file, header, {}

    def left(self):
        return self.budget_s - (time.perf_counter() - self.start)

    def report(self):
        seconds = round(time.perf_counter() - self.start, 1)
        report = {**self.header, "seconds": seconds, "paths": self.paths}
        write_atomic(self.report_file, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
        return report

    def run(self, name, work, needs_s=0):
        """work() returns a dict of details or raises; it gets the seconds left as its timeout. It runs only
        if the budget leaves the margin, and `needs_s` (a path that cannot be stopped halfway)."""
        if self.left() < max(self.margin_s, needs_s):
            self.paths[name] = {"status": "skipped-for-budget", "seconds": 0.0}
            self.report()
            return
        tic = time.perf_counter()
        try:
            details, status = work(self.left()) or {}, "ok"
        except Exception as error:  # a failed path is reported, the others still run
            details, status = {"error": str(error)[-2000:]}, "failed"
        self.paths[name] = {"status": status, "seconds": round(time.perf_counter() - tic, 1), **details}
        print(f"{name:28s} {status:8s} {self.paths[name]['seconds']:7.1f} s", flush=True)
        self.report()

    def skip(self, name, status, reason):
        self.paths[name] = {"status": status, "seconds": 0.0, "reason": reason}
        self.report()


def script(command, timeout, **popen):
    """Run a command in the repository; raises with the tail of its output unless it exits 0."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")
    return done


def throughput(out):
    """A run's figures from its metrics.csv: the last epoch's (img_per_s, data_wait), as this check has always
    reported them, and the steady state's, the mean over the epochs after the first, which fills the
    loader's pipeline and starts its workers (steady_img_per_s, steady_data_wait, steady_epoch_s). Beside them
    the steady state's seconds of an epoch's other work (pretrain.finish_epoch), each the mean over the steady
    epochs that have it, and its fraction of the epoch, the mean of seconds / epoch_s over the same epochs
    (None where none has it): the kNN monitor (knn_s, where it ran), the loop held by the epoch's writes
    (save_s), the background writer's seconds for the epoch before's backbones, metrics.csv, curves.png and
    last.pt (write_s, all of them together)."""
    with open(out / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if int(row["epoch"]) > 0]
    steady = rows[1:] or rows

    def mean(values):
        return sum(values) / len(values) if values else None

    figures = {
        "img_per_s": float(rows[-1]["img_per_s"]),
        "data_wait": float(rows[-1]["data_wait"]),
        "steady_img_per_s": mean([float(row["img_per_s"]) for row in steady]),
        "steady_data_wait": mean([float(row["data_wait"]) for row in steady]),
        "steady_epoch_s": mean([float(row["epoch_s"]) for row in steady]),
    }
    for key in ("knn_s", "save_s", "write_s"):
        timed = [row for row in steady if row.get(key)]  # empty where it did not run
        figures[f"steady_{key}"] = mean([float(row[key]) for row in timed])
        name = f"steady_{key.removesuffix('_s')}_fraction"
        figures[name] = mean([float(row[key]) / float(row["epoch_s"]) for row in timed])
    return figures


def differences(a, b):
    """Two backbone.pt files: the largest difference of any weight or buffer, and the whole state's relative
    difference ||a - b|| / ||b|| (one large buffer can make the first say little of the rest)."""
    first, second = (
        {k: v.double() for k, v in torch.load(p, weights_only=True)["state_dict"].items()} for p in (a, b)
    )
    largest = max((first[k] - second[k]).abs().max().item() for k in first)
    apart = sum((first[k] - second[k]).square().sum() for k in first).sqrt()
    size = sum(second[k].square().sum() for k in first).sqrt()
    return {"max_abs_difference": largest, "relative_difference": (apart / size).item()}


def stop_and_resume(command, out, reference, exact, timeout, twin=None):
    """SIGTERM once the first epoch's last.pt exists, then --resume; the result against `reference`, the
    backbone of the same run never stopped. On the CPU they must be equal; on a GPU, where cuDNN's autotuned
    kernels are not deterministic, the difference is reported beside that of `twin`, another uninterrupted
    run of the same configuration, if it exists."""
    deadline = time.perf_counter() + timeout
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "last.pt").exists() and process.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=max(deadline - time.perf_counter(), 1))
    if process.returncode != 128 + signal.SIGTERM:
        raise RuntimeError(f"stopped run: exit {process.returncode}, expected 143: {stderr[-1500:]}")
    resume = [sys.executable, "pretrain.py", "--out", str(out), "--resume"]
    script(resume, max(deadline - time.perf_counter(), 1))
    found = differences(out / "backbone.pt", reference)
    if exact and found["max_abs_difference"] != 0:
        raise RuntimeError(f"resumed backbone differs from the uninterrupted run's: {found}")
    if twin is not None and twin.exists():
        found |= {f"uninterrupted_{k}": v for k, v in differences(twin, reference).items()}
    return found


def model_only(size, batch_size, warmup, steps, device, channels_last, compile_mode=None):
    """pretrain.py's step (SimSiam, R50x1 BN, autocast, GradScaler) on two views already on the device: the
    images per second the model alone allows, its peak memory, and the seconds of the first `warmup` steps
    (cuDNN's autotuning; with a `compile_mode`, torch.compile's compilation, compiled as pretrain.py
    --compile does, in place)."""
    args = pretrain.parse_args(["--data", "ham10000", "--image-size", str(size), "--device", str(device)])
    _, _, device = pretrain.init_process(args)  # as pretrain.py: cuDNN autotuning on
    method = pretrain.prepare_method(args, None, None, device)
    if not channels_last:
        method = method.to(memory_format=torch.contiguous_format)
    if compile_mode:
        torch._dynamo.reset()  # nothing compiled before counts: the first steps hold the whole compilation
        method.compile(mode=compile_mode)
    optimizer = torch.optim.SGD(method.param_groups(), lr=pretrain.peak_lr(args), momentum=args.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    views = [torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)] * 2
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        inputs = [to_input(v, device) for v in views]
        inputs = inputs if channels_last else [x.contiguous() for x in inputs]
        with autocast(device):
            loss, _ = method(inputs)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    tic = time.perf_counter()
    for k in range(warmup):  # cuDNN autotuning, compilation, allocator warm-up: apart
        with pretrain.compile_errors(1, k + 1):  # its error in one line, not the tail of dynamo's
            step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_steps_s, tic = time.perf_counter() - tic, time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    figures = {"img_per_s": steps * batch_size / (time.perf_counter() - tic), "first_steps_s": first_steps_s}
    if device.type == "cuda":
        figures["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        del method, optimizer, views
        torch._dynamo.reset()  # compiled code, and CUDA graphs' memory pools, go too
        torch.cuda.empty_cache()  # the scripts that run next have the GPU to themselves
    return figures


def main():
    args = parse_args()
    device = torch.device(args.device)
    output_dir(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        sequence = Sequence(args, device, Path(tmp))
        run_paths(sequence)
    check = sequence.check
    print_table(check.report())
    failed = [name for name, p in check.paths.items() if p["status"] == "failed"]
    if failed:
        sys.exit(f"gpu_check.py: failed: {', '.join(failed)} (details in {args.out / 'gpu_check.json'})")


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=device_name, default="cuda")
    parser.add_argument("--tiny", action="store_true", help="8 px, batch 16, 2 epochs of 2 steps")
    parser.add_argument("--budget-s", type=finite_float, default=420, help="stop before this many seconds")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument(
        "--only", help=f"comma-separated path names to run (default: all): {', '.join(PATHS)}"
    )
    args = parser.parse_args()
    args.wanted = set(args.only.split(",")) if args.only else set(PATHS)
    if args.wanted - set(PATHS):
        unknown = ", ".join(sorted(args.wanted - set(PATHS)))
        parser.error(f"--only: no path named {unknown} (the paths: {', '.join(PATHS)})")
    return args


def header(args, device, size, batch):
    """What gpu_check.json records of the machine and the check's settings."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "precision": str(amp_dtype(device)).removeprefix("torch."),
        "image_size": size,
        "batch_size": batch,
        "budget_s": args.budget_s,
        "cpus": os.cpu_count(),
    }


def run_paths(s):
    """The sequence of PATHS, each declared once, in PATHS's order."""
    for layout, channels_last in (("channels-last", True), ("contiguous", False)):
        s.path(f"model-only-{layout}", lambda t, c=channels_last: s.model_only(c))
    s.path("model-only-compiled", lambda t: s.compiled("default"))
    s.pretraining("pretrain-simsiam", "--method", "simsiam")
    s.pretraining("pretrain-simsiam-device-views", "--method", "simsiam", "--views-on", "device")
    s.pretraining("pretrain-simsiam-ham-size", "--method", "simsiam", inputs=s.ham_size)
    ham_device = ("--method", "simsiam", "--views-on", "device")
    s.pretraining("pretrain-simsiam-device-views-ham-size", *ham_device, inputs=s.ham_size)
    s.pretraining("pretrain-simsiam-compiled", "--method", "simsiam", "--compile")
    # the CPU computes in float32 whatever the GPU can
    fp16 = "steps per epoch, float16" if s.device.type == "cuda" else None
    s.pretraining("pretrain-simsiam-fp16", launcher=[sys.executable, "-c", FORCE_FP16], expect=fp16)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.gpus}"]
    backend = "nccl" if s.device.type == "cuda" else "gloo"
    s.pretraining("torchrun", launcher=torchrun, expect=f"{s.gpus} process(es) over {backend}")
    backbone = s.tmp / "pretrain-simsiam" / "backbone.pt"
    # one GPU: torchrun's run is the same run again (two gloo processes on the CPU are not)
    twin = s.tmp / "torchrun" / "backbone.pt" if s.device.type == "cuda" and s.gpus == 1 else None
    stopped = [sys.executable, "pretrain.py", *s.data, *s.train, "--out", str(s.tmp / "stopped")]
    exact = s.device.type == "cpu"
    s.path("sigterm-resume", lambda t: stop_and_resume(stopped, s.tmp / "stopped", backbone, exact, t, twin))
    evaluation = [*s.data, "--ckpt", str(backbone), "--epochs", "2", "--trials", "1"]
    linear = [sys.executable, "linear_eval.py", *evaluation, "--out", str(s.tmp / "linear")]
    s.path("linear-eval", lambda t: script(linear, t) and {})
    # half the batch: the train part (10% of the images, split by lesion) may hold fewer than 128
    finetune = [sys.executable, "finetune.py", *evaluation, "--tune", "q4", "--batch-size", str(s.batch // 2)]
    s.path("finetune-q4", lambda t: script([*finetune, "--out", str(s.tmp / "finetune")], t) and {})
    for method in ("simclr", "byol", "swav"):
        s.pretraining(f"pretrain-{method}", "--method", method)
    # MoCo v2 once, with the local loss that only it takes: both paths in one run
    s.pretraining("pretrain-mocov2-local", "--method", "mocov2", "--local-weight", "0.5")
    s.pretraining("pretrain-whiten", "--whiten")
    for method in ("simclr", "byol", "swav"):
        s.pretraining(f"pretrain-{method}-device-views", "--method", method, "--views-on", "device")
    local = ["--method", "mocov2", "--local-weight", "0.5", "--views-on", "device"]
    s.pretraining("pretrain-mocov2-local-device-views", *local)
    s.path("model-only-max-autotune", lambda t: s.compiled("max-autotune"), needs_s=MAX_AUTOTUNE_S)


class Sequence:
    """The settings of one check and the runs of its paths: the stand-in data in `tmp`, the flags every
    script run shares, and how a path runs (skipped, or under the check's budget, which starts here)."""

    def __init__(self, args, device, tmp):
        self.args, self.device, self.tmp = args, device, tmp
        # 1280 images of 224 px, 60% to pretrain on (paper §3): 6 steps of 128 an epoch, 30 in all. Tiny: 80
        # of 8 px, 40% to pretrain on, 2 steps of 16 an epoch (5 stratified folds: 5 lesions a class).
        self.size, self.batch, images, epochs = (8, 16, 80, 2) if args.tiny else (224, 128, 1280, 5)
        settings = header(args, device, self.size, self.batch)
        self.check = Check(args.budget_s, 5 if args.tiny else 20, args.out / "gpu_check.json", settings)
        split = "0.4,0.2,0.2,0.2" if args.tiny else "0.6,0.1,0.1,0.2"
        # HAM10000's size for the headline paths: 6,680 JPEGs of 600x450 (HAM10000's), 90% to pretrain on
        # (about 6,010: 47 steps of 128 an epoch), 3 epochs, so that epochs 2-3 give each of 16 workers 5
        # batches or more after the first fills the pipeline. Tiny: the small stand-in's count and split at
        # 60x45, 3 epochs.
        self.ham_images, self.ham_shape, ham_split = (
            (80, (45, 60), split) if args.tiny else (6680, (450, 600), "0.9,0.04,0.03,0.03")
        )
        # the tiny run loads in the main process; a GPU run keeps the scripts' default, a worker per core up
        # to 16
        workers = ["--workers", "0"] if args.tiny else []
        self.gpus = torch.cuda.device_count() if device.type == "cuda" else 2  # two gloo processes on the CPU
        self.warmup, self.steps = (1, 2) if args.tiny else (3, 20)
        write_ham_like(tmp / "ham", images, self.size, self.size)
        self.data = ["--data", "ham10000", "--data-root", str(tmp / "ham"), "--image-size", str(self.size)]
        self.data += ["--split", split, "--split-file", str(tmp / "split.json")]
        self.data += ["--cache-dir", str(tmp / "cache"), "--device", args.device, *workers]
        self.train = ["--batch-size", str(self.batch), "--epochs", str(epochs), "--warmup-epochs", "1"]
        self.train += ["--eval-every", str(epochs)]
        self.ham = tmp / "ham-size"
        # the later flags win
        self.ham_data = [*self.data, "--data-root", str(self.ham), "--split", ham_split]
        self.ham_data += ["--split-file", str(tmp / "split-ham.json")]
        self.ham_train = [*self.train, "--epochs", "3", "--eval-every", "3"]

    def path(self, name, work, needs_s=0):
        if name in COMPILED and self.device.type == "cpu" and not self.args.only:
            reason = "inductor compiles R50 on the CPU for minutes; --only NAME runs it"
            self.check.skip(name, "skipped-on-cpu", reason)
        elif name in self.args.wanted:
            self.check.run(name, work, needs_s)

    def pretraining(self, name, *flags, launcher=(sys.executable,), expect=None, inputs=None):
        """inputs(): (figures, data flags, train flags) made before the run; default ({}, data, train)"""

        def work(timeout):
            out = self.tmp / name
            figures, run_data, run_train = inputs() if inputs else ({}, self.data, self.train)
            command = [*launcher, "pretrain.py", *run_data, *run_train, *flags, "--out", str(out)]
            done = script(command, timeout)
            if expect and expect not in done.stdout:
                raise RuntimeError(f"pretrain.py did not announce {expect!r}: {done.stdout[-1500:]}")
            shutil.copyfile(out / "metrics.csv", self.args.out / f"{name}-metrics.csv")  # the figures' source
            figures |= throughput(out)
            return figures | {"protocol_minutes": protocol_minutes(figures["steady_img_per_s"])}

        self.path(name, work)

    def ham_size(self):
        """The HAM10000-sized stand-in, written by the first path that runs on it, with its seconds."""
        if self.ham.exists():
            return {}, self.ham_data, self.ham_train
        tic = time.perf_counter()
        write_ham_like(self.ham, self.ham_images, *self.ham_shape)
        return {"stand_in_write_s": time.perf_counter() - tic}, self.ham_data, self.ham_train

    def model_only(self, channels_last, compile_mode=None):
        return model_only(
            self.size, self.batch, self.warmup, self.steps, self.device, channels_last, compile_mode
        )

    def compiled(self, mode):
        """The channels-last step, compiled, beside the eager figure of this check."""
        figures = self.model_only(True, compile_mode=mode)
        eager = self.check.paths.get("model-only-channels-last", {}).get("img_per_s")
        return figures | ({"speedup": figures["img_per_s"] / eager} if eager else {})


def print_table(report):
    print(f"\n{report['device']}, torch {report['torch']}, CUDA {report['cuda']}, {report['precision']}")
    print(f"{report['image_size']} px, batch {report['batch_size']}, {report['seconds']} s in all")
    for name, p in report["paths"].items():
        figures = {k: v for k, v in p.items() if k not in ("status", "seconds", "error") and v is not None}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in figures.items())
        print(f"  {name:28s} {p['status']:18s} {p['seconds']:7.1f} s  {shown}")


if __name__ == "__main__":
    run(main)
