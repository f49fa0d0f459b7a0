"""SimSiam pretraining (Chen & He, CVPR 2021) of a BiT ResNet-V2, as in Lu, Jha & Huo (2021).

    python pretrain.py --init bit-m --data ham10000 --data-root PATH --out runs/ham-bit-m   # one GPU (or the CPU)
    torchrun --nproc_per_node=4 pretrain.py --init bit-m --data ham10000 ...               # DDP, same flags
    python pretrain.py --out DIR --resume                                                  # after a crash or Ctrl-C

Every --eval-every epochs a weighted kNN classifier (bank: the `train` part, queries: the `val` part) measures the
representation, as the paper's Fig. 2; `test` is never read here. DIR receives metrics.csv, curves.png, args.json,
split.json, last.pt (everything to resume), backbone.pt and backbone_epN.pt snapshots (for linear_eval.py, tsne.py).
"""
import argparse
import csv
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from tqdm import tqdm

import datasets
from bit_convert import ARCHS, WeightsError, build_backbone, save_atomic, save_backbone

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# On --resume the run's own args.json is used, but for these, which come from the machine and the command line ...
NOT_RESTORED = {"resume", "force", "device", "workers", "out"}
# ... and the command line may change these; any other difference from the saved run is an error.
MAY_CHANGE = NOT_RESTORED | {"eval_every", "save_at", "download", "data_root", "cache_dir"}


class SimSiam(nn.Module):
    """Backbone f, projector and predictor h (Chen & He 2021, Fig. 1 and §4.4). projector="paper" is what the
    paper's authors ran (2 layers, REFERENCE §1); "simsiam" is SimSiam's own 3 layers with a non-affine output BN."""

    def __init__(self, backbone, projector="paper", dim=2048, pred_dim=512):
        super().__init__()
        self.backbone = backbone
        layers, width = [], backbone.num_features
        for _ in range(1 if projector == "paper" else 2):  # Linear-BN-ReLU; no bias before a BN
            layers += [nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
            width = dim
        layers += [nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=projector == "paper")]
        self.projector = nn.Sequential(*layers)
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return self.predictor(z1), self.predictor(z2), z1.detach(), z2.detach()


def simsiam_loss(p1, p2, z1, z2):
    """L = D(p1, z2)/2 + D(p2, z1)/2 with D(p, z) = -cos(p, stopgrad(z)) (Chen & He 2021, Eq. 1-3); minimum -1."""
    return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2


def peak_lr(args):
    """--lr is per 256 images: the linear scaling rule (Goyal et al. 2017), as SimSiam and the paper (§4.1)."""
    return args.lr * args.batch_size / 256


def learning_rate(step, steps_per_epoch, args):
    """Linear warm-up to peak_lr over --warmup-epochs, then a cosine that reaches 0 at --cosine-epochs (default: the
    last epoch; the authors' code decayed over 800 epochs and stopped at 400)."""
    peak, epoch = peak_lr(args), (step + 1) / steps_per_epoch
    if epoch <= args.warmup_epochs:
        return peak * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / ((args.cosine_epochs or args.epochs) - args.warmup_epochs)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def embed(backbone, images, device, batch_size=256):
    """Backbone features (N, D), float32, of uint8 images (N, 3, H, W), in eval mode."""
    backbone.eval()
    with torch.autocast(device.type, amp_dtype(device), enabled=amp_dtype(device) != torch.float32):
        features = [backbone(datasets.to_input(images[i:i + batch_size], device)).float()
                    for i in range(0, len(images), batch_size)]
    return torch.cat(features)


@torch.no_grad()
def estimate_bn_statistics(backbone, images, device, batch_size=256):
    """Fresh BatchNorm statistics (mean 0, var 1) make an untrained or BiT-initialised BN network meaningless in eval
    mode; replace them by their average over `images` in train mode. Training itself never reads them."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    backbone.train()
    with torch.autocast(device.type, amp_dtype(device), enabled=amp_dtype(device) != torch.float32):
        for i in range(0, len(images), batch_size):
            backbone(datasets.to_input(images[i:i + batch_size], device))
    for norm in norms:
        norm.momentum = 0.1


def knn_predict(queries, bank, bank_labels, n_classes, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar bank features vote for their class with weight
    exp(similarity / temperature); the class with the largest sum wins."""
    similarity = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    weights, neighbours = similarity.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), n_classes, device=queries.device, dtype=weights.dtype)
    votes.scatter_add_(1, bank_labels[neighbours], (weights / temperature).exp())
    return votes.argmax(1)


def covariance_spectrum(features):
    """Singular values, largest first, of the covariance of L2-normalised features (Jing et al. 2022, Fig. 3)."""
    z = F.normalize(features.double(), dim=1)
    z = z - z.mean(0)
    spectrum = torch.linalg.svdvals(z) ** 2 / len(z)  # the covariance z'z/N has the squares of z's singular values
    return spectrum[:len(z) - 1]  # centring removes one dimension: N points span at most N - 1


