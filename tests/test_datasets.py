"""Tests of datasets.py against the data formats as their publishers ship them.

Every stand-in is written here, into tmp_path, in the real format: a HAM10000 tree (the real CSV header, CRLF,
real image ids from tests/data/HAM10000_metadata_sample.csv, small JPEGs in HAM10000_images_part_1/2), the
ISIC 2018 Task 3 layout, CIFAR-10's pickle batches, a DermaMNIST .npz and an image folder with odd PIL modes.
Expected values come from this file's own reading of those files (the csv module, numpy, PIL, scikit-learn),
never from datasets.py itself. The split tests run on the real 10015-row metadata where ../shared/data has it
(skipped otherwise) and always on the committed 415-row sample.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import bit_common
import bit_convert
import datasets
from helpers import (
    ISIC_COLUMNS,
    REPO,
    SAMPLE,
    colour,
    read_rows,
    write_cifar,
    write_crlf,
    write_dermamnist,
    write_ham,
    write_images,
    write_isic,
    write_jpeg,
)

FULL = REPO.parent / "shared" / "data" / "HAM10000_metadata.csv"
HAM_ORDER = (
    "akiec",
    "bcc",
    "bkl",
    "df",
    "mel",
    "nv",
    "vasc",
)  # alphabetical: DermaMNIST's label ids (MedMNIST v2)
PARTS = ("pretrain", "train", "val", "test")
SPLIT = "0.6,0.1,0.1,0.2"
SIZE = 16


# --------------------------------------------------------------------------------------------------- fixtures


def metadata_only(root):
    """The HAM10000 metadata in `root` as a Data with 1x1 dummy images: what the split tests need."""
    ids, dx, lesions, _ = datasets.read_ham_metadata(root)
    return datasets.Data(
        "ham10000",
        np.zeros((len(ids), 1, 1, 3), np.uint8),
        np.array([HAM_ORDER.index(d) for d in dx], dtype=np.int64),
        ids,
        HAM_ORDER,
        lesions,
    )


@pytest.fixture(scope="module")
def sample_rows():
    return read_rows(SAMPLE)


@pytest.fixture(scope="module")
def small(sample_rows):
    """Rows of 4 real lesions per class (the multi-image ones first), in file order: ~50 images."""
    count = Counter(r["lesion_id"] for r in sample_rows)
    keep = set()
    for dx in HAM_ORDER:
        lesions = {r["lesion_id"] for r in sample_rows if r["dx"] == dx}
        lesions = sorted(lesions, key=lambda lesion: (-count[lesion], lesion))
        keep |= set(lesions[:4])
    return [r for r in sample_rows if r["lesion_id"] in keep]


@pytest.fixture(scope="module")
def ham_root(small, tmp_path_factory):
    """A read-only HAM10000 tree shared by the tests that do not change it."""
    return write_ham(tmp_path_factory.mktemp("ham") / "HAM10000", small)


def assert_ham(data, rows, size=SIZE):
    """`data` holds exactly `rows`, in their order, with their labels, lesions and pixels."""
    assert data.name == "ham10000"
    assert data.images.dtype == np.uint8 and data.images.shape == (len(rows), size, size, 3)
    assert data.ids == [r["image_id"] for r in rows]
    assert data.labels.tolist() == [HAM_ORDER.index(r["dx"]) for r in rows]
    assert tuple(data.classes) == HAM_ORDER
    assert data.bad == {}
    for k in range(len(rows)):  # JPEG keeps a solid colour within a few levels
        assert np.abs(data.images[k].reshape(-1, 3).mean(0) - colour(k)).max() < 6, rows[k]["image_id"]


# -------------------------------------------------------------------------------------------- 1. every source


def test_digits_are_sklearn_digits_as_rgb():
    from sklearn.datasets import load_digits

    ref = load_digits()
    data = datasets.load_digits()
    assert data.images.dtype == np.uint8 and data.images.shape == (1797, 8, 8, 3)
    np.testing.assert_array_equal(data.images[..., 0], np.round(ref.images * 255 / 16))
    assert np.array_equal(data.images[..., 0], data.images[..., 2])
    assert data.labels.tolist() == ref.target.tolist()
    assert data.ids == list(range(1797)) and tuple(data.classes) == tuple("0123456789")


@pytest.mark.parametrize("variant", ["parts", "age_float", "dataset_column", "flat"])
def test_ham10000_loads_every_metadata_variant(tmp_path, small, variant):
    root = write_ham(
        tmp_path / "ham",
        small,
        layout="flat" if variant == "flat" else "parts",
        age_float=variant == "age_float",
        dataset_column=variant == "dataset_column",
    )
    raw = (root / "HAM10000_metadata.csv").read_bytes()
    assert raw.count(b"\r\n") == len(small) + 1
    assert (variant != "age_float") or b".0," in raw
    data = datasets.load_ham10000(root, SIZE, tmp_path / "cache")
    assert_ham(data, small)
    assert data.groups == [r["lesion_id"] for r in small]


def test_ham10000_tree_splits_images_between_the_two_part_folders(ham_root, small, tmp_path):
    parts = {p.parent.name for p in ham_root.rglob("*.jpg")}
    assert parts == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert_ham(datasets.load_ham10000(ham_root, SIZE, tmp_path), small)


@pytest.mark.parametrize("groupings", [True, False])
def test_isic2018_ground_truth_columns_are_mapped_by_name(tmp_path, small, groupings):
    root = write_isic(tmp_path / "isic", small, groupings)
    data = datasets.load_ham10000(root, SIZE, tmp_path / "cache")
    assert_ham(data, small)
    if groupings:
        assert data.groups == [r["lesion_id"] for r in small]
    else:
        assert data.groups is None


def test_isic2018_without_groupings_refuses_a_lesion_split_but_splits_by_image(tmp_path, small):
    data = datasets.load_ham10000(write_isic(tmp_path / "isic", small, False), SIZE, tmp_path / "cache")
    with pytest.raises(bit_common.DataError, match="--split-by image"):
        datasets.make_split(data, datasets.parse_fractions(SPLIT), 0, "lesion")
    split = datasets.make_split(data, datasets.parse_fractions(SPLIT), 0, "image")
    assert sorted(sum((split[p] for p in PARTS), [])) == sorted(r["image_id"] for r in small)


def test_isic2018_archives_as_unpacked_load_from_their_common_parent(tmp_path, small):
    root = write_isic(tmp_path / "isic", small, False)
    (root / "ISIC2018_Task3_Training_GroundTruth").mkdir()
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").rename(
        root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    )
    assert_ham(datasets.load_ham10000(root, SIZE, tmp_path / "cache"), small)


def test_cifar10_reads_the_pickles_channel_major_without_torchvision_md5(tmp_path):
    rows, labels, names = write_cifar(tmp_path)
    with pytest.raises(
        RuntimeError
    ):  # the stand-in fails torchvision's md5 check: the loader must not use it
        torchvision.datasets.CIFAR10(tmp_path, train=True, download=False)
    data = datasets.load_cifar10(tmp_path)
    assert data.images.dtype == np.uint8 and data.images.shape == (120, 32, 32, 3)
    for i in (0, 57, 100, 119):
        expected = np.empty((32, 32, 3), np.uint8)
        for r in range(32):
            for c in range(32):
                for k in range(3):
                    expected[r, c, k] = rows[i, k * 1024 + r * 32 + c]
        np.testing.assert_array_equal(data.images[i], expected)
    assert data.labels.tolist() == labels.tolist() and data.labels.dtype == np.int64
    assert tuple(data.classes) == tuple(names) and data.ids == list(range(120))
    assert data.official_test.tolist() == [False] * 100 + [True] * 20


def test_folder_turns_every_mode_into_rgb_uint8(tmp_path):
    rng = np.random.default_rng(2)
    rgb = lambda: rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # noqa: E731
    root = tmp_path / "folder"
    (root / "alpha").mkdir(parents=True)
    (root / "beta").mkdir()
    Image.fromarray(rgb()[..., 0]).save(root / "alpha" / "grey_L.png")
    alpha = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb(), alpha])).save(root / "alpha" / "rgba.png")
    Image.fromarray(rgb()).convert("P").save(root / "alpha" / "palette_P.png")
    depth = (np.arange(256).reshape(16, 16) * 8 + 1000).astype(
        np.uint16
    )  # 1000..3040: not 0..max, not 0..65535
    Image.fromarray(depth).save(root / "beta" / "depth16.png")
    Image.fromarray(rgb()[..., :2].copy(), "LA").save(root / "beta" / "grey_alpha_LA.png")
    Image.fromarray(rgb()).convert("CMYK").save(root / "beta" / "cmyk.jpg")
    modes = {p.relative_to(root).as_posix(): Image.open(p).mode for p in root.rglob("*.*")}
    assert sorted(modes.values()) == sorted(["L", "RGBA", "P", "I;16", "LA", "CMYK"])

    data = datasets.load_folder(root, SIZE, tmp_path / "cache")
    expected_ids = sorted(modes)  # class folders in order, file names sorted within each
    assert data.ids == expected_ids and tuple(data.classes) == ("alpha", "beta")
    assert data.labels.tolist() == [0 if i.startswith("alpha/") else 1 for i in expected_ids]
    assert data.images.dtype == np.uint8 and data.images.shape == (6, SIZE, SIZE, 3)
    for k, image_id in enumerate(data.ids):
        if modes[image_id] == "I;16":  # min-max stretch to 0..255 (the file is already 16 px: no resize)
            stretched = np.round((depth - 1000.0) / 2040.0 * 255)
            assert data.images[k].min() == 0 and data.images[k].max() == 255
            for c in range(3):
                np.testing.assert_array_equal(data.images[k][..., c], stretched)
        else:  # exact: PNGs, and a 40x30 JPEG is below 2x16 px so libjpeg's draft scaling does not apply
            with Image.open(root / image_id) as img:
                ref = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
            np.testing.assert_array_equal(data.images[k], ref, err_msg=image_id)


def test_dermamnist_file_or_directory_keeps_the_official_test_part(tmp_path):
    parts = write_dermamnist(tmp_path / "dermamnist.npz")
    for root in (tmp_path / "dermamnist.npz", tmp_path):
        data = datasets.load_dermamnist(root)
        np.testing.assert_array_equal(
            data.images, np.concatenate([parts[p][0] for p in ("train", "val", "test")])
        )
        assert (
            data.labels.tolist()
            == np.concatenate([parts[p][1][:, 0] for p in ("train", "val", "test")]).tolist()
        )
        assert data.images.dtype == np.uint8 and data.labels.max() < len(data.classes)
        assert tuple(data.classes) == HAM_ORDER and data.ids == list(range(77))
        assert data.official_test.tolist() == [False] * 56 + [True] * 21


# ----------------------------------------------------------------------------- 2. splits on the real metadata


@pytest.fixture(scope="module", params=["full", "sample"])
def real(request, tmp_path_factory):
    """The real metadata (full file, or the committed sample) as a Data with 1x1 dummy images, and its two
    splits."""
    if request.param == "full":
        if not FULL.exists():
            pytest.skip(f"{FULL} absent (a fresh clone has only the committed sample)")
        root = FULL.parent
        tol = SimpleNamespace(size=0.01, prop=0.02, min_class=100)
    else:
        root = tmp_path_factory.mktemp("sample")
        shutil.copy(SAMPLE, root / "HAM10000_metadata.csv")
        # 415 images: a 10-fold cut moves a few images
        tol = SimpleNamespace(size=0.02, prop=0.06, min_class=50)
    rows = read_rows(root / "HAM10000_metadata.csv")
    data = metadata_only(root)
    fractions = datasets.parse_fractions(SPLIT)
    made = {by: datasets.make_split(data, fractions, 0, by) for by in ("lesion", "image")}
    return SimpleNamespace(kind=request.param, root=root, rows=rows, data=data, splits=made, tol=tol)


@pytest.mark.heavy
def test_read_ham_metadata_matches_the_raw_csv(real):
    ids, dx, lesions, source = datasets.read_ham_metadata(real.root)
    assert source == real.root / "HAM10000_metadata.csv"
    assert ids == [r["image_id"] for r in real.rows]
    assert dx == [r["dx"] for r in real.rows] and lesions == [r["lesion_id"] for r in real.rows]
    if real.kind == "full":  # Tschandl et al. 2018, Sci. Data
        assert len(ids) == 10015 and len(set(lesions)) == 7470
        assert Counter(dx) == {
            "nv": 6705,
            "mel": 1113,
            "bkl": 1099,
            "bcc": 514,
            "akiec": 327,
            "vasc": 142,
            "df": 115,
        }
    else:
        assert len(ids) == 415 and len(set(lesions)) == 300 and set(dx) == set(HAM_ORDER)
        assert max(Counter(lesions).values()) >= 2


def parts_of(split, rows):
    """{part: set of image ids}, {part: set of lesion ids}, from this file's own reading of the metadata."""
    lesion_of = {r["image_id"]: r["lesion_id"] for r in rows}
    images = {p: set(split[p]) for p in PARTS}
    lesions = {p: {lesion_of[i] for i in split[p]} for p in PARTS}
    return images, lesions


