"""Tests of the downloads (issue 25): BiT weights that --init bit-s / bit-m fetch, and HAM10000 as the ISIC
2018 Task 3 training release that --download fetches, against a local HTTP server and never the internet.

The server (http.server, on 127.0.0.1) serves stand-ins in the real formats: a zip of small JPEGs in
ISIC2018_Task3_Training_Input/, the one-hot ground truth zipped in ISIC2018_Task3_Training_GroundTruth/ as the
challenge ships it (header image,MEL,NV,BCC,AKIEC,BKL,DF,VASC), the lesion groupings CSV (image, lesion_id,
diagnosis_confirm_type), and a BiT-M-R50x1-shaped .npz built from BiT's key table as tests/test_bit_convert.py
builds it. It answers Range requests (206, or 416 with the length past the end), and can cut a response
short, ignore Range, answer with the wrong range, or send slowly. Expected values come from the stand-ins as
written here, never from the code under test.

The stand-in release has 70 images, the real one 10,015, and the code checks that count whatever the URL
(a mirror too): no flag or variable changes it. The tests change the module constant in their own process
(datasets.ISIC_IMAGE_COUNT), and the whole-script tests run pretrain.py through a wrapper that sets it first
(run_with_count): the count stays checked in every real use, and a test of the count itself (with the real
10,015) refuses the stand-in.
"""

import csv
import errno
import http.server
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import bit_common
import bit_convert
import datasets
from helpers import (
    REPO,
    ROOT_KEY,
    SAMPLE,
    closed_port_url,
    colour,
    hwio_to_oihw,
    model_tensors,
    random_bit_arrays,
    run_script,
    write_jpeg,
    write_npz,
)

COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")  # the real ground truth's order
INPUT, TRUTH, GROUPS = (
    "ISIC2018_Task3_Training_Input.zip",
    "ISIC2018_Task3_Training_GroundTruth.zip",
    "ISIC2018_Task3_Training_LesionGroupings.csv",
)
PER_CLASS = 10


# ----------------------------------------------------------------------------------------------- the server


