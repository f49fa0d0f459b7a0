"""What several test files share: the scripts as subprocesses, the smallest pretraining run that still
exercises everything, the data flags as `datasets.data_from_args` takes them, and a pretrained backbone
file."""

import csv
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from subprocess import PIPE

import numpy as np
import pytest
import torch
from PIL import Image

import bit_common
import datasets
import pretrain
from bit_common import UserError
from bit_convert import estimate_bn_statistics, resnet_v2, save_backbone

REPO = Path(__file__).resolve().parents[1]


def tiny_args(tmp, epochs=2, out="run"):
    """digits at 8 px, 180 pretrain images in batches of 30 (6 steps an epoch), kNN every epoch, on the
    CPU."""
    return [
        "--data",
        "digits",
        "--image-size",
        "8",
        "--split",
        "0.1,0.05,0.05,0.8",
        "--split-file",
        str(tmp / "split.json"),
        "--cache-dir",
        str(tmp / "cache"),
        "--batch-size",
        "30",
        "--epochs",
        str(epochs),
        "--warmup-epochs",
        "1",
        "--workers",
        "0",
        "--eval-every",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp / out),
    ]


def run_script(script, *args, timeout=300, env=None, **popen):
    """Run a project script in a fresh interpreter; returns the CompletedProcess (text output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def run_patched(script, patch, *args, **kwargs):
    """run_script, after `patch` (Python code, run once the script's module is imported as its name, e.g.
    `pretrain`) has changed what it needs: a failure or a signal at one chosen moment, from outside the code
    under test. The script then runs as from its command line, through bit_common.run."""
    return run_script(*patched(script, patch), *args, **kwargs)


def patched(script, patch):
    """The interpreter's arguments that run `script` after `patch` (see run_patched), for a process of one's
    own (subprocess.Popen)."""
    module = Path(script).stem
    code = f"import sys\nsys.argv = [{script!r}, *sys.argv[1:]]\nimport bit_common, {module}\n{patch}\n"
    return ["-c", code + f"bit_common.run({module}.main)\n"]


def run_pretraining_over_gloo(args, patch=None, check=True, env=None, timeout=300):
    """pretrain.py as two processes (torchrun, gloo, one thread each), after `patch` where given (see
    run_patched); asserts that it ran through unless not `check`. A hang (a collective that one process never
    joins) fails the test after `timeout` seconds, its processes stopped."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if patch is not None:
        code = (
            f"import sys\nsys.argv = ['pretrain.py', *sys.argv[1:]]\nimport bit_common, pretrain\n{patch}\n"
        )
        command += ["--no-python", sys.executable, "-c", code + "bit_common.run(pretrain.main)\n"]
    else:
        command.append("pretrain.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    hung = False
    with subprocess.Popen(
        [*command, *map(str, args)], cwd=REPO, stdout=PIPE, stderr=PIPE, text=True, env=env
    ) as torchrun:
        try:
            stdout, stderr = torchrun.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            torchrun.terminate()  # torchrun stops its workers on SIGTERM; a SIGKILL would leave them waiting
            stdout, stderr = torchrun.communicate()
            hung = True
    if hung:
        pytest.fail(
            f"pretrain.py over gloo did not finish in {timeout} s; its output ended with: {stdout[-1500:]}"
        )
    assert torchrun.returncode == 0 or not check, stderr[-3000:]
    return subprocess.CompletedProcess(torchrun.args, torchrun.returncode, stdout, stderr)


def write_pretrained_backbone(path, seed=0):
    """A backbone file as a pretraining leaves one (it records its epoch): r50x1/bn with the cifar stem, for
    8 px digits. Its BatchNorm statistics are those of random-noise images: real ones, as a trained network
    has (fresh ones, mean 0 and variance 1, blow eval-mode features up), yet far from any estimate on the
    digits, so that a test sees whether a script kept them."""
    torch.manual_seed(seed)
    backbone = resnet_v2("r50x1", "bn", cifar_stem=True)
    noise = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    estimate_bn_statistics(backbone, noise, torch.device("cpu"))
    save_backbone(backbone, path, epoch=3, init="scratch", data="digits", image_size=8, method="simsiam")
    return path


R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)  # units of the four blocks
HEAD_KERNEL, HEAD_BIAS = "resnet/head/conv2d/kernel", "resnet/head/conv2d/bias"
SAMPLE = REPO / "tests" / "data" / "HAM10000_metadata_sample.csv"


HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


ISIC_COLUMNS = [
    "image",
    "DF",
    "VASC",
    "MEL",
    "AKIEC",
    "NV",
    "BKL",
    "BCC",
]  # shuffled: columns must be read by name


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_crlf(path, lines):
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


def colour(k):
    """A solid colour per image, far from its neighbours': the decoded image tells which file it came from."""
    return ((k * 67 + 20) % 256, (k * 131 + 50) % 256, (k * 29 + 90) % 256)


def write_jpeg(path, k):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 40, 3), colour(k), np.uint8)).save(path, quality=95)


