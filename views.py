"""The views: each method's augmentations of one image (its recipe, with the paper and file it follows), the
dataset that draws them, seeded per image and epoch, and the crop geometry that a local loss needs
(LocatedCrop: where each view came from in the source image)."""

import functools

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2


class RandomGaussianBlur:
    """PIL's Gaussian blur with sigma drawn from [lo, hi] (SimSiam's loader.py does the same). torchvision's
    GaussianBlur gives the same augmentation but measured 50x slower on a 224-px image on the CPU (130 ms vs
    2.5 ms)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(float(torch.empty(1).uniform_(*self.sigma))))


def simsiam_view(size):
    """One SimSiam augmentation (Chen & He 2021, §4 and their main_simsiam.py) of a PIL image: no blur at <=
    32 px, as in SimSiam's CIFAR recipe (lightly's CIFAR-10 benchmark: SimSiamTransform with
    gaussian_blur=0.0)."""
    blur = [v2.RandomApply([RandomGaussianBlur()], p=0.5)] if size > 32 else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
            v2.RandomHorizontalFlip(),
        ]
    )


def simclr_view(size):
    """One SimCLR augmentation (Chen et al. 2020, App. A; google-research/simclr data_util.py): a crop of
    scale (0.08, 1), a flip, colour distortion of strength s (color_jitter: jitter 0.8 s, 0.8 s, 0.8 s, 0.2 s
    with p = 0.8, grey p = 0.2), blur with p = 0.5. ImageNet's recipe has s = 1; at <= 32 px CIFAR-10's
    (App. B.9; the repository's README trains CIFAR-10 with --color_jitter_strength=0.5 --use_blur=False):
    s = 0.5 and no blur."""
    cifar = size <= 32
    strength = 0.5 if cifar else 1.0
    blur = [] if cifar else [v2.RandomApply([RandomGaussianBlur()], p=0.5)]
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(*(0.8 * strength,) * 3, 0.2 * strength)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
        ]
    )


def byol_view(size, blur, solarise):
    """One of BYOL's two asymmetric augmentations (Grill et al. 2020, Table 6): view 1 blurred always and
    never solarised, view 2 blurred with p = 0.1 and solarised with p = 0.2; no blur at <= 32 px, as the CIFAR
    recipes of lightly's benchmark (BYOLView1Transform and BYOLView2Transform with gaussian_blur=0.0) and of
    solo-learn (scripts/pretrain/cifar/augmentations/asymmetric.yaml)."""
    blurred = [v2.RandomApply([RandomGaussianBlur()], p=blur)] if size > 32 else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blurred,
            v2.RandomSolarize(128, p=solarise),
        ]
    )


def swav_view(size, small=False):
    """One SwAV crop (Caron et al. 2020, §3.2; main_swav.py and src/multicropdataset.py): a large crop of
    scale (0.14, 1) at the full size, or a small one of scale (0.05, 0.14) at 96/224 of it (multi-crop);
    colour distortion of strength 1, blur with p = 0.5. No blur at <= 32 px: our choice, as the other
    methods' CIFAR recipes (solo-learn's cifar/swav.yaml keeps it; lightly's CIFAR-10 SwaVTransform drops it
    and halves the colour strength)."""
    blur = [v2.RandomApply([RandomGaussianBlur()], p=0.5)] if size > 32 else []
    crop_size, scale = (max(1, round(size * 96 / 224)), (0.05, 0.14)) if small else (size, (0.14, 1.0))
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, scale=scale),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
        ]
    )


def eval_view(size):
    """The whole image at `size` (the images are square already, resized as the paper's §3 resizes HAM10000,
    so the centre crop takes all of it): our choice; the authors' code resizes to 8/7 of the size and
    centre-crops (BiT-SimSiam augmentations/eval_aug.py)."""
    return v2.Compose([v2.Resize(size), v2.CenterCrop(size)])


class ImageSet(torch.utils.data.Dataset):
    """Images `index` of `data`, each through every transform in `views`: items (view_1, ..., view_k, label),
    the views uint8 (3, H, W) tensors. A key may come as (seed, i), from a SeededSampler: that image's
    augmentation is then drawn from a generator seeded with `seed`, so a run's views depend on its seed, epoch
    and image alone."""

    def __init__(self, data, index, views):
        self.images, self.labels, self.index, self.views = data.images, data.labels, index, views

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        seed, i = key if isinstance(key, tuple) else (None, key)
        image = Image.fromarray(np.asarray(self.images[self.index[i]]))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            views = [as_tensors(view(image)) for view in self.views]
        return (*views, int(self.labels[self.index[i]]))


def as_tensors(view):
    """A view as a uint8 (3, H, W) tensor; a located view's (image, box, flipped) as that tensor and its
    geometry, one float tensor (x0, y0, x1, y1, flipped)."""
    if isinstance(view, tuple):
        image, box, flipped = view
        return v2.functional.pil_to_tensor(image), torch.cat([box, torch.tensor([float(flipped)])])
    return v2.functional.pil_to_tensor(view)


class SeededSampler(torch.utils.data.DistributedSampler):
    """The DistributedSampler's shuffle (for one process too), each index i paired with the seed of that
    image's augmentation in this epoch, (seed * 100_003 + epoch) * 10_000_019 + i: distinct for every (seed,
    epoch, image) while there are fewer than 10_000_019 images and 100_003 epochs. An ImageSet seeds its views
    with it, so that they do not depend on which worker made them, and a resumed run sees the views it would
    have seen."""

    start = 0

    def set_epoch(self, epoch, start=0):
        """Shuffle for `epoch` and skip its first `start` items (a resumed run has trained on them
        already)."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        order = list(super().__iter__())[self.start :]
        return iter([((self.seed * 100_003 + self.epoch) * 10_000_019 + i, i) for i in order])


