"""RandAugment (Cubuk et al. 2020) in NumPy, on (C, H, W) float images in [0, 1].

Each image gets `num_ops` operations drawn uniformly from OPS, each applied with probability
0.5 at magnitude m ~ N(magnitude, magnitude_std) clipped to [0, 10] (timm's
"rand-m9-mstd0.5": num_ops 2, magnitude 9, std 0.5). At m = 10 the operations reach:

    identity        the image as it is
    auto_contrast   each channel stretched to [0, 1]
    equalize        each channel's histogram equalised (256 levels)
    brightness      x · f,                     f = 1 ± 0.9·m/10
    contrast        mean + (x − mean) · f,     f = 1 ± 0.9·m/10 (mean of the grey image)
    solarize        1 − x where x ≥ 1 − m/10
    posterize       8 − round(4·m/10) bits kept
    rotate          ± 30° · m/10
    shear_x/y       ± 0.3 · m/10
    translate_x/y   ± 0.45 · m/10 of the width / height

Geometric operations sample the source pixel nearest to each output pixel (about the image's
centre) and fill what comes from outside with 0.5 grey, as timm fills with its mean colour.
"""

import numpy as np

from minivit.errors import DatasetError

MAX_MAGNITUDE = 10.0


def _signed(level, scale, rng):
    return scale * level / MAX_MAGNITUDE * (1 if rng.random() < 0.5 else -1)


def _affine(image, matrix):
    """Output pixel (y, x) takes the input pixel nearest to matrix @ (y, x, 1), both about the
    centre; outside the image: 0.5."""
    _, height, width = image.shape
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ys, xs = np.mgrid[0:height, 0:width]
    source = np.tensordot(matrix, np.stack([ys - cy, xs - cx, np.ones_like(ys)]), axes=1)
    sy, sx = np.rint(source[0] + cy).astype(int), np.rint(source[1] + cx).astype(int)
    inside = (sy >= 0) & (sy < height) & (sx >= 0) & (sx < width)
    out = np.full_like(image, 0.5)
    out[:, inside] = image[:, sy[inside], sx[inside]]
    return out


def identity(image, level, rng):
    return image


def auto_contrast(image, level, rng):
    low = image.min(axis=(1, 2), keepdims=True)
    high = image.max(axis=(1, 2), keepdims=True)
    scale = np.where(high > low, 1.0 / np.maximum(high - low, 1e-12), 1.0)
    return np.where(high > low, (image - low) * scale, image).astype(image.dtype)


def equalize(image, level, rng):
    levels = np.clip(np.rint(image * 255), 0, 255).astype(np.int64)
    out = np.empty_like(image)
    for c, channel in enumerate(levels):
        cdf = np.cumsum(np.bincount(channel.ravel(), minlength=256))
        low = cdf[cdf > 0][0]
        span = cdf[-1] - low
        out[c] = channel / 255 if span == 0 else (cdf[channel] - low) / span
    return out


def brightness(image, level, rng):
    return np.clip(image * (1 + _signed(level, 0.9, rng)), 0, 1).astype(image.dtype)


def contrast(image, level, rng):
    mean = image.mean()  # of all channels: the grey image's mean, as Pillow's Contrast
    return np.clip(mean + (image - mean) * (1 + _signed(level, 0.9, rng)), 0, 1).astype(
        image.dtype)


def solarize(image, level, rng):
    return np.where(image >= 1 - level / MAX_MAGNITUDE, 1 - image, image).astype(image.dtype)


def posterize(image, level, rng):
    steps = 2 ** (8 - int(round(4 * level / MAX_MAGNITUDE)))
    return (np.floor(image * (steps - 1e-6)) / steps).astype(image.dtype)


def rotate(image, level, rng):
    angle = np.deg2rad(_signed(level, 30.0, rng))
    c, s = np.cos(angle), np.sin(angle)
    return _affine(image, np.array([[c, -s, 0.0], [s, c, 0.0]]))


def shear_x(image, level, rng):
    return _affine(image, np.array([[1.0, 0.0, 0.0], [_signed(level, 0.3, rng), 1.0, 0.0]]))


def shear_y(image, level, rng):
    return _affine(image, np.array([[1.0, _signed(level, 0.3, rng), 0.0], [0.0, 1.0, 0.0]]))


def translate_x(image, level, rng):
    shift = _signed(level, 0.45, rng) * image.shape[2]
    return _affine(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, shift]]))


def translate_y(image, level, rng):
    shift = _signed(level, 0.45, rng) * image.shape[1]
    return _affine(image, np.array([[1.0, 0.0, shift], [0.0, 1.0, 0.0]]))


OPS = {op.__name__: op for op in (identity, auto_contrast, equalize, brightness, contrast,
                                   solarize, posterize, rotate, shear_x, shear_y, translate_x,
                                   translate_y)}


class RandAugment:
    """`aug(images, rng) -> images` on a batch (B, C, H, W) in [0, 1], image by image."""

    def __init__(self, magnitude=9.0, num_ops=2, magnitude_std=0.5, prob=0.5):
        if not 0 <= magnitude <= MAX_MAGNITUDE or num_ops < 1 or magnitude_std < 0:
            raise DatasetError(f"RandAugment needs 0 <= magnitude <= {MAX_MAGNITUDE:g}, "
                               f"num_ops >= 1, magnitude_std >= 0; got {magnitude}, {num_ops}, "
                               f"{magnitude_std}")
        self.magnitude, self.num_ops = float(magnitude), int(num_ops)
        self.magnitude_std, self.prob = float(magnitude_std), float(prob)
        self.names = list(OPS)

    def __call__(self, images, rng):
        out = images.copy()
        for i in range(len(out)):
            for name in rng.choice(self.names, self.num_ops):
                if rng.random() >= self.prob:
                    continue
                level = np.clip(rng.normal(self.magnitude, self.magnitude_std), 0, MAX_MAGNITUDE)
                out[i] = OPS[name](out[i], level, rng)
        return out

    def __repr__(self):
        return (f"RandAugment(magnitude={self.magnitude:g}, num_ops={self.num_ops}, "
                f"magnitude_std={self.magnitude_std:g})")
