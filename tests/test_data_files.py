"""minivit.data's file formats: MNIST / Fashion-MNIST IDX files and CIFAR-10/100 pickles,
written in their real formats, and every way such a file can be wrong.
"""

import gzip
import pickle

import numpy as np
import pytest

from minivit.data import load_dataset
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
