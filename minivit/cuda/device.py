"""What every CUDA family module shares: the dispatch question, the switch, the device math
overloads and row reductions every row kernel includes, and the kernels' sources and compile
cache.

Dispatch: the registry (minivit.functional.registry) asks ``handles(*arrays)``. It is True only
for CuPy arrays of one float32/float64 dtype while fused kernels are on, so NumPy arrays never
reach the kernels, and CuPy is imported only when a CuPy array has already been seen.
``fused_kernels(False)`` (or MINIVIT_FUSED_KERNELS=0) turns the kernels off, leaving the plain
CuPy path; the tests compare the two.

Sources: a family module declares its kernels here, ``row_kernels(source, *names)`` for
RawKernels (C++ with the element type T; one thread block per row of a C-contiguous array,
compiled once per T) and ``elementwise_kernel(name, in_params, out_params, operation)`` for
cupy.ElementwiseKernels (one object for both dtypes). ROW_SOURCES and ELEMENTWISE then hold
every kernel minivit has (tests/test_cuda_without_gpu.py compiles them all with nvcc). Kernels
are built on first use and cached per (kernel, dtype); CuPy also caches the compiled binaries
on disk (~/.cupy/kernel_cache), so only the first run on a machine pays for NVRTC.
"""

import contextlib
import os
import sys

from minivit import backend

_state = {"fused": os.environ.get("MINIVIT_FUSED_KERNELS", "1").strip() not in ("0", "false", "no")}
kernels = {}  # (name, dtype name or None) -> compiled-on-first-call CuPy kernel object
ROW_SOURCES = {}  # RawKernel name -> its source (T left to a typedef)
ELEMENTWISE = {}  # ElementwiseKernel name -> (in_params, out_params, operation)
KERNEL_MODULES = {}  # kernel name -> the minivit.cuda module that declared it
C_TYPES = {"float32": "float", "float64": "double"}


def cupy():
    """The cupy module (only reached with CuPy arrays in hand: CuPy is installed and imported)."""
    import cupy
    return cupy


# -- dispatch ---------------------------------------------------------------------------------
def handles(*arrays):
    """True when the fused kernels should run on `arrays`: all (non-None) are CuPy arrays of
    one float32/float64 dtype and fused kernels are on. False for any NumPy array."""
    return _state["fused"] and backend.one_float_dtype(arrays, _is_cupy_array)


def _is_cupy_array(array):
    return backend.backend_of(array) == "cupy"


def fused_kernels_enabled():
    return _state["fused"]


@contextlib.contextmanager
def fused_kernels(enabled):
    """Within this block the fused kernels are on (True) or off (False: plain CuPy ops)."""
    previous = _state["fused"]
    _state["fused"] = bool(enabled)
    try:
        yield
    finally:
        _state["fused"] = previous


# -- shared device code -----------------------------------------------------------------------
# Overloads instead of relying on CUDA's C++ math overloads: float calls the f-suffixed
# single-precision functions (erff, expf, ...), double the double ones.
MATH = r"""
__device__ __forceinline__ float mv_erf(float x) { return erff(x); }
__device__ __forceinline__ double mv_erf(double x) { return erf(x); }
__device__ __forceinline__ float mv_exp(float x) { return expf(x); }
__device__ __forceinline__ double mv_exp(double x) { return exp(x); }
__device__ __forceinline__ float mv_log(float x) { return logf(x); }
__device__ __forceinline__ double mv_log(double x) { return log(x); }
__device__ __forceinline__ float mv_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double mv_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float mv_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double mv_tanh(double x) { return tanh(x); }
"""

# Row kernels: one thread block per row of a C-contiguous (rows, cols) array; blockDim.x is a
# power of two >= 32 (whole warps). T is the element type; each file is compiled once per T.
ROW_COMMON = MATH + r"""
// Sum / max over a warp, then over the block, returned to every thread. Max keeps v unless the
// other value is larger (a NaN arriving from another lane is passed over). `fill`: what the
// lanes past the block's last warp contribute (0 to a sum; to a max, any of the block's values).
// `shared` holds 32 values; the leading __syncthreads lets the block call these back to back.
struct Sum {
    __device__ static T apply(T v, T other) { return v + other; }
    __device__ static T fill(const T* shared) { return (T)0; }
};
struct Max {
    __device__ static T apply(T v, T other) { return other > v ? other : v; }
    __device__ static T fill(const T* shared) { return shared[0]; }
};
template <class Op> __device__ __forceinline__ T warp_reduce(T v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = Op::apply(v, __shfl_down_sync(0xffffffffu, v, offset));
    return v;
}
template <class Op> __device__ T block_reduce(T v, T* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_reduce<Op>(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_reduce<Op>(lane < warps ? shared[lane] : Op::fill(shared));
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}
__device__ T block_sum(T v, T* shared) { return block_reduce<Sum>(v, shared); }
__device__ T block_max(T v, T* shared) { return block_reduce<Max>(v, shared); }
"""



def row_kernels(source, *names):
    """Declare the RawKernels `names`, all defined in `source` (which includes ROW_COMMON or
    stands alone); returns `source`."""
    for name in names:
        ROW_SOURCES[name] = source
        KERNEL_MODULES[name] = sys._getframe(1).f_globals["__name__"]
    return source


def elementwise_kernel(name, in_params, out_params, operation):
    """Declare the cupy.ElementwiseKernel `name` (T is its type placeholder; MATH is its
    preamble)."""
    ELEMENTWISE[name] = (in_params, out_params, operation)
    KERNEL_MODULES[f"minivit_{name}"] = sys._getframe(1).f_globals["__name__"]


def row_kernel(name, dtype):
    """The cupy.RawKernel `name` for element type `dtype` (built once, compiled on first call)."""
    key = (name, dtype.name)
    if key not in kernels:
        source = f"typedef {C_TYPES[dtype.name]} T;\n" + ROW_SOURCES[name]
        kernels[key] = cupy().RawKernel(source, name)
    return kernels[key]


def elementwise(name):
    """The cupy.ElementwiseKernel `name` (one object for both dtypes: T is a type placeholder)."""
    key = (name, None)
    if key not in kernels:
        in_params, out_params, operation = ELEMENTWISE[name]
        kernels[key] = cupy().ElementwiseKernel(in_params, out_params, operation,
                                                f"minivit_{name}", preamble=MATH)
    return kernels[key]


def threads(cols):
    """Threads per row block: a power of two from 32 (one warp) to 256, about one per column."""
    return min(256, max(32, 1 << max(cols - 1, 0).bit_length()))


def launch_rows(name, dtype, rows, cols, args):
    """The row kernel `name` on `rows` blocks of threads(cols) threads (nothing for no rows)."""
    if rows:
        row_kernel(name, dtype)((rows,), (threads(cols),), args)