@pytest.mark.heavy
def test_lesion_split_is_disjoint_by_image_and_by_lesion_and_covers_everything(real):
    split = real.splits["lesion"]
    images, lesions = parts_of(split, real.rows)
    for p in PARTS:
        assert len(images[p]) == len(split[p]), f"{p} lists an image twice"
    assert sum(len(images[p]) for p in PARTS) == len(real.rows)
    assert set().union(*images.values()) == {r["image_id"] for r in real.rows}
    for a in PARTS:
        for b in PARTS:
            if a < b:
                assert not images[a] & images[b], (a, b)
                assert not lesions[a] & lesions[b], (
                    f"lesions {sorted(lesions[a] & lesions[b])[:3]} in {a} and {b}"
                )
    assert split["val"] and split["test"] and split["val"] != split["test"]


@pytest.mark.heavy
@pytest.mark.parametrize("by", ["lesion", "image"])
def test_split_sizes_follow_the_fractions(real, by):
    n = len(real.rows)
    for part, fraction in zip(PARTS, (0.6, 0.1, 0.1, 0.2)):
        assert abs(len(real.splits[by][part]) - fraction * n) <= real.tol.size * n, part


@pytest.mark.heavy
@pytest.mark.parametrize("by", ["lesion", "image"])
def test_split_class_proportions_follow_the_whole(real, by):
    dx_of = {r["image_id"]: r["dx"] for r in real.rows}
    whole = Counter(dx_of.values())
    big = [c for c in HAM_ORDER if whole[c] >= real.tol.min_class]
    assert big
    for part in PARTS:
        counts = Counter(dx_of[i] for i in real.splits[by][part])
        for c in big:
            share, expected = counts[c] / len(real.splits[by][part]), whole[c] / len(real.rows)
            assert abs(share - expected) <= real.tol.prop, (part, c, share, expected)