def effective_rank(spectrum):
    """exp(entropy of the normalised spectrum) (Roy & Vetterli 2007; RankMe, Garrido et al. 2023): near 1 when
    everything lies along one direction (collapse), up to D when the features fill every dimension."""
    p = spectrum / spectrum.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def amp_dtype(device):
    """Mixed precision: bf16 on GPUs that have it, fp16 (with a GradScaler) on older ones; float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class SeededSampler(torch.utils.data.DistributedSampler):
    """The DistributedSampler's shuffle (one process too), each index paired with a seed for that image's augmentation
    in this epoch (see datasets.ImageSet), and able to start mid-epoch: what makes --resume exact."""

    start = 0

    def __iter__(self):
        order = list(super().__iter__())[self.start:]
        return iter([((self.seed * 100_003 + self.epoch) * 10_000_019 + i, i) for i in order])


def ignore_signals(_worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets.add_data_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--init", default="scratch", help="scratch (default), bit-s, bit-m, FILE.npz or FILE.pt")
    model.add_argument("--arch", choices=ARCHS, default="r50x1")
    model.add_argument("--norm", choices=("bn", "gn"), default="bn",
                       help="bn: the paper's fix (default); gn: BiT as released, which collapses (paper Fig. 1)")
    model.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction,
                       help="3x3 stride-1 root conv, no max-pool (paper §4.2); default: on for images <= 64 px")
    model.add_argument("--no-ws", dest="ws", action="store_false", help="plain convs instead of weight-standardised")
    model.add_argument("--zero-init-last", action="store_true",
                       help="zero the norm before each unit's last conv, as the authors' code did")
    model.add_argument("--projector", choices=("paper", "simsiam"), default="paper",
                       help="paper: the authors' 2-layer projector (default); simsiam: SimSiam's 3 layers")
    optim = parser.add_argument_group("optimisation (paper §4.1)")
    optim.add_argument("--epochs", type=int, default=400)
    optim.add_argument("--batch-size", type=int, default=128, help="global, over all processes")
    optim.add_argument("--lr", type=float, default=0.03, help="base lr, scaled by batch-size/256")
    optim.add_argument("--weight-decay", type=float, default=5e-4)
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--warmup-epochs", type=float, default=10)
    optim.add_argument("--cosine-epochs", type=float, help="where the cosine reaches 0 (default: --epochs)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, help="output directory (default runs/DATA-INIT-NORM)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument("--force", action="store_true", help="start afresh in an --out that holds another run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--eval-every", type=int, default=10, help="epochs between kNN evaluations (also at the end)")
    run.add_argument("--save-at", default="", help="epochs at which to keep a backbone snapshot, e.g. 25,400")
    run.add_argument("--knn-k", type=int, default=200)
    run.add_argument("--knn-t", type=float, default=0.1)
    args = parser.parse_args(argv)

    def fail(message):  # one line, no usage block: the flags were well-formed, their values do not fit
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    args.out = args.out or Path("runs") / f"{args.data}-{Path(args.init).stem}-{args.norm}"
    if args.resume:  # the run's own arguments, but for those the command line may change
        if not (args.out / "args.json").exists():
            fail(f"--resume: {args.out} holds no run to resume (no args.json)")
        try:
            saved = json.loads((args.out / "args.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            fail(f"--resume: cannot read {args.out / 'args.json'} ({e})")
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in NOT_RESTORED})
        args, out = parser.parse_args(argv), args.out
        args.out = out
        current = to_json(args)
        changed = [k for k, v in saved.items() if k not in MAY_CHANGE and current.get(k, v) != v]
        if changed:
            flags = " ".join(f"--{k.replace('_', '-')}" for k in sorted(MAY_CHANGE - {"resume", "force", "out"}))
            fail(f"--resume: --{changed[0].replace('_', '-')} {current[changed[0]]} differs from the run in "
                 f"{args.out} ({saved[changed[0]]}); only {flags} may change")
    try:
        args.snapshots = {int(e) for e in args.save_at.split(",") if e.strip()}
    except ValueError:
        fail(f"--save-at {args.save_at}: expected epochs separated by commas, e.g. 25,400")
    if min(args.epochs, args.batch_size, args.eval_every) < 1:
        fail("--epochs, --batch-size and --eval-every must be positive")
    return args


def to_json(args):
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "snapshots"}


def write_metrics(out, history, dim):
    """metrics.csv, a row per epoch (row 0: the network before training), and curves.png, both replaced whole."""
    columns = list(history[-1])
    with open(out / ".metrics.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(out / ".metrics.csv.tmp", out / "metrics.csv")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    trained = [row for row in history if row["epoch"] > 0]
    evaluated = [row for row in history if row["knn_bacc"] is not None]
    axes[0].plot([r["epoch"] for r in trained], [r["loss"] for r in trained])
    axes[0].set(title="SimSiam loss", xlabel="epoch", ylim=(-1.02, None))
    axes[1].plot([r["epoch"] for r in evaluated], [r["knn_bacc"] for r in evaluated], "o-")
    axes[1].set(title="kNN balanced accuracy (val)", xlabel="epoch")
    axes[2].plot([r["epoch"] for r in trained], [r["z_std"] for r in trained], label="std of z/|z|")
    axes[2].axhline(1 / math.sqrt(dim), color="gray", ls="--", label="1/sqrt(d): healthy")
    axes[2].set(title="output std (0: collapse)", xlabel="epoch", ylim=(0, 1.2 / math.sqrt(dim)))  # at most 1/sqrt(d)
    axes[2].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / ".curves.tmp.png", dpi=90)
    plt.close(fig)
    os.replace(out / ".curves.tmp.png", out / "curves.png")


def main(argv=None):
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_process = rank == 0
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    log = print if main_process else (lambda *a, **k: None)

    # ---- the output directory: never clobber another run
    last = args.out / "last.pt"
    if args.resume and not last.exists():
        raise datasets.DataError(f"--resume: {last} not found")
    if not args.resume and not args.force and (last.exists() or (args.out / "args.json").exists()):
        raise datasets.DataError(f"{args.out} holds another run: pass --resume to continue it, --force to replace it,"
                                 " or another --out")

    # ---- data: the split is made once and shared with linear_eval.py and tsne.py through DIR/split.json
    if distributed and not main_process:
        dist.barrier()  # process 0 writes the decoded-image cache and the split file first
    data = datasets.load_data(args)
    args.cifar_stem = args.image_size <= 64 if args.cifar_stem is None else args.cifar_stem
    split_file = args.out / "split.json" if args.resume else args.split_file or datasets.default_split_file(args)
    split = datasets.load_split(data, split_file, args.split, args.split_seed, args.split_by)
    if distributed and main_process:
        dist.barrier()
    pretrain_set = datasets.ImageSet(data, datasets.indices(data, split, "pretrain"),
                                     datasets.simsiam_view(args.image_size), views=2)
    if args.batch_size % world or len(pretrain_set) < args.batch_size:
        raise datasets.DataError(f"--batch-size {args.batch_size}: must divide among {world} process(es) and not "
                                 f"exceed the {len(pretrain_set)} images of the pretrain part")
    sampler = SeededSampler(pretrain_set, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        pretrain_set, args.batch_size // world, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0, worker_init_fn=ignore_signals)
    steps_per_epoch = len(sampler) // (args.batch_size // world)
    if main_process:
        bank_index, query_index = datasets.indices(data, split, "train"), datasets.indices(data, split, "val")
        bank_images = datasets.eval_images(data, bank_index, args.image_size)
        query_images = datasets.eval_images(data, query_index, args.image_size)
        bank_labels = torch.as_tensor(data.labels[bank_index], device=device)

    # ---- model and optimiser (paper §4.1: SGD, momentum 0.9, wd 5e-4; constant predictor lr, Chen & He §4.4)
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.init, args.arch, args.norm, args.cifar_stem, args.ws, args.zero_init_last,
                              args.download)
    model = SimSiam(backbone, args.projector).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif distributed:
        log("note: SyncBatchNorm runs on GPUs only; on the CPU each process normalises over its own batch")
    predictor = {id(p) for p in model.predictor.parameters()}
    optimizer = torch.optim.SGD([
        {"params": [p for p in model.parameters() if id(p) not in predictor], "fixed_lr": False},
        {"params": list(model.predictor.parameters()), "fixed_lr": True}],
        lr=peak_lr(args), momentum=args.momentum, weight_decay=args.weight_decay)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    dim = model.projector[-1].num_features
    start_epoch, start_step, history, sums = 1, 0, [], torch.zeros(3, dtype=torch.float64, device=device)
    if args.resume:
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, history = state["epoch"], state["step"], state["history"]
        sums = state["sums"].to(device)
        torch.set_rng_state(state["rng"])
        log(f"resumed {args.out} at epoch {start_epoch}, step {start_step}")
    raw_model = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def evaluate(epoch):
        """kNN accuracy on val with the train part as the bank (paper Fig. 2), and the features' effective rank."""
        bank = embed(raw_model.backbone, bank_images, device)
        predictions = knn_predict(embed(raw_model.backbone, query_images, device), bank, bank_labels,
                                  len(data.classes), args.knn_k, args.knn_t).cpu().numpy()
        truth = data.labels[query_index]
        return {"knn_acc": float(np.mean(predictions == truth)),
                "knn_bacc": float(balanced_accuracy_score(truth, predictions)),
                "eff_rank": effective_rank(covariance_spectrum(bank))}

    def stop_now(step):
        """Whether a signal asked to stop; under DDP all processes agree, every 20 steps, so they stop together."""
        if not distributed:
            return bool(stop)
        if step % 20 and step != steps_per_epoch:
            return False
        flag = torch.tensor(float(bool(stop)), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def save(epoch, step):
        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "history": history,
                     "sums": sums, "rng": torch.get_rng_state(), "args": to_json(args)}, last)

    if main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "args.json").write_text(json.dumps(to_json(args), indent=1) + "\n")
        if Path(split_file).resolve() != (args.out / "split.json").resolve():
            shutil.copyfile(split_file, args.out / "split.json")
        log(datasets.summary(data, split, split_file))
        log(f"{args.init} {args.arch}/{args.norm}{' cifar-stem' if args.cifar_stem else ''}, {world} process(es) on "
            f"{device}, batch {args.batch_size}, peak lr {peak_lr(args):g}, {steps_per_epoch} steps "
            f"per epoch, {dtype}")
        if not history:  # row 0: the network as initialised, the floor that training must rise above
            estimate_bn_statistics(raw_model.backbone, bank_images, device)
            history.append({"epoch": 0, "loss": None, "lr": None, "z_std": None, **evaluate(0),
                            "img_per_s": None, "data_wait": None, "epoch_s": None})
            log(f"epoch 0 (before training): kNN balanced accuracy {history[0]['knn_bacc']:.4f}")

    stop = []  # the signal that asked us to stop, if any
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _: stop.append(s))
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        sampler.start = start_step * (args.batch_size // world) if epoch == start_epoch else 0
        step, waited, tic = start_step if epoch == start_epoch else 0, 0.0, time.perf_counter()
        bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch}", disable=not main_process or None,
                   leave=False, dynamic_ncols=True)
        batches = iter(loader)
        while step < steps_per_epoch:
            wait = time.perf_counter()
            x1, x2, _ = next(batches)
            waited += time.perf_counter() - wait
            for group in optimizer.param_groups:
                group["lr"] = peak_lr(args) if group["fixed_lr"] else learning_rate(
                    (epoch - 1) * steps_per_epoch + step, steps_per_epoch, args)
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                p1, p2, z1, z2 = model(datasets.to_input(x1, device), datasets.to_input(x2, device))
                loss = simsiam_loss(p1, p2, z1, z2)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # collapse signal (Chen & He §4.1): std over the batch of z/|z|, ~1/sqrt(d) when healthy, 0 if collapsed
            z_std = F.normalize(z1.float(), dim=1).std(0).mean()
            sums += torch.stack([loss.detach().double(), z_std.double(), torch.ones((), device=device)])
            step += 1
            bar.update()
            if step % 20 == 0 or step == steps_per_epoch or stop:  # a host sync now and then, not every step
                if not math.isfinite(sums[0].item()):
                    sys.exit(f"pretrain.py: error: the loss became {sums[0].item()} in epoch {epoch}, step {step}; "
                             f"stopped. The last good checkpoint is {last}")
                bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.4f}")
            if stop_now(step):
                if main_process:
                    save(epoch, step)
                    log(f"stopped by signal in epoch {epoch} at step {step}; saved {last}; continue with --resume")
                sys.exit(128 + (stop[0] if stop else signal.SIGTERM))
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        mean = (sums / sums[2]).tolist()
        sums.zero_()
        start_step = 0
        if not main_process:
            continue
        row = {"epoch": epoch, "loss": mean[0], "lr": optimizer.param_groups[0]["lr"], "z_std": mean[1],
               "knn_acc": None, "knn_bacc": None, "eff_rank": None,
               "img_per_s": steps_per_epoch * args.batch_size / seconds, "data_wait": waited / seconds,
               "epoch_s": seconds}
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            row.update(evaluate(epoch))
        history.append(row)
        log(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None and k != "epoch"))
        if row["z_std"] < 0.1 / math.sqrt(dim):
            log(f"WARNING: epoch {epoch}: output std {row['z_std']:.2g} is far below 1/sqrt({dim}) = "
                f"{1 / math.sqrt(dim):.3f}: the representation has collapsed (paper Fig. 1)")
        save(epoch + 1, 0)
        write_metrics(args.out, history, dim)
        meta = {"epoch": epoch, "init": args.init, "data": args.data, "split_digest": datasets.split_digest(split)}
        if epoch in args.snapshots:
            save_backbone(raw_model.backbone, args.out / f"backbone_ep{epoch}.pt", **meta)
        if epoch == args.epochs:
            save_backbone(raw_model.backbone, args.out / "backbone.pt", **meta)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (datasets.DataError, WeightsError) as e:
        sys.exit(f"pretrain.py: error: {e}")
