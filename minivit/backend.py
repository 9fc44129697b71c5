"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

Everything above this module asks it for the array module (``xp``) instead of importing
numpy or cupy itself, so switching is one call: ``minivit.set_backend("cupy")``, the
environment variable ``MINIVIT_BACKEND=cupy`` or ``--backend cupy`` on the command line.
CuPy is imported only when asked for.
"""

import os

import numpy as np

from minivit.errors import BackendError

BACKENDS = ("numpy", "cupy")
_GPU_INSTALL_HINT = (
    "install CuPy for your CUDA version (pip install 'minivit[gpu]' for CUDA 12) "
    "on a machine with an NVIDIA GPU, or use --backend numpy"
)

_current = {"name": "numpy", "xp": np, "error": None}  # error: a bad MINIVIT_BACKEND, raised on use
_random_generators = {}
_checked_modules = {}  # "cupy" -> the module, once it imported and showed a GPU


def _import_cupy():
    """Import CuPy and check that a GPU is visible (once); a clear BackendError otherwise."""
    if "cupy" in _checked_modules:
        return _checked_modules["cupy"]
    try:
        import cupy
    except ImportError as error:
        raise BackendError(f"the cupy backend needs CuPy, which is not installed ({error}): "
                           f"{_GPU_INSTALL_HINT}") from None
    try:
        device_count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA driver missing or broken
        raise BackendError(f"CuPy is installed but no CUDA device could be opened ({error}): "
                           f"{_GPU_INSTALL_HINT}") from None
    if device_count == 0:
        raise BackendError(f"CuPy is installed but no GPU is visible: {_GPU_INSTALL_HINT}")
    _checked_modules["cupy"] = cupy
    return cupy


def cupy_available():
    """True when CuPy imports and sees at least one GPU."""
    try:
        _import_cupy()
    except BackendError:
        return False
    return True


# The names a user may give set_backend and .to(): PyTorch's device names as well as the array
# modules'.
BACKEND_NAMES = {"numpy": "numpy", "cpu": "numpy", "cupy": "cupy", "cuda": "cupy", "gpu": "cupy"}


def backend_name(name):
    """"numpy" or "cupy" for a name in BACKEND_NAMES (any case); BackendError naming the
    choices for anything else."""
    key = name.lower() if isinstance(name, str) else None
    if key not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}: expected numpy or cpu (the CPU), or "
                           f"cupy, cuda or gpu (an NVIDIA GPU)")
    return BACKEND_NAMES[key]


def set_backend(name):
    """Select "numpy" or "cupy" (or a BACKEND_NAMES alias) for new tensors, parameters and
    data."""
    name = backend_name(name)
    _current["xp"] = np if name == "numpy" else _import_cupy()
    _current["name"] = name
    _current["error"] = None


def get_backend():
    """The current backend's name: "numpy" or "cupy"."""
    if _current["error"] is not None:
        raise _current["error"]
    return _current["name"]


def xp():
    """The current backend's array module (numpy or cupy)."""
    if _current["error"] is not None:
        raise _current["error"]
    return _current["xp"]


_backend_of_type = {}  # type -> "numpy" or "cupy" (the engine asks several times per op)


def backend_of(array):
    """"numpy" or "cupy" for an array (anything that is not a CuPy array counts as NumPy)."""
    kind = type(array)
    name = _backend_of_type.get(kind)
    if name is None:
        name = _backend_of_type[kind] = "cupy" if kind.__module__.startswith("cupy") else "numpy"
    return name


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def one_float_dtype(arrays, belongs):
    """True when at least one of `arrays` is not None and every non-None one `belongs(array)`
    and has one float32/float64 dtype: the question each device's fast kernels ask."""
    dtype = None
    for array in arrays:
        if array is None:
            continue
        if not belongs(array) or array.dtype not in _FLOAT_DTYPES:
            return False
        if dtype is None:
            dtype = array.dtype
        elif array.dtype != dtype:
            return False
    return dtype is not None


def array_module(*arrays):
    """The array module all `arrays` belong to; BackendError naming both when they are mixed."""
    names = {backend_of(a) for a in arrays if a is not None}
    if len(names) > 1:
        raise BackendError("arrays from two backends met in one op: numpy and cupy. "
                           "Move every tensor to one backend first (model.to(backend=...), "
                           "Tensor.to(...)).")
    return _import_cupy() if names == {"cupy"} else np


def to_backend(array, name=None):
    """Copy (or pass through) `array` onto backend `name` (a BACKEND_NAMES name; default: the
    current backend)."""
    name = get_backend() if name is None else backend_name(name)
    if backend_of(array) == name:
        return array
    if name == "numpy":
        return array.get()
    return _import_cupy().asarray(array)


def to_numpy(array):
    """A host NumPy array for any backend array."""
    return array.get() if backend_of(array) == "cupy" else np.asarray(array)


def erf(x):
    """Error function on either backend (scipy.special on NumPy, cupyx.scipy.special on CuPy)."""
    if backend_of(x) == "cupy":
        from cupyx.scipy.special import erf as cupy_erf
        return cupy_erf(x)
    from scipy.special import erf as scipy_erf
    return scipy_erf(x)


def matmul_operand(array):
    """`array`, or on CuPy a C-contiguous copy of one with a negative stride: CuPy's batched
    matmul computes each matrix's address with an unsigned step and raises OverflowError on a
    reversed view."""
    if backend_of(array) == "cupy" and any(step < 0 for step in array.strides):
        return array_module(array).ascontiguousarray(array)
    return array


def scatter_add(target, index, values):
    """target[index] += values, accumulating repeated indices (np.add.at / cupyx.scatter_add)."""
    if backend_of(target) == "cupy":
        import cupyx
        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


def manual_seed(seed):
    """Seed the random generators minivit uses (initialisation, dropout) on every backend."""
    _random_generators.clear()
    _random_generators["seed"] = seed


def random_generator(name=None):
    """The random generator of backend `name` (default: the current one), created from the
    last manual_seed()."""
    name = name or get_backend()
    if name not in _random_generators:
        seed = _random_generators.get("seed")
        module = np if name == "numpy" else _import_cupy()
        _random_generators[name] = module.random.default_rng(seed)
    return _random_generators[name]


def _select_from_environment():
    """MINIVIT_BACKEND's choice. A bad one (unknown, or cupy without CuPy or a GPU) is raised
    where a backend is first needed, not at import: `import minivit` and the command line's
    error handling still work, and set_backend() or --backend can override it."""
    name = os.environ.get("MINIVIT_BACKEND")
    if name:
        try:
            set_backend(name.strip().lower())
        except BackendError as error:
            _current["error"] = BackendError(f"MINIVIT_BACKEND={name}: {error}")


_select_from_environment()
