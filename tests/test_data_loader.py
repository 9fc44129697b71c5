"""minivit.data beyond the files: the embedded digits, synthetic data and the dataset table, the
loader (epochs, seeds, batches, normalisation) and augmentation.
"""

import numpy as np
import pytest

from minivit.data import (DATASETS, ArrayDataset, Compose, DataLoader, RandomCrop,
                          RandomHorizontalFlip, default_augmentation, load_dataset, synthetic)
from minivit.data.datasets import digits_split_indices
from minivit.errors import DatasetError


# ---------------------------------------------------------------- digits, synthetic, entry point

def test_digits():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and 355 <= len(test) <= 365
    assert train.images.shape[1:] == (1, 8, 8) and train.num_classes == 10
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    assert np.all(np.bincount(train.labels, minlength=10) > 130)
    assert np.all(np.bincount(test.labels, minlength=10) >= 34)  # stratified: ~20% of each class
    assert test.mean == train.mean and 0.2 < train.mean[0] < 0.4


def test_digits_split_stable_and_disjoint():
    np.random.seed(123)  # the user's global seed must not matter
    train, test = digits_split_indices()
    np.random.seed(7)
    train2, test2 = digits_split_indices()
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(test, test2)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(1797))
    assert test[:8].tolist() == [3, 7, 13, 19, 36, 38, 43, 48]  # frozen across NumPy versions


def test_synthetic_and_datasets_table():
    ds = synthetic(20, image_size=16, channels=2, num_classes=3, seed=1)
    assert ds.images.shape == (20, 2, 16, 16) and ds.labels.max() < 3 and len(ds.mean) == 2
    np.testing.assert_array_equal(ds.images, synthetic(20, 16, 2, 3, seed=1).images)
    for name in ("digits", "synthetic"):
        ds = load_dataset(name, "test")
        info = DATASETS[name]
        assert ds.images.shape[1:] == (info.channels, info.image_size, info.image_size)
        assert ds.num_classes == info.num_classes


def test_load_dataset_errors():
    with pytest.raises(DatasetError, match="known datasets: digits, mnist"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", "validation")


# ---------------------------------------------------------------- loader

def indexed_dataset(n=23, channels=1, size=4):
    """A dataset whose image i is filled with the value i / n, to see which samples came."""
    images = np.broadcast_to((np.arange(n) / n).reshape(n, 1, 1, 1), (n, channels, size, size))
    return ArrayDataset(images, np.arange(n) % 3, 3, ["a", "b", "c"], (0.5,) * channels,
                        (0.25,) * channels, "indexed")


def test_labels_that_are_not_whole_numbers_are_refused():
    images = np.zeros((2, 1, 4, 4))
    with pytest.raises(DatasetError, match="labels must be whole numbers .* e.g. 0.7"):
        ArrayDataset(images, [0.7, 1.2], 2, ["a", "b"], (0.5,), (0.25,), "toy")
    labels = ArrayDataset(images, np.array([0.0, 1.0]), 2, ["a", "b"], (0.5,), (0.25,),
                          "toy").labels
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1]  # whole floats are fine


def seen(images, n=23):
    return np.rint(images[:, 0, 0, 0] * n).astype(int)


