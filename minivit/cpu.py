"""Fast NumPy paths for the CPU: minivit's own threads, BLAS thread control, chunked kernels.

Why this module exists (measured on the project's 2-core machines; `minivit bench --profile`
shows where a step's time goes):

- OpenBLAS's own threads are a poor fit for a ViT step. They busy-wait for each other, so
  when the machine is shared (another process, or PyTorch's OpenMP threads) a small GEMM on 2
  BLAS threads can take 50x longer than on one (256x256: 16 ms instead of 0.34 ms). minivit
  runs every GEMM on ONE BLAS thread and splits the large ones itself into blocks that a
  small pool of Python threads takes from a shared counter: dx = dy W by row blocks, dW = dyᵀ x
  by blocks of the summed-over rows (partials added at the end in a fixed order, so results do
  not depend on which thread ran what). NumPy releases the GIL inside BLAS, so the blocks run
  in parallel (1.9x on 2 cores for the cifar GEMMs), and a thread that is not scheduled in time
  simply takes no block: nobody spins waiting for it.
- The elementwise and row-wise work (GELU with exact erf, LayerNorm, softmax) costs as much as
  the GEMMs. It runs in cache-sized chunks with `out=` buffers (no 25 MB temporaries), row
  statistics as GEMVs (a keepdims reduction over 64-element rows costs NumPy 3x more), and
  float32 GELU takes Φ from ½·erfc in Numerical Recipes' erfcc form (relative error < 1.2e-7)
  instead of scipy's double-precision erf: y = max(x, 0) − |x|·½erfc(|x|/√2) has no
  cancellation in either tail (GELU relative error < 1.1e-6 for x > −3, < 4.5e-6 down to x = −8;
  the plain float32 x·½(1 + erf(x/√2)) is off by 1e-5 at x = −3 and 5% at x = −5).
- Threads help elementwise NumPy far less than GEMMs: each ufunc call hands the GIL back and
  forth, so chunks must be large (64K elements) and small ops stay on one thread (the
  _MIN_* thresholds below, measured on a quiet 2-core machine).
- With numba installed (``pip install 'minivit[fast]'``), GELU, LayerNorm, softmax (also inside
  attention) and AdamW run as compiled one-pass kernels (minivit.kernels) on the same chunks
  and threads, with the GIL released; without it, the NumPy code here. MINIVIT_JIT=0 (or
  ``compiled_kernels(False)``) keeps the NumPy code with numba installed; `minivit bench`
  prints which ran.

Dispatch: the ops in minivit.functional call ``cpu.handles(*arrays)`` first; it is True only
for NumPy float32/float64 arrays while the fast paths are on. float64 takes the same chunked
kernels with exact erf (scipy's, or libm's in the compiled kernel), so gradient checks see the
exact math. ``fast_paths(False)`` (or MINIVIT_FAST_CPU=0) turns them off, leaving the plain
whole-array NumPy code; the tests compare both.

Threads: ``set_num_threads(n)`` (or MINIVIT_NUM_THREADS); default: the CPUs this process may
run on. BLAS threads: minivit sets NumPy's BLAS to 1 thread the first time a fast path runs,
through threadpoolctl when it is installed (MINIVIT_BLAS_THREADS=N picks another number;
MINIVIT_BLAS_THREADS=0 leaves BLAS alone). Without threadpoolctl minivit leaves BLAS's
threads as they are and does not split GEMMs itself (set OPENBLAS_NUM_THREADS=1 in the
environment to get the split GEMMs anyway).
"""

import contextlib
import ctypes
import itertools
import math
import os
import queue
import sys
import threading
import warnings

import numpy as np

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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


_state = {"fast": _env_flag("MINIVIT_FAST_CPU", "1"), "threads": _default_threads(),
          "blas": None,  # None until first configured, then a dict (see blas_info)
          "malloc": None,  # None until first tried, then whether glibc's thresholds were raised
          "compiled": _env_flag("MINIVIT_JIT", "1"),  # use minivit.kernels when numba is there
          "kernels": None,  # the minivit.kernels module once imported, False if it cannot be
          "kernels_error": None}  # why numba, though installed, could not load them


# -- dispatch -----------------------------------------------------------------------------------
def handles(*arrays):
    """True when the fast CPU kernels should run on `arrays`: every non-None one is a NumPy
    array of one float32/float64 dtype and the fast paths are on."""
    if not _state["fast"]:
        return False
    dtype = None
    for array in arrays:
        if array is None:
            continue
        if type(array) is not np.ndarray or array.dtype not in _FLOAT_DTYPES:
            return False
        if dtype is None:
            dtype = array.dtype
        elif array.dtype != dtype:
            return False
    if _state["blas"] is None:
        _configure_blas()
    if _state["malloc"] is None:
        _keep_large_allocations()
    return True


