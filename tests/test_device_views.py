"""device_views.py (issue 24, item 3), on the CPU: its recipes are the loader's numbers; its random parameters
follow torchvision's distribution (Kolmogorov-Smirnov over 100,000 draws, exact binomial tests, chi-square on
the jitter's 24 orders); with the same parameters its pixels are torchvision's tensor functions' (float32
rounding apart), and they differ from the loader's PIL steps by a measured amount (PIL's 8-bit HSV hue and its
box-approximated blur above all); 10,000 views agree in distribution with the PIL loader's
(datasets.ImageSet); a view depends on (image seed, draw) alone, whatever batch it is drawn in.

Every statistical test has a fixed seed, so it is deterministic; its level (the chance that correct code fails
it with other seeds) is 0.001 a test."""

import math
import statistics
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import bit_common
import datasets
import device_views as dv
import pretrain
import ssl_methods
from helpers import read_metrics

ALPHA = 0.001
COLUMN = dv.COLUMN

# ----------------------------------------------------------------------------------------------- statistics


def ks_statistic(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs, evaluated
    at every observed value (ties included)."""
    a, b = np.sort(a), np.sort(b)
    at = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, at, "right") / len(a) - np.searchsorted(b, at, "right") / len(b)).max()


def ks_critical(n, m, alpha=ALPHA):
    """The asymptotic critical value of the two-sample KS statistic, c(alpha) sqrt((n + m) / (n m)) with
    c(alpha) = sqrt(-ln(alpha / 2) / 2) (Smirnov's limit); for discrete values (the crop's integers) the test
    is conservative."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def binomial_p_value(k, n, p):
    """The exact two-sided binomial test: the probability, under Binomial(n, p), of a count no more likely
    than k. The log-pmf by its recurrence pmf(j + 1) / pmf(j) = (n - j) p / ((j + 1) (1 - p))."""
    if p in (0.0, 1.0):
        return float(k == round(n * p))
    j = np.arange(n)
    log_pmf = np.concatenate(
        [[n * math.log1p(-p)], np.log((n - j) / (j + 1)) + math.log(p / (1 - p))]
    ).cumsum()
    pmf = np.exp(log_pmf)
    return pmf[pmf <= pmf[k] * (1 + 1e-9)].sum()


def chi_square_critical(dof, alpha=ALPHA):
    """The (1 - alpha) quantile of chi-square with `dof` degrees of freedom by Wilson and Hilferty's cube-root
    normal approximation (within 0.3 % of the exact 49.73 at 23 dof and alpha = 0.001)."""
    z = statistics.NormalDist().inv_cdf(1 - alpha)
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_the_statistics_against_known_values():
    """The helpers above against textbook values: KS's c(0.05) = 1.358; P(X <= 3 or X >= 7) = 0.34375 for
    X ~ Binomial(10, 1/2); chi-square's 0.999 quantile at 23 dof 49.728 (tables); a KS statistic by hand."""
    assert ks_critical(1, 1, 0.05) / math.sqrt(2) == pytest.approx(1.3581, abs=1e-4)
    assert binomial_p_value(3, 10, 0.5) == pytest.approx(0.34375)
    assert binomial_p_value(0, 4, 0.5) == pytest.approx(2 / 16)
    assert chi_square_critical(23) == pytest.approx(49.728, rel=3e-3)
    assert ks_statistic(np.array([1, 2, 3]), np.array([2, 3, 4, 5])) == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- images to augment


def colour_images(n, height, width, seed=0):
    """(n, height, width, 3) uint8 images with some of a photograph's structure: a colour of its own, smooth
    waves in each channel, a darker blob (a lesion), a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = []
    for _ in range(n):
        base, freq, phase = rng.uniform(40, 215, 3), rng.uniform(1, 4, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
        image = np.stack(
            [
                base[c] + 40 * np.sin(2 * np.pi * (freq[c, 0] * x + freq[c, 1] * y) + phase[c])
                for c in range(3)
            ],
            -1,
        )
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        image *= 1 - 0.6 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        out.append((image + rng.normal(0, 5, image.shape)).clip(0, 255).astype(np.uint8))
    return np.stack(out)


def as_batch(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------- 1. the recipes of the loader's views (datasets.py, ssl_methods.py)


def pil_recipe(view):
    """The numbers of one of the loader's augmentations (datasets.py, ssl_methods.py), read from its
    torchvision transforms; the order of its steps as a string (c crop, f flip, j jitter, g grey, b blur, s
    solarise)."""
    steps = (
        [view.crop, *view.then.transforms] if isinstance(view, ssl_methods.LocatedCrop) else view.transforms
    )
    found, order = {"blur_p": 0.0, "solarise_p": 0.0}, ""
    if isinstance(view, ssl_methods.LocatedCrop):  # its flip, torch.rand(1) < 0.5, comes right after the crop
        found["flip_p"], order = 0.5, "f"
    for step in steps:
        p, inner = (
            (step.p, step.transforms[0])
            if isinstance(step, v2.RandomApply)
            else (getattr(step, "p", 1), step)
        )
        if p == 0:  # a step that never runs (BYOL's first view: RandomSolarize(p=0))
            continue
        if isinstance(inner, v2.RandomResizedCrop):
            found.update(size=inner.size[0], scale=inner.scale, ratio=inner.ratio)
            order = "c" + order
        elif isinstance(inner, v2.RandomHorizontalFlip):
            found["flip_p"], order = inner.p, order + "f"
        elif isinstance(inner, v2.ColorJitter):
            jitter = (inner.brightness, inner.contrast, inner.saturation, inner.hue)
            found.update(jitter_p=p, jitter=jitter)
            order += "j"
        elif isinstance(inner, v2.RandomGrayscale):
            found["grey_p"], order = inner.p, order + "g"
        elif isinstance(inner, datasets.RandomGaussianBlur):
            found.update(blur_p=p, sigma=inner.sigma)
            order += "b"
        elif isinstance(inner, v2.RandomSolarize):
            found.update(solarise_p=inner.p, threshold=inner.threshold)
            order += "s"
        else:
            raise AssertionError(f"a step this test does not know: {inner}")
    return found, order


def device_recipe(name, size):
    recipe = dv.RECIPES[name]
    jitter = v2.ColorJitter(*recipe.jitter_at(size))  # the ranges draw_params draws from
    found = {
        "size": recipe.output_size(size),
        "scale": recipe.scale,
        "ratio": v2.RandomResizedCrop(1).ratio,  # draw_params keeps RandomResizedCrop's default ratio
        "flip_p": dv.FLIP_P,
        "jitter_p": recipe.jitter_p,
        "jitter": (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue),
        "grey_p": recipe.grey_p,
        "blur_p": recipe.blur_at(size),
        "solarise_p": recipe.solarise_p,
    }
    if found["blur_p"]:
        found["sigma"] = dv.BLUR_SIGMA
    if recipe.solarise_p:
        found["threshold"] = dv.SOLARISE_THRESHOLD
    return found


@pytest.mark.parametrize("size", [8, 32, 33, 224])
@pytest.mark.parametrize("name", sorted(ssl_methods.VIEWS))
def test_each_recipe_has_the_numbers_of_views_py(name, size):
    """Every number of every ssl_methods.VIEWS augmentation, at sizes either side of the 32-px rule: the
    device recipe reads the same (a change to one recipe without the other fails here). The steps come in one
    of the two orders device_views assumes: the flip right after the crop, or last (it commutes with the
    rest)."""
    found, order = pil_recipe(ssl_methods.VIEWS[name](size))
    assert found == device_recipe(name, size)
    assert order.replace("b", "").replace("s", "") in ("cfjg", "cjgf")
    assert order.replace("f", "") == "cjg" + "b" * (found["blur_p"] > 0) + "s" * (found["solarise_p"] > 0)


# --------------------------------------------------------------------------- 2. the random parameters


N_DRAWS = 100_000


@pytest.fixture(scope="module")
def simclr_draws():
    """100,000 draws of SimCLR's view at 224 px (crop scale 0.08-1, jitter of strength 1, blur p = 0.5): one
    per image seed, draw 0."""
    return dv.draw_params("simclr", 224, range(N_DRAWS), 0, 224, 224).numpy()


@pytest.fixture(scope="module")
def torchvision_draws():
    """100,000 draws of torchvision's own transforms, called as a loader calls them (one generator, seeded
    once): RandomResizedCrop(224, scale=(0.08, 1)) and ColorJitter(0.8, 0.8, 0.8, 0.2)."""
    torch.manual_seed(0)
    crop, jitter = v2.RandomResizedCrop(224, scale=(0.08, 1.0)), v2.ColorJitter(0.8, 0.8, 0.8, 0.2)
    source = [torch.empty(3, 224, 224)]
    boxes, factors = [], []
    for _ in range(N_DRAWS):
        box, p = crop.make_params(source), jitter.make_params(source)
        boxes.append([box["top"], box["left"], box["height"], box["width"]])
        factors.append(
            [p["brightness_factor"], p["contrast_factor"], p["saturation_factor"], p["hue_factor"]]
        )
    return np.array(boxes), np.array(factors)


@pytest.mark.heavy
def test_the_crop_geometry_follows_torchvision(simclr_draws, torchvision_draws):
    """top, left, height and width of 100,000 crops against 100,000 of RandomResizedCrop's (the 10 tries and
    the central fallback included): KS at level 0.001 each."""
    boxes, _ = torchvision_draws
    for k, column in enumerate(("top", "left", "height", "width")):
        d = ks_statistic(simclr_draws[:, COLUMN[column]], boxes[:, k])
        assert d < ks_critical(N_DRAWS, N_DRAWS), (column, d)


@pytest.mark.heavy
def test_the_ks_test_sees_a_wrong_crop_scale(torchvision_draws):
    """The test above has the power to see a plausible mistake: SimSiam's crop (scale 0.2-1, 10,000 draws)
    against SimCLR's (0.08-1) is rejected many times over."""
    simsiam = dv.draw_params("simsiam", 224, range(10_000), 0, 224, 224).numpy()
    d = ks_statistic(simsiam[:, COLUMN["height"]], torchvision_draws[0][:, 2])
    assert d > 3 * ks_critical(10_000, N_DRAWS)


