"""Weight files: atomic saving and loading of state dicts, and wrapper-prefix stripping.

Everything here works on plain state dicts (``dict[str, numpy.ndarray]``) with timm's names;
checking them against a ViT and resampling position embeddings live with the models
(``minivit.models.timm_keys``, ``minivit.models.pos_embed``).

Formats:

- ``.safetensors`` -- written with ``safetensors.numpy``; read by a small reader of our own
  (the format is an 8-byte header length, a JSON header and raw little-endian data), because
  ``safetensors.numpy`` cannot read bfloat16, which NumPy lacks.
- ``.npz`` -- a zip of ``.npy`` arrays, no pickles; metadata is a JSON string stored under
  the reserved name ``__metadata__``.
- ``.pth`` / ``.pt`` / ``.bin`` -- read only, through PyTorch imported lazily
  (``weights_only=True``).

On loading, bfloat16 and float16 arrays become float32 (in every format); other dtypes are
kept. Metadata is a ``dict[str, str]`` in every format (empty for PyTorch files).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from minivit.errors import WeightsError

__all__ = [
    "SAVE_SUFFIXES",
    "LOAD_SUFFIXES",
    "atomic_write",
    "save_weights",
    "load_weights",
    "strip_prefixes",
]

SAVE_SUFFIXES = (".safetensors", ".npz")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
LOAD_SUFFIXES = SAVE_SUFFIXES + TORCH_SUFFIXES
NPZ_METADATA_KEY = "__metadata__"
# Containers that training scripts wrap a state dict in, tried in this order.
STATE_DICT_CONTAINERS = ("state_dict", "model", "model_state", "model_state_dict")


# --------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one.

    ``write_fn(tmp_path)`` writes the whole file to ``tmp_path``, a new, empty file in the
    same directory whose name ends with ``path``'s suffix (so ``np.savez`` appends nothing
    and ``safetensors.numpy.save_file`` just works). The file is then flushed to disk and
    renamed onto ``path`` with ``os.replace``, and the directory is fsynced where the OS
    allows. If ``write_fn`` raises, or the process is interrupted (KeyboardInterrupt), the
    temporary file is removed and any previous file at ``path`` is left untouched. Only a
    hard kill can leave a ``.<name>.<random>.tmp<suffix>`` file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    open(tmp, "xb").close()  # claims the name; permissions follow the umask
    mode = tmp.stat().st_mode & 0o777
    try:
        write_fn(str(tmp))
        os.chmod(tmp, mode)  # a writer that recreates the file (safetensors: 0600) gets it back
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory``; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Saving


def save_weights(
    state: Mapping[str, object], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a state dict to ``.safetensors`` or ``.npz`` (chosen by suffix), atomically.

    Arrays are copied to contiguous host NumPy arrays first (CuPy arrays through ``.get()``).
    ``metadata`` maps str to str; it comes back from :func:`load_weights`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise WeightsError(
            f"cannot save {path}: unsupported suffix {suffix or '(none)'!r}; "
            f"name the file with one of {', '.join(SAVE_SUFFIXES)}"
        )
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightsError(
            f"cannot save {path}: metadata must map str to str, got "
            f"{ {k: type(v).__name__ for k, v in metadata.items()} }; convert values with str() "
            "or json.dumps()"
        )
    arrays = {name: _host_array(name, value, path) for name, value in state.items()}

    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        def write(tmp):
            try:
                save_file(arrays, tmp, metadata=metadata or None)
            except SafetensorError as err:  # how safetensors reports a failed write (full disk)
                raise OSError(str(err)) from None

    else:
        if NPZ_METADATA_KEY in arrays:
            raise WeightsError(
                f"cannot save {path}: the name {NPZ_METADATA_KEY!r} is reserved for metadata "
                "in .npz files; rename that entry"
            )

        def write(tmp):
            _write_npz(tmp, arrays, metadata)

    try:
        atomic_write(path, write)
    except OSError as err:  # the reason, not the temporary file's name
        raise WeightsError(
            f"cannot write {path}: {err.strerror or err}; check that its folder exists, is "
            "writable and has room"
        ) from None


def _host_array(name: object, value: object, path: Path) -> np.ndarray:
    """A contiguous NumPy copy-or-view of ``value``; CuPy arrays come over through ``.get()``."""
    if not isinstance(name, str):
        raise WeightsError(f"cannot save {path}: state dict names must be str, got {name!r}")
    if not isinstance(value, np.ndarray) and hasattr(value, "get"):
        value = value.get()
    array = np.asarray(value, order="C")
    if array.dtype.kind not in "biuf":
        raise WeightsError(
            f"cannot save {path}: entry {name!r} has dtype {array.dtype}; expected a numeric "
            "or bool array"
        )
    return array


def _write_npz(filename: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]):
    """Write arrays (and metadata as JSON) the way ``np.savez`` does, but never pickling and
    without ``np.savez``'s keyword arguments, which would clash with names like ``file``."""
    entries = dict(arrays)
    if metadata:
        entries[NPZ_METADATA_KEY] = np.array(json.dumps(dict(metadata)))
    with zipfile.ZipFile(filename, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in entries.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)


# --------------------------------------------------------------------------------------------
# Loading