def image_dir(root, image_id, layout):
    if layout == "flat":
        return root
    if layout == "isic":
        return root / "ISIC2018_Task3_Training_Input"
    return root / ("HAM10000_images_part_1" if int(image_id[5:]) <= 29305 else "HAM10000_images_part_2")


def write_images(root, rows, layout="parts"):
    for k, r in enumerate(rows):
        write_jpeg(image_dir(root, r["image_id"], layout) / f"{r['image_id']}.jpg", k)


def write_ham(root, rows, layout="parts", age_float=False, dataset_column=False, header=HAM_HEADER):
    """HAM10000_metadata.csv (CRLF) and one JPEG per row."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header + (["dataset"] if dataset_column else []))]
    for r in rows:
        age = f"{float(r['age']):.1f}" if age_float and r["age"] else r["age"]
        values = [r["lesion_id"], r["image_id"], r["dx"], r["dx_type"], age, r["sex"], r["localization"]]
        lines.append(",".join(values + (["vidir_modern"] if dataset_column else [])))
    write_crlf(root / "HAM10000_metadata.csv", lines)
    write_images(root, rows, layout)
    return root


def write_isic(root, rows, groupings, columns=ISIC_COLUMNS):
    """ISIC2018_Task3_Training_GroundTruth.csv (one-hot floats, columns in `columns` order), optionally the
    lesion groupings, and the images in ISIC2018_Task3_Training_Input/."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [",".join(columns)]
    for r in rows:
        lines.append(
            ",".join([r["image_id"]] + ["1.0" if c == r["dx"].upper() else "0.0" for c in columns[1:]])
        )
    write_crlf(root / "ISIC2018_Task3_Training_GroundTruth.csv", lines)
    if groupings:
        write_crlf(
            root / "ISIC2018_Task3_Training_LesionGroupings.csv",
            ["image,lesion_id,diagnosis_confirm_type"]
            + [f"{r['image_id']},{r['lesion_id']},{r['dx_type']}" for r in rows],
        )
    write_images(root, rows, "isic")
    return root