def run_epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_epoch_covers_every_sample_once():
    loader = DataLoader(indexed_dataset(), batch_size=5, normalize=False)
    batches = run_epoch(loader, 0)
    assert len(loader) == len(batches) == 5 and [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    order = np.concatenate([seen(x) for x, _ in batches])
    assert sorted(order) == list(range(23)) and order.tolist() != list(range(23))
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.flags.c_contiguous
        np.testing.assert_array_equal(y, seen(x) % 3)


def test_loader_reproducible_per_seed_and_epoch():
    aug = Compose([RandomCrop(4, padding=1), RandomHorizontalFlip()])
    ds = synthetic(50, 4, 3, 5, seed=0)
    a = run_epoch(DataLoader(ds, 8, seed=3, augment=aug), 2)
    b = run_epoch(DataLoader(ds, 8, seed=3, augment=aug), 2)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other_epoch = run_epoch(DataLoader(ds, 8, seed=3, augment=aug), 3)
    other_seed = run_epoch(DataLoader(ds, 8, seed=4, augment=aug), 2)
    assert not np.array_equal(a[0][1], other_epoch[0][1])
    assert not np.array_equal(a[0][1], other_seed[0][1])


def test_loader_passes_advance_epoch():
    loader = DataLoader(indexed_dataset(), 23, normalize=False)
    first, second = next(iter(loader))[0], next(iter(loader))[0]
    assert loader.epoch == 2 and not np.array_equal(seen(first), seen(second))
    loader.set_epoch(0)
    np.testing.assert_array_equal(next(iter(loader))[0], first)


def test_loader_drop_last_no_shuffle_and_normalize():
    ds = indexed_dataset()
    loader = DataLoader(ds, 5, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and all(len(y) == 5 for _, y in batches)
    np.testing.assert_allclose(batches[1][0], (ds.images[5:10] - 0.5) / 0.25, rtol=1e-6)
    assert ds.images[0, 0, 0, 0] == 0.0  # the dataset is never modified in place


def test_loader_bad_batch_size():
    for bad in (0, -1, 2.5):
        with pytest.raises(DatasetError, match="batch_size"):
            DataLoader(indexed_dataset(), bad)
    with pytest.raises(DatasetError, match="drop_last"):
        DataLoader(indexed_dataset(), 100, drop_last=True)


# ---------------------------------------------------------------- augmentation

def test_random_crop_shifts_content():
    images = np.zeros((200, 2, 6, 6), np.float32)
    images[:, :, 2, 3] = 1.0  # one bright pixel at (2, 3) in both channels
    before = images.copy()
    out = RandomCrop(6, padding=2)(images, np.random.default_rng(0))
    np.testing.assert_array_equal(images, before)
    assert out.shape == (200, 2, 6, 6) and out.dtype == np.float32
    shifts = set()
    for img in out:
        np.testing.assert_array_equal(img[0], img[1])  # same offset for all channels
        ys, xs = np.nonzero(img[0])
        if len(ys):  # the pixel can be cropped away by a 2-pixel shift
            assert len(ys) == 1 and abs(ys[0] - 2) <= 2 and abs(xs[0] - 3) <= 2
            shifts.add((ys[0] - 2, xs[0] - 3))
    assert len(shifts) > 10 and (0, 0) in shifts


def test_random_crop_exact_window_and_smaller_size():
    images = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    out = RandomCrop(3, padding=0)(images, np.random.default_rng(1))
    assert out.shape == (2, 1, 3, 3)
    for img, crop in zip(images, out):
        assert any(np.array_equal(img[:, y:y + 3, x:x + 3], crop)
                   for y in range(2) for x in range(2))
    with pytest.raises(DatasetError, match="cannot crop"):
        RandomCrop(9, padding=2)(images, np.random.default_rng(0))


def test_horizontal_flip():
    images = np.random.default_rng(0).random((64, 3, 4, 5), dtype=np.float32)
    np.testing.assert_array_equal(RandomHorizontalFlip(1.0)(images, np.random.default_rng(0)),
                                  images[..., ::-1])
    np.testing.assert_array_equal(RandomHorizontalFlip(0.0)(images, np.random.default_rng(0)),
                                  images)
    out = RandomHorizontalFlip(0.5)(images, np.random.default_rng(0))
    flipped = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_default_augmentation():
    assert default_augmentation("digits") is None
    assert default_augmentation("mnist").padding == 2
    cifar = default_augmentation("cifar10")
    assert [type(t) for t in cifar.transforms] == [RandomCrop, RandomHorizontalFlip]
    assert default_augmentation("synthetic") is None
    with pytest.raises(DatasetError):
        default_augmentation("nope")
    x = np.zeros((3, 3, 32, 32), np.float32)
    assert cifar(x, np.random.default_rng(0)).shape == x.shape