def fast_paths_enabled():
    return _state["fast"]


@contextlib.contextmanager
def _switched(key, enabled):
    previous = _state[key]
    _state[key] = bool(enabled)
    try:
        yield
    finally:
        _state[key] = previous


def fast_paths(enabled):
    """Within the block (a context manager), use (True) or bypass (False) the fast CPU kernels."""
    return _switched("fast", enabled)


def _kernels():
    """minivit.kernels (the numba kernels) when they are on and numba is installed, else None."""
    if not _state["compiled"]:
        return None
    if _state["kernels"] is None:
        try:
            from minivit import kernels

            if kernels.numba.config.DISABLE_JIT:  # the kernels would run as (broken) Python
                raise RuntimeError("NUMBA_DISABLE_JIT is set")
        except ImportError:  # numba is not installed: the NumPy code below runs instead
            kernels, _state["kernels_error"] = False, None
        except RuntimeError as error:  # no writable cache folder, or the JIT switched off
            hint = "" if "DISABLE_JIT" in str(error) else \
                "; set NUMBA_CACHE_DIR to a writable folder"
            kernels, _state["kernels_error"] = False, f"{error}{hint}"
        _state["kernels"] = kernels
    return _state["kernels"] or None


def compiled_kernels_available():
    """True when the numba kernels are installed and switched on (see minivit.kernels)."""
    return _kernels() is not None


def compiled_kernels_info():
    """A line saying whether the compiled kernels run, and if not, why and how to get them."""
    if not _state["compiled"]:
        return "off (MINIVIT_JIT=0 or compiled_kernels(False))"
    if _kernels() is None:
        if _state["kernels_error"]:
            return f"off: numba could not load them ({_state['kernels_error']})"
        return "off: numba is not installed (pip install 'minivit[fast]')"
    import numba

    return f"numba {numba.__version__}"


def compiled_kernels(enabled):
    """Within the block (a context manager), use (True, when numba is installed) or bypass
    (False) the compiled kernels; the chunked NumPy code runs instead."""
    return _switched("compiled", enabled)


def num_threads():
    """How many threads minivit's CPU kernels use (the calling thread included)."""
    return _state["threads"]


def set_num_threads(n):
    """Use `n` threads (>= 1) for the CPU kernels: GEMM blocks and elementwise chunks."""
    _state["threads"] = max(1, int(n))


# -- BLAS threads ---------------------------------------------------------------------------------
def _configure_blas():
    """Put NumPy's BLAS on MINIVIT_BLAS_THREADS threads (default 1) through threadpoolctl."""
    wanted = _env_int("MINIVIT_BLAS_THREADS", 1)
    info = {"controlled": False, "threads": None, "libraries": []}
    _state["blas"] = info
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
    """What minivit did to BLAS: {"controlled": bool, "threads": n or None, "libraries": [...]}."""
    if _state["blas"] is None:
        _configure_blas()
    return dict(_state["blas"])


def set_blas_threads(n):
    """Set the BLAS libraries' thread count now (needs threadpoolctl); returns blas_info()."""
    os.environ["MINIVIT_BLAS_THREADS"] = str(int(n))
    return _configure_blas()


# -- memory: keep freed activations for reuse -----------------------------------------------------
# glibc hands every allocation above its mmap threshold (at most 32 MiB) straight to the kernel
# and back on free, so a 51 MB activation of the cifar model is fresh memory every step: the
# kernel zeroes it page by page on first touch. A training step allocates ~1.5 GB of such
# arrays. Raising the thresholds keeps freed blocks in the heap for the next step: cifar
# training ran at 153 instead of 119 images/s (medians of 3 alternating rounds in one process;
# PyTorch, which allocates fewer large blocks, ran the same either way). glibc only; the
# process's peak memory is then kept until it exits. MINIVIT_KEEP_MEMORY=0 leaves malloc alone.
_MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap, reused after free
_TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top is given back beyond 2 GiB
# (mallopt takes a C int: 1 << 31 would wrap to a negative number, which glibc reads as "never")


def _keep_large_allocations():
    """Raise glibc's mmap and trim thresholds (see above); returns whether it did."""
    if _state["malloc"] is not None:
        return _state["malloc"]
    _state["malloc"] = False
    if not _env_flag("MINIVIT_KEEP_MEMORY", "1") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    _state["malloc"] = bool(mallopt(m_mmap_threshold, _MMAP_THRESHOLD)
                            and mallopt(m_trim_threshold, _TRIM_THRESHOLD))
    return _state["malloc"]


