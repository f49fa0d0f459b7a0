"""pretrain.py --method simclr | byol | mocov2 | swav, whole runs on the CPU: every output, an exact resume
after a SIGTERM (weights, momentum encoder, queue, prototypes, metrics), and (slow) a short run on the digits
that raises kNN balanced accuracy; two processes over gloo are in test_distributed.py. The in-process runs
train TinyBackbone (helpers.py) inside each method: what they pin is the method's state around the network;
the ResNet itself runs in every method in test_distributed.py and in the slow runs here."""

import json
import os
import shutil
import signal

import pytest
import torch

import bit_common
import pretrain
from bit_convert import read_backbone_file
from helpers import TinyBackbone, read_metrics, run_script, tiny_args, without_timing

# small queues and prototypes: the SwAV queue (60 = 2 batches) is full, hence in use, from the third step, its
# prototypes frozen in the first epoch only (so that a resumed epoch 2 trains them), and --multi-crop puts 8
# crops of two sizes through the loop
FLAGS = {
    "simclr": [],
    "byol": [],
    "mocov2": ["--queue-size", "64"],
    "swav": [
        *("--queue-size", "60", "--queue-start", "1", "--freeze-prototypes", "1"),
        *("--prototypes", "10", "--multi-crop"),
    ],
}
SPLIT = "0.05,0.05,0.05,0.85"  # 90 pretrain images: 3 steps of 30 an epoch


def method_args(tmp, method, epochs=2, out="run"):
    args = tiny_args(tmp, epochs, out) + ["--method", method, *FLAGS[method]]
    args[args.index("--split") + 1] = SPLIT
    return args


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs on one thread, as the subprocesses run (OMP_NUM_THREADS=1): on a shared 2-core machine
    two threads per run measured several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def tiny_backbone():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain, "build_backbone", lambda *args, **kwargs: TinyBackbone())
        yield


@pytest.fixture(scope="module", params=list(FLAGS))
def complete_run(request, tmp_path_factory):
    """Two epochs, uninterrupted, in-process."""
    tmp = tmp_path_factory.mktemp(request.param)
    assert pretrain.main(method_args(tmp, request.param)) == 0
    return request.param, tmp, tmp / "run"


@pytest.mark.script
def test_a_stop_by_signal_resumes_exactly(complete_run, monkeypatch):
    """SIGTERM at the end of epoch 1: the run stops after the first step of epoch 2 and saves; --resume ends
    with the state of the uninterrupted run, bit for bit: weights, momentum encoder, queue, prototypes."""
    method, tmp, expected = complete_run
    finish = pretrain.finish_epoch

    def finish_then_signal(row, *rest, **options):
        finish(row, *rest, **options)
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pretrain, "finish_epoch", finish_then_signal)
    assert pretrain.main(method_args(tmp, method, out="stopped")) == 128 + signal.SIGTERM
    state = torch.load(tmp / "stopped" / "last.pt", weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (2, 1)
    monkeypatch.setattr(pretrain, "finish_epoch", finish)
    assert pretrain.main(["--out", str(tmp / "stopped"), "--resume", "--workers", "0"]) == 0
    got = torch.load(tmp / "stopped" / "last.pt", weights_only=True)["model"]
    want = torch.load(expected / "last.pt", weights_only=True)["model"]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items()), [
        k for k, v in want.items() if not torch.equal(got[k], v)
    ]
    assert without_timing(read_metrics(tmp / "stopped")) == without_timing(read_metrics(expected))


@pytest.mark.script
def test_a_run_writes_every_output_and_records_its_method(complete_run):
    method, _, out = complete_run
    names = {"args.json", "backbone.pt", "curves.png", "last.pt", "metrics.csv", "split.json"}
    assert names <= {p.name for p in out.iterdir()}
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and all(r["loss"] != "" for r in rows[1:])
    assert read_backbone_file(out / "backbone.pt")["method"] == method
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert ("queue" in state) == (method in ("mocov2", "swav"))
    if method == "swav":
        assert state["queue"][:, -1].abs().sum() > 0  # filled and in use


@pytest.mark.script
@pytest.mark.parametrize("complete_run", ["mocov2"], indirect=True)
def test_a_last_pt_without_a_buffer_of_this_version_is_refused_in_one_line(complete_run, tmp_path):
    """A MoCo v2 run saved before shuffling BN holds no shuffle generator: --resume says so in one line,
    naming the file and the key, and changes no file."""
    out = tmp_path / "earlier"
    shutil.copytree(complete_run[2], out)
    state = torch.load(out / "last.pt", weights_only=True)
    del state["model"]["shuffle_state"]
    torch.save(state, out / "last.pt")
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    with pytest.raises(bit_common.UserError) as error:
        pretrain.main(["--out", str(out), "--resume", "--workers", "0"])
    assert f"{out / 'last.pt'}: its model does not fit this run" in str(error.value)
    assert '"shuffle_state"' in str(error.value) and "\n" not in str(error.value)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


@pytest.mark.script
@pytest.mark.parametrize("complete_run", ["swav"], indirect=True)
def test_a_run_saved_before_a_method_setting_existed_resumes_with_its_default(complete_run, tmp_path):
    out = tmp_path / "earlier"
    shutil.copytree(complete_run[2], out)
    saved = json.loads((out / "args.json").read_text())
    del saved["freeze_prototypes"]
    (out / "args.json").write_text(json.dumps(saved))
    assert pretrain.parse_args(["--out", str(out), "--resume"]).freeze_prototypes == 2


@pytest.mark.script
@pytest.mark.slow
@pytest.mark.parametrize("method", list(FLAGS))
def test_pretraining_on_digits_raises_knn_balanced_accuracy(tmp_path, method):
    """The README's demonstration for each method: three epochs from scratch on the embedded digits, the
    method's own defaults but for a queue that fits 1080 images, and SwAV's prototypes frozen for its first
    epoch only (its default 2 would be 2 of the 3)."""
    queue = {
        "mocov2": ["--queue-size", "512"],
        "swav": ["--queue-size", "256", "--queue-start", "2", "--freeze-prototypes", "1"],
    }
    run = run_script(
        "pretrain.py",
        *("--data", "digits", "--method", method, *queue.get(method, [])),
        *("--epochs", "3", "--batch-size", "32", "--warmup-epochs", "1", "--eval-every", "1"),
        *("--workers", "2", "--device", "cpu", "--out", tmp_path / "run"),
        *("--split-file", tmp_path / "split.json", "--cache-dir", tmp_path),
        timeout=3600,
    )
    assert run.returncode == 0, run.stderr
    rows = read_metrics(tmp_path / "run")
    print(method, [round(float(r["knn_bacc"]), 3) for r in rows])
    assert float(rows[-1]["knn_bacc"]) > float(rows[0]["knn_bacc"]) + 0.1