@pytest.mark.heavy
def test_the_jitter_factors_follow_torchvision(simclr_draws, torchvision_draws):
    """brightness, contrast, saturation and hue of the jittered draws (about 80,000) against ColorJitter's:
    KS at level 0.001 each; and the sigma of the blurred ones (about 50,000) against GaussianBlur's own."""
    _, factors = torchvision_draws
    jittered = simclr_draws[simclr_draws[:, COLUMN["jittered"]] > 0]
    for k, column in enumerate(("brightness", "contrast", "saturation", "hue")):
        d = ks_statistic(jittered[:, COLUMN[column]], factors[:, k])
        assert d < ks_critical(len(jittered), N_DRAWS), (column, d)
    sigma = simclr_draws[simclr_draws[:, COLUMN["sigma"]] > 0, COLUMN["sigma"]]
    torch.manual_seed(1)
    blur = v2.GaussianBlur(17, dv.BLUR_SIGMA)
    reference = [blur.make_params([torch.empty(3, 8, 8)])["sigma"][0] for _ in range(50_000)]
    assert ks_statistic(sigma, np.array(reference)) < ks_critical(len(sigma), len(reference))


@pytest.mark.heavy
def test_the_jitter_order_is_uniform_over_its_24_permutations(simclr_draws):
    """ColorJitter draws a new order for every image (torch.randperm(4)): the orders of the jittered draws are
    all permutations of 0-3, each about 1/24 of them (chi-square, 23 degrees of freedom, level 0.001)."""
    jittered = simclr_draws[simclr_draws[:, COLUMN["jittered"]] > 0]
    orders = jittered[:, [COLUMN[f"order_{i}"] for i in range(1, 5)]].astype(int)
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    _, counts = np.unique(orders @ np.array([64, 16, 4, 1]), return_counts=True)
    assert len(counts) == 24
    expected = len(orders) / 24
    assert ((counts - expected) ** 2 / expected).sum() < chi_square_critical(23)


