"""Readers for the original dataset file formats: IDX (MNIST, Fashion-MNIST) and the CIFAR
python pickle batches. Each checks what it reads and raises DatasetError naming the file."""

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

from minivit.errors import DatasetError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)


def read_bytes(path):
    """Whole content of `path`, gunzipped when the name ends in .gz."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot read {path}: {exc}. The file is damaged or truncated; "
            "replace it with a fresh copy of the original."
        ) from exc


def read_idx(path, magic):
    """Parse an IDX file of unsigned bytes; returns a uint8 array of the dimensions in its header.

    `magic` is IDX_IMAGES_MAGIC or IDX_LABELS_MAGIC; a different magic number, a short header or
    a payload whose size differs from the product of the dimensions raises DatasetError.
    """
    raw = read_bytes(path)
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DatasetError(
            f"{path} is truncated: an IDX header needs {header} bytes, the file has {len(raw)}. "
            "Replace it with a fresh copy of the original."
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(
            f"{path} is not the expected IDX file: magic number 0x{magic:08X} expected, "
            f"0x{found:08X} found. Check that images and labels files are not swapped or damaged."
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} is truncated or padded: header dimensions {dims} need {expected} bytes of "
            f"data, the file has {len(raw) - header}. Replace it with a fresh copy of the original."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asks for an object other than NumPy arrays and plain containers."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only NumPy arrays and plain containers, never arbitrary objects:
    a pickle can run any code on load, and dataset files often come from elsewhere."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def read_pickle(path):
    """Load a CIFAR python batch (a dict with bytes keys) from `path` (gunzipped if .gz)."""
    raw = read_bytes(path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise DatasetError(
            f"{path} asks to build a {exc} object; a CIFAR batch holds only arrays, lists and "
            "bytes, and minivit refuses other objects (unpickling them can run code). "
            "Use the files of the original 'python version' archive."
        ) from exc
    except Exception as exc:  # a damaged pickle can fail in many ways
        raise DatasetError(
            f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {exc}). "
            "The file is damaged or truncated; replace it with a fresh copy of the original "
            "'python version' archive."
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{path} should hold a dict, it holds a {type(obj).__name__}. "
            "Use the files of the original 'python version' archive."
        )
    return obj


def _entry(batch, key, path):
    """batch[key], under bytes keys (the original files) or str keys (a batch re-pickled by
    Python 3 code); `key` is given as bytes."""
    for name in (key, key.decode()):
        if name in batch:
            return batch[name]
    found = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
    raise DatasetError(
        f"{path} has no {key.decode()!r} entry (found: {found}). "
        "Use the files of the original 'python version' archive."
    )


def read_cifar_batch(path, label_key, num_classes):
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR batch file.

    `label_key` is b"labels" for CIFAR-10 and b"fine_labels" for CIFAR-100.
    """
    batch = read_pickle(path)
    data = _entry(batch, b"data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise DatasetError(
            f"{path}: 'data' should be a uint8 array of shape (N, 3072), it is a {got}. "
            "Use the files of the original 'python version' archive."
        )
    labels = np.asarray(_entry(batch, label_key, path))
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: {label_key.decode()} should be {len(data)} integers (one per image), "
            f"found {labels.dtype} of shape {labels.shape}. The file is damaged; replace it."
        )
    check_labels(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar_names(path, key):
    """Class names (list of str) from a CIFAR meta file; `key` is b"label_names" or
    b"fine_label_names"."""
    names = _entry(read_pickle(path), key, path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def check_labels(labels, num_classes, path):
    """Raise DatasetError naming `path` when a label is outside 0..num_classes-1."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path}: labels must lie in 0..{num_classes - 1}, "
            f"found {labels.min()}..{labels.max()}. "
            "The file is damaged or belongs to another dataset; replace it."
        )