def write_cifar(root, n=20, omit=()):
    """cifar-10-batches-py/ as torchvision unpacks it; returns (all data rows, all labels, label names)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, 10, n).tolist()
        rows.append(data)
        labels += batch_labels
        if name not in omit:
            with open(base / name, "wb") as f:
                pickle.dump(
                    {
                        "batch_label": name,
                        "labels": batch_labels,
                        "data": data,
                        "filenames": [f"img_{j}.png" for j in range(n)],
                    },
                    f,
                    protocol=2,
                )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": n, "label_names": names, "num_vis": 3072}, f, protocol=2)
    return np.concatenate(rows), np.array(labels), names


def write_dermamnist(path, sizes=(42, 14, 21)):
    """A MedMNIST-style .npz; returns {part: (images, labels)}."""
    rng = np.random.default_rng(1)
    parts = {}
    for part, n in zip(("train", "val", "test"), sizes):
        parts[part] = (
            rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8),
            rng.permutation(np.arange(n) % 7).astype(np.uint8).reshape(n, 1),
        )
    np.savez(
        path,
        **{
            f"{p}_{k}": a
            for p, (images, labels) in parts.items()
            for k, a in (("images", images), ("labels", labels))
        },
    )
    return parts


ROOT_KEY = "resnet/root_block/standardized_conv2d/kernel"


def bit_layout(units=R50, width=1, head=1000):
    """[(key, HWIO shape)] of a released BiT .npz."""
    root = 64 * width
    layout = [(ROOT_KEY, (7, 7, 3, root))]
    cin = root
    for b, n in enumerate(units, 1):
        cmid = root * 2 ** (b - 1)
        cout = 4 * cmid
        for u in range(1, n + 1):
            p = f"resnet/block{b}/unit{u:02d}/"
            c = cin if u == 1 else cout
            layout += [
                (p + "a/group_norm/gamma", (c,)),
                (p + "a/group_norm/beta", (c,)),
                (p + "a/standardized_conv2d/kernel", (1, 1, c, cmid)),
                (p + "b/group_norm/gamma", (cmid,)),
                (p + "b/group_norm/beta", (cmid,)),
                (p + "b/standardized_conv2d/kernel", (3, 3, cmid, cmid)),
                (p + "c/group_norm/gamma", (cmid,)),
                (p + "c/group_norm/beta", (cmid,)),
                (p + "c/standardized_conv2d/kernel", (1, 1, cmid, cout)),
            ]
            if u == 1:
                layout.append((p + "a/proj/standardized_conv2d/kernel", (1, 1, cin, cout)))
        cin = cout
    return layout + [
        ("resnet/group_norm/gamma", (cin,)),
        ("resnet/group_norm/beta", (cin,)),
        (HEAD_KERNEL, (1, 1, cin, head)),
        (HEAD_BIAS, (head,)),
    ]


def random_bit_arrays(units=R50, width=1, head=1000, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in bit_layout(units, width, head)}


def zero_bit_arrays(units=R50, width=1, head=1000):
    """Cheaper than random where only the keys and shapes matter."""
    return {k: np.zeros(shape, np.float32) for k, shape in bit_layout(units, width, head)}


def write_npz(path, arrays, drop=(), **replace):
    """Save `arrays` as an uncompressed .npz (as BiT's are), less the keys in `drop`, with the arrays of
    `replace`."""
    out = {k: v for k, v in arrays.items() if k not in drop}
    out.update(replace)
    np.savez(path, **out)
    return path


def model_tensors(model):
    """{BiT key: model tensor}, by walking the model: stem.conv, blocks[b][u].norm1-3/conv1-3/proj, norm,
    head."""
    t = {ROOT_KEY: model.stem.conv.weight}
    for b, block in enumerate(model.blocks, 1):
        for u, unit in enumerate(block, 1):
            p = f"resnet/block{b}/unit{u:02d}/"
            for part, norm, conv in zip(
                "abc", (unit.norm1, unit.norm2, unit.norm3), (unit.conv1, unit.conv2, unit.conv3)
            ):
                t[p + part + "/group_norm/gamma"], t[p + part + "/group_norm/beta"] = norm.weight, norm.bias
                t[p + part + "/standardized_conv2d/kernel"] = conv.weight
            if unit.proj is not None:
                t[p + "a/proj/standardized_conv2d/kernel"] = unit.proj.weight
    t["resnet/group_norm/gamma"], t["resnet/group_norm/beta"] = model.norm.weight, model.norm.bias
    if model.head is not None:
        t[HEAD_KERNEL], t[HEAD_BIAS] = model.head.weight, model.head.bias
    return t


def hwio_to_oihw(a):
    return (
        torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))
        if a.ndim == 4
        else torch.from_numpy(a)
    )


def closed_port_url():
    """A URL on localhost where nothing listens: a machine without network, and no request leaves it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


TIMING = ("img_per_s", "data_wait", "epoch_s", "eta_s", "knn_s", "save_s", "write_s")


def read_metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def eval_args(tmp, *extra):
    return [
        "--data",
        "digits",
        "--image-size",
        "8",
        "--cache-dir",
        str(tmp / "cache"),
        "--workers",
        "0",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def files_of(*roots):
    """{path: (sha256, mtime_ns)} of every file at or below `roots`, but a run directory's .lock (which each
    process that opens the run takes)."""
    found = {}
    for root in map(Path, roots):
        for p in [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []:
            if p.is_file() and p.name != ".lock":
                found[p] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return found


@contextmanager
def untouched(*roots):
    """The user's files below `roots` are byte-identical, with the same mtimes, and none came or went."""
    before = files_of(*roots)
    assert before, "nothing to watch"
    yield
    assert files_of(*roots) == before


def failure(call, capsys=None):
    """The message with which `call` fails as its command line would, asserted to be one line: a DataError or
    WeightsError (the scripts print it and exit 1), or a SystemExit with a non-zero status (its text, or what
    argparse wrote to stderr)."""
    try:
        call()
    except UserError as e:
        message = str(e)
    except SystemExit as e:
        assert e.code not in (0, None), "exit status 0"
        message = e.code if isinstance(e.code, str) else capsys.readouterr().err
    else:
        pytest.fail("no error")
    message = message.strip()
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def data_args(*argv):
    parser = bit_common.ArgumentParser()
    datasets.add_data_args(parser)
    return parser.parse_args([str(a) for a in argv])


class RunsCode:
    """Unpickled, this calls open(marker, "w"): the marker file appears if a loader runs code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hand_edit(path, split, **parts):
    path.write_text(json.dumps({k: v for k, v in {**split, **parts}.items() if v is not None}, indent=1))


@contextmanager
def sigterm_at(epoch, step):
    """pretrain.main in this process stopped by a SIGTERM to itself once `step` of `epoch` has trained: a
    stop by signal at one chosen moment."""
    add = pretrain.RunState.add

    def add_and_stop(state, loss, z_std):
        add(state, loss, z_std)
        if (state.epoch, state.step) == (epoch, step):
            os.kill(os.getpid(), signal.SIGTERM)

    pretrain.RunState.add = add_and_stop
    try:
        yield
    finally:
        pretrain.RunState.add = add


# What a script's own process runs first (run_patched) to train the stand-in network below
STAND_IN = (
    "sys.path.insert(0, 'tests'); import helpers\n"
    "pretrain.build_backbone = lambda *args, **kwargs: helpers.TinyBackbone()"
)


class TinyBackbone(torch.nn.Module):
    """Stands in for the ResNet (through pretrain.build_backbone) where the network does not matter, only the
    run around it: a conv, a BatchNorm and pooling, 16 features. A two-epoch run then takes seconds, not
    minutes."""

    num_features, arch, norm_kind, cifar_stem, head_size, ws = 16, "r50x1", "bn", True, 0, True

    def __init__(self):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x))).mean((2, 3))


def not_writable(tmp_path):
    """A directory in which not even root may create anything (root ignores permission bits, not /sys)."""
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
        return tmp_path / "locked" / "run"
    path = Path("/sys/catalogue-not-writable/run")
    with pytest.raises(OSError):
        path.mkdir(parents=True)
    return path