def memory_info():
    """A line saying whether freed large arrays are kept for reuse (see _keep_large_allocations)."""
    if _state["malloc"] is None:
        return "malloc not tuned yet (the first fast-path op does it)"
    if _state["malloc"]:
        return "glibc keeps freed arrays under 1 GiB for reuse (MINIVIT_KEEP_MEMORY=0: off)"
    return "malloc left as it is"


def _split_gemms():
    """minivit splits GEMMs over its threads only when BLAS itself runs on one thread."""
    blas = _state["blas"] or _configure_blas()
    return _state["threads"] > 1 and (blas["threads"] == 1 or _blas_env_is_one())


def _blas_env_is_one():
    return any(os.environ.get(name, "").strip() == "1"
               for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"))


# -- the thread pool ------------------------------------------------------------------------------
class _Job:
    """Tasks that the caller and the pool's threads take one by one from a shared counter."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.count = len(tasks)
        self.take = itertools.count().__next__  # atomic under the GIL
        self.finish = itertools.count(1).__next__
        self.done = threading.Event()
        self.error = None

    def work(self):
        while True:
            index = self.take()
            if index >= self.count:
                return
            try:
                self.tasks[index]()
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                self.error = error
            if self.finish() == self.count:
                self.done.set()


class _Pool:
    def __init__(self):
        self.queue = queue.SimpleQueue()
        self.workers = 0
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def _worker(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            job.work()

    def run(self, tasks, threads):
        if os.getpid() != self.pid:  # a forked child has none of the parent's threads
            self.__init__()
        with self.lock:
            while self.workers < threads - 1:
                threading.Thread(target=self._worker, name=f"minivit-cpu-{self.workers}",
                                 daemon=True).start()
                self.workers += 1
        job = _Job(tasks)
        for _ in range(min(threads - 1, len(tasks) - 1)):
            self.queue.put(job)
        job.work()
        job.done.wait()
        job.tasks = None  # a helper that takes the job late finds no task: drop the arrays now
        if job.error is not None:
            raise job.error


_pool = _Pool()


def run_tasks(tasks, parallel=True):
    """Run zero-argument callables, spread over minivit's threads (in the calling thread alone
    when `parallel` is false); returns when all are done. Tasks must write disjoint outputs.
    The first exception raised by a task is re-raised."""
    threads = _state["threads"]
    if (not parallel or threads <= 1 or len(tasks) <= 1
            or threading.current_thread().name.startswith("minivit-cpu")):
        for task in tasks:
            task()
        return
    _pool.run(tasks, threads)


def _blocks(total, block):
    """(start, stop) pairs covering range(total) in pieces of `block` (the last may be shorter)."""
    block = max(1, int(block))
    return [(start, min(start + block, total)) for start in range(0, total, block)]


# Per-thread scratch buffers, reused between calls (no 25 MB temporaries).
_local = threading.local()


def _scratch(count, dtype, slot=0):
    """A 1-D scratch array of at least `count` elements for this thread and slot."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (np.dtype(dtype).char, slot)
    buffer = buffers.get(key)
    if buffer is None or buffer.size < count:
        buffer = buffers[key] = np.empty(max(count, 1 << 16), dtype=dtype)
    return buffer[:count]


# -- GEMM -----------------------------------------------------------------------------------------
# Thresholds measured on the 2-core machines: below them the GIL hand-offs and smaller BLAS
# calls cost more than the second core gives (a ViT step on 8x8 digits is faster on one).
_MIN_SPLIT_MACS = 1 << 24  # multiply-adds of one GEMM
_MIN_PARALLEL = 1 << 18  # elements of an elementwise kernel (GELU, products, AdamW)
_MIN_PARALLEL_ROWS = 1 << 17  # elements of a row-wise kernel (LayerNorm, softmax, attention)
_MIN_BLOCK_ROWS = 256  # rows of one GEMM block (smaller ones run below BLAS's best speed)


