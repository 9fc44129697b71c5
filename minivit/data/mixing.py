"""Batch-level parts of the DeiT recipe: Mixup / CutMix with soft targets, random erasing.

Both act on a normalised batch (B, C, H, W) with an explicit numpy Generator, as timm's
``Mixup`` (mode "batch") and ``RandomErasing`` (mode "pixel") do.
"""

import numpy as np

from minivit.errors import DatasetError


def smooth_one_hot(labels, num_classes, smoothing):
    """(B, K) float32: 1 − ε + ε/K on the label, ε/K elsewhere (timm's smoothed targets)."""
    off = smoothing / num_classes
    targets = np.full((len(labels), num_classes), off, np.float32)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return targets


class Mixup:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) over a batch and its reverse, with
    label smoothing folded into the soft targets, as timm's Mixup(mode="batch"):

        λ ~ Beta(α, α);  mixup:  x ← λ x + (1 − λ) x[::-1]
        cutmix: a box of area ≈ (1 − λ)·H·W (side √(1 − λ) of each, centre uniform, clipped)
                takes x[::-1]'s pixels, and λ ← 1 − box area / (H·W)
        targets ← λ smooth(y) + (1 − λ) smooth(y[::-1])

    With both α > 0 each batch is CutMix with probability switch_prob, else Mixup; `prob` is the
    chance a batch is mixed at all (unmixed batches still get smoothed one-hot targets).
    """

    def __init__(self, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                 switch_prob=0.5, label_smoothing=0.1):
        if mixup_alpha < 0 or cutmix_alpha < 0 or not (mixup_alpha or cutmix_alpha):
            raise DatasetError(f"Mixup needs alphas >= 0, one of them > 0; got mixup "
                               f"{mixup_alpha}, cutmix {cutmix_alpha}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob),
                            ("label_smoothing", label_smoothing)):
            if not 0 <= value <= 1:
                raise DatasetError(f"Mixup's {name} must lie in [0, 1], got {value}")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, \
            cutmix_alpha
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, label_smoothing

    def draw(self, rng, height, width):
        """(λ, box): the mixing weight and, for CutMix, the box (top, bottom, left, right)
        taken from the reversed batch; None for Mixup. λ = 1: not mixed."""
        if rng.random() >= self.prob:
            return 1.0, None
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or
                                            rng.random() < self.switch_prob)
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
        if not cutmix:
            return lam, None
        cut = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return float(lam), (int(top), int(bottom), int(left), int(right))

    def __call__(self, images, labels, rng):
        """(mixed images, soft targets (B, K) float32) for a batch; `images` is not changed."""
        lam, box = self.draw(rng, images.shape[2], images.shape[3])
        targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        if lam == 1.0:
            return images, targets
        reverse = images[::-1]
        if box is None:
            mixed = (images * np.float32(lam) + reverse * np.float32(1.0 - lam)).astype(
                images.dtype)
        else:
            top, bottom, left, right = box
            mixed = images.copy()
            mixed[:, :, top:bottom, left:right] = reverse[:, :, top:bottom, left:right]
        mixed_targets = targets * np.float32(lam) + targets[::-1] * np.float32(1.0 - lam)
        return mixed, mixed_targets

    def __repr__(self):
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"prob={self.prob}, switch_prob={self.switch_prob}, "
                f"label_smoothing={self.smoothing})")


class RandomErasing:
    """Random erasing (Zhong et al. 2020), timm's defaults (mode "pixel"): with probability
    `prob` per image, one rectangle of area in [min_area, max_area] of the image and aspect
    ratio log-uniform in [0.3, 1/0.3] is filled with standard normal noise (the batch is
    normalised, so that is noise of the data's own scale). Up to 10 tries to fit a rectangle."""

    def __init__(self, prob=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
        if not 0 <= prob <= 1 or not 0 < min_area <= max_area <= 1 or not 0 < min_aspect <= 1:
            raise DatasetError(f"RandomErasing needs 0 <= prob <= 1, 0 < min_area <= max_area "
                               f"<= 1, 0 < min_aspect <= 1; got {prob}, {min_area}, "
                               f"{max_area}, {min_aspect}")
        self.prob, self.min_area, self.max_area = prob, min_area, max_area
        self.log_aspect = (np.log(min_aspect), -np.log(min_aspect))

    def __call__(self, images, rng):
        out = images.copy()
        _, channels, height, width = images.shape
        for image in out:
            if rng.random() >= self.prob:
                continue
            for _ in range(10):
                area = rng.uniform(self.min_area, self.max_area) * height * width
                aspect = np.exp(rng.uniform(*self.log_aspect))
                h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
                if 0 < h < height and 0 < w < width:
                    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                    image[:, top:top + h, left:left + w] = rng.standard_normal(
                        (channels, h, w), dtype=np.float32)
                    break
        return out

    def __repr__(self):
        return f"RandomErasing(prob={self.prob}, area=[{self.min_area}, {self.max_area:.3g}])"
