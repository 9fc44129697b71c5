"""Datasets, the mini-batch loader and batch augmentations (pure NumPy).

    from minivit.data import load_dataset, DataLoader, default_augmentation
    train = load_dataset("digits", "train")
    loader = DataLoader(train, 128, augment=default_augmentation("digits"))
    for epoch in range(10):
        loader.set_epoch(epoch)
        for images, labels in loader: ...
"""

from minivit.data.augment import Compose, RandomCrop, RandomHorizontalFlip, default_augmentation
from minivit.data.datasets import (
    DATASETS, ArrayDataset, DatasetInfo, load_cifar, load_dataset, load_digits, load_idx_dataset,
    synthetic,
)
from minivit.data.loader import DataLoader

__all__ = [
    "DATASETS", "ArrayDataset", "DatasetInfo", "load_dataset", "load_digits", "load_idx_dataset",
    "load_cifar", "synthetic", "DataLoader", "RandomCrop", "RandomHorizontalFlip", "Compose",
    "default_augmentation",
]