def matmul(a, b, out=None, bias=None):
    """out = a @ b (+ bias) for 2-D a (m, k) and b (k, n), any strides; row blocks of `a` run
    on minivit's threads when the product is large enough."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.result_type(a, b))
    if not _split_gemms() or m * k * n < _MIN_SPLIT_MACS or m < 2 * _MIN_BLOCK_ROWS:
        np.matmul(a, b, out=out)
        if bias is not None:
            out += bias
        return out
    rows = max(_MIN_BLOCK_ROWS, -(-m // (4 * _state["threads"])))  # ~4 per thread: balance

    def task(start, stop):
        np.matmul(a[start:stop], b, out=out[start:stop])
        if bias is not None:
            out[start:stop] += bias

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in _blocks(m, rows)])
    return out


# -- linear: y = x Wᵀ + b;  dx = dy W,  dW = dyᵀ x,  db = Σ dy ------------------------------------
def linear_forward(x2d, weight, bias):
    return matmul(x2d, weight.T, bias=bias)


def linear_backward(grad2d, x2d, weight, needs):
    """(dx, dW, db) for 2-D grad (rows, out) and x (rows, in); None where not needed.

    Split over minivit's threads: dx by row blocks; dW = dyᵀ x and db = 1ᵀ dy by blocks of the
    summed-over rows, each block into its own partial result, the partials added at the end
    in a fixed order (deterministic whatever thread ran which block). Column sums are GEMVs:
    far cheaper in NumPy than a reduction over a strided axis."""
    rows, out_features = grad2d.shape
    in_features = weight.shape[1]
    dtype = grad2d.dtype
    grad_x = np.empty((rows, in_features), dtype) if needs[0] else None
    ones = np.ones(rows, dtype) if needs[2] else None
    macs = rows * out_features * in_features
    if not _split_gemms() or macs < _MIN_SPLIT_MACS or rows < 2 * _MIN_BLOCK_ROWS:
        if grad_x is not None:
            np.matmul(grad2d, weight, out=grad_x)
        grad_w = np.matmul(grad2d.T, x2d) if needs[1] else None
        grad_b = np.matmul(ones, grad2d) if needs[2] else None
        return grad_x, grad_w, grad_b
    threads = _state["threads"]
    tasks = []
    if grad_x is not None:
        step = max(_MIN_BLOCK_ROWS, -(-rows // (3 * threads)))
        for s, e in _blocks(rows, step):
            tasks.append(lambda s=s, e=e: np.matmul(grad2d[s:e], weight, out=grad_x[s:e]))
    parts = []
    if needs[1] or needs[2]:
        parts = _blocks(rows, max(_MIN_BLOCK_ROWS, -(-rows // (2 * threads))))
        partial_w = np.empty((len(parts), out_features, in_features), dtype) if needs[1] else None
        partial_b = np.empty((len(parts), out_features), dtype) if needs[2] else None

        def weight_task(index, s, e):
            block = grad2d[s:e]
            if partial_w is not None:
                np.matmul(block.T, x2d[s:e], out=partial_w[index])
            if partial_b is not None:
                np.matmul(ones[s:e], block, out=partial_b[index])

        for index, (s, e) in enumerate(parts):
            tasks.append(lambda i=index, s=s, e=e: weight_task(i, s, e))
    run_tasks(tasks)
    grad_w = grad_b = None
    if needs[1]:
        grad_w = partial_w[0]
        for part in partial_w[1:]:
            grad_w += part
    if needs[2]:
        grad_b = partial_b[0]
        for part in partial_b[1:]:
            grad_b += part
    return grad_x, grad_w, grad_b


# -- elementwise helpers ---------------------------------------------------------------------------
_CHUNK = 1 << 16  # elements per chunk of the fused elementwise kernels: a few buffers fit in L2


def _flat_chunks(size):
    return _blocks(size, _CHUNK * 4)


def _contiguous(array):
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def binary(ufunc, a, b, out=None):
    """ufunc(a, b) for two same-shape arrays, in parallel chunks when large (add, multiply)."""
    if (a.shape != b.shape or a.size < _MIN_PARALLEL or _state["threads"] <= 1
            or (out is not None and not out.flags.c_contiguous)):
        return ufunc(a, b, out=out) if out is not None else ufunc(a, b)
    shape = a.shape
    a, b = _contiguous(a).reshape(-1), _contiguous(b).reshape(-1)
    result = np.empty(a.shape, np.result_type(a, b)) if out is None else out.reshape(-1)
    run_tasks([lambda s=s, e=e: ufunc(a[s:e], b[s:e], out=result[s:e])
               for s, e in _blocks(a.size, _CHUNK * 8)])
    return result.reshape(shape)


# -- gelu, exact: y = x Φ(x);  dy/dx = Φ(x) + x φ(x) -----------------------------------------------
# float32: Φ comes from erfc in the form of Numerical Recipes' erfcc (Chebyshev fit, relative
# error < 1.2e-7 for every z >= 0): with a = |x|, z = a/√2 and t = 1/(1 + z/2),
#     e = ½ erfc(z) = t · exp(−z² + P(t) + ln ½),   P(t) = −1.26551223 + t(1.00002368 + ...)
# so that Φ(x) = e for x < 0 and 1 − e for x >= 0, and  y = max(x, 0) − a·e  with no
# cancellation in either tail (relative accuracy of y ~1e-6 even where Φ(x) is 1e-10; the
# straightforward float32 x·½(1 + erf(x/√2)) loses all digits there). float64: exact scipy erf.
_ERFC_P = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
           0.09678418, 0.37409196, 1.00002368)  # highest power of t first
_ERFC_P0 = -1.26551223 + math.log(0.5)  # the constant term, with the ½ folded in
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def half_erfc_float32(a, out, t, u):
    """out = ½ erfc(a/√2) for a float32 chunk a >= 0, with scratch t, u of a's size.
    Leaves t = 1/(1 + a/(2√2)) and u = a²/2 (for callers that want φ)."""
    f = np.float32
    np.multiply(a, f(0.5 * _INV_SQRT_2), out=t)
    t += f(1.0)
    np.divide(f(1.0), t, out=t)
    np.multiply(t, f(_ERFC_P[0]), out=out)
    for c in _ERFC_P[1:]:
        out += f(c)
        out *= t
    out += f(_ERFC_P0)
    np.square(a, out=u)
    u *= f(0.5)  # (exact; squaring a/√2 instead would round twice)
    out -= u
    np.exp(out, out=out)
    out *= t
    return out


_SIGN_BIT = np.uint32(0x80000000)
_LOG_INV_SQRT_2PI = math.log(_INV_SQRT_2PI)


def _gelu_exact_chunk(x, y, d):
    """y = x Φ(x) and, when d is not None, d = Φ(x) + x φ(x), for one chunk."""
    n = x.size
    if x.dtype == np.float64:
        from scipy.special import erf
        cdf = _scratch(n, x.dtype, 1)
        np.multiply(x, _INV_SQRT_2, out=cdf)
        erf(cdf, out=cdf)
        cdf += 1.0
        cdf *= 0.5
        np.multiply(x, cdf, out=y)
        if d is not None:
            pdf = _scratch(n, x.dtype, 2)
            np.multiply(x, x, out=pdf)
            pdf *= -0.5
            np.exp(pdf, out=pdf)
            pdf *= _INV_SQRT_2PI
            pdf *= x
            np.add(cdf, pdf, out=d)
        return
    f = np.float32
    a, e, t, u = (_scratch(n, x.dtype, slot) for slot in (1, 2, 3, 4))
    np.abs(x, out=a)
    np.minimum(a, f(1e30), out=a)  # gelu(±inf) = inf, 0 rather than inf − inf·0 = NaN
    half_erfc_float32(a, e, t, u)                  # e = ½ erfc(|x|/√2), u = x²/2
    if d is not None:
        # x φ(x) + ½ = x exp(−x²/2 + ln(1/√(2π))) + ½
        np.subtract(f(_LOG_INV_SQRT_2PI), u, out=u)
        np.exp(u, out=u)
        u *= x
        u += f(0.5)
        # Φ − ½ = sign(x)(½ − e): copy x's sign bit onto ½ − e >= 0 (integer views: a fraction
        # of np.copysign's cost)
        np.subtract(f(0.5), e, out=t)
        bits = t.view(np.uint32)
        np.bitwise_and(x.view(np.uint32), _SIGN_BIT, out=a.view(np.uint32))
        np.bitwise_or(bits, a.view(np.uint32), out=bits)
        np.add(t, u, out=d)
        np.abs(x, out=a)
        np.minimum(a, f(1e30), out=a)
    np.multiply(a, e, out=a)
    np.maximum(x, f(0.0), out=y)
    y -= a


# -- gelu, tanh:  y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
#                dy/dx = ½(1 + tanh u) + ½x(1 − tanh²u) √(2/π)(1 + 3·0.044715x²)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_COEFF = 0.044715


def _gelu_tanh_chunk(x, y, d):
    n = x.size
    f = x.dtype.type
    s, th = _scratch(n, x.dtype, 1), _scratch(n, x.dtype, 2)
    np.multiply(x, x, out=s)                       # s = x²
    np.multiply(s, f(_TANH_COEFF), out=th)
    th += f(1.0)
    th *= x
    th *= f(_SQRT_2_OVER_PI)
    np.tanh(th, out=th)                            # th = tanh u
    if d is not None:
        g = _scratch(n, x.dtype, 3)
        np.multiply(th, th, out=g)
        np.subtract(f(1.0), g, out=g)              # 1 − tanh²u
        g *= x
        s *= f(3.0 * _TANH_COEFF)
        s += f(1.0)
        s *= f(0.5 * _SQRT_2_OVER_PI)
        g *= s
        np.add(th, f(1.0), out=d)
        d *= f(0.5)
        d += g
    th += f(1.0)
    np.multiply(x, th, out=y)
    y *= f(0.5)


def gelu_forward(x, approximate="none", need_grad=True):
    """(y, dy/dx) of GELU for a NumPy array (dy/dx None unless need_grad): chunked, with
    scratch buffers, on minivit's threads."""
    compiled = _kernels()
    if compiled is not None:  # one pass per chunk; no scratch
        kernel = compiled.gelu_tanh if approximate == "tanh" else compiled.gelu_exact
    else:
        kernel = _gelu_tanh_chunk if approximate == "tanh" else _gelu_exact_chunk
    flat = _contiguous(x).reshape(-1)
    y = np.empty_like(flat)
    d = np.empty_like(flat) if need_grad else None

    chunk = _CHUNK if compiled is None else max(flat.size, 1)  # ufunc chains: L2-sized chunks

    def task(s, e):
        for cs in range(s, e, chunk):
            ce = min(cs + chunk, e)
            kernel(flat[cs:ce], y[cs:ce], None if d is None else d[cs:ce])

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in _flat_chunks(flat.size)],
              parallel=flat.size >= _MIN_PARALLEL)
    return y.reshape(x.shape), (None if d is None else d.reshape(x.shape))