@pytest.mark.heavy
def test_image_split_lets_lesions_cross_parts_which_the_lesion_split_forbids(real):
    images, lesions = parts_of(real.splits["image"], real.rows)
    assert sum(len(images[p]) for p in PARTS) == len(real.rows) == len(set().union(*images.values()))
    crossing = {lesion for a in PARTS for b in PARTS if a < b for lesion in lesions[a] & lesions[b]}
    assert len(crossing) > (100 if real.kind == "full" else 10)


# ---------------------------------------------------------------------------------------------- 3. load_split


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_meta")
    shutil.copy(SAMPLE, root / "HAM10000_metadata.csv")
    return metadata_only(root)


def test_split_depends_on_the_seed_and_only_on_it(sample_data):
    fractions = datasets.parse_fractions(SPLIT)
    first = datasets.make_split(sample_data, fractions, 0, "lesion")
    assert datasets.make_split(sample_data, fractions, 0, "lesion") == first
    assert datasets.make_split(sample_data, fractions, 1, "lesion")["test"] != first["test"]


def test_load_split_writes_the_parts_as_id_lists(tmp_path, sample_data):
    path = tmp_path / "sub" / "split.json"
    returned = datasets.load_split(sample_data, path, SPLIT, 0, "lesion")
    on_disk = json.loads(path.read_text())
    assert all(isinstance(on_disk[p], list) for p in PARTS)
    assert sorted(sum((on_disk[p] for p in PARTS), [])) == sorted(sample_data.ids)
    assert on_disk["seed"] == 0 and on_disk["split_by"] == "lesion" and on_disk["data"] == "ham10000"
    assert {p: on_disk[p] for p in PARTS} == {p: returned[p] for p in PARTS}
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left


