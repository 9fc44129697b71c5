"""DINO's multi-crop augmentation for small images, vectorised over the batch in NumPy.

Each image gives 2 global crops (the same size as the image, area scale 0.4-1 of it) and
`local_crops` small crops (area scale 0.05-0.4), each a random resized crop (aspect ratio
3/4-4/3, bilinear resampling), optionally flipped, with colour jitter (brightness and contrast;
saturation on colour images) with probability 0.8, grey-scale with probability 0.2 (colour
images) and solarisation of the second global crop with probability 0.2, as the reference's
DataAugmentationDINO. Not taken from it: the Gaussian blur (on 8-32 pixel images a blur of the
reference's radius erases the digit) and the hue jitter. The photometric part can be left out
(color_jitter=False, minivit pretrain's default: on the digits it makes DINO collapse).
"""

import math

import numpy as np

from minivit.data.datasets import dataset_key
from minivit.errors import MinivitError

GLOBAL_SCALE = (0.4, 1.0)
LOCAL_SCALE = (0.05, 0.4)


def _crop_boxes(rng, count, height, width, scale):
    """(top, left, h, w) float arrays of random resized crops (torchvision's sampling, the
    fallback being the whole image where 10 tries find no box that fits)."""
    area = height * width
    top, left = np.zeros(count), np.zeros(count)
    h, w = np.full(count, float(height)), np.full(count, float(width))
    pending = np.ones(count, dtype=bool)
    for _ in range(10):
        target = area * rng.uniform(*scale, count)
        ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), count))
        cw, ch = np.sqrt(target * ratio), np.sqrt(target / ratio)
        fits = pending & (cw <= width) & (ch <= height)
        h[fits], w[fits] = ch[fits], cw[fits]
        top[fits] = rng.uniform(0, 1, count)[fits] * (height - ch[fits])
        left[fits] = rng.uniform(0, 1, count)[fits] * (width - cw[fits])
        pending &= ~fits
    return top, left, h, w


def _bilinear_matrices(start, length, size, out):
    """(B, out, size) matrices sampling `out` points evenly over [start, start + length)
    of a `size`-pixel axis, bilinearly (pixel centres at i + 0.5, borders clamped)."""
    centres = start[:, None] + (np.arange(out) + 0.5) * (length[:, None] / out) - 0.5
    centres = np.clip(centres, 0, size - 1)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    frac = centres - low
    matrices = np.zeros((len(start), out, size))
    rows = np.arange(len(start))[:, None]
    cols = np.arange(out)[None, :]
    np.add.at(matrices, (rows, cols, low), 1 - frac)
    np.add.at(matrices, (rows, cols, high), frac)
    return matrices


def random_resized_crop(images, rng, size, scale, rows=slice(None)):
    """(B, C, size, size) random resized crops of images (B, C, H, W); `rows`: crop only
    those images (the boxes are drawn for all, so a part gets the crops the whole would)."""
    count, _, height, width = images.shape
    top, left, h, w = (a[rows] for a in _crop_boxes(rng, count, height, width, scale))
    rows_matrices = _bilinear_matrices(top, h, height, size)
    cols_matrices = _bilinear_matrices(left, w, width, size)
    return np.einsum("boh,bchw,bpw->bcop", rows_matrices, images[rows], cols_matrices,
                     optimize=True)


def _jitter_numbers(rng, count, colour, solarize):
    """The random numbers of _jitter, one per image of `count`, in the order drawn."""
    jitter = rng.random(count) < 0.8
    numbers = {"brightness": np.where(jitter, rng.uniform(0.6, 1.4, count), 1.0),
               "contrast": np.where(jitter, rng.uniform(0.6, 1.4, count), 1.0)}
    if colour:
        numbers["saturation"] = np.where(jitter, rng.uniform(0.8, 1.2, count), 1.0)
        numbers["to_grey"] = rng.random(count) < 0.2
    if solarize:
        numbers["solarize"] = rng.random(count) < 0.2
    return numbers


def _jitter(images, numbers):
    """Brightness, contrast (saturation, grey-scale), solarisation with `numbers`
    (_jitter_numbers' for these images)."""
    def per_image(name):
        return numbers[name][:, None, None, None]

    out = images * per_image("brightness")
    grey_level = out.mean(axis=(1, 2, 3), keepdims=True)
    out = grey_level + per_image("contrast") * (out - grey_level)
    if "saturation" in numbers:
        grey = out.mean(axis=1, keepdims=True)
        out = grey + per_image("saturation") * (out - grey)
        to_grey = numbers["to_grey"]
        out[to_grey] = out[to_grey].mean(axis=1, keepdims=True)
    out = np.clip(out, 0.0, 1.0)
    if "solarize" in numbers:
        out = np.where(per_image("solarize") & (out >= 0.5), 1.0 - out, out)
    return out


class MultiCrop:
    """multicrop(images, rng) -> [global 1, global 2, local 1, ...] crops of [0, 1] images
    (B, C, H, W), each normalised with the dataset's per-channel mean and std. color_jitter
    False leaves out the photometric part (jitter, grey-scale, solarisation): crops only.
    multicrop(images, rng, rows): the crops of those images only, the random numbers drawn for
    the whole batch (a data-parallel process's part: the crops one process would make)."""

    def __init__(self, image_size, patch_size, local_crops, local_size, mean, std, flip,
                 color_jitter=True):
        if local_crops < 0:
            raise MinivitError(f"--local-crops must be at least 0, got {local_crops}")
        for what, size in (("global", image_size), ("local", local_size)):
            if size < patch_size or size % patch_size:
                raise MinivitError(f"the {what} crop size must be a positive multiple of the "
                                   f"patch size {patch_size}, got {size}")
        self.image_size, self.local_size = image_size, local_size
        self.local_crops, self.flip, self.color_jitter = local_crops, flip, color_jitter
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def _view(self, images, rng, rows, size, scale, solarize=False):
        count, channels = images.shape[:2]
        crops = random_resized_crop(images, rng, size, scale, rows)
        if self.flip:
            flipped = (rng.random(count) < 0.5)[rows]
            crops[flipped] = crops[flipped, ..., ::-1]
        if self.color_jitter:
            numbers = _jitter_numbers(rng, count, channels == 3, solarize)
            crops = _jitter(crops, {name: value[rows] for name, value in numbers.items()})
        return ((crops - self.mean) / self.std).astype(np.float32)

    def __call__(self, images, rng, rows=slice(None)):
        views = [self._view(images, rng, rows, self.image_size, GLOBAL_SCALE),
                 self._view(images, rng, rows, self.image_size, GLOBAL_SCALE, solarize=True)]
        views += [self._view(images, rng, rows, self.local_size, LOCAL_SCALE)
                  for _ in range(self.local_crops)]
        return views


def flips_suit(dataset):
    """Mirroring keeps the class of CIFAR's photographs, not of digits or letters."""
    return dataset_key(dataset) in ("cifar10", "cifar100", "synthetic")
