"""The CPU runtime: the fast-path switches, minivit's thread count, BLAS threads and malloc.

Switches (read here, asked by minivit.functional.registry when it picks an implementation):
MINIVIT_FAST_CPU=0 (or ``fast_paths(False)``) leaves the plain whole-array NumPy code;
MINIVIT_JIT=0 (or ``compiled_kernels(False)``) keeps the chunked NumPy kernels although numba
is installed. ``handles(*arrays)`` only answers; it changes nothing.

Process set-up is explicit: ``configure()`` (called by the command line and by minivit.train)
puts NumPy's BLAS on MINIVIT_BLAS_THREADS threads (default 1) through threadpoolctl and raises
glibc's malloc thresholds (MINIVIT_KEEP_MEMORY=0 leaves malloc alone). Why both:

- OpenBLAS's own threads busy-wait for each other, so on a shared machine a small GEMM on 2
  BLAS threads can take 50x longer than on one (256x256: 16 ms instead of 0.34 ms). minivit
  runs every GEMM on ONE BLAS thread and splits the large ones itself (minivit.cpu.gemm) over
  its own threads (minivit.cpu.pool). Without threadpoolctl (or before configure()) BLAS keeps
  its threads and minivit does not split GEMMs, unless OPENBLAS_NUM_THREADS=1 (or OMP_/MKL_)
  is set in the environment.
- glibc hands every allocation above its mmap threshold (at most 32 MiB) straight to the
  kernel and back on free, so a 51 MB activation of the cifar model is fresh memory every
  step, zeroed page by page on first touch; a training step allocates ~1.5 GB of such arrays.
  Raising the thresholds keeps freed blocks in the heap for the next step: cifar training ran
  at 153 instead of 119 images/s (medians of 3 alternating rounds in one process). glibc only;
  the process's peak memory is then kept until it exits.

Threads: ``set_num_threads(n)`` (or MINIVIT_NUM_THREADS); default: the CPUs this process may
run on.
"""

import contextlib
import ctypes
import os
import sys
import warnings

import numpy as np

from minivit import backend

def _env_flag(name, default):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off")


def _env_int(name, default):
    """The integer in environment variable `name`, or `default` (with a warning saying so)
    when it is set to something else."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        warnings.warn(f"{name}={value!r} is not a whole number; using {default}", stacklevel=3)
        return default


def _default_threads():
    """MINIVIT_NUM_THREADS, else the CPUs this process may run on."""
    try:
        usable = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        usable = max(1, os.cpu_count() or 1)
    return max(1, _env_int("MINIVIT_NUM_THREADS", usable))


state = {"fast": _env_flag("MINIVIT_FAST_CPU", "1"), "threads": _default_threads(),
         "blas": None,  # None until configure(), then a dict (see blas_info)
         "malloc": None,  # None until configure(), then whether glibc's thresholds were raised
         "compiled": _env_flag("MINIVIT_JIT", "1"),  # use minivit.cpu.compiled when numba is there
         "kernels": None,  # the minivit.cpu.compiled module once imported, False if it cannot be
         "kernels_error": None}  # why numba, though installed, could not load them


# -- the question the registry asks ----------------------------------------------------------------
def handles(*arrays):
    """True when the fast CPU kernels should run on `arrays`: the fast paths are on and every
    non-None one (at least one) is a NumPy array of one float32/float64 dtype. A pure question."""
    return state["fast"] and backend.one_float_dtype(arrays, _is_numpy_array)


def _is_numpy_array(array):
    return type(array) is np.ndarray


def fast_paths_enabled():
    return state["fast"]


@contextlib.contextmanager
def _switched(key, enabled):
    previous = state[key]
    state[key] = bool(enabled)
    try:
        yield
    finally:
        state[key] = previous


def fast_paths(enabled):
    """Within the block (a context manager), use (True) or bypass (False) the fast CPU kernels."""
    return _switched("fast", enabled)


# -- the compiled (numba) kernels ------------------------------------------------------------------
def compiled():
    """minivit.cpu.compiled (the numba kernels) when they are on and numba is installed, else
    None: the chunked NumPy code runs instead."""
    if not state["compiled"]:
        return None
    if state["kernels"] is None:
        try:
            from minivit.cpu import compiled as kernels

            if kernels.numba.config.DISABLE_JIT:  # the kernels would run as (broken) Python
                raise RuntimeError("NUMBA_DISABLE_JIT is set")
        except ImportError:  # numba is not installed: the NumPy code runs instead
            kernels, state["kernels_error"] = False, None
        except RuntimeError as error:  # no writable cache folder, or the JIT switched off
            hint = "" if "DISABLE_JIT" in str(error) else \
                "; set NUMBA_CACHE_DIR to a writable folder"
            kernels, state["kernels_error"] = False, f"{error}{hint}"
        state["kernels"] = kernels
    return state["kernels"] or None


def compiled_kernels_available():
    """True when the numba kernels are installed and switched on (see minivit.cpu.compiled)."""
    return compiled() is not None


def compiled_kernels_info():
    """A line saying whether the compiled kernels run, and if not, why and how to get them."""
    if not state["compiled"]:
        return "off (MINIVIT_JIT=0 or compiled_kernels(False))"
    if compiled() is None:
        if state["kernels_error"]:
            return f"off: numba could not load them ({state['kernels_error']})"
        return "off: numba is not installed (pip install 'minivit[fast]')"
    return f"numba {state['kernels'].numba.__version__}"


def compiled_kernels(enabled):
    """Within the block (a context manager), use (True, when numba is installed) or bypass
    (False) the compiled kernels; the chunked NumPy code runs instead."""
    return _switched("compiled", enabled)


def num_threads():
    """How many threads minivit's CPU kernels use (the calling thread included)."""
    return state["threads"]