def test_load_split_is_byte_identical_for_the_same_data_and_seed(tmp_path, sample_data):
    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.json"))
    datasets.load_split(sample_data, a, SPLIT, 0)
    datasets.load_split(sample_data, b, SPLIT, 0)
    datasets.load_split(sample_data, c, SPLIT, 1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_load_split_reuses_an_existing_file_unchanged(tmp_path, sample_data):
    path = tmp_path / "split.json"
    datasets.load_split(sample_data, path, SPLIT, 0)
    before, stamp = path.read_bytes(), path.stat().st_mtime_ns
    again = datasets.load_split(sample_data, path)  # no flags: the file's own split
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    assert {p: again[p] for p in PARTS} == {p: json.loads(before)[p] for p in PARTS}


@pytest.mark.heavy
@pytest.mark.parametrize("change", ["subset", "label", "lesion"])
def test_load_split_refuses_a_file_made_from_other_data(tmp_path, sample_data, change):
    path = tmp_path / "split.json"
    datasets.load_split(sample_data, path, SPLIT, 0)
    if change == "subset":
        keep = slice(0, len(sample_data.ids) - 1)
        other = dataclasses.replace(
            sample_data,
            images=sample_data.images[keep],
            labels=sample_data.labels[keep],
            ids=sample_data.ids[keep],
            groups=sample_data.groups[keep],
        )
    elif change == "label":
        labels = sample_data.labels.copy()
        labels[0] = (labels[0] + 1) % 7
        other = dataclasses.replace(sample_data, labels=labels)
    else:
        other = dataclasses.replace(sample_data, groups=["HAM_9999999"] + sample_data.groups[1:])
    with pytest.raises(bit_common.DataError, match=re.escape(str(path))):
        datasets.load_split(other, path, SPLIT, 0)


def test_load_split_refuses_overlapping_parts(tmp_path, sample_data):
    path = tmp_path / "split.json"
    split = datasets.load_split(sample_data, path, SPLIT, 0)
    doctored = json.loads(path.read_text())
    doctored["test"].append(split["pretrain"][0])
    path.write_text(json.dumps(doctored))
    with pytest.raises(bit_common.DataError, match=r"split\.json: part test .*another part"):
        datasets.load_split(sample_data, path, SPLIT, 0)


@pytest.mark.parametrize("text", ["{not json", '{"pretrain": []}'])
def test_load_split_refuses_an_unreadable_file(tmp_path, sample_data, text):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(bit_common.DataError, match=re.escape(str(path))):
        datasets.load_split(sample_data, path, SPLIT, 0)


def test_default_split_file_names_data_grouping_fractions_and_seed():
    assert datasets.default_split_file("ham10000", SPLIT, 3, "lesion") == Path(
        "splits/ham10000-lesion-60-10-10-20-seed3.json"
    )
    assert datasets.default_split_file("cifar10", "0.7,0.1,0.1,0.1", 0, "image") == Path(
        "splits/cifar10-image-70-10-10-10-seed0.json"
    )


def test_parse_fractions_reads_four_exact_fractions():
    assert datasets.parse_fractions(SPLIT) == [
        Fraction(3, 5),
        Fraction(1, 10),
        Fraction(1, 10),
        Fraction(1, 5),
    ]


@pytest.mark.parametrize(
    "text",
    ["0.6,0.1,0.1,0.1", "0.6,0.2,0.2", "0.5,0.1,0.1,0.1,0.2", "0.6,0,0.2,0.2", "a,b,c,d", "0.6,0.1,0.1,0.2,"],
)
def test_parse_fractions_refuses_bad_fractions_naming_the_flag(text):
    with pytest.raises(bit_common.DataError, match=re.escape(f"--split {text}")):
        datasets.parse_fractions(text)


def test_fractions_come_in_steps_of_a_hundredth_and_each_such_makes_a_split():
    with pytest.raises(bit_common.DataError, match="steps of 0.01"):
        datasets.parse_fractions("0.0016666667,0.0011111111,0.5,0.4972222222")  # would need 1800 folds
    digits = datasets.load_digits()
    split = datasets.make_split(
        digits, datasets.parse_fractions("0.33,0.07,0.19,0.41"), 0, "image"
    )  # 100 folds
    assert [round(len(split[p]) / len(digits.ids), 2) for p in PARTS] == [0.33, 0.07, 0.19, 0.41]


# -------------------------------------------------------------------------------------- 4. official test sets


def check_official_test(data, split):
    official = [i for i, t in zip(data.ids, data.official_test) if t]
    rest = [i for i, t in zip(data.ids, data.official_test) if not t]
    assert split["test"] == official
    others = sum((split[p] for p in PARTS[:3]), [])
    assert sorted(others) == sorted(rest) and len(set(others)) == len(rest)
    n = len(rest)  # the first three fractions 0.6 : 0.1 : 0.1 shared over the rest
    for part, share in zip(PARTS[:3], (0.75, 0.125, 0.125)):
        assert abs(len(split[part]) - share * n) <= 0.05 * n + 1, part


def test_cifar10_keeps_the_official_test_batch_as_the_test_part(tmp_path):
    write_cifar(tmp_path, n=40)
    data = datasets.load_cifar10(tmp_path)
    check_official_test(data, datasets.make_split(data, datasets.parse_fractions(SPLIT), 0))
    check_official_test(data, datasets.load_split(data, tmp_path / "split.json", SPLIT, 0))
    assert json.loads((tmp_path / "split.json").read_text())["test"] == list(range(200, 240))


def test_dermamnist_keeps_its_official_test_part(tmp_path):
    write_dermamnist(tmp_path / "dermamnist.npz", sizes=(140, 20, 35))
    data = datasets.load_dermamnist(tmp_path / "dermamnist.npz")
    check_official_test(data, datasets.load_split(data, tmp_path / "split.json", SPLIT, 0))
    assert json.loads((tmp_path / "split.json").read_text())["test"] == list(range(160, 195))


# --------------------------------------------------------------------------------------------------- 5. views


def noise_data(n=4, side=40):
    rng = np.random.default_rng(3)
    return datasets.Data(
        "folder",
        rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
        np.arange(n, dtype=np.int64) % 2,
        [f"x{i}" for i in range(n)],
        ("a", "b"),
    )


@pytest.mark.parametrize("size", [24, 64])
def test_simsiam_view_gives_a_square_pil_image(size):
    torch.manual_seed(0)
    img = Image.fromarray(noise_data().images[0][:30])  # 40 wide, 30 high
    out = datasets.simsiam_view(size)(img)
    assert isinstance(out, Image.Image) and out.size == (size, size) and out.mode == "RGB"


def test_imageset_gives_two_different_uint8_views_and_the_label():
    torch.manual_seed(0)
    data = noise_data()
    item = datasets.ImageSet(data, np.array([3, 1]), [datasets.simsiam_view(32)] * 2)[0]
    assert len(item) == 3 and item[2] == int(data.labels[3])
    for view in item[:2]:
        assert view.dtype == torch.uint8 and view.shape == (3, 32, 32)
    assert not torch.equal(item[0], item[1])


def test_seeded_key_repeats_its_views_and_leaves_the_global_rng_alone():
    images = datasets.ImageSet(noise_data(), np.arange(4), [datasets.simsiam_view(32)] * 2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = images[(5, 2)], images[(5, 2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    other = images[(6, 2)]
    assert not torch.equal(first[0], other[0])
    images[2]  # unseeded: draws from the global generator (so the comparison above can fail)
    assert not torch.equal(torch.get_rng_state(), before)


def has_blur(compose):
    inner = [u for t in compose.transforms for u in getattr(t, "transforms", [t])]
    return any("Blur" in type(t).__name__ for t in inner)


def test_blur_only_above_32_pixels():
    assert not has_blur(datasets.simsiam_view(32)) and not has_blur(datasets.simsiam_view(16))
    assert has_blur(datasets.simsiam_view(33)) and has_blur(datasets.simsiam_view(224))


def test_random_gaussian_blur_smooths():
    torch.manual_seed(0)
    img = Image.fromarray(noise_data().images[0])
    out = np.asarray(datasets.RandomGaussianBlur((1.0, 2.0))(img), dtype=float)
    assert (
        np.abs(np.diff(out, axis=1)).mean()
        < 0.5 * np.abs(np.diff(np.asarray(img, dtype=float), axis=1)).mean()
    )


def test_eval_view_is_resize_then_center_crop():
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 45, 3), dtype=np.uint8))
    ref = np.asarray(img.resize((24, 16), Image.BILINEAR).crop((4, 0, 20, 16)))
    first, second = datasets.eval_view(16)(img), datasets.eval_view(16)(img)
    assert first.size == (16, 16)
    assert np.abs(np.asarray(first, dtype=int) - ref).max() <= 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_eval_images_stacks_the_eval_view_as_uint8():
    data = noise_data(side=20)
    out = datasets.eval_images(data, np.array([3, 0, 2]), 16)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 16, 16)
    for j, i in enumerate((3, 0, 2)):
        ref = np.asarray(Image.fromarray(data.images[i]).resize((16, 16), Image.BILINEAR))
        assert np.abs(out[j].permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1
    assert datasets.eval_images(data, np.array([], dtype=np.int64), 16).shape == (0, 3, 16, 16)


def test_to_input_maps_0_255_onto_minus_1_plus_1():
    x = torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8)
    y = bit_convert.to_input(x, torch.device("cpu"))
    assert y.dtype == torch.float32
    assert y[0, 0].item() == -1.0 and y[0, 3].item() == 1.0
    np.testing.assert_allclose(y.numpy(), x.numpy() / 127.5 - 1, atol=1e-6)
    assert abs((y[0, 1] + y[0, 2]).item()) < 1e-6  # 127.5 is the midpoint
    assert x.tolist() == [[0, 127, 128, 255]]