def gelu_backward(grad, derivative):
    """dx = dy ⊙ gelu'(x), in parallel chunks, written over `derivative` (the caller's own
    saved array, dropped after backward: no new 25 MB buffer to fault in)."""
    if grad.shape != derivative.shape:
        return np.multiply(grad, derivative)
    return binary(np.multiply, grad, derivative, out=derivative)


# -- layer_norm: x̂ = (x − μ)·r, r = 1/√(σ² + ε);  y = x̂ w + b
#    dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂)),  dx̂ = dy w;  dw = Σ dy ⊙ x̂;  db = Σ dy
def _row_blocks(rows, features, target=1 << 16):
    """Row blocks of ~`target` elements (a few such buffers stay in L2)."""
    return _blocks(rows, max(8, target // max(features, 1)))


def _row_mean_vector(features, dtype):
    """A (features,) vector of 1/features: x @ it is the row mean as one GEMV (much cheaper
    in NumPy than a keepdims reduction over short rows)."""
    return np.full(features, 1.0 / features, dtype=dtype)


def layer_norm_forward(x, weight, bias, eps):
    """(y, x̂, r) over the last dimension, row blocks on minivit's threads."""
    features = x.shape[-1]
    x2 = _contiguous(x).reshape(-1, features)
    rows = x2.shape[0]
    f = x2.dtype.type
    out = np.empty_like(x2)
    normalized = np.empty_like(x2)
    rstd = np.empty((rows, 1), x2.dtype)
    mean_of = _row_mean_vector(features, x2.dtype)
    compiled = _kernels()

    def task(s, e):
        if compiled is not None:
            compiled.layer_norm_forward(x2[s:e], weight, bias, eps, out[s:e], normalized[s:e],
                                        rstd[s:e, 0])
            return
        xs, ns, rs, sq = x2[s:e], normalized[s:e], rstd[s:e], out[s:e]  # out: scratch first
        mean = np.matmul(xs, mean_of)
        np.subtract(xs, mean[:, None], out=ns)
        np.square(ns, out=sq)
        np.matmul(sq, mean_of, out=rs[:, 0])                  # σ²
        rs += f(eps)
        np.sqrt(rs, out=rs)
        np.divide(f(1.0), rs, out=rs)
        ns *= rs
        if weight is not None:
            np.multiply(ns, weight, out=sq)
        else:
            sq[...] = ns
        if bias is not None:
            sq += bias

    _run_rows(task, rows, features)
    shape = x.shape
    return out.reshape(shape), normalized.reshape(shape), rstd.reshape(shape[:-1] + (1,))


def layer_norm_backward(grad, normalized, rstd, weight, needs):
    features = grad.shape[-1]
    g2 = _contiguous(grad).reshape(-1, features)
    n2 = normalized.reshape(-1, features)
    r2 = rstd.reshape(-1, 1)
    rows = g2.shape[0]
    mean_of = _row_mean_vector(features, g2.dtype)
    grad_x = np.empty_like(g2) if needs[0] else None
    blocks = _row_blocks(rows, features)
    ones = np.ones(max((e - s for s, e in blocks), default=0), g2.dtype)
    compiled = _kernels()
    partial_dtype = np.float64 if compiled is not None else g2.dtype  # the kernel adds into it
    partial_w = np.zeros((len(blocks), features), partial_dtype) if needs[1] else None
    partial_b = np.zeros((len(blocks), features), partial_dtype) if needs[2] else None

    def task(index, s, e):
        if compiled is not None:
            compiled.layer_norm_backward(
                g2[s:e], n2[s:e], r2[s:e, 0], weight, None if grad_x is None else grad_x[s:e],
                None if partial_w is None else partial_w[index],
                None if partial_b is None else partial_b[index])
            return
        gs, ns, count = g2[s:e], n2[s:e], e - s
        if partial_b is not None:
            np.matmul(ones[:count], gs, out=partial_b[index])      # Σ dy (column sums, GEMV)
        tmp = _scratch(gs.size, gs.dtype, 5).reshape(gs.shape)
        if partial_w is not None:
            np.multiply(gs, ns, out=tmp)
            np.matmul(ones[:count], tmp, out=partial_w[index])     # Σ dy ⊙ x̂
        if grad_x is None:
            return
        dx = grad_x[s:e]
        if weight is not None:
            np.multiply(gs, weight, out=dx)                         # dx̂
        else:
            dx[...] = gs
        mean_grad = np.matmul(dx, mean_of)
        np.multiply(dx, ns, out=tmp)
        mean_dot = np.matmul(tmp, mean_of)
        np.multiply(ns, mean_dot[:, None], out=tmp)
        dx -= mean_grad[:, None]
        dx -= tmp
        dx *= r2[s:e]

    run_tasks([lambda i=i, s=s, e=e: task(i, s, e) for i, (s, e) in enumerate(blocks)],
              parallel=g2.size >= _MIN_PARALLEL_ROWS)
    grad_w = partial_w.sum(axis=0).astype(g2.dtype, copy=False) if needs[1] else None
    grad_b = partial_b.sum(axis=0).astype(g2.dtype, copy=False) if needs[2] else None
    return (None if grad_x is None else grad_x.reshape(grad.shape)), grad_w, grad_b


def _run_rows(task, rows, features):
    run_tasks([lambda s=s, e=e: task(s, e) for s, e in _row_blocks(rows, features)],
              parallel=rows * features >= _MIN_PARALLEL_ROWS)


# -- softmax over the last axis: p = eˣ / Σ eˣ;  dx = p ⊙ (dp − Σ dp ⊙ p) --------------------------
def _softmax_rows(x, p, scale=None):
    """p = softmax(scale · x) along the last axis (scale > 0; x, p C-contiguous). The compiled
    kernel needs p and x to be distinct arrays: on overlapping ones LLVM's run-time check picks
    its scalar loop (2.7x slower); the NumPy code also runs in place (p is x)."""
    compiled = _kernels()
    if compiled is not None:
        compiled.softmax_forward(x.reshape(-1, x.shape[-1]), p.reshape(-1, p.shape[-1]),
                                 p.dtype.type(1.0 if scale is None else scale))
        return
    if p is not x:
        p[...] = x
    p -= p.max(axis=-1, keepdims=True)
    if scale is not None:
        p *= p.dtype.type(scale)
    np.exp(p, out=p)
    total = _row_sums(p)
    np.divide(p.dtype.type(1.0), total, out=total)
    p *= total


def _row_sums(a):
    """Σ over the last axis, keepdims, as one GEMV with a ones vector (a keepdims reduction
    over short rows costs NumPy several times more)."""
    if a.flags.c_contiguous:
        flat = a.reshape(-1, a.shape[-1])
        return np.matmul(flat, np.ones(a.shape[-1], a.dtype)).reshape(a.shape[:-1] + (1,))
    return np.add.reduce(a, axis=-1, keepdims=True)


def softmax_forward(x):
    features = x.shape[-1]
    x2 = _contiguous(x).reshape(-1, features)
    out = np.empty_like(x2)

    def task(s, e):
        _softmax_rows(x2[s:e], out[s:e])

    _run_rows(task, out.shape[0], features)
    return out.reshape(x.shape)


def softmax_backward(probs, grad):
    features = probs.shape[-1]
    p2 = _contiguous(probs).reshape(-1, features)
    g2 = _contiguous(grad).reshape(-1, features)
    out = np.empty_like(g2)
    compiled = _kernels()

    def task(s, e):
        if compiled is not None:
            compiled.softmax_backward(p2[s:e], g2[s:e], out[s:e], p2.dtype.type(1.0))
            return
        ps, dx = p2[s:e], out[s:e]
        np.multiply(g2[s:e], ps, out=dx)
        dot = _row_sums(dx)
        np.subtract(g2[s:e], dot, out=dx)
        dx *= ps

    _run_rows(task, p2.shape[0], features)
    return out.reshape(probs.shape)


# -- attention: S = q kᵀ·s + B, P = softmax(S), O = P v   (B: an optional additive bias)
#    dv = Pᵀ dO;  dP = dO vᵀ;  dS = P ⊙ (dP − Σ dP ⊙ P);  dq = dS k·s;  dk = dSᵀ q·s;  dB from dS
def _batch_blocks(batch, per_item):
    per = max(1, (1 << 17) // max(per_item, 1))  # ~128K elements of scores per block
    per = min(per, max(1, -(-batch // (2 * _state["threads"]))))
    return _blocks(batch, per)


def attention_forward(q, k, v, scale, out, bias=None):
    """P = softmax(q kᵀ·scale + bias) and out[...] = P v for (B, H, N, d) arrays of any
    strides (out may be a strided view; bias broadcasts to (B, H, N, M)). Returns P."""
    batch, heads, tokens, _ = q.shape
    probs = np.empty((batch, heads, tokens, k.shape[2]), q.dtype)
    in_place = _kernels() is None  # the compiled softmax wants its scores in another buffer
    if bias is not None:
        bias = np.broadcast_to(bias, probs.shape)

    def task(s, e):
        p = probs[s:e]
        scores = p if in_place else _scratch(p.size, p.dtype, 6).reshape(p.shape)
        np.matmul(q[s:e], k[s:e].swapaxes(-1, -2), out=scores)
        if bias is None:
            _softmax_rows(scores, p, scale)
        else:  # the scale goes in before the bias
            scores *= p.dtype.type(scale)
            scores += bias[s:e]
            _softmax_rows(scores, p)
        np.matmul(p, v[s:e], out=out[s:e])

    run_tasks([lambda s=s, e=e: task(s, e)
               for s, e in _batch_blocks(batch, heads * tokens * k.shape[2])],
              parallel=probs.size >= _MIN_PARALLEL_ROWS)
    return probs


def attention_backward(grad, q, k, v, probs, scale, grad_q, grad_k, grad_v, grad_scores=None):
    """Write dq, dk, dv (views of any strides, or None) for upstream grad dO (B, H, N, d), and
    dS into grad_scores (B, H, N, M) when given (a biased attention's dB, before summing)."""
    batch, heads, tokens, keys = probs.shape
    f = probs.dtype.type
    compiled = _kernels()
    # dS·s straight from the kernel, unless dS itself is wanted (then scaled afterwards)
    kernel_scale = 1.0 if grad_scores is not None else scale

    def task(s, e):
        p, g = probs[s:e], grad[s:e]
        if grad_v is not None:
            np.matmul(p.swapaxes(-1, -2), g, out=grad_v[s:e])
        if grad_q is None and grad_k is None and grad_scores is None:
            return
        ds = _scratch(p.size, p.dtype, 6).reshape(p.shape)
        tmp = _scratch(p.size, p.dtype, 7).reshape(p.shape)
        if compiled is not None:                                 # dS·s from dP in tmp
            np.matmul(g, v[s:e].swapaxes(-1, -2), out=tmp)
            compiled.softmax_backward(p.reshape(-1, keys), tmp.reshape(-1, keys),
                                      ds.reshape(-1, keys), f(kernel_scale))
        else:
            np.matmul(g, v[s:e].swapaxes(-1, -2), out=ds)       # dP
            np.multiply(ds, p, out=tmp)
            dot = _row_sums(tmp)
            ds -= dot
            ds *= p
            if grad_scores is None:
                ds *= f(scale)                                   # dS·s
        if grad_scores is not None:
            grad_scores[s:e] = ds
            ds *= f(scale)
        if grad_q is not None:
            np.matmul(ds, k[s:e], out=grad_q[s:e])
        if grad_k is not None:
            np.matmul(ds.swapaxes(-1, -2), q[s:e], out=grad_k[s:e])

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in _batch_blocks(batch, heads * tokens * keys)],
              parallel=probs.size >= _MIN_PARALLEL_ROWS)


# -- AdamW over the flat buffers, in cache-sized chunks (see optim.AdamW for the math) -----------
def adamw_update(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step):
    f = params.dtype.type
    step_size = f(lr / (1.0 - beta1 ** step))
    inv_bias2 = f(1.0 / math.sqrt(1.0 - beta2 ** step))
    decay = f(lr * weight_decay)

    compiled = _kernels()

    def task(s, e):
        if compiled is not None:  # scalars of the parameters' type: float32 math stays float32
            compiled.adamw_update(params[s:e], grads[s:e], m[s:e], v[s:e], decay_mask[s:e],
                                  f(beta1), f(1.0 - beta1), f(beta2), f(1.0 - beta2), f(eps),
                                  decay, step_size, inv_bias2)
            return
        g, ms, vs, ps = grads[s:e], m[s:e], v[s:e], params[s:e]
        tmp = _scratch(e - s, params.dtype, 8)
        ms *= f(beta1)
        np.multiply(g, f(1.0 - beta1), out=tmp)
        ms += tmp
        vs *= f(beta2)
        np.multiply(g, g, out=tmp)
        tmp *= f(1.0 - beta2)
        vs += tmp
        if weight_decay:
            np.multiply(ps, decay_mask[s:e], out=tmp)
            tmp *= decay
            ps -= tmp
        np.sqrt(vs, out=tmp)
        tmp *= inv_bias2
        tmp += f(eps)
        np.divide(ms, tmp, out=tmp)
        tmp *= step_size
        ps -= tmp

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in _blocks(params.size, _CHUNK)],
              parallel=params.size >= _MIN_PARALLEL)
