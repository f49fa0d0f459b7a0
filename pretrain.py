"""Self-supervised pretraining of a BiT ResNet-V2: SimSiam (Chen & He, CVPR 2021) as in Lu, Jha & Huo (2021),
or --method simclr | byol | mocov2 | swav (the add-on ssl_methods.py, read only by such a run).

    python pretrain.py --init bit-m --data ham10000 --download   # one GPU or CPU; the data and BiT-M once
    torchrun --nproc_per_node=4 pretrain.py --init bit-m --data ham10000 ...               # DDP, same flags
    python pretrain.py --out DIR --resume                                          # after a crash or Ctrl-C

Every --eval-every epochs a weighted kNN classifier (bank: the `train` part, queries: the `val` part) measures
the representation, as the paper's Fig. 2; `test` is never read here. DIR receives metrics.csv, curves.png,
args.json, split.json, last.pt (everything to resume), backbone.pt and backbone_epN.pt snapshots (for
linear_eval.py, tsne.py).

Reading order: SimSiam (its heads and loss; its view is datasets.simsiam_view), main (the whole run), then
its setup, the schedule, the end of an epoch, saving and resuming, the flags, and the kNN monitor.
"""

import argparse
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score
from tqdm import tqdm

import bit_common
import datasets
from bit_common import (
    FRACTION,
    KNN_TEMPERATURE,
    MOMENTUM,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    ArgumentParser,
    Method,
    UserError,
    device_name,
    finite_float,
    join_process_group,
    launch_number,
    on_process_0,
    path_arg,
    run,
    to_json,
    write_atomic,
)
from bit_convert import (
    ARCHS,
    WHITEN_AT,
    add_backbone_args,
    add_zero_init_last,
    amp_dtype,
    autocast,
    build_backbone,
    embed,
    estimate_bn_statistics,
    on_device,
    rankme,
    read_backbone_file,
    resolve_backbone_args,
    save_backbone,
    synchronise_whitening,
    untrained_statistics,
    whiten,
    whiten_placement,
    zero_init_last,
)


class SimSiam(Method):
    """Chen & He, "Exploring Simple Siamese Representation Learning" (CVPR 2021): backbone f, projector and
    predictor h (Fig. 1, §4.4); L = D(p1, z2)/2 + D(p2, z1)/2 with D(p, z) = -cos(p, stopgrad(z)) (Eq.
    1-3)."""

    view_names = ("simsiam", "simsiam")
    # lr and weight decay: Lu et al. §4.1; the projector and the widths: the authors' code (BiT-SimSiam
    # models/simsiam.py, proj_layers 2 in its HAM configs), whose predictor is Chen & He's (§4.4)
    defaults = {"lr": 0.03, "weight_decay": 5e-4, "projector": "paper"}

    def __init__(self, backbone, projector="paper", dim=2048, pred_dim=512):
        super().__init__()
        self.backbone, width = backbone, backbone.num_features
        if projector == "paper":  # what the paper's authors ran (BiT-SimSiam): two layers
            self.projector = nn.Sequential(
                nn.Linear(width, dim, bias=False),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),  # no bias before a BN
                nn.Linear(dim, dim, bias=False),
                nn.BatchNorm1d(dim),
            )
        else:  # SimSiam's builder.py: three layers, the output BN without affine
            self.projector = nn.Sequential(
                nn.Linear(width, dim, bias=False),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),
                nn.Linear(dim, dim, bias=False),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),
                nn.Linear(dim, dim, bias=False),
                nn.BatchNorm1d(dim, affine=False),
            )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )
        self.out_dim = dim

    def forward(self, views):
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return simsiam_loss(p1, p2, z1, z2), z1

    def param_groups(self):
        """The predictor keeps a constant lr (Chen & He §4.4: it works better than a decaying one)."""
        predictor = {id(p) for p in self.predictor.parameters()}
        return [
            {"params": [p for p in self.parameters() if id(p) not in predictor], "fixed_lr": False},
            {"params": list(self.predictor.parameters()), "fixed_lr": True},
        ]


def simsiam_loss(p1, p2, z1, z2):
    """Chen & He Eq. 3: the symmetric negative cosine, the stop-gradient on z where D puts it. Minimum -1."""
    return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2


# On --resume the run's own args.json is used, but for these, which come from the machine and the command line
# ...
NOT_RESTORED = {"resume", "force", "device", "workers", "out"}

# ... and the command line may change these; any other difference from the saved run is an error. --compile
# computes the same step (in exact arithmetic; compiled kernels sum in another order, a difference of the size
# that cuDNN's autotuned kernels already make between two GPU runs): a run resumed on a machine where it fails
# can go on with --no-compile
MAY_CHANGE = NOT_RESTORED | {"eval_every", "save_at", "download", "data_root", "cache_dir", "compile"}

# A run records a value for these whatever the command line said (from an --init .pt, or the defaults)
RESOLVED = {"arch", "norm", "cifar_stem", "ws", "image_size", "lr", "weight_decay"}

# metrics.csv, a row an epoch: the training's means, the monitor's (every --eval-every epochs), the speed; the
# seconds of the epoch's other work (finish_epoch): the kNN monitor, the loop held by the epoch's writes, the
# writer's own seconds for the previous epoch's writes
COLUMNS = ("epoch", "loss", "lr", "z_std", "knn_acc", "knn_bacc", "rankme", "img_per_s", "data_wait")
COLUMNS += ("epoch_s", "eta_s", "knn_s", "save_s", "write_s")