# --------------------------------------------------------------------------------------- 6. decode-once cache


def cache_files(cache_dir):
    return sorted(p.name for p in (cache_dir / "images").iterdir())


def test_decode_cache_is_written_once_then_reused(tmp_path, small, monkeypatch):
    root = write_ham(tmp_path / "ham", small)
    cache = tmp_path / "cache"
    first = np.array(datasets.load_ham10000(root, SIZE, cache).images)
    files = cache_files(cache)
    assert len(files) == 2 and files[0][:-5] == files[1][:-4]
    assert re.fullmatch(r"16px-[0-9a-f]+\.json", files[0]) and files[1].endswith(".npy")
    assert json.loads((cache / "images" / files[0]).read_text())["count"] == len(small)
    np.testing.assert_array_equal(np.load(cache / "images" / files[1]), first)

    def no_decoding(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(bit_common, "read_rgb", no_decoding)
    second = datasets.load_ham10000(root, SIZE, cache)
    np.testing.assert_array_equal(second.images, first)
    assert cache_files(cache) == files


def test_a_changed_image_file_makes_a_new_cache_entry(tmp_path, small, monkeypatch):
    root = write_ham(tmp_path / "ham", small)
    cache = tmp_path / "cache"
    first = np.array(datasets.load_ham10000(root, SIZE, cache).images)
    path = next(root.rglob(f"{small[0]['image_id']}.jpg"))
    Image.fromarray(np.full((30, 40, 3), (250, 5, 5), np.uint8)).save(path, quality=80)
    stamp = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(stamp, stamp))
    calls = []
    real_read = bit_common.read_rgb
    monkeypatch.setattr(bit_common, "read_rgb", lambda p, s: calls.append(p) or real_read(p, s))
    again = datasets.load_ham10000(root, SIZE, cache)
    assert len(calls) == len(small) and len(cache_files(cache)) == 4
    assert np.abs(again.images[0].reshape(-1, 3).mean(0) - (250, 5, 5)).max() < 8
    np.testing.assert_array_equal(again.images[1:], first[1:])


