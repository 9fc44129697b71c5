"""Batch augmentations on (B, C, H, W) arrays, vectorised over the batch.

Each is a callable `aug(images, rng) -> images` taking an explicit numpy Generator, so the
caller decides the randomness (the DataLoader derives it from seed and epoch). The input
array is never modified.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from minivit.data.datasets import dataset_key
from minivit.errors import DatasetError


class RandomCrop:
    """Zero-pad each side by `padding`, then crop `size` x `size` at a random offset per image."""

    def __init__(self, size, padding=0):
        if size < 1 or padding < 0:
            raise DatasetError(
                f"RandomCrop needs size >= 1 and padding >= 0, got {size} and {padding}.")
        self.size = int(size)
        self.padding = int(padding)

    def __call__(self, images, rng):
        b, c, h, w = images.shape
        p, s = self.padding, self.size
        if s > h + 2 * p or s > w + 2 * p:
            raise DatasetError(
                f"RandomCrop({s}, padding={p}) cannot crop {h}x{w} images: "
                f"the padded image is {h + 2 * p}x{w + 2 * p}."
            )
        padded = np.zeros((b, c, h + 2 * p, w + 2 * p), images.dtype)
        padded[:, :, p:p + h, p:p + w] = images
        top = rng.integers(0, h + 2 * p - s + 1, b)
        left = rng.integers(0, w + 2 * p - s + 1, b)
        # windows[i, :, y, x] is the s x s crop of image i at (y, x); one gather takes them all.
        windows = sliding_window_view(padded, (s, s), axis=(2, 3))
        return np.ascontiguousarray(windows[np.arange(b), :, top, left])

    def __repr__(self):
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability p."""

    def __init__(self, p=0.5):
        if not 0.0 <= p <= 1.0:
            raise DatasetError(f"RandomHorizontalFlip needs 0 <= p <= 1, got {p}.")
        self.p = float(p)

    def __call__(self, images, rng):
        flip = rng.random(len(images)) < self.p
        out = images.copy()
        out[flip] = images[flip, ..., ::-1]
        return out

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply augmentations one after the other, all drawing from the same rng."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, images, rng):
        for t in self.transforms:
            images = t(images, rng)
        return images

    def __repr__(self):
        return f"Compose({self.transforms})"


def default_augmentation(name):
    """The training augmentation that suits dataset `name`, or None.

    MNIST and Fashion-MNIST get 2-pixel shifts, never flips (a mirrored digit is another symbol);
    CIFAR gets the usual 4-pixel padded crop and horizontal flip. Digits and synthetic get none:
    on the 8x8 digits a 1-pixel shift is 1/8 of the image and half a 2x2 patch; for a small ViT
    (D64, depth 4, patch 2, AdamW) it cost 9 points of test accuracy after 40 epochs (95% -> 86%)
    and gained only 0.6 (95.5% -> 96.1%, noise level) after 100.
    """
    key = dataset_key(name)
    if key in ("mnist", "fashion_mnist"):
        return RandomCrop(28, padding=2)
    if key in ("cifar10", "cifar100"):
        return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip()])
    return None
