"""minivit.data: IDX and CIFAR files, the embedded digits, the loader and augmentation."""

import gzip
import pickle

import numpy as np
import pytest

from minivit.data import (
    DATASETS, ArrayDataset, Compose, DataLoader, RandomCrop, RandomHorizontalFlip,
    default_augmentation, load_dataset, synthetic,
)
from minivit.data.datasets import digits_split_indices
from minivit.errors import DatasetError


# ---------------------------------------------------------------- file writers (real formats)

def write_idx(path, magic, array, gz=False, cut=0):
    """Write `array` (uint8) as an IDX file with `magic`; drop `cut` bytes from the end."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = (header + array.astype(np.uint8).tobytes())[:len(header) + array.size - cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_mnist(folder, split="train", n=5, gz=False, seed=0):
    """IDX image and label files for `split` in `folder`; returns (pixels, labels, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    img = write_idx(folder / f"{prefix}-images-idx3-ubyte", 0x803, pixels, gz)
    lab = write_idx(folder / f"{prefix}-labels-idx1-ubyte", 0x801, labels, gz)
    return pixels, labels, (img, lab)


def write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def make_cifar10(root, per_batch=2, seed=0):
    """cifar-10-batches-py/ with 5 train batches, a test batch and batches.meta (bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[name] = (data, labels)
        write_pickle(folder / name, {b"batch_label": name.encode(), b"data": data,
                                     b"labels": labels, b"filenames": [b"x.png"] * per_batch})
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                           b"num_vis": 3072})
    return folder, batches


# ---------------------------------------------------------------- MNIST / Fashion-MNIST

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_loads(tmp_path, gz):
    pixels, labels, _ = make_mnist(tmp_path, "train", n=5, gz=gz)
    ds = load_dataset("mnist", "train", data_dir=tmp_path)
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == np.float32
    np.testing.assert_allclose(ds.images[:, 0], pixels / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 10 and len(ds) == 5
    assert ds.mean == (0.1307,) and ds.std == (0.3081,) and ds.name == "mnist-train"


@pytest.mark.parametrize("name,sub", [("mnist", "mnist"), ("mnist", "MNIST/raw"),
                                      ("fashion_mnist", "fashion_mnist"),
                                      ("fashion_mnist", "FashionMNIST/raw")])
def test_idx_subfolders(tmp_path, name, sub):
    make_mnist(tmp_path / sub, "test", n=3, gz=True)
    ds = load_dataset(name, "test", data_dir=tmp_path)
    assert ds.images.shape == (3, 1, 28, 28)
    if name == "fashion_mnist":
        assert ds.class_names[0] == "T-shirt/top" and ds.mean == (0.2860,)


def test_idx_missing_file_lists_paths(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "cannot download" in msg
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg


@pytest.mark.parametrize("gz", [False, True])
def test_idx_wrong_magic(tmp_path, gz):
    _, _, (img, lab) = make_mnist(tmp_path, gz=gz)
    write_idx(tmp_path / "train-images-idx3-ubyte", 0x801, np.zeros((5, 28, 28), np.uint8), gz)
    with pytest.raises(DatasetError, match="magic number") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert img.name in str(e.value)


def test_idx_truncated_payload(tmp_path):
    _, labels, (img, lab) = make_mnist(tmp_path)
    write_idx(lab, 0x801, labels, cut=1)
    with pytest.raises(DatasetError, match="truncated") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(lab) in str(e.value)


def test_idx_truncated_header_and_gzip(tmp_path):
    _, _, (img, _) = make_mnist(tmp_path)
    img.write_bytes(img.read_bytes()[:7])
    with pytest.raises(DatasetError, match="truncated") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(img) in str(e.value)
    img.unlink()
    gz = img.with_name(img.name + ".gz")
    gz.write_bytes(gzip.compress(b"\0" * 5000)[:100])
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(gz) in str(e.value)


def test_idx_count_mismatch(tmp_path):
    _, labels, (img, lab) = make_mnist(tmp_path, n=5)
    write_idx(lab, 0x801, labels[:4])
    with pytest.raises(DatasetError, match="5 images.*4 labels") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(img) in str(e.value) and str(lab) in str(e.value)


def test_idx_label_out_of_range(tmp_path):
    _, labels, (_, lab) = make_mnist(tmp_path)
    labels[2] = 10
    write_idx(lab, 0x801, labels)
    with pytest.raises(DatasetError, match="0..9") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(lab) in str(e.value)


def test_idx_wrong_image_size(tmp_path):
    _, _, (img, _) = make_mnist(tmp_path)
    write_idx(img, 0x803, np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match="28x28") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(img) in str(e.value)


# ---------------------------------------------------------------- CIFAR

def test_cifar10_loads(tmp_path):
    _, batches = make_cifar10(tmp_path, per_batch=2)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    data, labels = batches["data_batch_2"]
    # row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    np.testing.assert_allclose(train.images[2, 1, 0, 5], data[0, 1024 + 5] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(train.images[3].ravel(), data[1] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(train.labels[2:4], labels)
    assert train.class_names == [f"c{i}" for i in range(10)] and train.num_classes == 10
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.std == (0.2470, 0.2435, 0.2616)


def test_cifar100_loads(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)
    for name in ("train", "test"):
        write_pickle(folder / name, {b"data": data, b"fine_labels": [0, 50, 99],
                                     b"coarse_labels": [0, 1, 2]})
    write_pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [b"x"] * 20})
    ds = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert ds.images.shape == (3, 3, 32, 32) and ds.num_classes == 100
    np.testing.assert_array_equal(ds.labels, [0, 50, 99])
    assert ds.class_names[99] == "f99" and ds.mean == (0.5071, 0.4865, 0.4409)


def test_cifar_accepts_protocol5_arrays(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps(
        {b"data": np.zeros((4, 3072), np.uint8), b"labels": [1, 2, 3, 4]}, protocol=5))
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path)) == 4


@pytest.mark.parametrize("corrupt,match", [
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable CIFAR"),
    (lambda p: p.write_bytes(b"garbage, not a pickle"), "not a readable CIFAR"),
    (lambda p: write_pickle(p, [1, 2, 3]), "dict"),
    (lambda p: write_pickle(p, {b"labels": [0, 1]}), "'data'"),
    (lambda p: write_pickle(p, {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}),
     r"\(N, 3072\)"),
    (lambda p: write_pickle(p, {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
     "uint8"),
    (lambda p: write_pickle(p, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
     "one per image"),
    (lambda p: write_pickle(p, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
     "0..9"),
])
def test_cifar_bad_batch(tmp_path, corrupt, match):
    folder, _ = make_cifar10(tmp_path)
    corrupt(folder / "data_batch_3")
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert str(folder / "data_batch_3") in str(e.value)


def test_cifar_batches_re_pickled_with_str_keys_load(tmp_path):
    folder, batches = make_cifar10(tmp_path)
    for name in ("test_batch", "batches.meta"):
        batch = pickle.loads((folder / name).read_bytes(), encoding="bytes")
        write_pickle(folder / name, {key.decode(): value for key, value in batch.items()})
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(test.labels, batches["test_batch"][1])
    assert test.class_names[3] == "c3"


def test_a_cifar_batch_without_data_names_the_keys_it_has(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    write_pickle(folder / "test_batch", {"labels": [0, 1], "filenames": []})
    with pytest.raises(DatasetError, match=r"has no 'data' entry \(found: \['filenames', "
                                           r"'labels'\]\)"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder, _ = make_cifar10(tmp_path)
    write_pickle(folder / "test_batch", {b"data": Evil()})
    with pytest.raises(DatasetError, match=r"build a __builtin__\.print object"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_missing_files(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    (folder / "batches.meta").unlink()
    with pytest.raises(DatasetError, match="batches.meta not found") as e:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert str(folder / "batches.meta") in str(e.value)
    assert "\n" not in str(e.value)  # one line on the command line
    with pytest.raises(DatasetError, match="cifar-100-python"):
        load_dataset("cifar100", "train", data_dir=tmp_path)


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