def test_cached_jpeg_decode_is_close_to_a_full_pil_decode(tmp_path):
    """read_rgb lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (img.draft) before the resize, so
    pixels differ slightly from a full decode + resize: compared within a tolerance here (the exact
    comparison, on PNGs and small JPEGs, is in test_folder_turns_every_mode_into_rgb_uint8)."""
    y, x = np.mgrid[0:120, 0:160]
    smooth = np.dstack([128 + 100 * np.sin(x / 25), 128 + 100 * np.cos(y / 20), (x + y) * 255 / 280])
    root = tmp_path / "folder"
    (root / "c").mkdir(parents=True)
    Image.fromarray(smooth.astype(np.uint8)).save(root / "c" / "big.jpg", quality=95)
    data = datasets.load_folder(root, SIZE, tmp_path / "cache")
    with Image.open(root / "c" / "big.jpg") as img:
        ref = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=int)
    diff = np.abs(data.images[0].astype(int) - ref)
    assert diff.mean() < 1 and diff.max() <= 4


def test_skipped_image_stays_skipped_when_the_root_is_spelled_differently(tmp_path, small, monkeypatch):
    root = write_ham(tmp_path / "ham", small)
    bad = next(root.rglob(f"{small[0]['image_id']}.jpg"))
    bad.write_bytes(os.urandom(600))
    monkeypatch.chdir(tmp_path)
    relative = datasets.load_ham10000(Path("ham"), SIZE, tmp_path / "cache", skip_bad=True)
    absolute = datasets.load_ham10000(root, SIZE, tmp_path / "cache", skip_bad=True)
    assert small[0]["image_id"] not in relative.ids
    assert absolute.ids == relative.ids