@pytest.mark.heavy
def test_every_probability_by_a_binomial_test(simclr_draws):
    """flip 0.5, jitter 0.8, grey 0.2, blur 0.5 (SimCLR at 224 px, 100,000 draws); BYOL's second view blur
    0.1 and solarise 0.2 (20,000 draws); its first view always blurred and never solarised; no blur at all at
    32 px: each count by an exact binomial test at level 0.001."""
    byol2 = dv.draw_params("byol2", 224, range(20_000), 1, 224, 224).numpy()
    byol1 = dv.draw_params("byol1", 224, range(2_000), 0, 224, 224).numpy()
    small = dv.draw_params("simclr", 32, range(2_000), 0, 32, 32).numpy()
    cases = [
        ("flip", simclr_draws[:, COLUMN["flipped"]], 0.5),
        ("jitter", simclr_draws[:, COLUMN["jittered"]], 0.8),
        ("grey", simclr_draws[:, COLUMN["grey"]], 0.2),
        ("blur", simclr_draws[:, COLUMN["sigma"]], 0.5),
        ("BYOL 2 blur", byol2[:, COLUMN["sigma"]], 0.1),
        ("BYOL 2 solarise", byol2[:, COLUMN["solarised"]], 0.2),
        ("BYOL 1 blur", byol1[:, COLUMN["sigma"]], 1.0),
        ("BYOL 1 solarise", byol1[:, COLUMN["solarised"]], 0.0),
        ("blur at 32 px", small[:, COLUMN["sigma"]], 0.0),
    ]
    for label, column, p in cases:
        chosen = column > 0
        assert binomial_p_value(int(chosen.sum()), len(chosen), p) > ALPHA, (label, chosen.mean())


def test_a_view_is_a_function_of_its_image_seed_and_draw_alone():
    """The same (image seed, draw) gives the same row in any company and order; another draw of the same
    image another row; the caller's random state is left as it was."""
    torch.manual_seed(5)
    state = torch.get_rng_state()
    alone = dv.draw_params("swav_small", 224, [77], 3, 224, 224)
    assert torch.equal(torch.get_rng_state(), state)
    among = dv.draw_params("swav_small", 224, [5, 77, 9], 3, 224, 224)
    assert torch.equal(among[1], alone[0])
    assert not torch.equal(dv.draw_params("swav_small", 224, [77], 4, 224, 224), alone)