class StandIns(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        self.reset()

    def reset(self):
        self.files, self.log = {}, []  # {name: bytes}; [(name, Range header or None)] of every request
        self.cut_at = {}  # {name: bytes}: the next response for that name stops after so many bytes
        self.ignore_range, self.wrong_range, self.slow = set(), set(), set()

    def handle_error(self, request, client_address):
        pass  # a client that went away (Ctrl-C) is no error of the server's


class Handler(http.server.BaseHTTPRequestHandler):
    """GET of a stand-in: HTTP/1.0, one request a connection, Content-Length always sent."""

    def do_GET(self):
        server, name = self.server, self.path.lstrip("/")
        asked = self.headers.get("Range")
        server.log.append((name, asked))
        body = server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = (
            int(re.fullmatch(r"bytes=(\d+)-", asked)[1]) if asked and name not in server.ignore_range else 0
        )
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start:
            first = 0 if name in server.wrong_range else start
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
        else:
            first = 0
            self.send_response(200)
        rest = body[first:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        rest = rest[: server.cut_at.pop(name, len(rest))]
        step = 1024 if name in server.slow else len(rest) or 1
        for at in range(0, len(rest), step):  # bounded by the file's size
            self.wfile.write(rest[at : at + step])
            if name in server.slow:
                time.sleep(0.1)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def module_server():
    server = StandIns()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(module_server):
    module_server.reset()
    return module_server


def one_line(error):
    message = str(error)
    assert "\n" not in message and message, message
    return message


def everything_below(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------- the stand-in release


def sample_rows():
    """PER_CLASS rows of each dx from the committed sample of the real metadata, in file order."""
    with open(SAMPLE, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for c in datasets.HAM_CLASSES for r in [r for r in rows if r["dx"] == c][:PER_CLASS]]


def zipped(members, compression=zipfile.ZIP_DEFLATED):
    """A zip archive in memory of {name: bytes}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """{file name: bytes} of the stand-in release, with the rows and the JPEGs' bytes it was made from."""
    rows, folder = sample_rows(), tmp_path_factory.mktemp("jpegs")
    jpegs = {}
    for k, r in enumerate(rows):
        write_jpeg(folder / f"{r['image_id']}.jpg", k)
        jpegs[r["image_id"]] = (folder / f"{r['image_id']}.jpg").read_bytes()
    truth = ["image," + ",".join(COLUMNS)] + [
        r["image_id"] + "," + ",".join("1.0" if c == r["dx"].upper() else "0.0" for c in COLUMNS)
        for r in rows
    ]
    groups = ["image,lesion_id,diagnosis_confirm_type"] + [
        f"{r['image_id']},{r['lesion_id']},{r['dx_type']}" for r in rows
    ]
    files = {
        INPUT: zipped(
            {f"ISIC2018_Task3_Training_Input/{i}.jpg": b for i, b in jpegs.items()}
            | {"ISIC2018_Task3_Training_Input/LICENSE.txt": b"CC BY-NC 4.0\n"}
        ),
        TRUTH: zipped(
            {"ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv": "\n".join(truth)}
        ),
        GROUPS: ("\n".join(groups) + "\n").encode(),
    }
    return files, rows, jpegs


@pytest.fixture
def ham(server, release, tmp_path, monkeypatch):
    """The release served, datasets pointed at the server, the count set to the stand-in's; returns the
    root to download into (tmp/data/HAM10000, not yet there)."""
    server.files.update(release[0])
    monkeypatch.setattr(datasets, "ISIC2018_URL", server.url)
    monkeypatch.setattr(datasets, "ISIC_IMAGE_COUNT", len(release[1]))
    return tmp_path / "data" / "HAM10000"


def fetch(root):
    return datasets.load_ham10000(root, 8, root.parent.parent / "cache", download=True)


def assert_is_the_release(data, release):
    """The Data of the stand-in: every image, its class from the ground truth, its lesion from the
    groupings, the pixels of its JPEG."""
    rows = {r["image_id"]: r for r in release[1]}
    assert sorted(data.ids) == sorted(rows)
    assert [data.classes[k] for k in data.labels] == [rows[i]["dx"] for i in data.ids]
    assert data.groups == [rows[i]["lesion_id"] for i in data.ids]
    position = {r["image_id"]: k for k, r in enumerate(release[1])}
    for image_id, pixels in zip(data.ids, data.images):  # each JPEG is one solid colour (test_datasets)
        assert np.abs(pixels.reshape(-1, 3).mean(0) - colour(position[image_id])).max() < 6, image_id


# --------------------------------------------------------------------------------------- HAM10000: success


def test_a_complete_download_unpacks_the_release_that_every_script_reads(ham, server, release, capsys):
    data = fetch(ham)
    assert_is_the_release(data, release)
    assert [name for name, asked in server.log] == [INPUT, TRUTH, GROUPS]
    assert all(asked is None for _, asked in server.log)
    assert sorted(p.name for p in ham.parent.iterdir()) == ["HAM10000"]  # no download or unpacking folder
    assert (ham / GROUPS).read_bytes() == release[0][GROUPS]
    for image_id, jpeg in release[2].items():
        assert (ham / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg").read_bytes() == jpeg
    out = capsys.readouterr()
    assert "CC BY-NC 4.0" in out.out and f"{len(release[1])} images, 2.6 GB" in out.out
    assert INPUT in out.err and "100%" in out.err  # the progress bars


def test_an_existing_copy_is_read_as_it_is_and_nothing_is_fetched(ham, server, release):
    fetch(ham)
    server.log.clear()
    assert_is_the_release(fetch(ham), release)
    assert server.log == []


@pytest.mark.skipif("HAM10000_ROOT" in os.environ, reason="a root is named here")
def test_the_default_root_is_shared_and_movable(tmp_path, monkeypatch):
    """--data ham10000 without --data-root reads HAM10000_ROOT (~/.cache/bit-simsiam/data/HAM10000 unless
    $HAM10000_ROOT says otherwise): the same for every script, which all read through load_data."""
    assert datasets.HAM10000_ROOT == Path.home() / ".cache" / "bit-simsiam" / "data" / "HAM10000"
    monkeypatch.setattr(datasets, "HAM10000_ROOT", tmp_path / "elsewhere")
    with pytest.raises(bit_common.DataError) as e:
        datasets.load_data("ham10000", None, 8, tmp_path / "cache")
    assert str(tmp_path / "elsewhere") in str(e.value)


def test_no_data_and_no_download_is_one_line_saying_where_and_what_download_fetches(tmp_path, monkeypatch):
    root = tmp_path / "data" / "HAM10000"
    monkeypatch.setattr(datasets, "HAM10000_ROOT", root)
    with pytest.raises(bit_common.DataError) as e:
        datasets.load_data("ham10000", None, 8, tmp_path / "cache")
    message = one_line(e.value)
    for needed in (str(root), "--download", "ISIC 2018 Task 3", "10,015", "2.6 GB", "CC BY-NC 4.0"):
        assert needed in message, needed
    assert "https://isic-challenge-data.s3.amazonaws.com/2018/" in message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- HAM10000: interruptions


def test_an_interrupted_download_resumes_with_range_and_ends_byte_identical(ham, server, release):
    cut = len(release[0][INPUT]) // 3
    server.cut_at[INPUT] = cut
    with pytest.raises(bit_common.UserError) as e:
        fetch(ham)
    message = one_line(e.value)
    assert f"after {cut:,} of {len(release[0][INPUT]):,} bytes" in message and "resume" in message
    part = ham.parent / ".HAM10000.download" / f"{INPUT}.part"
    assert part.read_bytes() == release[0][INPUT][:cut]
    assert not ham.exists()
    server.log.clear()
    assert_is_the_release(fetch(ham), release)
    assert server.log[0] == (INPUT, f"bytes={cut}-")  # the rest alone
    for image_id, jpeg in release[2].items():
        assert (ham / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg").read_bytes() == jpeg
    assert sorted(p.name for p in ham.parent.iterdir()) == ["HAM10000"]


@pytest.mark.script
def test_ctrl_c_mid_download_is_one_line_and_the_download_resumes(ham, server, release, tmp_path):
    server.slow.add(INPUT)
    part = ham.parent / ".HAM10000.download" / f"{INPUT}.part"
    env = {"ISIC2018_URL": server.url, "OMP_NUM_THREADS": "1"}
    args = ["--data", "ham10000", "--data-root", ham, "--download", "--cache-dir", tmp_path / "cache"]
    process = subprocess.Popen(
        [sys.executable, "datasets.py", *map(str, args)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "it finished before it could be stopped"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("datasets.py: error: the download of ")
    assert "Ctrl-C" in stderr.splitlines()[-1] and "resume" in stderr.splitlines()[-1]
    kept = part.stat().st_size
    assert 0 < kept < len(release[0][INPUT]) and part.read_bytes() == release[0][INPUT][:kept]
    assert not ham.exists()
    server.slow.clear()
    server.log.clear()
    assert_is_the_release(fetch(ham), release)
    assert server.log[0] == (INPUT, f"bytes={kept}-")


def test_a_server_that_ignores_range_sends_the_file_whole_and_says_so(ham, server, release, capsys):
    server.cut_at[INPUT] = 1000
    with pytest.raises(bit_common.UserError):
        fetch(ham)
    server.ignore_range.add(INPUT)
    server.log.clear()
    assert_is_the_release(fetch(ham), release)
    assert server.log[0] == (INPUT, "bytes=1000-")  # asked, answered with 200 and the whole file
    assert "ignored the Range request" in capsys.readouterr().out
    assert sorted(p.name for p in ham.parent.iterdir()) == ["HAM10000"]


def test_a_server_that_answers_another_range_is_refused(ham, server, release):
    server.cut_at[INPUT] = 1000
    with pytest.raises(bit_common.UserError):
        fetch(ham)
    server.wrong_range.add(INPUT)
    with pytest.raises(bit_common.UserError) as e:
        fetch(ham)
    assert "bytes 0-" in one_line(e.value) and f"{INPUT}.part" in str(e.value)
    assert not ham.exists()


def test_a_part_that_is_already_whole_is_not_fetched_again(ham, server, release):
    """Stopped between the last byte and the check: the next run's Range starts at the end, the server
    answers 416 with the length (RFC 9110 §15.5.17), and the part is checked and kept as it is."""
    staging = ham.parent / ".HAM10000.download"
    staging.mkdir(parents=True)
    (staging / f"{INPUT}.part").write_bytes(release[0][INPUT])
    assert_is_the_release(fetch(ham), release)
    assert server.log[0] == (INPUT, f"bytes={len(release[0][INPUT])}-")
    assert [name for name, _ in server.log] == [INPUT, TRUTH, GROUPS]


# ------------------------------------------------------------------------------------- HAM10000: refusals


def refused(ham, kept=()):
    """The one-line error of a download into `ham` that leaves no root, no part file and no unpacking
    folder; only the files of `kept`, which arrived whole and checked before the refusal, stay in the hidden
    download folder beside the root for the next run."""
    with pytest.raises(bit_common.UserError) as e:
        fetch(ham)
    staging = ".HAM10000.download"
    expected = [staging, *(f"{staging}/{name}" for name in kept)] if kept else []
    assert not ham.parent.exists() or everything_below(ham.parent) == sorted(expected)
    return one_line(e.value)


def test_a_corrupt_zip_is_refused_and_nothing_is_kept(ham, server, release):
    """A byte changed inside a JPEG's compressed data: the archive opens, the member fails its CRC."""
    archive = bytearray(release[0][INPUT])
    with zipfile.ZipFile(io.BytesIO(release[0][INPUT])) as z:
        member = z.infolist()[3]
    at = member.header_offset + 30 + len(member.filename) + len(member.extra) + member.compress_size // 2
    archive[at] ^= 0xFF
    server.files[INPUT] = bytes(archive)
    message = refused(ham)
    assert INPUT in message and "corrupt" in message


@pytest.mark.parametrize("name", [INPUT, TRUTH])
def test_an_html_page_instead_of_a_zip_is_refused(ham, server, release, name):
    server.files[name] = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    message = refused(ham, kept=[INPUT] if name == TRUTH else [])
    if name == TRUTH:
        assert (ham.parent / ".HAM10000.download" / INPUT).read_bytes() == release[0][INPUT]
    assert f"{name}.part is not a zip archive" in message and "deleted" in message


@pytest.mark.parametrize(
    "change",
    ["an_image_missing", "an_image_not_in_the_truth", "an_image_without_a_lesion_group", "a_group_too_many"],
)
def test_csvs_that_disagree_with_the_images_are_refused(ham, server, release, change):
    files, rows, jpegs = release
    first = rows[0]["image_id"]
    if change == "an_image_missing":
        server.files[INPUT] = zipped(
            {f"ISIC2018_Task3_Training_Input/{i}.jpg": b for i, b in jpegs.items() if i != first}
        )
    elif change == "an_image_not_in_the_truth":
        server.files[INPUT] = zipped(
            {f"ISIC2018_Task3_Training_Input/{i}.jpg": b for i, b in jpegs.items()}
            | {"ISIC2018_Task3_Training_Input/ISIC_9999999.jpg": jpegs[first]}
        )
    elif change == "an_image_without_a_lesion_group":
        lines = files[GROUPS].decode().splitlines()
        server.files[GROUPS] = (
            "\n".join(line for line in lines if not line.startswith(first)) + "\n"
        ).encode()
    else:
        server.files[GROUPS] = files[GROUPS] + b"ISIC_9999999,HAM_9999999,histo\n"
    message = refused(ham)
    odd = "ISIC_9999999" if change in ("an_image_not_in_the_truth", "a_group_too_many") else first
    assert odd in message and "lacks" in message


def test_the_count_of_the_real_release_stays_checked(ham, monkeypatch):
    """A mirror serving fewer images than the release's 10,015 (here the stand-in, with the real count) is
    refused: no URL changes the count."""
    monkeypatch.setattr(datasets, "ISIC_IMAGE_COUNT", 10015)
    message = refused(ham)
    assert f"lists {PER_CLASS * 7} images; the release has 10,015" in message


def test_a_404_is_one_line_naming_the_url_and_nothing_is_left(ham, server):
    del server.files[INPUT]
    message = refused(ham)
    assert f"{server.url}{INPUT}" in message and "404" in message and str(ham) in message


def test_no_network_is_one_line_naming_the_url_and_nothing_is_left(ham, monkeypatch, tmp_path):
    url = closed_port_url()
    monkeypatch.setattr(datasets, "ISIC2018_URL", url)
    message = refused(ham)
    assert f"{url}{INPUT}" in message and "fetch it elsewhere" in message and str(ham) in message
    assert list(tmp_path.iterdir()) == []  # not even the folders


def test_a_member_that_would_land_outside_the_root_is_refused(ham, server, release, tmp_path):
    server.files[TRUTH] = zipped({"../../escaped.csv": b"image,MEL\n"})
    message = refused(ham)
    assert "../../escaped.csv" in message and "outside" in message
    assert "escaped.csv" not in str(everything_below(tmp_path))


def test_a_zip_bomb_is_refused_before_it_is_unpacked(ham, server, release, tmp_path):
    server.files[TRUTH] = zipped({"ISIC2018_Task3_Training_GroundTruth/zeros.csv": bytes(20 << 20)})
    message = refused(ham)
    assert "zip bomb" in message and TRUTH in message
    assert not any(p.stat().st_size > 1 << 20 for p in tmp_path.rglob("*") if p.is_file())


def test_too_little_free_space_is_refused_before_unpacking(ham, server, monkeypatch):
    usage = datasets.shutil.disk_usage
    monkeypatch.setattr(datasets.shutil, "disk_usage", lambda path: usage(path)._replace(free=1000))
    message = refused(ham)
    assert INPUT in message and "GB free" in message


def test_a_full_disk_while_unpacking_is_one_line_and_nothing_is_kept(ham, server, monkeypatch):
    def full(self, member, path=None, pwd=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extract", full)
    message = refused(ham)
    assert "the disk is full" in message and INPUT in message


def test_a_full_disk_while_downloading_keeps_what_arrived_for_a_resume(ham, server, release):
    """The part file on a full device (/dev/full: every write fails with ENOSPC)."""
    staging = ham.parent / ".HAM10000.download"
    staging.mkdir(parents=True)
    (staging / f"{INPUT}.part").symlink_to("/dev/full")
    with pytest.raises(bit_common.UserError) as e:
        fetch(ham)
    assert "the disk is full" in one_line(e.value) and f"{INPUT}.part" in str(e.value)
    assert not ham.exists()


def test_a_root_that_holds_other_files_is_not_downloaded_into(ham, server):
    ham.mkdir(parents=True)
    (ham / "notes.txt").write_text("mine")
    with pytest.raises(bit_common.DataError) as e:
        fetch(ham)
    assert str(ham) in one_line(e.value) and "empty folder" in str(e.value)
    assert everything_below(ham) == ["notes.txt"] and server.log == []


# ------------------------------------------------------------------------------------------- BiT weights


@pytest.fixture(scope="module")
def bit_m(tmp_path_factory):
    """(bytes, arrays) of a BiT-M-R50x1-shaped .npz with random values, in BiT's layout (test_bit_convert)."""
    arrays = random_bit_arrays()
    path = write_npz(tmp_path_factory.mktemp("npz") / "BiT-M-R50x1.npz", arrays)
    return path.read_bytes(), arrays


@pytest.fixture
def weights(server, bit_m, tmp_path, monkeypatch):
    """The .npz served as BiT-M-R50x1, bit_convert pointed at the server and at an empty cache."""
    server.files["BiT-M-R50x1.npz"] = bit_m[0]
    monkeypatch.setattr(bit_convert, "BIT_MODELS_URL", server.url)
    monkeypatch.setattr(bit_convert, "CACHE_DIR", tmp_path / "weights")
    return tmp_path / "weights"


@pytest.mark.heavy
def test_init_bit_m_fetches_the_weights_with_progress_and_loads_them(weights, server, bit_m, capsys):
    model = bit_convert.build_backbone("bit-m", norm="gn")
    assert server.log == [("BiT-M-R50x1.npz", None)]
    assert everything_below(weights) == ["BiT-M-R50x1.npz"]  # no part file beside it
    assert (weights / "BiT-M-R50x1.npz").read_bytes() == bit_m[0]
    for key, tensor in model_tensors(model).items():
        if not key.startswith("resnet/head"):
            assert torch.equal(tensor, hwio_to_oihw(bit_m[1][key])), key
    err = capsys.readouterr().err
    assert "BiT-M-R50x1.npz" in err and "100%" in err
    server.log.clear()
    bit_convert.build_backbone("bit-m", norm="bn")  # cached: not fetched again
    assert server.log == []


@pytest.mark.heavy
def test_an_interrupted_weights_download_resumes_byte_identical(weights, server, bit_m):
    server.cut_at["BiT-M-R50x1.npz"] = len(bit_m[0]) // 2
    with pytest.raises(bit_common.UserError) as e:
        bit_convert.bit_file("BiT-M-R50x1")
    assert "resume" in one_line(e.value) and str(weights / "BiT-M-R50x1.npz.part") in str(e.value)
    assert everything_below(weights) == ["BiT-M-R50x1.npz.part"]
    path = bit_convert.bit_file("BiT-M-R50x1")
    assert server.log[-1] == ("BiT-M-R50x1.npz", f"bytes={len(bit_m[0]) // 2}-")
    assert path.read_bytes() == bit_m[0] and everything_below(weights) == ["BiT-M-R50x1.npz"]


@pytest.mark.heavy
@pytest.mark.parametrize("served", ["truncated", "html", "an_npz_of_other_arrays"])
def test_weights_that_are_not_a_complete_bit_file_are_refused_and_not_kept(weights, server, bit_m, served):
    """A file the server sends whole (Content-Length and all) that is not the BiT .npz asked for: checked
    before it is kept (every array's CRC, every key of its architecture with its shape), then deleted."""
    server.files["BiT-M-R50x1.npz"] = {
        "truncated": bit_m[0][: len(bit_m[0]) // 2],
        "html": b"<!DOCTYPE html><html>Not here</html>",
        "an_npz_of_other_arrays": write_npz(
            weights.parent / "r50x3.npz", {ROOT_KEY: np.zeros((7, 7, 3, 192), np.float32)}
        ).read_bytes(),
    }[served]
    with pytest.raises(bit_common.UserError) as e:
        bit_convert.build_backbone("bit-m")
    message = one_line(e.value)
    assert f"{server.url}BiT-M-R50x1.npz" in message and "deleted" in message
    assert not weights.exists() or list(weights.iterdir()) == []


def test_weights_offline_are_one_line_naming_the_url_and_where_to_put_the_file(weights, monkeypatch):
    url = closed_port_url()
    monkeypatch.setattr(bit_convert, "BIT_MODELS_URL", url)
    with pytest.raises(bit_common.UserError) as e:
        bit_convert.build_backbone("bit-s")
    message = one_line(e.value)
    assert f"{url}BiT-S-R50x1.npz" in message and f"put it at {weights / 'BiT-S-R50x1.npz'}" in message
    assert not weights.exists()


@pytest.mark.heavy
@pytest.mark.skipif("BIT_MODELS_URL" in os.environ, reason="a mirror is named here")
def test_the_weights_come_from_the_bit_bucket_unless_a_mirror_is_named():
    """google-research/big_transfer's README: https://storage.googleapis.com/bit_models/{NAME}.npz."""
    assert bit_convert.BIT_MODELS_URL == "https://storage.googleapis.com/bit_models/"


@pytest.mark.script
def test_a_process_that_finds_another_fetching_waits_for_it(weights, server, bit_m, capsys):
    """torchrun's processes all build the backbone: the first fetches, the others wait on the part file's
    lock and then find the file there, without fetching it again."""
    import fcntl

    weights.mkdir()
    part = weights / "BiT-M-R50x1.npz.part"
    holder = open(part, "ab")
    fcntl.flock(holder, fcntl.LOCK_EX)
    found = []
    waiter = threading.Thread(target=lambda: found.append(bit_convert.bit_file("BiT-M-R50x1")))
    waiter.start()
    said, deadline = "", time.monotonic() + 60
    while "waiting for another process" not in said and time.monotonic() < deadline:
        time.sleep(0.05)
        said += capsys.readouterr().out
    assert "waiting for another process" in said and waiter.is_alive() and server.log == []
    holder.write(bit_m[0])
    holder.flush()
    os.replace(part, weights / "BiT-M-R50x1.npz")
    holder.close()  # releases the lock
    waiter.join(60)
    assert found == [weights / "BiT-M-R50x1.npz"] and server.log == []
    assert everything_below(weights) == ["BiT-M-R50x1.npz"]


# ------------------------------------------------------------------------------------ the card's command


def run_with_count(count, script, *args, env):
    """`script` run as its command line runs it, with datasets.ISIC_IMAGE_COUNT set to the stand-in's
    count first (see the module's docstring)."""
    wrapper = Path(env["HOME"]) / "with_count.py"
    wrapper.write_text(
        f"import runpy, sys\nsys.path.insert(0, {str(REPO)!r})\nimport datasets\n"
        f"datasets.ISIC_IMAGE_COUNT = {count}\nsys.argv[0] = {script!r}\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    return run_script(wrapper, *args, env=env)


@pytest.mark.script
def test_the_cards_command_downloads_once_then_runs_as_written(server, release, bit_m, tmp_path):
    """`pretrain.py --init bit-m --data ham10000` on a fresh machine: one line saying what --download
    fetches; with --download, the data and the weights arrive in the default places under HOME and a run
    completes; then the card's command as written runs without fetching anything."""
    server.files.update(release[0])
    server.files["BiT-M-R50x1.npz"] = bit_m[0]
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "BIT_CACHE": "", "HAM10000_ROOT": ""}  # the defaults, under this HOME
    env |= {"ISIC2018_URL": server.url, "BIT_MODELS_URL": server.url}
    # one step of 8 images (about 14 pretrain images), each run
    small = ["--image-size", "8", "--epochs", "1", "--batch-size", "8", "--split", "0.2,0.4,0.2,0.2"]
    small += ["--split-file", tmp_path / "split.json", "--workers", "0", "--device", "cpu"]
    card = ["pretrain.py", "--init", "bit-m", "--data", "ham10000"]

    first = run_with_count(len(release[1]), *card, *small, "--out", tmp_path / "first", env=env)
    assert first.returncode == 1, first.stderr
    assert first.stderr.strip().count("\n") == 0 and "--download" in first.stderr
    assert str(home / ".cache" / "bit-simsiam" / "data" / "HAM10000") in first.stderr
    assert server.log == [] and not (home / ".cache" / "bit-simsiam").exists()

    fetched = run_with_count(len(release[1]), *card, "--download", *small, "--out", tmp_path / "run", env=env)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert sorted(name for name, _ in server.log) == sorted([INPUT, TRUTH, GROUPS, "BiT-M-R50x1.npz"])
    cache = home / ".cache" / "bit-simsiam"
    assert (cache / "weights" / "BiT-M-R50x1.npz").read_bytes() == bit_m[0]
    assert sorted(p.name for p in (cache / "data").iterdir()) == ["HAM10000"]
    assert (tmp_path / "run" / "backbone.pt").exists()

    server.log.clear()
    again = run_with_count(len(release[1]), *card, *small, "--out", tmp_path / "again", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert server.log == [] and (tmp_path / "again" / "backbone.pt").exists()