# -------------------------------------------------------------------------------------------------- 7. errors


@pytest.mark.parametrize("loader", ["ham10000", "folder", "dermamnist", "load_data"])
def test_missing_root_is_named(tmp_path, loader):
    root = tmp_path / "absent"
    with pytest.raises(bit_common.DataError, match=re.escape(str(root))) as e:
        if loader == "ham10000":
            datasets.load_ham10000(root, SIZE, tmp_path)
        elif loader == "folder":
            datasets.load_folder(root, SIZE, tmp_path)
        elif loader == "dermamnist":
            datasets.load_dermamnist(root)
        else:
            datasets.load_data("ham10000", root, None, tmp_path)
    assert "--data-root" in str(e.value)


def test_missing_metadata_names_both_accepted_files(tmp_path):
    write_images(tmp_path, [{"image_id": "ISIC_0024306"}])
    with pytest.raises(bit_common.DataError) as e:
        datasets.load_ham10000(tmp_path, SIZE, tmp_path / "cache")
    assert str(tmp_path) in str(e.value)
    assert "HAM10000_metadata.csv" in str(e.value) and "ISIC2018_Task3_Training_GroundTruth.csv" in str(
        e.value
    )


def test_missing_metadata_columns_are_listed(tmp_path, small):
    root = write_ham(
        tmp_path / "ham",
        small[:7],
        header=["lesion_id", "image", "diagnosis", "dx_type", "age", "sex", "localization"],
    )
    with pytest.raises(bit_common.DataError, match=r"HAM10000_metadata\.csv.*missing column") as e:
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")
    assert "image_id" in str(e.value) and "dx" in str(e.value).split("found")[0]


def test_missing_isic_class_column_is_listed(tmp_path, small):
    root = write_isic(tmp_path / "isic", small[:7], True, columns=ISIC_COLUMNS[:-1])
    with pytest.raises(bit_common.DataError, match=r"GroundTruth\.csv.*missing column\(s\) BCC"):
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")


def test_isic_row_with_two_classes_is_named(tmp_path, small):
    root = write_isic(tmp_path / "isic", small, True)
    path = root / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("0.0", "1.0", 1)
    write_crlf(path, lines)
    with pytest.raises(bit_common.DataError, match=r"GroundTruth\.csv: line 4"):
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")


def test_image_missing_on_disk_is_named_and_can_be_skipped(tmp_path, small):
    root = write_ham(tmp_path / "ham", small)
    gone = small[5]["image_id"]
    next(root.rglob(f"{gone}.jpg")).unlink()
    with pytest.raises(bit_common.DataError, match=gone):
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")
    data = datasets.load_ham10000(root, SIZE, tmp_path / "cache", skip_bad=True)
    assert gone not in data.ids and len(data.ids) == len(small) - 1
    assert list(data.bad) == [gone]
    kept = [r for r in small if r["image_id"] != gone]
    assert data.labels.tolist() == [HAM_ORDER.index(r["dx"]) for r in kept]


def truncated_jpeg(path):
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


@pytest.mark.parametrize("damage", ["random_bytes", "truncated"])
def test_unreadable_image_is_named_and_can_be_skipped(tmp_path, small, damage):
    root = write_ham(tmp_path / "ham", small)
    path = next(root.rglob(f"{small[3]['image_id']}.jpg"))
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(6).integers(0, 256, 700, dtype=np.uint8).tobytes())
    else:
        truncated_jpeg(path)
    with pytest.raises(bit_common.DataError, match=re.escape(str(path))):
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")
    data = datasets.load_ham10000(root, SIZE, tmp_path / "cache", skip_bad=True)
    assert data.ids == [r["image_id"] for k, r in enumerate(small) if k != 3]
    assert list(data.bad) == [small[3]["image_id"]]  # the skipped image, by id, with the reason
    for j, k in enumerate(i for i in range(len(small)) if i != 3):  # the rows after it keep their own pixels
        assert np.abs(data.images[j].reshape(-1, 3).mean(0) - colour(k)).max() < 6


