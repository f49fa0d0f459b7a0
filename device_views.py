"""Each method's views drawn in batches on the device that holds the images (a GPU, or the CPU), with the
augmentations of the loader's views (datasets.py, ssl_methods.py): the same recipes, torchvision's
distribution of every random parameter, and torchvision's tensor operations' pixels.

Two halves. `draw_params` draws each view's random parameters on the CPU, one row per image, from a generator
seeded by (image seed, draw) alone, by torchvision's own `make_params` (RandomResizedCrop, ColorJitter,
GaussianBlur), so that the distribution is torchvision's by construction; it is cheap enough for DataLoader
workers (about 50 us a view). `render` then makes the pixels of a whole batch on the images' device: the crop
and resize as two matrix products with the weights of torch's antialiased bilinear resize (the horizontal flip
folded into them), the colour jitter with each image's own order of its four operations, greyscale, Gaussian
blur as a separable convolution with each image's own kernel, solarisation. No Python loop runs over images
there, and nothing waits for the device: every count that shapes the work is read from the CPU's copy of the
parameters. The image seed is datasets.SeededSampler's (seed, epoch, image) number and the draw is the view's
position in the method's views, so a view is a function of (seed, epoch, image, draw) alone: the same in any
batch, in any order, in any process, and on the CPU bit for bit the same in a resumed run.

Only torch and torchvision: no project imports.
"""

import dataclasses
import hashlib

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

# Images of this size or smaller get no blur: the loader's rule for every method (SimSiam's CIFAR recipe).
SMALL_IMAGE = 32


# torchvision's RandomHorizontalFlip() default, as the loader's views (and SimSiam's main_simsiam.py) use it.
FLIP_P = 0.5


# The blur's sigma range, in pixels: SimSiam's loader.py GaussianBlur([.1, 2.]) (datasets.RandomGaussianBlur)
# and SimCLR's data_util.py random_blur (tf.random.uniform([], 0.1, 2.0)).
BLUR_SIGMA = (0.1, 2.0)


# Taps on each side of the blur kernel: 4 sigma at sigma's largest (2.0). The loader's views (datasets.py,
# ssl_methods.py) blur with PIL's untruncated Gaussian; a kernel cut at 4 sigma drops 2 * Phi(-4) = 6e-5 of
# its weight, under 0.02 of a grey level. (At 224 px SimCLR's data_util.py and SwAV's src/multicropdataset.py
# cut theirs at 23 taps.)
BLUR_RADIUS = 8


# BYOL's solarisation threshold (Grill et al. 2020, Table 6; ssl_methods.byol_view's RandomSolarize(128)), on
# the 0..255 scale: pixels at or above it are inverted.
SOLARISE_THRESHOLD = 128


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One augmentation of the loader's views (datasets.py, ssl_methods.py) as numbers: crop, flip (FLIP_P),
    colour jitter applied with jitter_p in a random order, greyscale, blur, solarisation, in that order.
    datasets.simsiam_view flips last rather than second; a flip commutes with every step after it (pointwise,
    or a symmetric kernel with symmetric padding), so the views are the same."""

    scale: tuple  # RandomResizedCrop's range of the crop's area, as a fraction of the image's
    jitter: tuple  # ColorJitter's (brightness, contrast, saturation, hue) strengths
    blur_p: float  # the probability of the Gaussian blur above SMALL_IMAGE px (none at or below)
    jitter_p: float = 0.8  # RandomApply([ColorJitter], p=0.8): SimSiam, SimCLR, BYOL, SwAV alike
    grey_p: float = 0.2  # RandomGrayscale(p=0.2): SimSiam, SimCLR, BYOL, SwAV alike
    solarise_p: float = 0.0
    size_ratio: tuple = (1, 1)  # the view's size / the image size (SwAV's small crops: 96/224)
    small_strength: float = 1.0  # the jitter strengths are multiplied by this at or below SMALL_IMAGE px
    located: bool = False  # also return where the view came from (ssl_methods.LocatedCrop)

    def output_size(self, size):
        """The view's side in pixels for images of `size` (ssl_methods.swav_view rounds it the same way)."""
        return max(1, round(size * self.size_ratio[0] / self.size_ratio[1]))

    def jitter_at(self, size):
        return tuple(s * (self.small_strength if size <= SMALL_IMAGE else 1.0) for s in self.jitter)

    def blur_at(self, size):
        return self.blur_p if size > SMALL_IMAGE else 0.0


SIMSIAM = Recipe(  # Chen & He 2021, §4; facebookresearch/simsiam main_simsiam.py; datasets.simsiam_view
    scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5
)