def eval_images(data, index, size, workers=0):
    """The evaluation view of the images `index` as one uint8 tensor (N, 3, size, size): made once, then
    reused."""
    loader = torch.utils.data.DataLoader(  # any batch size gives the same tensor
        ImageSet(data, index, [eval_view(size)]), batch_size=256, num_workers=workers
    )
    if not len(index):
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.cat([images for images, _ in loader])


class LocatedCrop:
    """A random resized crop and a horizontal flip that say where the view came from, for losses that match
    regions between views (methods.matched_regions). The crop is torchvision's RandomResizedCrop (its own
    parameter sampling, so the same distribution); `then` (e.g. the colour steps) runs on the result. Returns
    (image, box, flipped): box the crop as (x0, y0, x1, y1) in the source image's normalised coordinates, a
    float32 tensor, and flipped whether the view was mirrored. Flipping before the colour steps rather than
    after, as simsiam_view does, draws the same views: colour, grey and blur do not see left from right."""

    def __init__(self, size, scale=(0.2, 1.0), then=None):  # MoCo v2's and SimSiam's scale (main_simsiam.py)
        self.crop, self.size, self.then = v2.RandomResizedCrop(size, scale=scale), size, then

    def __call__(self, image):
        width, height = image.size
        p = self.crop.make_params([image])
        top, left, h, w = p["top"], p["left"], p["height"], p["width"]
        view = v2.functional.resized_crop(image, top, left, h, w, [self.size] * 2)
        box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
        flipped = bool(torch.rand(1) < 0.5)
        if flipped:
            view = v2.functional.horizontal_flip(view)
        return (self.then(view) if self.then else view), box, flipped


def located_view(size):
    """A MoCo v2 view (Chen et al. 2020, "Improved Baselines"; SimSiam's too: simsiam main_simsiam.py)
    that records its crop and flip: LocatedCrop, then simsiam_view's own colour, grey and blur steps (the
    steps between its crop and its flip), so that the two recipes cannot drift apart."""
    return LocatedCrop(size, then=v2.Compose(simsiam_view(size).transforms[1:-1]))


VIEWS = {  # the augmentations a method's views name (methods.py)
    "simsiam": simsiam_view,
    "simclr": simclr_view,
    "byol1": functools.partial(byol_view, blur=1.0, solarise=0.0),
    "byol2": functools.partial(byol_view, blur=0.1, solarise=0.2),
    "swav": swav_view,
    "swav_small": functools.partial(swav_view, small=True),
    "located": located_view,
}