def load_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a weights file; return ``(state, metadata)``.

    Supports ``.safetensors``, ``.npz`` and (through PyTorch) ``.pth``/``.pt``/``.bin``.
    PyTorch files may wrap the state dict in ``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"model_state": ...}`` or ``{"model_state_dict": ...}``; a ``module.`` prefix (from
    DistributedDataParallel) is stripped. A missing, truncated or corrupt file raises one
    :class:`~minivit.errors.WeightsError` naming it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise WeightsError(f"cannot read {path}: no such file; check the path")
    if suffix not in LOAD_SUFFIXES:
        raise WeightsError(
            f"cannot read {path}: unsupported suffix {suffix or '(none)'!r}; "
            f"supported: {', '.join(LOAD_SUFFIXES)}"
        )
    if not path.is_file():
        raise WeightsError(f"cannot read {path}: no such file; check the path")
    if suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
    elif suffix == ".npz":
        state, metadata = _read_npz(path)
    else:
        state, metadata = strip_prefixes(_read_torch(path), ("module.",)), {}
    return {name: _widen_half(array) for name, array in state.items()}, metadata


def _widen_half(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float16 else array


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a .safetensors file, checking every offset against the file's size."""

    def fail(problem):
        return WeightsError(
            f"cannot read {path} as .safetensors: {problem}; the file is damaged or incomplete "
            "-- download or save it again"
        )

    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise fail(f"expected at least 8 bytes, the file has {size}")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise fail(f"header claims {header_len} bytes, only {size - 8} follow")
        try:
            header = json.loads(f.read(header_len))
            metadata = header.pop("__metadata__", None) or {}
            specs = {
                name: (spec["dtype"], tuple(int(n) for n in spec["shape"]),
                       *(int(o) for o in spec["data_offsets"]))
                for name, spec in header.items()
            }  # fmt: skip
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise fail(f"malformed header ({type(err).__name__}: {err})") from None
        data_start = 8 + header_len
        state = {}
        for name, (dtype_name, shape, begin, end) in specs.items():
            if dtype_name not in _SAFETENSORS_DTYPES:
                raise WeightsError(
                    f"cannot read {path}: tensor {name!r} has dtype {dtype_name}; supported: "
                    f"{', '.join(_SAFETENSORS_DTYPES)} -- convert the file to float32"
                )
            dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes:
                raise fail(f"tensor {name!r} of shape {shape} ({dtype_name}) needs {nbytes} bytes, "
                           f"the header gives offsets {begin}..{end}")  # fmt: skip
            if data_start + end > size:
                raise fail(f"truncated: tensor {name!r} ends at byte {data_start + end}, "
                           f"the file has {size}")  # fmt: skip
            array = np.empty(shape, dtype)
            f.seek(data_start + begin)
            f.readinto(memoryview(array.reshape(-1)).cast("B"))
            if dtype_name == "BF16":  # bfloat16 is the top half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            state[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return state, metadata


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read an .npz archive (no pickles) and its optional JSON metadata."""

    def fail(problem):
        return WeightsError(
            f"cannot read {path} as .npz: {problem}; expected a zip of .npy arrays as written "
            "by numpy.savez or minivit -- the file is damaged, incomplete or of another format"
        )

    if not zipfile.is_zipfile(path):
        raise fail("it is not a zip archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            state = {name: npz[name] for name in npz.files}
        metadata = json.loads(str(state.pop(NPZ_METADATA_KEY, "{}")))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise fail(f"{type(err).__name__}: {err}") from None
    return state, metadata


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (``weights_only=True``), unwrapping common containers."""
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"cannot read {path}: reading .pth needs PyTorch: pip install 'minivit[parity]' "
            "or convert the file to .safetensors elsewhere"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, OSError...
        if "Weights only load failed" in str(err):
            raise WeightsError(
                f"cannot read {path} as a PyTorch file: it holds pickled Python objects besides "
                "tensors, which torch.load(weights_only=True) refuses (a full training "
                "checkpoint, or a damaged file); if you trust the file, extract its state dict "
                "with torch.load(..., weights_only=False) and save that as .safetensors"
            ) from None
        lines = str(err).strip().splitlines()
        raise WeightsError(
            f"cannot read {path} as a PyTorch file ({type(err).__name__}"
            f"{': ' + lines[0] if lines else ''}); the file is damaged or incomplete -- "
            "download or save it again"
        ) from None
    while isinstance(obj, Mapping):
        key = next((k for k in STATE_DICT_CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"cannot read {path}: expected a state dict (name -> tensor), found a "
            f"{type(obj).__name__}; save model.state_dict() rather than the model"
        )
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(
            f"cannot read {path}: expected a state dict (name -> tensor), but entries "
            f"{not_tensors[:8]} are not tensors and none of {list(STATE_DICT_CONTAINERS)} "
            "holds one; save model.state_dict() on its own"
        )
    state = {}
    for name, tensor in obj.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        state[str(name)] = np.asarray(tensor.numpy(), order="C")
    return state


# --------------------------------------------------------------------------------------------
# Wrapper prefixes


# Prefixes that training wrappers put before every key: DistributedDataParallel, EMA/Lightning.
TIMM_PREFIXES = ("module.", "model.")


def strip_prefixes(
    state: Mapping[str, np.ndarray], prefixes: tuple[str, ...] = TIMM_PREFIXES
) -> dict[str, np.ndarray]:
    """Remove wrapper prefixes such as ``module.`` (DDP) or ``model.`` (EMA/Lightning).

    A prefix is stripped only when every key carries it, repeatedly (``module.model.x`` ->
    ``x``), so a model whose own names start with ``model.`` is never mangled.
    """
    state = dict(state)
    while state:
        prefix = next((p for p in prefixes if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