def test_unreadable_folder_image_can_be_skipped(tmp_path):
    root = tmp_path / "folder"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        write_jpeg(root / c / "good.jpg", 1)
    truncated_jpeg(root / "b" / "cut.jpg")
    with pytest.raises(bit_common.DataError, match="cut.jpg"):
        datasets.load_folder(root, SIZE, tmp_path / "cache")
    data = datasets.load_folder(root, SIZE, tmp_path / "cache", skip_bad=True)
    assert data.ids == ["a/good.jpg", "b/good.jpg"] and data.labels.tolist() == [0, 1] and len(data.bad) == 1


def test_unknown_dx_is_named_with_its_line(tmp_path, small):
    rows = [dict(r) for r in small]
    rows[2]["dx"] = "scc"
    root = write_ham(tmp_path / "ham", rows)
    with pytest.raises(bit_common.DataError, match=r"HAM10000_metadata\.csv: line 4: unknown dx 'scc'"):
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")


def test_image_listed_twice_is_named(tmp_path, small):
    root = write_ham(tmp_path / "ham", small + [small[0]])
    with pytest.raises(bit_common.DataError, match=f"image {small[0]['image_id']} is listed twice"):
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")


def test_class_without_images_is_named(tmp_path, small):
    root = write_ham(tmp_path / "ham", [r for r in small if r["dx"] != "df"])
    with pytest.raises(bit_common.DataError, match="class df has no images"):
        datasets.load_ham10000(root, SIZE, tmp_path / "cache")
    folder = tmp_path / "folder"
    write_jpeg(folder / "full" / "x.jpg", 0)
    (folder / "hollow").mkdir()
    with pytest.raises(bit_common.DataError, match="hollow"):
        datasets.load_folder(folder, SIZE, tmp_path / "cache")


def test_cifar10_missing_batch_is_named(tmp_path):
    write_cifar(tmp_path, omit=("data_batch_3",))
    with pytest.raises(bit_common.DataError, match=r"data_batch_3: missing"):
        datasets.load_cifar10(tmp_path)


def test_cifar10_absent_without_download_says_download_and_names_the_path(tmp_path):
    with pytest.raises(bit_common.DataError, match="--download") as e:
        datasets.load_cifar10(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "cifar-10-batches-py") in str(e.value)


def test_cifar10_download_that_fails_names_the_source_and_the_root(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(bit_common.DataError, match="cannot download CIFAR-10") as e:
        datasets.load_cifar10(tmp_path / "nothing", download=True)
    assert str(tmp_path / "nothing") in str(e.value) and "cs.toronto.edu" in str(e.value)


# ------------------------------------------------------------------------------------------------- 8. the CLI


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "datasets.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.script
def test_cli_writes_the_split_and_prints_counts_per_part(tmp_path, small, ham_root):
    split_file = tmp_path / "split.json"
    done = run_cli(
        "--data",
        "ham10000",
        "--data-root",
        ham_root,
        "--split-file",
        split_file,
        "--cache-dir",
        tmp_path / "cache",
        "--image-size",
        SIZE,
    )
    assert done.returncode == 0, done.stderr
    split = json.loads(split_file.read_text())
    dx_of = {r["image_id"]: r["dx"] for r in small}
    lesion_of = {r["image_id"]: r["lesion_id"] for r in small}
    table = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    for c in HAM_ORDER:
        expected = [sum(dx_of[i] == c for i in split[p]) for p in PARTS]
        assert table[c] == [str(n) for n in expected + [sum(expected)]], c
    lesions = [len({lesion_of[i] for i in split[p]}) for p in PARTS]
    assert table["lesions"] == [str(n) for n in lesions + [len(set(lesion_of.values()))]]
    assert table["images"] == [str(len(split[p])) for p in PARTS] + [str(len(small))]
    assert "bad images skipped: 0" in done.stdout


@pytest.mark.script
def test_cli_missing_root_is_one_error_line(tmp_path, monkeypatch):
    """datasets.py's main as its command line calls it (its process runs in the test above): a UserError, one
    line that `run` prints after "datasets.py: error:"."""
    argv = ["--data", "ham10000", "--data-root", tmp_path / "absent", "--split-file", tmp_path / "s.json"]
    monkeypatch.setattr(sys, "argv", ["datasets.py", *map(str, argv), "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(bit_common.UserError) as error:
        datasets.main()
    assert "\n" not in str(error.value) and str(tmp_path / "absent") in str(error.value)
    assert not (tmp_path / "s.json").exists()
