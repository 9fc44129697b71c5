"""Datasets as in-memory arrays: embedded 8x8 digits, MNIST / Fashion-MNIST (IDX files),
CIFAR-10/100 (python pickle batches) and random synthetic data. minivit never downloads data."""

import functools
import io
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minivit.errors import DatasetError
from minivit.data.formats import (
    IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, check_labels, read_bytes, read_cifar_batch,
    read_cifar_names, read_idx,
)


class DatasetInfo(NamedTuple):
    """What a model needs to know before the data is loaded."""
    image_size: int
    channels: int
    num_classes: int


DATASETS = {
    "digits": DatasetInfo(8, 1, 10),
    "mnist": DatasetInfo(28, 1, 10),
    "fashion_mnist": DatasetInfo(28, 1, 10),
    "cifar10": DatasetInfo(32, 3, 10),
    "cifar100": DatasetInfo(32, 3, 100),
    "synthetic": DatasetInfo(32, 3, 10),
}

SPLITS = ("train", "test")
DEFAULT_DATA_DIR = "data"

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Conventional per-channel normalisation constants (mean, std) of the train splits.
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


class ArrayDataset:
    """Images and labels held in memory.

    images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64 in 0..num_classes-1;
    mean, std: per-channel normalisation constants (tuples of C floats); name: e.g. "cifar10-train".
    """

    def __init__(self, images, labels, num_classes, class_names, mean, std, name):
        images = np.ascontiguousarray(images, dtype=np.float32)
        given = np.asarray(labels)
        if given.dtype.kind not in "iub" and not (
                given.dtype.kind == "f" and np.array_equal(given, np.round(given))):
            raise DatasetError(f"{name}: labels must be whole numbers (class indices); got dtype "
                             f"{given.dtype}" + (f", e.g. {given[given != np.round(given)][0]}"
                                                 if given.dtype.kind == "f" else ""))
        labels = np.ascontiguousarray(given, dtype=np.int64)
        if images.ndim != 4 or labels.shape != (len(images),):
            raise DatasetError(
                f"{name}: images (N, C, H, W) and labels (N,) expected, "
                f"got {images.shape} and {labels.shape}."
            )
        channels = images.shape[1]
        if len(class_names) != num_classes or len(mean) != channels or len(std) != channels:
            raise DatasetError(
                f"{name}: {num_classes} class names and {channels} mean/std values expected, "
                f"got {len(class_names)} names, {len(mean)} means and {len(std)} stds."
            )
        check_labels(labels, num_classes, name)
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        return (f"ArrayDataset({self.name!r}, images={self.images.shape}, "
                f"num_classes={self.num_classes})")


def _to_unit(pixels, max_value):
    """Integer pixels 0..max_value -> float32 in [0, 1]."""
    return pixels.astype(np.float32) / np.float32(max_value)


def dataset_key(name):
    """The DATASETS key for `name` (case and '-' vs '_' ignored); DatasetError if unknown."""
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    return key


def _data_root(data_dir):
    return Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()


def _check_split(split):
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}.")


# ---------------------------------------------------------------- digits (embedded)

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_split_indices():
    """Fixed stratified 80/20 split of the 1,797 digits: (train_idx, test_idx), sorted.

    Uses the legacy RandomState, whose stream NumPy keeps frozen, so the split never changes.
    """
    labels = _read_digits()[1]
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        n_test = int(round(DIGITS_TEST_FRACTION * len(members)))
        test.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


@functools.lru_cache(maxsize=None)
def _read_digits():
    """(pixels (1797, 8, 8) uint8 0..16, labels (1797,) int64) from the embedded CSV, read once;
    the arrays are read-only."""
    source = resources.files(__package__).joinpath("digits.csv.gz")
    with resources.as_file(source) as path:
        text = read_bytes(path)
    table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64)
    if table.shape != (1797, 65):
        raise DatasetError(
            f"{source}: 1797 rows of 65 values expected, found shape {table.shape}. "
            "The packaged file is damaged; reinstall minivit."
        )
    pixels, labels = table[:, :64].astype(np.uint8).reshape(-1, 8, 8), table[:, 64].copy()
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


def load_digits(split="train"):
    """The embedded UCI 8x8 handwritten digits (CC BY 4.0), 1,438 train / 359 test images.

    Pixel values 0..16 are scaled to [0, 1]; mean/std come from the train split.
    """
    _check_split(split)
    pixels, labels = _read_digits()
    images = _to_unit(pixels, 16)[:, None]
    train, test = digits_split_indices()
    mean, std = float(images[train].mean()), float(images[train].std())
    idx = train if split == "train" else test
    return ArrayDataset(images[idx], labels[idx], 10, [str(d) for d in range(10)],
                        (mean,), (std,), f"digits-{split}")


# ---------------------------------------------------------------- MNIST / Fashion-MNIST

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion_mnist", "FashionMNIST/raw"),
}
IDX_SOURCES = {
    "mnist": "https://yann.lecun.com/exdb/mnist/ (or any mirror of the original files)",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
}