STRENGTH_1 = (0.8, 0.8, 0.8, 0.2)  # SimCLR's colour distortion of strength 1 (Chen et al. 2020, App. A)


RECIPES = {  # by the names of ssl_methods.VIEWS, which the methods' views tuples use
    "simsiam": SIMSIAM,
    # Chen et al. 2020, App. A; google-research/simclr data_util.py; ssl_methods.simclr_view
    "simclr": Recipe(scale=(0.08, 1.0), jitter=STRENGTH_1, blur_p=0.5, small_strength=0.5),
    # Grill et al. 2020, Table 6: view 1 always blurred, never solarised; view 2 blurred with p = 0.1,
    # solarised with p = 0.2; ssl_methods.byol_view
    "byol1": Recipe(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0),
    "byol2": Recipe(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarise_p=0.2),
    # Caron et al. 2020, §3.2; facebookresearch/swav main_swav.py (crops 224 and 96, scales (0.14, 1) and
    # (0.05, 0.14)) and src/multicropdataset.py (strength 1, blur p = 0.5); ssl_methods.swav_view
    "swav": Recipe(scale=(0.14, 1.0), jitter=STRENGTH_1, blur_p=0.5),
    "swav_small": Recipe(scale=(0.05, 0.14), jitter=STRENGTH_1, blur_p=0.5, size_ratio=(96, 224)),
    # MoCo v2's view (SimSiam's) with its crop box and flip, for the local loss; ssl_methods.located_view
    "located": dataclasses.replace(SIMSIAM, located=True),
}


# One row of parameters per view. order_1..4: the jitter's operations in the order applied (0 brightness,
# 1 contrast, 2 saturation, 3 hue: ColorJitter's fn_idx); the four factors are 1, 1, 1, 0 (no change) where
# the jitter is not applied; sigma is 0 where the view is not blurred.
COLUMNS = (
    "top", "left", "height", "width", "flipped", "jittered", "order_1", "order_2", "order_3", "order_4",
    "brightness", "contrast", "saturation", "hue", "grey", "sigma", "solarised",
)  # fmt: skip


COLUMN = {name: i for i, name in enumerate(COLUMNS)}


NO_JITTER = [0, 0, 1, 2, 3, 1.0, 1.0, 1.0, 0.0]  # jittered, order_1..4, brightness..hue


def view_seed(image_seed, draw):
    """The seed of one view: 32 bits (all that torch's CPU generator, mt19937, keeps of a seed) of the BLAKE2b
    hash of "image_seed draw", the same in every Python and torch version. Two views share a seed by chance
    alone, 1 in 4.3e9 a pair: the 4.8 million views of 400 epochs of two views of HAM10000's 6,009
    pretraining images hold about 2,700 such pairs, nearly all of two different images (the same parameters
    on other pixels); of one image, 0.45 pairs a run."""
    digest = hashlib.blake2b(b"%d %d" % (image_seed, draw), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def draw_params(name, size, image_seeds, draw, height, width):
    """The random parameters of view `draw` of each image, for recipe `name` at image size `size`, from
    source images of height x width: a float64 (N, len(COLUMNS)) CPU tensor, row n drawn from a generator
    seeded by view_seed(image_seeds[n], draw) alone. The draws are torchvision's own make_params (the crop's
    10 tries then its central fallback; ColorJitter's random order and factors; GaussianBlur's sigma) and its
    probability tests (`torch.rand(1) < p`, as RandomApply and the Random* transforms skip when `>= p`). The
    caller's random state is left as it was."""
    recipe = RECIPES[name]
    crop = v2.RandomResizedCrop(
        recipe.output_size(size), scale=recipe.scale
    )  # ratio (3/4, 4/3): the loader's
    jitter = v2.ColorJitter(*recipe.jitter_at(size))
    blur = v2.GaussianBlur(2 * BLUR_RADIUS + 1, BLUR_SIGMA)
    blur_p = recipe.blur_at(size)
    source = [torch.empty(()).expand(3, height, width)]  # make_params reads only the image's size
    rows = []
    with torch.random.fork_rng(devices=[]):
        for image_seed in image_seeds:
            torch.default_generator.manual_seed(view_seed(int(image_seed), draw))
            box = crop.make_params(source)
            row = [box["top"], box["left"], box["height"], box["width"], torch.rand(1).item() < FLIP_P]
            if torch.rand(1).item() < recipe.jitter_p:
                p = jitter.make_params(source)
                factors = (
                    p["brightness_factor"],
                    p["contrast_factor"],
                    p["saturation_factor"],
                    p["hue_factor"],
                )
                # a strength of 0 makes ColorJitter skip that operation (factor None): no change
                row += [
                    1,
                    *p["fn_idx"].tolist(),
                    *(n if f is None else f for f, n in zip(factors, NO_JITTER[5:])),
                ]
            else:
                row += NO_JITTER
            row.append(torch.rand(1).item() < recipe.grey_p)
            row.append(blur.make_params(source)["sigma"][0] if torch.rand(1).item() < blur_p else 0.0)
            row.append(torch.rand(1).item() < recipe.solarise_p)
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(COLUMNS))