# ---------------------------------------------------------------------- 3. the pixels against torchvision

# float32 images in [0, 1] through the same operations in another association order (a 17-tap separable blur
# against a 17 x 17 kernel; a resize by matrix products against torch's loops): the values agree to float32
# rounding accumulated over at most a few dozen additions, about 1e-6; 1e-5 leaves a margin and is still 0.003
# of a grey level.
FLOAT_TOLERANCE = 1e-5


def to_uint8(x):
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def batch():
    """24 colour images of 40 x 52 (not square: rows and columns must not be swapped) and rows of parameters
    drawn for BYOL's second view at 48 px, with blur and solarisation switched on in every other row so that
    every step runs."""
    images = as_batch(colour_images(24, 40, 52, seed=1))
    params = dv.draw_params("byol2", 48, range(24), 0, 40, 52)
    generator = torch.Generator().manual_seed(0)
    params[::2, COLUMN["sigma"]] = torch.empty(12, dtype=torch.float64).uniform_(
        0.1, 2.0, generator=generator
    )
    params[1::2, COLUMN["solarised"]] = 1.0
    assert params[:, COLUMN["jittered"]].min() == 0 and params[:, COLUMN["jittered"]].max() == 1
    return images, params


def crop_of(params, n):
    return [int(params[n, COLUMN[k]]) for k in ("top", "left", "height", "width")]


def test_the_crop_is_torchvisions_resized_crop(batch):
    """Each view's crop, resized (bilinear, antialiased) and flipped where drawn so, against
    v2.functional.resized_crop then horizontal_flip on the float image; and against torchvision's uint8 path
    (fixed-point weights on the CPU, rounded once) to within one grey level."""
    images, params = batch
    crops = dv.resized_crops(images, params, 48)
    assert crops.shape == (24, 3, 48, 48)
    for n in range(len(images)):
        for image, got, tolerance in (
            (images[n].float() / 255, crops[n], FLOAT_TOLERANCE),
            (images[n], to_uint8(crops[n]), 1),
        ):
            expected = F.resized_crop(image, *crop_of(params, n), [48, 48], antialias=True)
            if params[n, COLUMN["flipped"]]:
                expected = F.horizontal_flip(expected)
            assert (got.float() - expected.float()).abs().max() <= tolerance


@pytest.mark.parametrize(
    "step, reference, lo, hi",
    [
        (dv.adjust_brightness, F.adjust_brightness, 0.2, 1.8),
        (dv.adjust_contrast, F.adjust_contrast, 0.2, 1.8),
        (dv.adjust_saturation, F.adjust_saturation, 0.2, 1.8),
        (dv.adjust_hue, F.adjust_hue, -0.5, 0.5),
    ],
)
def test_each_jitter_step_is_torchvisions(batch, step, reference, lo, hi):
    """Each of ColorJitter's operations with each image's own factor against the torchvision function on
    that image alone (factors over the widest range any recipe draws, hue's whole circle)."""
    x = batch[0].float() / 255
    factors = torch.linspace(lo, hi, len(x))
    got = step(x.clone(), factors)
    for n in range(len(x)):
        assert (got[n] - reference(x[n], float(factors[n]))).abs().max() < FLOAT_TOLERANCE


def test_grey_blur_and_solarise_are_torchvisions(batch):
    """Greyscale (rgb_to_grayscale, 3 channels), the blur (gaussian_blur, 17 taps, each image's sigma) and
    solarisation (solarize at 128/255) in the images chosen, the others untouched."""
    images, params = batch
    x = images.float() / 255
    chosen = params[:, COLUMN["solarised"]] > 0
    grey, solar = dv.greyscale(x, chosen), dv.solarise(x, chosen)
    blurred = dv.gaussian_blur(x.clone(), params, params)
    for n in range(len(x)):
        sigma = float(params[n, COLUMN["sigma"]])
        expected = F.gaussian_blur(x[n], [17, 17], [sigma, sigma]) if sigma else x[n]
        assert (blurred[n] - expected).abs().max() < FLOAT_TOLERANCE
        assert (grey[n] - (F.rgb_to_grayscale(x[n], 3) if chosen[n] else x[n])).abs().max() < FLOAT_TOLERANCE
        assert torch.equal(solar[n], F.solarize(x[n], 128 / 255) if chosen[n] else x[n])