def set_num_threads(n):
    """Use `n` threads (>= 1) for the CPU kernels: GEMM blocks and elementwise chunks."""
    state["threads"] = max(1, int(n))


# -- process set-up: BLAS threads and malloc -------------------------------------------------------
def configure():
    """Set the process up for minivit's CPU kernels (see the module docstring): BLAS threads
    and glibc's malloc thresholds. Done once; later calls only report; nothing with the fast
    paths off (MINIVIT_FAST_CPU=0 runs NumPy as it comes). Returns
    {"blas": blas_info(), "memory": memory_info()}."""
    if not state["fast"]:
        return {"blas": blas_info(), "memory": memory_info()}
    if state["blas"] is None:
        _configure_blas()
    if state["malloc"] is None:
        _keep_large_allocations()
    return {"blas": blas_info(), "memory": memory_info()}


def _configure_blas():
    """Put NumPy's BLAS on MINIVIT_BLAS_THREADS threads (default 1) through threadpoolctl."""
    wanted = _env_int("MINIVIT_BLAS_THREADS", 1)
    info = {"controlled": False, "threads": None, "libraries": []}
    state["blas"] = info
    if wanted <= 0:
        return info
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return info
    try:
        controller = ThreadpoolController()
        blas = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
        for lib in blas:
            lib.set_num_threads(wanted)
        info.update(controlled=bool(blas), threads=wanted,
                    libraries=[f"{lib.internal_api} {lib.version} ({lib.prefix})" for lib in blas])
    except Exception:  # noqa: BLE001 - an unexpected BLAS: leave it as it is
        pass
    return info


def blas_info():
    """What minivit did to BLAS: {"controlled": bool, "threads": n or None, "libraries": [...]}
    (nothing before configure())."""
    return dict(state["blas"] or {"controlled": False, "threads": None, "libraries": []})


def set_blas_threads(n):
    """Set the BLAS libraries' thread count now (needs threadpoolctl); returns blas_info()."""
    os.environ["MINIVIT_BLAS_THREADS"] = str(int(n))
    return _configure_blas()


_MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap, reused after free
_TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top is given back beyond 2 GiB
# (mallopt takes a C int: 1 << 31 would wrap to a negative number, which glibc reads as "never")


def _keep_large_allocations():
    """Raise glibc's mmap and trim thresholds (see the module docstring); returns whether it did."""
    if state["malloc"] is not None:
        return state["malloc"]
    state["malloc"] = False
    if not _env_flag("MINIVIT_KEEP_MEMORY", "1") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    state["malloc"] = bool(mallopt(m_mmap_threshold, _MMAP_THRESHOLD)
                           and mallopt(m_trim_threshold, _TRIM_THRESHOLD))
    return state["malloc"]


def memory_info():
    """A line saying whether freed large arrays are kept for reuse (see configure)."""
    if state["malloc"] is None:
        return "malloc not tuned (minivit.cpu.configure() was not called)"
    if state["malloc"]:
        return "glibc keeps freed arrays under 1 GiB for reuse (MINIVIT_KEEP_MEMORY=0: off)"
    return "malloc left as it is"


def split_gemms():
    """minivit splits GEMMs over its threads only when BLAS itself runs on one thread."""
    blas = state["blas"] or {}
    return state["threads"] > 1 and (blas.get("threads") == 1 or blas_env_is_one())


def blas_env_is_one():
    return any(os.environ.get(name, "").strip() == "1"
               for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"))