def render(images, params, name, size):
    """The views of a batch: `images` uint8 (N, 3, H, W) on any device, `params` their draw_params rows (on
    the CPU). Returns uint8 (N, 3, S, S) views on the images' device, S the recipe's output size; a located
    recipe returns (views, where), where float32 (N, 5) = (x0, y0, x1, y1, flipped), the crop box in the
    source image's normalised coordinates, as ssl_methods.LocatedCrop gives it. Computed in float32 in [0, 1]
    as torchvision's tensor operations compute float images, rounded to uint8 once at the end (the loader's
    PIL steps round at every step)."""
    recipe, device = RECIPES[name], images.device
    on_device = (params.pin_memory() if device.type == "cuda" else params).to(device, non_blocking=True)
    x = resized_crops(images, on_device, recipe.output_size(size))
    x = colour_jitter(x, params, on_device)
    x = greyscale(x, on_device[:, COLUMN["grey"]] > 0)
    x = gaussian_blur(x, params, on_device)
    x = solarise(x, on_device[:, COLUMN["solarised"]] > 0)
    views = x.mul_(255).round_().to(torch.uint8)
    return (views, crop_boxes(on_device, *images.shape[-2:])) if recipe.located else views


class ViewParams(torch.utils.data.Dataset):
    """pretrain.py --views-on device: for a key (image seed, i) of a SeededSampler, the item (i, the
    draw_params row of each of the method's views, 0): the loader's workers draw the numbers, and the training
    step renders the pixels on the device (DeviceViews). The trailing 0 stands where the loader's items hold
    a label, which pretraining does not read."""

    def __init__(self, names, size, count, height, width):
        self.names, self.size, self.count, self.height, self.width = names, size, count, height, width

    def __len__(self):
        return self.count

    def __getitem__(self, key):
        image_seed, i = key
        rows = [
            draw_params(name, self.size, [image_seed], draw, self.height, self.width)[0]
            for draw, name in enumerate(self.names)
        ]
        return (i, *rows, 0)


# The device memory that a training step takes beside the images, per pixel of the views it feeds the
# network: the GPU check's model-only peak for SimSiam R50x1 BN, batch 128, two 224-px views, bf16 (10,673 MiB
# on an H200, torch.cuda.max_memory_allocated: benchmarks/results/gpu_check-h200-1.json), activations above
# all, which grow with the batch and the views' pixels.
STEP_BYTES_PER_PIXEL = 10673 * 2**20 / (128 * 2 * 224**2)


# Half as much again: the allocator reserves more than its allocated peak (fragmentation), cuDNN's
# workspaces vary with the kernels it picks, and rendering takes float32 copies of each view (77 MB a 224-px
# view of 128).
STEP_HEADROOM = 1.5


def network_activations(units, width):
    """A BiT ResNet-V2's activations relative to R50x1's (bit_convert.ARCHS' units per block and width):
    a unit of block k (from 0) holds width * 256 * 2^k channels at 1/4^k of block 0's pixels, so it weighs
    width / 2^k."""
    return width * sum(n / 2**k for k, n in enumerate(units)) / (3 + 4 / 2 + 6 / 4 + 3 / 8)


def step_bytes(batch, names, size, units, width):
    """What a step of `batch` images with the views `names` at image size `size`, through a BiT network of
    `units` and `width`, needs of the device's memory beside the images (STEP_HEADROOM included)."""
    pixels = batch * sum(RECIPES[name].output_size(size) ** 2 for name in names)
    return STEP_HEADROOM * STEP_BYTES_PER_PIXEL * pixels * network_activations(units, width)


def placement(images_bytes, free_bytes, reserve_bytes):
    """Where the uint8 images go: "device" where they and a step's reserve fit in the device's free memory,
    else "pinned host" (each step's images then copied there asynchronously)."""
    return "device" if images_bytes + reserve_bytes <= free_bytes else "pinned host"


def choose_placement(images_bytes, device, reserve_bytes):
    """placement() with a CUDA device's free memory (torch.cuda.mem_get_info, after the model is there); any
    other device computes in the host's memory, which holds the images already."""
    if device.type != "cuda":
        return "device"
    return placement(images_bytes, torch.cuda.mem_get_info(device)[0], reserve_bytes)