def torchvision_view(image, row, size):
    """One view made by torchvision's functions, one image at a time, in ssl_methods.byol_view's order (crop,
    flip, jitter in the drawn order, grey, blur, solarise), on the float image; rounded to uint8 at the
    end."""
    c = COLUMN
    x = F.resized_crop(
        image.float() / 255, *[int(row[c[k]]) for k in ("top", "left", "height", "width")], [size] * 2
    )
    x = F.horizontal_flip(x) if row[c["flipped"]] else x
    if row[c["jittered"]]:
        steps = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        factors = ("brightness", "contrast", "saturation", "hue")
        for position in range(1, 5):
            op = int(row[c[f"order_{position}"]])
            x = steps[op](x, float(row[c[factors[op]]]))
    x = F.rgb_to_grayscale(x, 3) if row[c["grey"]] else x
    sigma = float(row[c["sigma"]])
    x = F.gaussian_blur(x, [17, 17], [sigma, sigma]) if sigma else x
    x = F.solarize(x, 128 / 255) if row[c["solarised"]] else x
    return (x * 255).round().to(torch.uint8)


def test_a_whole_view_is_torchvisions_functions_in_its_order(batch):
    """render, each image with its own jitter order, against torchvision_view: the two agree to float32
    rounding before the one rounding to uint8, so a pixel may differ by one grey level where its value falls
    within float32 rounding of a half-level (measured: 18 values of 165,888)."""
    images, params = batch
    got = dv.render(images, params, "byol2", 48)
    expected = torch.stack([torchvision_view(images[n], params[n], 48) for n in range(len(images))])
    difference = (got.int() - expected.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


# ------------------------------------------------------------------------ 4. the pixels against PIL's steps


def pil_difference(device_uint8, pil_images):
    """|device - PIL| in grey levels, per pixel and channel."""
    return (device_uint8.int() - torch.stack([F.pil_to_tensor(p) for p in pil_images]).int()).abs().float()


@pytest.fixture(scope="module")
def pil_batch():
    images = colour_images(64, 64, 64, seed=2)
    return as_batch(images), [Image.fromarray(image) for image in images]


def test_the_pil_colour_steps_differ_by_their_8_bit_rounding(pil_batch):
    """the loader's ColorJitter runs on PIL images, which store every step in 8 bits: brightness, contrast and
    saturation round down (measured: at most 1 level, 0.47 - 0.50 on average, the device a half-level
    brighter), greyscale rounds (at most 1); hue goes through PIL's 8-bit HSV, whose quantised hue moves
    colours by up to 13 levels (measured: 0.61 levels on average, 14 % of the values more than 1 apart)."""
    batch_, pil = pil_batch
    x = batch_.float() / 255
    generator = torch.Generator().manual_seed(3)
    for step, reference, lo, hi in (
        (dv.adjust_brightness, F.adjust_brightness, 0.2, 1.8),
        (dv.adjust_contrast, F.adjust_contrast, 0.2, 1.8),
        (dv.adjust_saturation, F.adjust_saturation, 0.2, 1.8),
    ):
        factors = torch.empty(len(x)).uniform_(lo, hi, generator=generator)
        d = pil_difference(to_uint8(step(x.clone(), factors)), map(reference, pil, factors.tolist()))
        assert d.max() <= 1 and d.mean() < 0.55
    grey = pil_difference(
        to_uint8(dv.greyscale(x, torch.ones(len(x), dtype=torch.bool))),
        (p.convert("L").convert("RGB") for p in pil),
    )
    assert grey.max() <= 1
    factors = torch.empty(len(x)).uniform_(-0.2, 0.2, generator=generator)
    hue = pil_difference(
        to_uint8(dv.adjust_hue(x.clone(), factors)), map(F.adjust_hue, pil, factors.tolist())
    )
    assert 0.3 < hue.mean() < 1.0 and 4 <= hue.max() <= 20 and (hue > 1).float().mean() < 0.25


def test_the_pil_blur_and_resize_differ_by_measured_amounts(pil_batch):
    """datasets.RandomGaussianBlur is PIL's GaussianBlur: three box blurs approximating the Gaussian, with the
    edge pixel repeated beyond the border where torchvision reflects. Measured on these images: 0.26 levels
    on average and at most 5 away from the 17-tap Gaussian inside (8 px from the border), 0.5 and at most 11
    at the border. The crop's resize is the same filter as PIL's (fixed-point in PIL): at most 1 level."""
    batch_, pil = pil_batch
    x = batch_.float() / 255
    params = torch.zeros(len(x), len(dv.COLUMNS), dtype=torch.float64)
    params[:, COLUMN["sigma"]] = torch.linspace(0.1, 2.0, len(x), dtype=torch.float64)
    blurred = to_uint8(dv.gaussian_blur(x.clone(), params, params))
    d = pil_difference(
        blurred,
        (p.filter(ImageFilter.GaussianBlur(float(s))) for p, s in zip(pil, params[:, COLUMN["sigma"]])),
    )
    inside = d[..., 8:-8, 8:-8]
    assert inside.mean() < 0.4 and inside.max() <= 6 and d.max() <= 16
    params = dv.draw_params("simsiam", 64, range(len(x)), 0, 64, 64)
    params[:, COLUMN["flipped"]] = 0
    crops = (F.resized_crop(p, *crop_of(params, n), [64, 64]) for n, p in enumerate(pil))
    assert pil_difference(to_uint8(dv.resized_crops(batch_, params, 64)), crops).max() <= 1


# ----------------------------------------------------------------- 5. 10,000 views: the PIL loader's and ours

N_VIEWS, N_SOURCES, SIDE = 10_000, 100, 40


def view_statistics(views_):
    """Per view: each channel's mean and standard deviation, and its histogram in 16 bins of 16 levels (as
    fractions), float64."""
    statistics_ = []
    for chunk in views_.split(1000):
        x = chunk.reshape(len(chunk), 3, -1)
        bins = (x // 16).long()
        histogram = torch.zeros(len(chunk), 3, 16, dtype=torch.float64)
        histogram.scatter_add_(2, bins, torch.ones(bins.shape, dtype=torch.float64))
        statistics_.append((x.double().mean(2), x.double().std(2), histogram / x.shape[2]))
    return [torch.cat(s).numpy() for s in zip(*statistics_)]


@pytest.mark.heavy
def test_10000_views_agree_with_the_pil_loader():
    """SimSiam's views at 40 px (blur on) of 100 colour images, 100 views each: datasets.ImageSet (PIL, seeded
    per image as SeededSampler seeds it) against device_views (other seeds). Tested: each channel's per-view
    mean and standard deviation by KS at level 0.001; the average histogram (16 bins) within a total
    variation of 0.03 of PIL's per channel; the average of the channel means within 2.5 levels. Measured: KS
    statistics 0.011 - 0.019 (critical 0.028); total variation 0.007 - 0.011, against 0.003 - 0.005 between
    two device runs with other seeds (sampling noise) and 0.11 - 0.12 for SimCLR's device views against
    SimSiam's PIL views (a wrong recipe); channel means 0.9 - 1.3 levels lower in PIL, which rounds down at
    its 8-bit steps (0.05 - 0.6 between two device runs)."""
    images = colour_images(N_SOURCES, SIDE, SIDE, seed=4)
    data = datasets.Data("test", images, np.zeros(N_SOURCES, np.int64), list(range(N_SOURCES)), ("x",))
    loader = datasets.ImageSet(data, np.arange(N_SOURCES), [ssl_methods.VIEWS["simsiam"](SIDE)])
    pil = torch.stack([loader[(k, k % N_SOURCES)][0] for k in range(N_VIEWS)])
    source = as_batch(images)
    device = torch.cat(
        [
            dv.draw_views(source[k % N_SOURCES], (N_VIEWS + k).tolist(), ["simsiam"], SIDE)[0]
            for k in torch.arange(N_VIEWS).split(2000)
        ]
    )
    (pil_mean, pil_std, pil_histogram), (mean, std, histogram) = view_statistics(pil), view_statistics(device)
    critical = ks_critical(N_VIEWS, N_VIEWS)
    for c in range(3):
        assert ks_statistic(pil_mean[:, c], mean[:, c]) < critical
        assert ks_statistic(pil_std[:, c], std[:, c]) < critical
    assert (0.5 * np.abs(pil_histogram.mean(0) - histogram.mean(0)).sum(1) < 0.03).all()
    assert (np.abs(pil_mean.mean(0) - mean.mean(0)) < 2.5).all()


# -------------------------------------------------------------- 6. independent of the batch, deterministic


@pytest.mark.parametrize("names", [("simsiam", "simsiam"), ("byol1", "byol2"), ("swav", "swav_small")])
def test_views_do_not_depend_on_the_batch_or_its_order(names):
    """The same images and seeds, drawn as one batch of 32 and as 9 of them in another order among other
    images: identical pixels, view by view; and again identical when drawn twice (deterministic)."""
    images = as_batch(colour_images(40, 48, 48, seed=5))
    seeds = torch.arange(10**9, 10**9 + 40)
    whole = dv.draw_views(images[:32], seeds[:32], names, 48)
    assert all(torch.equal(a, b) for a, b in zip(whole, dv.draw_views(images[:32], seeds[:32], names, 48)))
    picked = torch.tensor([31, 3, 17, 35, 0, 38, 9, 22, 36])  # 35, 36, 38: images not in the first batch
    mixed = dv.draw_views(images[picked], seeds[picked], names, 48)
    inside = picked < 32
    for a, b in zip(whole, mixed):
        assert torch.equal(a[picked[inside]], b[inside])


def test_swav_small_crops_are_96_224_of_the_size():
    images = as_batch(colour_images(4, 64, 64, seed=6))
    large, small = dv.draw_views(images, range(4), ("swav", "swav_small"), 224 // 2)
    assert large.shape == (4, 3, 112, 112) and small.shape == (4, 3, 48, 48)


def test_a_located_view_says_where_it_came_from():
    """(x0, y0, x1, y1, flipped) as ssl_methods.LocatedCrop gives them: the crop box in the source's
    normalised coordinates; a view flipped is the mirror of the same crop unflipped (to one grey level: the
    blur and the contrast's mean add the same numbers in another order; measured: identical)."""
    images = as_batch(colour_images(8, 40, 52, seed=7))
    params = dv.draw_params("located", 48, range(8), 0, 40, 52)
    located, where = dv.render(images, params, "located", 48)
    top, left, height, width = (params[:, COLUMN[k]] for k in ("top", "left", "height", "width"))
    expected = torch.stack([left / 52, top / 40, (left + width) / 52, (top + height) / 40], 1).float()
    assert where.dtype == torch.float32 and torch.equal(where[:, :4], expected)
    assert torch.equal(where[:, 4], params[:, COLUMN["flipped"]].float())
    assert 0 < where[:, 4].sum() < 8
    mirrored = params.clone()
    mirrored[:, COLUMN["flipped"]] = 1 - mirrored[:, COLUMN["flipped"]]
    difference = (dv.render(images, mirrored, "located", 48)[0].int() - located.flip(-1).int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3

    images = torch.randint(
        0, 256, (12, 20, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("where", ["device", "pinned host"])
@pytest.mark.parametrize("names", [("simsiam", "simsiam"), ("located", "located")])
def test_the_training_path_renders_the_views_of_draw_views(names, where):
    """What pretrain.py's loader and step do with --views-on device (ViewParams items drawn for a sampler's
    keys, collated, then DeviceViews) gives each image the views that draw_views gives it for its seed: the
    numbers drawn in the workers are the same numbers, and the images gathered by position are the right
    ones, whether the images are kept on the device or in host memory and copied each step (on the CPU, the
    host path without pinning, which needs CUDA)."""
    images = torch.randint(
        0, 256, (12, 20, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    items = dv.ViewParams(names, 8, len(images), 20, 16)
    keys = [(1_000_003 * i + 7, i) for i in (5, 0, 11, 3)]
    *batch, labels = torch.utils.data.default_collate([items[key] for key in keys])
    got = dv.DeviceViews(images.numpy(), names, 8, torch.device("cpu"), where)(batch)
    positions, seeds = [i for _, i in keys], [seed for seed, _ in keys]
    expected = dv.draw_views(images[positions].permute(0, 3, 1, 2), seeds, names, 8)
    assert labels.tolist() == [0, 0, 0, 0] and len(got) == len(names)
    for g, e in zip(got, expected, strict=True):
        if isinstance(e, tuple):  # a located view: the pixels and where they came from
            assert torch.equal(g[0], e[0]) and torch.equal(g[1], e[1])
        else:
            assert torch.equal(g, e)


GIB = 2**30
HAM_PRETRAIN_BYTES = 6009 * 3 * 224 * 224  # HAM10000's 6,009 pretrain images, uint8 at 224 px


def test_a_steps_reserve_scales_the_measured_peak():
    """SimSiam R50x1 at 224 px, batch 128, is the measured case (10,673 MiB) with its headroom of 1.5; half
    the batch or half the side takes a half or a quarter; SwAV adds six 96-px crops; the BiT networks by the
    channels x pixels of their units (block k from 0 weighs width / 2^k a unit: R50 3 + 2 + 1.5 + 0.375)."""
    simsiam = dv.step_bytes(128, ("simsiam", "simsiam"), 224, (3, 4, 6, 3), 1)
    assert simsiam == pytest.approx(1.5 * 10673 * 2**20)
    assert dv.step_bytes(64, ("simsiam", "simsiam"), 224, (3, 4, 6, 3), 1) == pytest.approx(simsiam / 2)
    assert dv.step_bytes(128, ("simsiam", "simsiam"), 112, (3, 4, 6, 3), 1) == pytest.approx(simsiam / 4)
    swav = dv.step_bytes(128, ("swav", "swav", *["swav_small"] * 6), 224, (3, 4, 6, 3), 1)
    assert swav == pytest.approx(simsiam * (2 * 224**2 + 6 * 96**2) / (2 * 224**2))
    assert dv.network_activations((3, 4, 6, 3), 3) == pytest.approx(3)
    assert dv.network_activations((3, 4, 23, 3), 1) == pytest.approx(11.125 / 6.875)
    assert dv.network_activations((3, 8, 36, 3), 4) == pytest.approx(4 * 16.375 / 6.875)


@pytest.mark.parametrize(
    "images, free, reserve, where",
    [
        (HAM_PRETRAIN_BYTES, 78 * GIB, 16 * GIB, "device"),  # an H100: 0.9 GB beside the step's 16 GiB
        (HAM_PRETRAIN_BYTES, 15 * GIB, 16 * GIB, "pinned host"),  # a 16 GB T4: the step alone takes it all
        (63 * GIB, 78 * GIB, 16 * GIB, "pinned host"),  # 450,000 images of 224 px on an H100
        (62 * GIB, 78 * GIB, 16 * GIB, "device"),  # to the byte: it fits
        (62 * GIB + 1, 78 * GIB, 16 * GIB, "pinned host"),
    ],
)
def test_the_images_go_to_the_device_where_they_fit_beside_a_step(images, free, reserve, where):
    assert dv.placement(images, free, reserve) == where


def test_a_cpu_device_keeps_the_images_where_they_are():
    assert dv.choose_placement(10 * 2**40, torch.device("cpu"), 10 * 2**40) == "device"


def loader_settings(views_on="device"):
    return types.SimpleNamespace(
        image_size=8, batch_size=4, seed=0, workers=0, views_on=views_on, arch="r50x1"
    )


def test_pretrain_says_where_the_images_are_kept(capsys):
    images = np.zeros((12, 8, 8, 3), np.uint8)
    data = datasets.Data("bench", images, np.zeros(12, np.int64), list(range(12)), ("x",))
    method = types.SimpleNamespace(view_names=("simsiam", "simsiam"))
    pretrain.pretrain_loader(
        data, {"pretrain": data.ids}, method, loader_settings(), 0, 1, torch.device("cpu")
    )
    assert (
        capsys.readouterr().out == "--views-on device: the pretrain images (0.00 GB) kept in cpu's memory\n"
    )


def test_images_that_fit_nowhere_are_one_line(monkeypatch):
    """Page-locked memory refused (torch raises a RuntimeError, as CUDA's out of memory): a UserError naming
    the flag, the size, where and the other path."""
    images = np.zeros((12, 8, 8, 3), np.uint8)
    data = datasets.Data("bench", images, np.zeros(12, np.int64), list(range(12)), ("x",))
    method = types.SimpleNamespace(view_names=("simsiam", "simsiam"))
    monkeypatch.setattr(dv, "choose_placement", lambda *args: "pinned host")

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(bit_common.UserError) as error:
        pretrain.pretrain_loader(
            data, {"pretrain": data.ids}, method, loader_settings(), 0, 1, torch.device("cpu")
        )
    assert str(error.value) == (
        "--views-on device: the pretrain part's images (0.00 GB) could not be kept in pinned host memory "
        "(CUDA error: out of memory); use --views-on loader"
    )


# ------------------------------------------------------------------------------------- learning, either path


@pytest.mark.script
@pytest.mark.slow
def test_a_digits_run_learns_as_well_with_views_on_the_device(tmp_path):
    """One epoch of SimSiam from scratch on the embedded digits (8 px, 1080 pretrain images, batch 32, 33
    steps), seeds 0-2, with the views from the loader (PIL) and drawn on the device (the CPU here): the kNN
    monitor's balanced accuracy after it. One epoch already lifts it from the random network's about 0.57 to
    about 0.8, a signal well above the seeds' spread. The criterion: the two means differ by at most 3 of
    their (Welch) standard errors, sqrt(s_loader^2 / 3 + s_device^2 / 3), s each path's sample standard
    deviation over the three seeds; and every run learns (0.1 above its random network). About 5 minutes on
    a 2-core CPU."""
    found = {}
    for views_on in ("loader", "device"):
        for seed in (0, 1, 2):
            out = tmp_path / f"{views_on}-{seed}"
            args = ["--data", "digits", "--epochs", "1", "--batch-size", "32", "--lr", "0.4"]
            args += ["--warmup-epochs", "0", "--workers", "0", "--device", "cpu", "--seed", str(seed)]
            args += ["--views-on", views_on, "--split-file", str(tmp_path / "split.json")]
            args += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
            assert pretrain.main(args) == 0
            rows = read_metrics(out)
            assert float(rows[-1]["knn_bacc"]) > float(rows[0]["knn_bacc"]) + 0.1, (views_on, seed)
            found.setdefault(views_on, []).append(float(rows[-1]["knn_bacc"]))
    loader, device = found["loader"], found["device"]
    error = math.sqrt(statistics.variance(loader) / 3 + statistics.variance(device) / 3)
    print(f"knn_bacc after 1 epoch, seeds 0-2: loader {loader}, device {device}, standard error {error:.4f}")
    assert abs(statistics.mean(loader) - statistics.mean(device)) <= 3 * error
