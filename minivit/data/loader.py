"""Mini-batches from an ArrayDataset, reproducible from (seed, epoch)."""

import math

import numpy as np

from minivit.errors import DatasetError


class DataLoader:
    """Iterate over `dataset` in batches of (images (B, C, H, W) float32, labels (B,) int64).

    Each pass over the loader is one epoch. The shuffle order of epoch e comes from
    `np.random.default_rng([seed, e])` and the augmentation of its batch b from
    `np.random.default_rng([seed, e, b])`, so every batch is a function of (seed, epoch, b)
    only and a resumed run sees exactly the batches of the original one. A pass uses
    `loader.epoch` and then advances it by one; `set_epoch(e)` chooses the epoch of the next pass.

    augment: a callable `aug(images, rng) -> images` (see minivit.data.augment) applied to the
    [0, 1] images; normalize: subtract the dataset's per-channel mean and divide by its std.
    """

    def __init__(self, dataset, batch_size, shuffle=True, seed=0, drop_last=False,
                 augment=None, normalize=True):
        if int(batch_size) != batch_size or batch_size < 1:
            raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if drop_last and len(dataset) < batch_size:
            raise DatasetError(
                f"{dataset.name} has {len(dataset)} samples, fewer than batch_size={batch_size}, "
                "and drop_last=True would yield no batch; lower batch_size."
            )
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.augment = augment
        self.normalize = normalize
        self.epoch = 0
        channels = dataset.images.shape[1]
        self._mean = np.asarray(dataset.mean, np.float32).reshape(1, channels, 1, 1)
        self._inv_std = (1.0 / np.asarray(dataset.std, np.float32)).reshape(1, channels, 1, 1)

    def set_epoch(self, epoch):
        """Make the next pass epoch `epoch` (its order and augmentation depend on seed and it)."""
        self.epoch = int(epoch)

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch):
        images, labels = self.dataset.images, self.dataset.labels
        n = len(labels)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle \
            else np.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = images[idx]  # fancy indexing: a fresh contiguous copy, safe to change in place
            if self.augment is not None:
                x = np.ascontiguousarray(
                    self.augment(x, np.random.default_rng([self.seed, epoch, b])), np.float32)
            if self.normalize:
                x -= self._mean
                x *= self._inv_std
            yield x, labels[idx]