def _find_file(name, dirs, dataset, source):
    """First existing `dir/name` or `dir/name.gz`; DatasetError listing every path tried."""
    tried = [d / n for d in dirs for n in (name, name + ".gz")]
    for path in tried:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in tried)
    raise DatasetError(
        f"{dataset}: file {name} not found; looked at {looked}. "
        f"minivit cannot download datasets: get the original files from {source} "
        "and place them in one of these folders, or name their folder with --data-dir "
        "(data_dir= in Python)."
    )


def load_idx_dataset(name, split="train", data_dir=None):
    """MNIST or Fashion-MNIST (`name` "mnist" / "fashion_mnist") from the original IDX files
    in data_dir or its subfolder mnist, MNIST/raw, fashion_mnist or FashionMNIST/raw."""
    _check_split(split)
    root = _data_root(data_dir)
    dirs = [root] + [root / sub for sub in IDX_SUBDIRS[name]]
    image_file, label_file = (_find_file(f, dirs, name, IDX_SOURCES[name])
                              for f in IDX_FILES[split])
    pixels = read_idx(image_file, IDX_IMAGES_MAGIC)
    labels = read_idx(label_file, IDX_LABELS_MAGIC).astype(np.int64)
    size = DATASETS[name].image_size
    if pixels.shape[1:] != (size, size):
        raise DatasetError(
            f"{image_file}: {size}x{size} images expected, "
            f"found {pixels.shape[1]}x{pixels.shape[2]}. Use the original {name} files."
        )
    if len(pixels) != len(labels):
        raise DatasetError(
            f"{image_file} holds {len(pixels)} images but {label_file} holds {len(labels)} labels; "
            "the counts must match. One of the files is from another split or damaged; replace it."
        )
    check_labels(labels, 10, label_file)
    if name == "mnist":
        class_names, (mean, std) = [str(d) for d in range(10)], MNIST_STATS
    else:
        class_names, (mean, std) = FASHION_MNIST_CLASSES, FASHION_MNIST_STATS
    return ArrayDataset(_to_unit(pixels, 255)[:, None], labels, 10, class_names, mean, std,
                        f"{name}-{split}")


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100

CIFAR_LAYOUT = {
    # name: (folder, train files, test files, meta file, label key, names key, stats)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names", CIFAR10_STATS),
    "cifar100": ("cifar-100-python", ["train"], ["test"],
                 "meta", b"fine_labels", b"fine_label_names", CIFAR100_STATS),
}
CIFAR_SOURCE = ("https://www.cs.toronto.edu/~kriz/cifar.html "
                "(the 'python version' archive, extracted)")


def load_cifar(name, split="train", data_dir=None):
    """CIFAR-10 or CIFAR-100 (`name` "cifar10" / "cifar100", fine labels) from the original
    python batches in data_dir/cifar-10-batches-py, data_dir/cifar-100-python, or data_dir."""
    _check_split(split)
    folder, train_files, test_files, meta, label_key, names_key, (mean, std) = CIFAR_LAYOUT[name]
    root = _data_root(data_dir)
    dirs = [root / folder, root]
    num_classes = DATASETS[name].num_classes
    parts = [read_cifar_batch(_find_file(f, dirs, name, CIFAR_SOURCE), label_key, num_classes)
             for f in (train_files if split == "train" else test_files)]
    meta_path = _find_file(meta, dirs, name, CIFAR_SOURCE)
    class_names = read_cifar_names(meta_path, names_key)
    if len(class_names) != num_classes:
        raise DatasetError(
            f"{meta_path}: {num_classes} class names expected, found {len(class_names)}. "
            f"Use the meta file of the original {name} archive."
        )
    pixels = np.concatenate([p for p, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    return ArrayDataset(_to_unit(pixels, 255), labels, num_classes, class_names, mean, std,
                        f"{name}-{split}")


# ---------------------------------------------------------------- synthetic

def synthetic(num_samples, image_size=32, channels=3, num_classes=10, seed=0, name="synthetic"):
    """Uniform random images in [0, 1] with random labels, for benchmarks and smoke tests."""
    rng = np.random.default_rng(seed)
    images = rng.random((num_samples, channels, image_size, image_size), dtype=np.float32)
    labels = rng.integers(0, num_classes, num_samples)
    return ArrayDataset(images, labels, num_classes, [str(c) for c in range(num_classes)],
                        (0.5,) * channels, (12 ** -0.5,) * channels, name)


SYNTHETIC_SIZES = {"train": (1024, 0), "test": (256, 1)}  # split: (num_samples, seed)


# ---------------------------------------------------------------- entry point

def load_dataset(name, split="train", data_dir=None):
    """Load dataset `name` (one of DATASETS) for `split` "train" or "test".

    digits is embedded; mnist, fashion_mnist, cifar10 and cifar100 are read from the original
    files under `data_dir` (default ./data); synthetic is 1,024 train / 256 test random 32x32 RGB
    images.
    """
    key = dataset_key(name)
    if key == "digits":
        return load_digits(split)
    if key in IDX_SUBDIRS:
        return load_idx_dataset(key, split, data_dir)
    if key in CIFAR_LAYOUT:
        return load_cifar(key, split, data_dir)
    _check_split(split)
    info = DATASETS["synthetic"]
    num_samples, seed = SYNTHETIC_SIZES[split]
    return synthetic(num_samples, info.image_size, info.channels, info.num_classes, seed,
                     name=f"synthetic-{split}")