class DeviceViews:
    """The views of a batch of ViewParams items, drawn on `device`: the images (N, H, W, 3) uint8 are kept as
    (N, 3, H, W) where `where` says (choose_placement): on the device, sent once, or in the host's memory
    ("pinned host": page-locked where the device is CUDA), from where each step gathers its own and copies
    them to the device asynchronously (non_blocking: the copy overlaps the work already queued). Each step
    renders each view from its parameters."""

    def __init__(self, images, names, size, device, where):
        images = torch.as_tensor(images).permute(0, 3, 1, 2)
        self.resident, self.pin = where == "device", where == "pinned host" and device.type == "cuda"
        if self.resident:
            self.images = images.contiguous().to(device)
        else:  # page-locked memory can fail to be had (the OS's limit): a RuntimeError, as torch raises it
            self.images = torch.empty(images.shape, dtype=torch.uint8, pin_memory=self.pin)
            self.images.copy_(images)
        self.names, self.size, self.device = names, size, device

    def __call__(self, batch):
        positions, *params = batch
        if self.resident:
            images = self.images[positions.to(self.images.device)]
        else:  # into fresh page-locked memory, which torch's host allocator keeps until the copy is done
            staged = torch.empty(
                (len(positions), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pin
            )
            images = torch.index_select(self.images, 0, positions, out=staged).to(
                self.device, non_blocking=True
            )
        return [render(images, rows, name, self.size) for rows, name in zip(params, self.names, strict=True)]


def draw_views(images, image_seeds, names, size):
    """One method's views of a batch (`names`: its views tuple), view d from draw d: draw_params
    then render, as a training step would call them."""
    height, width = images.shape[-2:]
    return [
        render(images, draw_params(name, size, image_seeds, draw, height, width), name, size)
        for draw, name in enumerate(names)
    ]


def resample_weights(start, length, source, out):
    """(N, out, source) float64 weights that resize the window [start, start + length) of an axis of `source`
    pixels to `out` pixels, one window per row of start/length: torch's antialiased bilinear resize (aten
    UpSample.h, _compute_indices_min_size_weights_aa, which torchvision's resize calls with antialias=True;
    PIL's ImagingResample with its bilinear filter is the same). Output pixel o has its centre at
    scale * (o + 0.5) in the window, scale = length / out, and averages the window's pixels under a triangle
    of half-width max(scale, 1) there, normalised to sum to 1; pixels outside the window weigh 0."""
    scale = (length / out)[:, None, None]
    centre = scale * (torch.arange(out, dtype=torch.float64, device=start.device)[None, :, None] + 0.5)
    offset = (
        torch.arange(source, dtype=torch.float64, device=start.device)[None, None, :] - start[:, None, None]
    )
    weights = (1 - ((offset + 0.5 - centre) / scale.clamp(min=1.0)).abs()).clamp(min=0.0)
    weights = weights * ((offset >= 0) & (offset < length[:, None, None]))
    return weights / weights.sum(-1, keepdim=True)


def resized_crops(images, params, out):
    """Every image's crop (top, left, height, width) resized to out x out and mirrored where flipped, as
    v2.functional.resized_crop (bilinear, antialias=True) then horizontal_flip on the image as float in
    [0, 1]: rows @ image @ columns^T with each image's own weights, the flip being the columns' order
    reversed. The products need float32's full precision: with TF32 allowed for matrix products on a GPU
    (torch.backends.cuda.matmul.allow_tf32, off by default), its 10-bit mantissas could move a pixel by up to
    about half a grey level."""
    c = COLUMN
    height, width = images.shape[-2:]
    rows = resample_weights(params[:, c["top"]], params[:, c["height"]], height, out)
    columns = resample_weights(params[:, c["left"]], params[:, c["width"]], width, out)
    columns = torch.where(params[:, c["flipped"], None, None] > 0, columns.flip(1), columns)
    x = images.float().div_(255)
    return rows.float()[:, None] @ x @ columns.float().transpose(1, 2)[:, None]


def luma(x):
    """(N, H, W) grey of float RGB images: ITU-R 601, with torchvision's coefficients (rgb_to_grayscale)."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)


def blend(x, other, factor):
    """torchvision's _blend: factor * x + (1 - factor) * other, clamped to [0, 1]; factor (N,)."""
    factor = factor[:, None, None, None]
    return (x * factor + other * (1 - factor)).clamp_(0.0, 1.0)


def adjust_brightness(x, factor):
    return (x * factor[:, None, None, None]).clamp_(0.0, 1.0)


def adjust_contrast(x, factor):
    """Blended with the mean grey of each image (torchvision's adjust_contrast)."""
    return blend(x, luma(x).mean((1, 2))[:, None, None, None], factor)


def adjust_saturation(x, factor):
    return blend(x, luma(x)[:, None], factor)


def adjust_hue(x, factor):
    """Each image's hue turned by factor (a fraction of the colour circle), in HSV as torchvision's adjust_hue
    (its _rgb_to_hsv, after PIL's Convert.c); saturation and value, hence max and min, unchanged. Back to RGB
    by HSV's closed form: channel c = max - (max - min) * clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 h) mod 6,
    n = 5, 3, 1 for R, G, B, which equals torchvision's _hsv_to_rgb case by case."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    spread = high - low
    rc, gc, bc = ((high[:, None] - x) / torch.where(spread > 0, spread, 1.0)[:, None]).unbind(1)
    hue = torch.where(high == r, bc - gc, torch.where(high == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = (hue * (1.0 / 6.0) + 1.0).fmod(1.0).add(factor[:, None, None]).remainder(1.0)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device)[None, :, None, None]
    k = (offsets + 6 * hue[:, None]).remainder(6.0)
    return high[:, None] - spread[:, None] * torch.minimum(k, 4 - k).clamp(0.0, 1.0)


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's fn_idx order


def groups(host_keys, device_keys, count):
    """For each key 0..count-1, the device indices of the rows with that key: one stable sort on the device,
    cut at sizes counted on the CPU's copy of the keys, so nothing waits for the device."""
    sizes = torch.bincount(host_keys, minlength=count + 1).tolist()
    return torch.argsort(device_keys, stable=True).split(sizes)[:count]


def colour_jitter(x, params, on_device):
    """ColorJitter with each image's own order: at each of the four positions, the images are grouped by the
    operation they apply there and each group gets its operation with its own factors. Images not jittered are
    in no group."""
    c = COLUMN
    factors = on_device[:, c["brightness"] : c["hue"] + 1].float()
    skip = float(len(JITTER))  # the key of the images not jittered
    for position in ("order_1", "order_2", "order_3", "order_4"):
        keys = [
            torch.where(p[:, c["jittered"]] > 0, p[:, c[position]], skip).long() for p in (params, on_device)
        ]
        for op, index in enumerate(groups(*keys, len(JITTER))):
            if len(index):
                x[index] = JITTER[op](x[index], factors[index, op])
    return x


def greyscale(x, chosen):
    """RandomGrayscale: the chosen images' grey in all three channels (rgb_to_grayscale, 3 channels)."""
    return torch.where(chosen[:, None, None, None], luma(x)[:, None].expand_as(x), x)


def gaussian_blur(x, params, on_device):
    """The blurred images (sigma > 0) through a Gaussian of their own sigma, 2 * BLUR_RADIUS + 1 taps,
    reflected at the borders: torchvision's gaussian_blur (its kernel exp(-t^2 / (2 sigma^2)) normalised,
    reflect padding), done as two 1-D convolutions, one kernel per image and channel. The recipes blur only
    above SMALL_IMAGE px, where even SwAV's small crops (14 px at 33) are wider than the reflected border."""
    blurred = params[:, COLUMN["sigma"]] > 0
    sigma = on_device[:, COLUMN["sigma"]]
    (index,) = groups((~blurred).long(), (sigma == 0).long(), 1)
    if not len(index):
        return x
    chosen = x[index]
    n, channels, height, width = chosen.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32, device=x.device)
    kernels = torch.softmax(-((taps / sigma[index, None].float()) ** 2) / 2, dim=1)
    kernels = kernels.repeat_interleave(channels, 0)  # one per image and channel: the convolution's groups
    flat = chosen.reshape(1, n * channels, height, width)
    r = BLUR_RADIUS
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), kernels[:, None, None], groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), kernels[:, None, :, None], groups=n * channels)
    x[index] = flat.reshape(n, channels, height, width)
    return x


def solarise(x, chosen):
    """RandomSolarize: in the chosen images, pixels at or above SOLARISE_THRESHOLD inverted (solarize)."""
    return torch.where(chosen[:, None, None, None] & (x >= SOLARISE_THRESHOLD / 255), 1.0 - x, x)


def crop_boxes(params, height, width):
    """(N, 5) float32: each crop as (x0, y0, x1, y1) in the source's normalised coordinates, then flipped."""
    c = COLUMN
    top, left, h, w = (params[:, c[k]] for k in ("top", "left", "height", "width"))
    box = torch.stack(
        [left / width, top / height, (left + w) / width, (top + h) / height, params[:, c["flipped"]]], 1
    )
    return box.float()