# What a run writes into --out, which a new run there sets aside first (bit_common.set_aside_earlier_run)
RUN_FILES = ("args.json", "split.json", "last.pt", "metrics.csv", "curves.png")
RUN_FILES += ("backbone.pt", "backbone_ep*.pt")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_process(args)
    lock = on_process_0(rank, lambda: bit_common.lock_output(args))  # noqa: F841 (held until the process ends)
    data, split, split_file = load_data_and_split(args, rank)
    monitor = KnnMonitor(data, split, args.image_size, args.knn_k, args.knn_t, device) if rank == 0 else None
    method = prepare_method(args, data, split, device)
    loader, sampler, steps_per_epoch, views_of = pretrain_loader(
        data, split, method, args, rank, world, device
    )
    optimizer = make_optimizer(method, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    state = RunState(device)
    if args.resume and (args.out / "last.pt").exists():
        resume_from(args, state, method, optimizer, scaler, split, steps_per_epoch)

    def begin():  # all checked: now the run may write into --out
        record_run(args, split_file)
        complete_finished_epoch(args, state, method, split)
        announce(args, data, split, split_file, world, device, steps_per_epoch, state)
        if not state.history:  # row 0: the network as initialised, the floor that training must rise above
            initial = monitor.initial(method.backbone, starting_metadata(args))
            state.history.append(dict.fromkeys(COLUMNS) | {"epoch": 0, **initial})

    on_process_0(rank, begin)
    model, stop = distribute(method, device), bit_common.StopSignal(dist.is_initialized(), device)
    if args.compile:  # in place: method.state_dict()'s keys, and so last.pt and the backbones, stay the same
        model.compile()
    writer, start = bit_common.EpochWriter(), state.epoch  # the writer: process 0's
    try:
        for epoch in range(start, args.epochs + 1):
            model.train()
            method.start_epoch(epoch)
            sampler.set_epoch(epoch, start=state.step * (args.batch_size // world))
            bar = tqdm(
                total=steps_per_epoch,
                initial=state.step,
                desc=f"epoch {epoch}",
                disable=rank > 0 or None,
                leave=False,
                dynamic_ncols=True,
            )
            batches, tic = iter(loader), time.perf_counter()
            # a run stopped at an epoch's last step resumes past this loop
            while state.step < steps_per_epoch:
                wait = time.perf_counter()
                *batch, _ = next(batches)
                views = views_of(batch)
                state.waited += time.perf_counter() - wait
                done = (epoch - 1) * steps_per_epoch + state.step  # steps before this one
                for group in optimizer.param_groups:
                    fixed = group["fixed_lr"]
                    group["lr"] = peak_lr(args) if fixed else scheduled_lr(done, steps_per_epoch, args)
                with compile_errors(epoch, state.step + 1):
                    with autocast(device):
                        loss, z = model([on_device(view, device) for view in views])
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                method.before_step(epoch)
                scaler.step(optimizer)
                scaler.update()
                method.after_step(
                    momentum_progress(done + 1, steps_per_epoch, args.cosine_epochs or args.epochs)
                )
                state.add(loss.detach(), normalised_std(z.detach()))
                bar.update()
                # a host sync now and then, not at every step
                if state.step % 20 == 0 or state.step == steps_per_epoch or stop.signum:
                    check_finite(state, epoch, args)
                    bar.set_postfix(loss=f"{state.loss_sum.item() / state.step:.4f}")
                if stop.requested(state.step, steps_per_epoch):
                    state.seconds += time.perf_counter() - tic
                    on_process_0(rank, writer.wait)  # the finished epoch's files first: this last.pt is newer
                    saving = (args, state, method, optimizer, scaler, split)
                    on_process_0(rank, lambda: save_checkpoint(checkpoint(*saving), args.out))
                    if rank == 0:
                        where = f"epoch {epoch}, step {state.step}"
                        print(f"stopped by signal in {where}; saved; continue with --resume")
                    return 128 + stop.signum
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize()
            state.seconds += time.perf_counter() - tic
            row = state.end_epoch(optimizer.param_groups[0]["lr"], args.batch_size)
            finishing = (args, state, method, optimizer, scaler, monitor, split, epoch == start, writer)
            on_process_0(rank, lambda: finish_epoch(row, *finishing))
        on_process_0(rank, writer.wait)  # the last epoch's files
    finally:
        writer.join()  # after an error too: the pending files are written before the run ends
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def init_process(args):
    """(rank, world size, device): one process, or one of torchrun's, each on its own GPU. Under torchrun
    (which sets RANK and WORLD_SIZE, the test torchvision's reference scripts use) the process group and DDP
    are made whatever the count, so that `--nproc_per_node 1` runs the same NCCL path as eight."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        join_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", launch_number("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return (dist.get_rank(), dist.get_world_size(), device) if distributed else (0, 1, device)


def load_data_and_split(args, rank):
    """The data and the split, with the kNN bank (train) and queries (val) that the monitor needs; process 0
    writes the decoded-image cache and the split file before the others read them."""

    def load():
        data = datasets.data_from_args(args)
        if args.resume:  # the run's own split, which last.pt's digest is checked against
            split_file = args.out / "split.json"
            split = datasets.load_split(data, split_file)
        else:
            split, split_file = datasets.split_from_args(data, args)
        datasets.check_scored_parts(data, split, split_file, ("train", "val"))
        return data, split, split_file

    data, split, split_file = on_process_0(rank, load) or load()
    # what args.json records: the settings the split was made with
    args.split, args.split_seed, args.split_by = datasets.split_settings(split)
    return data, split, split_file


def record_run(args, split_file):
    """Once everything is checked: DIR/args.json, what --resume restores, and DIR/split.json, the split
    that linear_eval.py and tsne.py then use. A new run first sets aside the files of the run it replaces
    (--force; bit_common.set_aside_earlier_run), which it left as they were until then."""
    if not args.resume:
        bit_common.set_aside_earlier_run(args.out, RUN_FILES, keep=split_file)
        if Path(split_file).resolve() != (args.out / "split.json").resolve():
            write_atomic(args.out / "split.json", lambda tmp: shutil.copyfile(split_file, tmp))
    bit_common.write_args(args)


def prepare_method(args, data, split, device):
    """The backbone that --init names, changed as the related studies ask (interventions.intervene) and with
    the authors' zero-init, inside the method that --method names, on `device` (channels-last on GPUs: faster
    convs)."""
    images = None  # target-domain images to score the filters on (before the seed: a loader draws)
    if args.select_filters:
        images = datasets.eval_images(data, datasets.indices(data, split, "pretrain")[:1024], args.image_size)
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.init, args.arch, args.norm, args.cifar_stem, args.ws)
    backbone.to(device)
    if args.select_filters or args.shrink:
        import interventions  # an add-on: only these flags read it

        interventions.intervene(backbone, device, args.select_filters, images, args.shrink, args.seed)
    if args.whiten and not getattr(backbone, "whitened", False):  # a file whitened already stays as it is
        whiten(backbone, at=whiten_placement(args.whiten))
    if args.zero_init_last:
        zero_init_last(backbone)
    method = method_class(args.method)(backbone, **method_settings(args)).to(device)
    return method.to(memory_format=torch.channels_last) if device.type == "cuda" else method


def starting_metadata(args):
    """What the --init backbone file records ({} for scratch and BiT), for the epoch-0 row: a pretrained
    network (its file records an epoch) is measured with the BatchNorm statistics it trained with
    (bit_convert.untrained_statistics), unless --select-filters, --shrink, a fresh --whiten or
    --zero-init-last changed it: its statistics then describe the inputs of another network
    (interventions.shrink), and the epoch is left out so that they are estimated again."""
    if not args.init.endswith(".pt"):
        return {}
    meta = {k: v for k, v in read_backbone_file(args.init).items() if k != "state_dict"}
    fresh_whitening = args.whiten and not meta.get("whiten")  # as prepare_method decides
    if args.select_filters or args.shrink or fresh_whitening or args.zero_init_last:
        meta.pop("epoch", None)
    return meta


def view_transform(name, size):
    """SimSiam's view (datasets.simsiam_view), or another method's (ssl_methods.VIEWS)."""
    if name == "simsiam":
        return datasets.simsiam_view(size)
    import ssl_methods  # an add-on

    return ssl_methods.VIEWS[name](size)


def pretrain_loader(data, split, method, args, rank, world, device):
    """The `pretrain` part, sharded over the processes: (loader, sampler, steps an epoch, views_of), where
    views_of(batch) gives the method's views of a batch. --views-on loader: the loader's workers make every
    view (PIL, datasets.ImageSet); --views-on device: they draw each view's random numbers, and views_of
    renders the pixels on `device` from the images sent there once (the add-on device_views.py)."""
    index = datasets.indices(data, split, "pretrain")
    if args.batch_size % world or len(index) < args.batch_size or args.batch_size // world < 2:
        raise UserError(
            f"--batch-size {args.batch_size}: must divide among {world} process(es), two images or more "
            f"each (the heads' BatchNorm normalises over a process's batch), and not exceed the "
            f"{len(index)} images of the pretrain part"
        )
    if args.views_on == "device":
        import device_views  # an add-on: only --views-on device reads it

        height, width = data.images.shape[1:3]
        items = device_views.ViewParams(method.view_names, args.image_size, len(index), height, width)
        images = data.images[index]
        step = (args.batch_size // world, method.view_names, args.image_size, *ARCHS[args.arch])
        where = device_views.choose_placement(images.nbytes, device, device_views.step_bytes(*step))
        try:
            views_of = device_views.DeviceViews(images, method.view_names, args.image_size, device, where)
        except RuntimeError as error:  # torch's out of memory, on the device or for page-locked memory
            raise UserError(
                f"--views-on device: the pretrain part's images ({images.nbytes / 1e9:.2f} GB) could not be "
                f"kept in {where} memory ({error}); use --views-on loader"
            ) from None
        if rank == 0:
            kept = f"{device}'s memory" if where == "device" else f"pinned host memory, copied to {device}"
            print(f"--views-on device: the pretrain images ({images.nbytes / 1e9:.2f} GB) kept in {kept}")
    else:
        transforms = [view_transform(name, args.image_size) for name in method.view_names]
        items, views_of = datasets.ImageSet(data, index, transforms), lambda batch: batch
    sampler = datasets.SeededSampler(items, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        items,
        args.batch_size // world,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        worker_init_fn=bit_common.ignore_signals,
    )
    return loader, sampler, len(sampler) // (args.batch_size // world), views_of


def distribute(method, device):
    """DistributedDataParallel, with SyncBatchNorm on GPUs: SimSiam's BN statistics are over the global batch;
    a --whiten IterNorm whitens the global batch on every device (bit_convert.synchronise_whitening). A
    method whose norms must stay per process (MoCo v2's shuffling BN) keeps them so, its IterNorm too:
    whitened over the global batch, the key encoder would see the statistics of every query's own image
    again, the signal that shuffling takes away (He et al. 2020, §3.3). The norms' collectives start in the
    forward that every process runs: before it, process 0 computes the epoch-0 row alone. DDP's constructor
    broadcasts process 0's parameters and buffers, its BN statistics of row 0 included."""
    if not dist.is_initialized():
        return method
    if method.sync_batch_norm:
        synchronise_whitening(method)
    if device.type == "cuda" and method.sync_batch_norm:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    elif dist.get_rank() == 0 and not method.sync_batch_norm:
        print("note: no SyncBatchNorm for this method: each process normalises over its own batch")
    elif dist.get_rank() == 0:
        print(
            "note: SyncBatchNorm runs on GPUs only; on the CPU each process's BatchNorm normalises its batch"
        )
    return nn.parallel.DistributedDataParallel(method, device_ids=[device] if device.type == "cuda" else None)


@contextmanager
def compile_errors(epoch, step):
    """--compile: torch.compile compiles the forward at the first step (and again where one of its guards
    fails) and the backward at the first backward (AOTAutograd lowers it lazily); an error of its backend
    there (inductor without a C++ compiler on the CPU, a kernel Triton cannot build on a GPU) is one line that
    names the flag, not a traceback."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"--compile: torch.compile failed in epoch {epoch}, step {step} ({type(e).__name__}: {cause}); "
            "run without --compile (a run that saved a checkpoint goes on with --resume --no-compile)"
        ) from None


def make_optimizer(method, args):
    """SGD with --momentum (the paper §4.1), or LARS for a method whose recipe is LARS's (SwAV);
    --weight-decay is the method's default unless given."""
    kind = torch.optim.SGD
    if method.optimizer == "lars":
        from ssl_methods import LARS  # an add-on

        kind = LARS
    return kind(
        method.param_groups(), lr=peak_lr(args), momentum=args.momentum, weight_decay=args.weight_decay
    )


def peak_lr(args):
    """--lr is per 256 images: the linear scaling rule (Goyal et al. 2017), as SimSiam and the paper
    (§4.1)."""
    return args.lr * args.batch_size / 256


def scheduled_lr(step, steps_per_epoch, args):
    """Linear warm-up to peak_lr over --warmup-epochs, then a cosine that reaches 0 at --cosine-epochs
    (default: the last epoch; the authors' code decayed over 800 epochs and stopped at 400)."""
    peak, epoch = peak_lr(args), (step + 1) / steps_per_epoch
    if epoch <= args.warmup_epochs:
        return peak * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / ((args.cosine_epochs or args.epochs) - args.warmup_epochs)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def momentum_progress(steps_done, steps_per_epoch, horizon_epochs):
    """The fraction of the schedule done after `steps_done` steps, for a momentum encoder's cosine (BYOL
    §3.2): over the lr cosine's horizon (--cosine-epochs, else --epochs), so that the momentum reaches its end
    where the lr reaches 0, and a run extended with --resume --epochs N goes on where it stopped."""
    return min(steps_done / (horizon_epochs * steps_per_epoch), 1.0)


class RunState:
    """Where the run stands, saved in last.pt beside the modules: the next epoch and step, the metrics so far,
    the running sums of this epoch's loss and output std (kept on the device: no host sync at every step),
    and the seconds it has trained and waited for data so far, over every process that trained it."""

    def __init__(self, device):
        self.epoch, self.step, self.history, self.seconds, self.waited = 1, 0, [], 0.0, 0.0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.z_std_sum = torch.zeros((), dtype=torch.float64, device=device)

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        device = self.loss_sum.device
        vars(self).update(state)
        self.loss_sum, self.z_std_sum = self.loss_sum.to(device), self.z_std_sum.to(device)

    def add(self, loss, z_std):
        self.loss_sum += loss.double()
        self.z_std_sum += z_std.double()
        self.step += 1

    def end_epoch(self, lr, batch_size):
        """The epoch's row of metrics.csv (the monitor's columns empty); the sums restart for the next
        epoch. Its time is the sum over the processes that trained it: a run stopped at the epoch's last step
        resumes with no step left to train, and measures the epoch all the same."""
        steps, seconds = self.step, self.seconds
        row = dict.fromkeys(COLUMNS) | {"epoch": self.epoch, "lr": lr, "data_wait": self.waited / seconds}
        row |= {"loss": (self.loss_sum / steps).item(), "z_std": (self.z_std_sum / steps).item()}
        row |= {"img_per_s": steps * batch_size / seconds, "epoch_s": seconds}
        self.epoch, self.step, self.seconds, self.waited = self.epoch + 1, 0, 0.0, 0.0
        self.loss_sum.zero_(), self.z_std_sum.zero_()
        return row


def finish_epoch(row, args, state, method, optimizer, scaler, monitor, split, first, writer):
    """Process 0, after each epoch: the monitor (its seconds: knn_s), the log, and the epoch's files handed to
    the writer, which writes them while the next epoch trains: the backbones due, metrics.csv and curves.png,
    then last.pt. The loop is held meanwhile (save_s) by the wait for the previous epoch's writes (their
    seconds: write_s) and by the copy of what they write."""
    epoch = row["epoch"]
    if epoch % args.eval_every == 0 or epoch == args.epochs:
        tic = time.perf_counter()
        row.update(monitor(method.backbone))
        row["knn_s"] = time.perf_counter() - tic
    row["eta_s"] = row["epoch_s"] * (args.epochs - epoch)  # at this epoch's pace, the monitor's time included
    tic = time.perf_counter()
    writer.wait()  # at most one epoch's writes pending; their error is raised here
    last = checkpoint(args, state, method, optimizer, scaler, split)  # its history: the epochs before
    weights = bit_common.host_copy(method.backbone.state_dict()) if due_backbones(args, epoch) else None
    row |= {"save_s": time.perf_counter() - tic, "write_s": writer.seconds}
    state.history.append(row)
    last["progress"]["history"].append(dict(row))
    log_epoch(row, method.out_dim, first, args)

    def write():
        write_epoch_files(args, last["progress"]["history"], method, split, epoch, weights)
        save_checkpoint(last, args.out)  # last: it says the epoch's files exist

    writer.write(write)


def due_backbones(args, epoch):
    """The backbone files that an epoch writes: backbone_epN.pt at the --save-at epochs, backbone.pt at the
    last."""
    return [f"backbone_ep{epoch}.pt"] * (epoch in args.save_at) + ["backbone.pt"] * (epoch == args.epochs)


def write_epoch_files(args, history, method, split, epoch, weights=None, only_missing=False):
    """metrics.csv and curves.png of `history`, and the backbones due at `epoch` (backbone_epN.pt,
    backbone.pt; `weights`: the backbone's state dict, copied at the epoch's end, else the live one's), all
    before the last.pt that says the epoch finished: a kill in between leaves a run that redoes the epoch."""
    meta = {
        "epoch": epoch,
        "init": args.init,
        "data": args.data,
        "split_digest": datasets.split_digest(split),
        "image_size": args.image_size,
        "method": args.method,
    }
    due = due_backbones(args, epoch)
    if only_missing:
        due = [name for name in due if not (args.out / name).exists()]
        for name in due:
            print(f"writing {args.out / name}, which the run's finished epoch {epoch} lacked")
    if not only_missing or not (args.out / "metrics.csv").exists():
        write_metrics(args.out, history, method.out_dim)
    for name in due:
        save_backbone(method.backbone, args.out / name, weights, **meta)


def complete_finished_epoch(args, state, method, split):
    """--resume of a run whose last.pt says an epoch finished but whose files of that epoch are missing (the
    versions that wrote last.pt first, killed in between): write them from last.pt's weights."""
    if state.step == 0 and state.epoch > 1:
        write_epoch_files(args, state.history, method, split, state.epoch - 1, only_missing=True)


def write_metrics(out, history, dim):
    """metrics.csv, a row per epoch (row 0: the network before training), and curves.png, both replaced
    whole."""
    bit_common.write_csv(out / "metrics.csv", history)
    fig = Figure(figsize=(13, 3.6))  # not pyplot, whose figures are global: this runs in the writer's thread
    axes = fig.subplots(1, 3)
    trained = [row for row in history if row["epoch"] > 0]
    evaluated = [row for row in history if row["knn_bacc"] is not None]
    axes[0].plot([r["epoch"] for r in trained], [r["loss"] for r in trained])
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].plot([r["epoch"] for r in evaluated], [r["knn_bacc"] for r in evaluated], "o-")
    axes[1].set(title="kNN balanced accuracy (val)", xlabel="epoch")
    axes[2].plot([r["epoch"] for r in trained], [r["z_std"] for r in trained], label="std of z/|z|")
    axes[2].axhline(1 / math.sqrt(dim), color="gray", ls="--", label="1/sqrt(d): healthy")
    top = 1.2 / math.sqrt(dim)  # the std of unit vectors' coordinates is at most 1/sqrt(d)
    axes[2].set(title="output std (0: collapse)", xlabel="epoch", ylim=(0, top))
    axes[2].legend(loc="lower left")
    fig.tight_layout()
    write_atomic(out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def log_epoch(row, dim, first, args):
    values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None and k != "epoch")
    print(f"epoch {row['epoch']}: {values}")
    if first:
        seconds = row["epoch_s"] * args.epochs
        hint = "; to go faster: a GPU, a smaller --image-size, more --workers" if seconds > 86400 else ""
        total, eta = duration(seconds), duration(row["eta_s"])
        print(f"at this pace the whole run ({args.epochs} epochs) takes {total}, {eta} from now{hint}")
    if row["z_std"] < 0.1 / math.sqrt(dim):
        print(
            f"WARNING: epoch {row['epoch']}: output std {row['z_std']:.2g} is far below 1/sqrt({dim}) = "
            f"{1 / math.sqrt(dim):.3f}: the representation has collapsed (paper Fig. 1)"
        )


def duration(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def announce(args, data, split, split_file, world, device, steps_per_epoch, state):
    """What a user reads before a long run: the split's table and the run's configuration."""
    keep_finished_backbone(args, state.epoch)
    print(datasets.summary(data, split, split_file))
    stem, precision = " cifar-stem" if args.cifar_stem else "", str(amp_dtype(device)).removeprefix("torch.")
    processes = f"{world} process(es)" + (f" over {dist.get_backend()}" if dist.is_initialized() else "")
    print(
        f"{args.method}, {args.init} {args.arch}/{args.norm}{stem}, {processes} on {device}, "
        f"batch {args.batch_size}, peak lr {peak_lr(args):g}, {steps_per_epoch} steps per epoch, {precision}"
    )
    if state.history:
        print(f"resumed {args.out} at epoch {state.epoch}, step {state.step}")


def check_finite(state, epoch, args):
    if not math.isfinite(state.loss_sum.item()):
        saved = (args.resume or epoch > 1) and (
            args.out / "last.pt"
        ).exists()  # this run's, not a --force'd one
        last = (
            f"The last good checkpoint is {args.out / 'last.pt'}" if saved else "No checkpoint was saved yet"
        )
        raise FloatingPointError(
            f"the loss became {state.loss_sum.item()} in epoch {epoch}, step {state.step}; stopped. {last}"
        )


def keep_finished_backbone(args, start_epoch):
    """A finished run extended with --resume --epochs N: its backbone.pt is kept as backbone_epE.pt."""
    finished = args.out / "backbone.pt"
    if (  # one written ahead of a last.pt that never came is the epoch about to be redone: it is rewritten
        finished.exists()
        and start_epoch <= args.epochs
        and read_backbone_file(finished).get("epoch") == start_epoch - 1
    ):
        os.replace(finished, args.out / f"backbone_ep{start_epoch - 1}.pt")


def checkpoint(args, state, method, optimizer, scaler, split):
    """What DIR/last.pt holds: everything --resume needs, the random state included, and the split's digest,
    which --resume checks DIR/split.json against. A copy in CPU memory (bit_common.host_copy): the training
    may go on while it is written."""
    return bit_common.host_copy(
        {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": state.state_dict(),
            "rng": torch.get_rng_state(),
            "args": to_json(args),
            "split_digest": datasets.split_digest(split),
        }
    )


def save_checkpoint(last, out):
    """DIR/last.pt, written atomically."""
    try:
        bit_common.save_last(last, out)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as either
        raise UserError(f"cannot write {out / 'last.pt'} ({e}); the previous one is kept") from None


def resume_from(args, state, method, optimizer, scaler, split, steps_per_epoch):
    """--resume: the modules, optimiser, scaler, progress and random state of DIR/last.pt, checked first."""
    may_change = MAY_CHANGE | datasets.SPLIT_FLAGS | ({"epochs"} if args.cosine_epochs else set())
    saved = bit_common.read_checkpoint(
        args, may_change, ("model", "optimizer", "scaler", "progress", "rng", "args")
    )
    path, progress = args.out / "last.pt", saved["progress"]
    bit_common.check_progress(progress, state.state_dict(), path)
    if saved.get("split_digest", datasets.split_digest(split)) != datasets.split_digest(split):
        raise UserError(
            f"--resume: {args.out / 'split.json'} is not the split the run started with (its parts differ "
            f"from those {path} records: edited?); put the run's own split back"
        )
    if progress["epoch"] - 1 > args.epochs:
        raise UserError(f"--epochs {args.epochs}: the run in {args.out} trained {progress['epoch'] - 1}")
    if progress["step"] > steps_per_epoch:
        raise UserError(
            f"--resume: {path}: progress step = {progress['step']}, beyond the {steps_per_epoch} "
            "steps of an epoch"
        )
    loads = [
        ("model", lambda: bit_common.load_module(method, saved["model"])),
        ("optimizer", lambda: bit_common.load_optimizer(optimizer, saved["optimizer"])),
        ("scaler", lambda: scaler.load_state_dict(saved["scaler"])),
        ("progress", lambda: state.load_state_dict(progress)),
        ("random state", lambda: torch.set_rng_state(saved["rng"])),
    ]
    bit_common.load_parts(path, loads)


# --method: SimSiam, above, or a method of the add-on ssl_methods.py, imported only when it is asked for
METHODS = ("simsiam", "simclr", "byol", "mocov2", "swav")
# The flags of the methods, each for those methods only: its type and help; the defaults are each method's
# (its class's `defaults`), resolved once --method is known (resolve_method_args)
METHOD_FLAGS = {
    "projector": (str, "paper: the authors' 2-layer projector; simsiam: SimSiam's 3 layers"),
    "temperature": (finite_float, "of the softmax (NT-Xent, InfoNCE, SwAV's prediction)"),
    "target_momentum": (
        finite_float,
        "of the momentum encoder: byol's tau_0, rising by a cosine to 1 (Grill et al. §3.2); mocov2's, "
        "constant (He et al. Eq. 2)",
    ),
    "queue_size": (int, "keys or embeddings in the queue (swav: 0 for none)"),
    "queue_start": (int, "the epoch, counted from 1, from which SwAV's Sinkhorn uses its queue (once full)"),
    "prototypes": (int, "SwAV's number of prototypes K"),
    "freeze_prototypes": (int, "SwAV's prototypes stay frozen for this many epochs from the start"),
    "multi_crop": (bool, "6 small crops (96/224 of --image-size, scale 0.05-0.14) besides the 2 large ones"),
    "local_weight": (
        finite_float,
        "Hassanpour et al.'s local loss: its weight w in L_global + w L_local (theirs: 0.5)",
    ),
    # our choice: on a 224-px view's 7 x 7 map a 3 x 3 grid of the crops' overlap gives regions of about 2 x 2
    # cells (the median over random pairs of MoCo v2's crops; at least 1 x 1 for 99 % of them), each pooling
    # cells of its own; Hassanpour et al.'s code (med_selfsup mmselfsup/models/algorithms/moco.py) cuts
    # num_regions = 20 squares, a fraction of a cell each at that size
    "local_grid": (int, "the local loss cuts the overlap of the two crops into GRID x GRID regions"),
}


def method_class(name):
    """SimSiam, or the class of another --method from the add-on ssl_methods.py."""
    if name == "simsiam":
        return SimSiam
    import ssl_methods  # an add-on: only a run of another method reads it

    return ssl_methods.METHODS[name]


def add_method_args(group):
    """--method and the flags of the methods."""
    group.add_argument(
        "--method", choices=METHODS, default="simsiam", help="the self-supervised method (default simsiam)"
    )
    for key, (kind, text) in METHOD_FLAGS.items():
        flag = "--" + key.replace("_", "-")
        options = {"action": "store_true", "default": None} if kind is bool else {"type": kind}
        group.add_argument(flag, **options, help=f"{text} (default: the method's own)")


def resolve_method_args(args):
    """Each flag the method has takes its default where not given; one given to a method without it is an
    error, and so is a value out of range."""
    defaults = method_class(args.method).defaults
    for key in {"lr", "weight_decay", *METHOD_FLAGS}:
        value, flag = getattr(args, key), "--" + key.replace("_", "-")
        if key in defaults:
            setattr(args, key, defaults[key] if value is None else value)
        elif value is not None:
            raise UserError(
                f"{flag}{'' if value is True else f' {value}'}: --method {args.method} has no such setting "
                f"(it is one of {', '.join(m for m in METHODS if key in method_class(m).defaults)})"
            )
    # --projector checked here, not by argparse's choices, which bit_common.restored_args would apply to the
    # None that a resumed non-SimSiam run holds
    if args.method == "simsiam" and args.projector not in ("paper", "simsiam"):
        raise UserError(f"--projector {args.projector}: expected paper or simsiam")
    if args.method != "simsiam":
        import ssl_methods  # the add-on checks the values of its methods' flags

        ssl_methods.check_settings(args)


def method_settings(args):
    """The keyword arguments of --method's class, from its flags (lr and weight decay are the optimiser's)."""
    optimiser = ("lr", "weight_decay")
    return {key: getattr(args, key) for key in method_class(args.method).defaults if key not in optimiser}


def make_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets.add_data_args(parser)
    add_backbone_args(parser, norm_default="bn")
    model = parser.add_argument_group("method")
    model.add_argument(
        "--init", default="scratch", help="scratch (default), bit-s, bit-m, FILE.npz or FILE.pt"
    )
    add_zero_init_last(model)
    add_method_args(model)
    related = parser.add_argument_group("interventions of related studies, on the backbone (any method)")
    related.add_argument(
        "--shrink",
        type=FRACTION,
        metavar="LAMBDA",
        help="Ciga et al.'s weight scaling, as reconstructed (their definition is unpublished): Ash & "
        "Adams's shrink, every backbone parameter times LAMBDA in (0, 1]; not with --init scratch",
    )
    related.add_argument(
        "--select-filters",
        type=FRACTION,
        metavar="FRACTION",
        help="Ciga et al.'s filter selection, as reconstructed: keep the FRACTION most responsive filters of "
        "each unit's conv1 and conv2 on the pretrain images, re-initialise the rest; not with --init scratch",
    )
    related.add_argument(
        "--whiten",
        nargs="?",
        const="branch",
        metavar="{branch,final}",  # no choices=: runs saved before it record true/false, and still resume
        help="Hassanpour et al.'s feature decorrelation, an IterNorm (ZCA whitening; bn only) at the end of "
        "the last unit's residual branch, as their code places it; --whiten final: replacing the final norm, "
        "this project's earlier placement, which whitens the pooled features themselves",
    )
    optim = parser.add_argument_group("optimisation (paper §4.1)")
    optim.add_argument("--epochs", type=POSITIVE_INT, default=400)
    optim.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=128,
        help="global, over all processes; two images or more per process (BatchNorm)",
    )
    optim.add_argument(
        "--lr",
        type=POSITIVE,
        help="base lr, scaled by batch-size/256 (default: the method's own; simsiam 0.03)",
    )
    optim.add_argument("--weight-decay", type=NON_NEGATIVE, help="(default: the method's own; simsiam 5e-4)")
    optim.add_argument(
        "--momentum", type=MOMENTUM, default=0.9, help="SGD's and LARS's, in [0, 1) (default 0.9)"
    )
    optim.add_argument(
        "--warmup-epochs",
        type=NON_NEGATIVE,
        default=10,
        help="linear warm-up (default 10); one that would not end before the cosine's horizon is "
        "shortened to a tenth of it, and the log says so",
    )
    optim.add_argument(
        "--cosine-epochs",
        type=finite_float,
        help="where the cosine reaches 0 (default: --epochs); given, a finished run can be extended "
        "with --resume --epochs N, as the authors' 800-epoch horizon stopped at 400",
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", type=path_arg, help="output directory (default runs/DATA-INIT-NORM)")
    run_group.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run_group.add_argument(
        "--force", action="store_true", help="start afresh in an --out that holds another run"
    )
    run_group.add_argument("--seed", type=SEED, default=0)
    run_group.add_argument(
        "--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    # The default stays loader on GPUs too until benchmarks/gpu_check.py has measured device on one; a run
    # records None for loader (args.json of runs written before the flag lack the key)
    run_group.add_argument(
        "--views-on",
        choices=("loader", "device"),
        help="where the augmented views are made: loader (default: PIL in the loader's workers) or device "
        "(drawn in batches on --device, device_views.py: torchvision's distribution, other pixels)",
    )
    # Off by default, on GPUs too, until benchmarks/gpu_check.py has run it on one (model-only-compiled,
    # pretrain-simsiam-compiled); None in args.json of runs written before the flag
    run_group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the training step's forward and backward (inductor: a C++ compiler on the CPU, "
        "Triton on GPUs); the first step compiles (R50 on a GPU: about a minute by public reports; "
        "minutes on a CPU). Off by default: it has not run on a GPU yet. --resume keeps the run's setting "
        "unless --compile or --no-compile is given",
    )
    run_group.add_argument(
        "--eval-every", type=POSITIVE_INT, default=10, help="epochs between kNN evaluations (and the end)"
    )
    run_group.add_argument(
        "--save-at", type=epoch_list, default=[], help="the epochs whose backbone to keep, e.g. 25,400"
    )
    run_group.add_argument("--knn-k", type=POSITIVE_INT, default=200)
    run_group.add_argument("--knn-t", type=KNN_TEMPERATURE, default=0.1, help="at least 0.02 (default 0.1)")
    return parser


def parse_args(argv=None):
    """The arguments, with every default resolved here: the backbone flags (from an --init .pt where given),
    --out, a warm-up that fits the run; on --resume, the run's own, checked against the command line. Either
    way they pass the same checks (check_args)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs") / f"{args.data}-{Path(args.init).stem}-{args.norm or 'bn'}"
    if args.resume:  # the run's own arguments, but for those the command line may change
        args, saved = bit_common.restored_args(parser, argv, args.out, NOT_RESTORED, RESOLVED)
        extendable = {"epochs"} if saved.get("cosine_epochs") else set()  # the past schedule stays the same
        why = " (the cosine's horizon is --epochs: with an explicit --cosine-epochs, a run can be extended)"
        bit_common.refuse_changes(args, saved, MAY_CHANGE | extendable, why)
    else:
        meta = read_backbone_file(args.init) if args.init.endswith(".pt") else None  # its arch, norm, ...
        resolve_backbone_args(args, "bn", datasets.DEFAULT_SIZE[args.data], meta, args.init)
        found = whiten_placement((meta or {}).get("whiten"))
        if found and args.whiten not in (None, found):
            raise UserError(
                f"--whiten {args.whiten}: {args.init} is whitened at {found} already; leave --whiten out"
            )
    check_args(args)
    return args


def check_args(args):
    """What the flags' types cannot check alone, for a new run and a resumed one alike (before any file is
    written): each method flag for its method, the interventions for a pretrained --init, the epochs, and a
    warm-up that ends before the cosine's horizon (shortened to a tenth of it, as the log says)."""
    resolve_method_args(args)
    for flag in ("shrink", "select_filters"):
        if getattr(args, flag) is not None and args.init == "scratch":
            raise UserError(
                f"--{flag.replace('_', '-')}: changes pretrained weights before a second pretraining; "
                "--init is scratch"
            )
    if whiten_placement(args.whiten) not in (None, False, *WHITEN_AT):
        raise UserError(f"--whiten {args.whiten}: expected {' or '.join(WHITEN_AT)} (or nothing: branch)")
    if args.whiten and args.norm == "gn":
        raise UserError("--whiten: needs a BatchNorm backbone (--norm bn); --norm gn is BiT as released")
    check_epochs(args)
    horizon = args.cosine_epochs or args.epochs
    if args.warmup_epochs >= horizon:
        print(
            f"note: --warmup-epochs {args.warmup_epochs:g} would not end before the cosine's horizon "
            f"({horizon:g} epochs): warm-up shortened to {horizon / 10:g} epochs"
        )
        args.warmup_epochs = horizon / 10


def check_epochs(args):
    """The flags that name epochs of the run: a cosine horizon that the run reaches no sooner than its end
    (past the horizon the learning rate would stay 0), snapshots at epochs that the run has."""
    if args.cosine_epochs is not None and args.cosine_epochs < args.epochs:
        raise UserError(
            f"--cosine-epochs {args.cosine_epochs:g}: expected a horizon of at least --epochs "
            f"({args.epochs}); past it the learning rate would stay 0"
        )
    outside = [e for e in args.save_at if not 1 <= e <= args.epochs]
    if outside:
        raise UserError(f"--save-at {outside[0]}: expected epochs from 1 to --epochs ({args.epochs})")


def epoch_list(text):
    try:
        return sorted({int(e) for e in text.split(",") if e.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected epochs separated by commas, e.g. 25,400"
        ) from None


def knn_predict(queries, bank, bank_labels, n_classes, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar bank features vote for their class with weight
    exp(similarity / temperature); the class with the largest sum wins."""
    similarity = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    weights, neighbours = similarity.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), n_classes, device=queries.device, dtype=weights.dtype)
    votes.scatter_add_(1, bank_labels[neighbours], (weights / temperature).exp())
    return votes.argmax(1)


def normalised_std(z):
    """The collapse signal of SimSiam (Chen & He 2021, §4.1): the std over the batch of z/|z|, averaged over
    the channels; about 1/sqrt(d) when the outputs spread over the sphere, 0 when they have collapsed to one
    point."""
    return F.normalize(z.float(), dim=1).std(0).mean()


class KnnMonitor:
    """The paper's Fig. 2: weighted kNN accuracy on `val`, the labelled `train` part as the bank, and RankMe
    of the bank's features (a scalar read of dimensional collapse). Process 0 only; `test` is never read."""

    def __init__(self, data, split, image_size, k, temperature, device):
        bank, queries = datasets.indices(data, split, "train"), datasets.indices(data, split, "val")
        self.bank_images = datasets.eval_images(data, bank, image_size)
        self.query_images = datasets.eval_images(data, queries, image_size)
        self.bank_labels = torch.as_tensor(data.labels[bank], device=device)
        self.truth, self.n_classes = data.labels[queries], len(data.classes)
        self.k, self.temperature, self.device = k, temperature, device

    def __call__(self, backbone):
        bank = embed(backbone, self.bank_images, self.device)
        queries = embed(backbone, self.query_images, self.device)
        predicted = knn_predict(queries, bank, self.bank_labels, self.n_classes, self.k, self.temperature)
        predicted = predicted.cpu().numpy()
        return {
            "knn_acc": float(np.mean(predicted == self.truth)),
            "knn_bacc": float(balanced_accuracy_score(self.truth, predicted)),
            "rankme": rankme(bank),
        }

    def initial(self, backbone, meta):
        """The network as initialised, the floor that training must rise above. One whose BatchNorm statistics
        are not its own (untrained_statistics; `meta`: what its backbone file records) gets them estimated on
        the bank first, before the model is distributed: fresh ones are meaningless in eval mode. A pretrained
        one is measured with the statistics it trained with."""
        if untrained_statistics(backbone, meta):
            estimate_bn_statistics(backbone, self.bank_images, self.device)
        return self(backbone)


if __name__ == "__main__":
    run(main)
