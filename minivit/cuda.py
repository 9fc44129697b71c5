"""Fused CUDA kernels for the cupy backend, plus TF32, memory and CUDA-graph helpers.

The hot elementwise and row-wise parts of a ViT step each run as ONE kernel here instead of a
chain of CuPy calls (each ~18 µs of Python launch overhead plus a full read/write of memory):

    op                  forward                            backward
    layer_norm          RawKernel, one block per row       RawKernel (dx, two row sums per
                        (mean, variance, x̂, y, 1/σ)        block) + column_sums (dw and db)
    bias gradients                                         column_sums: coalesced Σ over rows
    gelu (exact, tanh)  ElementwiseKernel (erff/erf)       ElementwiseKernel (recomputes Φ / tanh)
    softmax/log_softmax RawKernel, one block per row       RawKernel p ⊙ (g − Σ g ⊙ p)
    cross_entropy       RawKernel per row: log-sum-exp and ElementwiseKernel (p Σq − q)·scale
                        the row's loss (labels or soft)    (+ the soft target's gradient)
    AdamW update        one ElementwiseKernel over the flat parameter buffer (param, m, v in place)
    self-attention      batched cuBLAS GEMMs on the packed qkv (no split/merge copies) + softmax

Every kernel works in float32 and float64 (T = float/double; row reductions accumulate in T).
The math of each op is written once, as a comment above the op in minivit/functional/*.py
(and optim.AdamW); the kernels follow the same formulas in the same order, so they agree with
the NumPy path to rounding.

Dispatch: the ops call ``cuda.handles(*arrays)`` first. It is True only for CuPy arrays of one
float32/float64 dtype while fused kernels are on, so NumPy arrays never reach this module, and
CuPy is imported only when a CuPy array has already been seen. ``fused_kernels(False)`` (or the
environment variable MINIVIT_FUSED_KERNELS=0) turns the kernels off, leaving the plain CuPy
path — the tests compare the two, and a benchmark can measure what fusing gains.

Kernels are built on first use and cached per (kernel, dtype); CuPy also caches the compiled
binaries on disk (~/.cupy/kernel_cache), so only the first run on a machine pays for NVRTC.

Other helpers: ``set_tf32(enabled)`` (TF32 tensor-core GEMMs for float32 matmuls),
``synchronize()``, ``memory_info()``, ``PeakMemory()`` and the experimental ``capture_step``
(CUDA graphs).
"""

import contextlib
import os

import numpy as np

from minivit import backend

_FLOAT_DTYPES = ("float32", "float64")
_state = {"fused": os.environ.get("MINIVIT_FUSED_KERNELS", "1").strip() not in ("0", "false", "no")}
_kernels = {}  # (name, dtype name) -> compiled-on-first-call CuPy kernel object


def _cupy():
    import cupy  # only reached with CuPy arrays in hand, so CuPy is installed and imported
    return cupy


# -- dispatch ---------------------------------------------------------------------------------
def handles(*arrays):
    """True when the fused kernels should run on `arrays`: all (non-None) are CuPy arrays of
    one float32/float64 dtype and fused kernels are on. False for any NumPy array."""
    if not _state["fused"]:
        return False
    dtype = None
    for array in arrays:
        if array is None:
            continue
        if backend.backend_of(array) != "cupy" or array.dtype.name not in _FLOAT_DTYPES:
            return False
        if dtype is None:
            dtype = array.dtype
        elif array.dtype != dtype:
            return False
    return dtype is not None


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


# -- kernel sources ---------------------------------------------------------------------------
# Overloads instead of relying on CUDA's C++ math overloads: float calls the f-suffixed
# single-precision functions (erff, expf, ...), double the double ones.
_MATH = r"""
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
_ROW_COMMON = _MATH + r"""
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

_LAYER_NORM = _ROW_COMMON + r"""
// x̂ = (x − μ)·r, r = 1/√(σ² + ε), y = x̂ w + b  (two-pass mean/variance, as NumPy)
extern "C" __global__ void layer_norm_forward(
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
        T* __restrict__ y, T* __restrict__ xhat, T* __restrict__ rstd, const int cols, const T eps) {
    __shared__ T shared[32];
    const long long base = (long long)blockIdx.x * cols;
    T s = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += x[base + j];
    const T mean = block_sum(s, shared) / (T)cols;
    T ss = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) { T d = x[base + j] - mean; ss += d * d; }
    const T r = (T)1 / mv_sqrt(block_sum(ss, shared) / (T)cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const T n = (x[base + j] - mean) * r;
        xhat[base + j] = n;
        y[base + j] = n * w[j] + b[j];
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// dx̂ = dy w;  dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂))
extern "C" __global__ void layer_norm_backward(
        const T* __restrict__ g, const T* __restrict__ xhat, const T* __restrict__ rstd,
        const T* __restrict__ w, T* __restrict__ dx, const int cols) {
    __shared__ T shared[32];
    const long long base = (long long)blockIdx.x * cols;
    T s1 = 0, s2 = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const T gn = g[base + j] * w[j];
        s1 += gn;
        s2 += gn * xhat[base + j];
    }
    const T mean_g = block_sum(s1, shared) / (T)cols;
    const T mean_gx = block_sum(s2, shared) / (T)cols;
    const T r = rstd[blockIdx.x];
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        dx[base + j] = r * (g[base + j] * w[j] - mean_g - xhat[base + j] * mean_gx);
}
"""

_SOFTMAX = _ROW_COMMON + r"""
// softmax: e^(x − max) / Σ e^(x − max);  log_softmax: (x − max) − log Σ e^(x − max);
// with_lse: also lse_row = max + log Σ e^(x − max), from which e^(x − lse) gives softmax again
extern "C" __global__ void softmax_forward(
        const T* __restrict__ x, T* __restrict__ y, T* __restrict__ lse, const int cols,
        const int log_mode, const int with_lse) {
    __shared__ T shared[32];
    const long long base = (long long)blockIdx.x * cols;
    T m = x[base];  // an element of the row: a valid start for the max
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = x[base + j] > m ? x[base + j] : m;
    m = block_max(m, shared);
    T s = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += mv_exp(x[base + j] - m);
    s = block_sum(s, shared);
    if (with_lse && threadIdx.x == 0) lse[blockIdx.x] = m + mv_log(s);
    if (log_mode) {
        const T log_s = mv_log(s);
        for (int j = threadIdx.x; j < cols; j += blockDim.x) y[base + j] = (x[base + j] - m) - log_s;
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x) y[base + j] = mv_exp(x[base + j] - m) / s;
    }
}

// dx = p ⊙ (dp − Σ dp ⊙ p)
extern "C" __global__ void softmax_backward(
        const T* __restrict__ p, const T* __restrict__ g, T* __restrict__ dx, const int cols) {
    __shared__ T shared[32];
    const long long base = (long long)blockIdx.x * cols;
    T s = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += g[base + j] * p[base + j];
    s = block_sum(s, shared);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dx[base + j] = p[base + j] * (g[base + j] - s);
}
"""

_CROSS_ENTROPY = _ROW_COMMON + r"""
// Per row, with d = x − max and L = log Σ e^d (so log p = d − L):
//   loss_row = Σ_k q_k (L − d_k), q = (1 − ε) target + ε/K; every term is >= 0, no cancellation.
extern "C" __global__ void cross_entropy_labels(
        const T* __restrict__ x, const long long* __restrict__ labels, T* __restrict__ row_max,
        T* __restrict__ row_logsum, T* __restrict__ row_loss, const int cols, const T smoothing) {
    __shared__ T shared[32];
    const long long base = (long long)blockIdx.x * cols;
    T m = x[base];
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = x[base + j] > m ? x[base + j] : m;
    m = block_max(m, shared);
    T s = 0, sd = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) { const T d = x[base + j] - m; s += mv_exp(d); sd += d; }
    s = block_sum(s, shared);
    sd = block_sum(sd, shared);
    if (threadIdx.x == 0) {
        const T log_s = mv_log(s);
        const T d_label = x[base + labels[blockIdx.x]] - m;
        row_max[blockIdx.x] = m;
        row_logsum[blockIdx.x] = log_s;
        row_loss[blockIdx.x] = ((T)1 - smoothing) * (log_s - d_label) + smoothing * (log_s - sd / (T)cols);
    }
}

extern "C" __global__ void cross_entropy_soft(
        const T* __restrict__ x, const T* __restrict__ target, T* __restrict__ row_max,
        T* __restrict__ row_logsum, T* __restrict__ row_qsum, T* __restrict__ row_loss,
        const int cols, const T smoothing) {
    __shared__ T shared[32];
    const long long base = (long long)blockIdx.x * cols;
    T m = x[base];
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = x[base + j] > m ? x[base + j] : m;
    m = block_max(m, shared);
    T s = 0, sq = 0, sqd = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const T d = x[base + j] - m;
        const T q = target[base + j] * ((T)1 - smoothing) + smoothing / (T)cols;
        s += mv_exp(d);
        sq += q;
        sqd += q * d;
    }
    s = block_sum(s, shared);
    sq = block_sum(sq, shared);
    sqd = block_sum(sqd, shared);
    if (threadIdx.x == 0) {
        const T log_s = mv_log(s);
        row_max[blockIdx.x] = m;
        row_logsum[blockIdx.x] = log_s;
        row_qsum[blockIdx.x] = sq;
        row_loss[blockIdx.x] = log_s * sq - sqd;
    }
}
"""

# Column sums of a C-contiguous (rows, cols) array: sums_c = Σ_r a_rc and, with_dot, dots_c =
# Σ_r a_rc b_rc. Block (32, 8): a warp reads 32 neighbouring columns of one row (coalesced), the
# 8 warps take every 8th row of the block's chunk; grid (column tiles, row chunks) writes one
# partial row per chunk, which a second launch over the (chunks, cols) partials sums.
_COLUMN_SUMS = r"""
extern "C" __global__ void column_sums(
        const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ sums,
        T* __restrict__ dots, const int rows, const int cols, const int chunk_rows,
        const int with_dot) {
    __shared__ T shared_sums[8][33], shared_dots[8][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int stop = min(rows, (blockIdx.y + 1) * chunk_rows);
    T s = 0, d = 0;
    if (col < cols) {
        for (int r = blockIdx.y * chunk_rows + threadIdx.y; r < stop; r += 8) {
            const T value = a[(long long)r * cols + col];
            s += value;
            if (with_dot) d += value * b[(long long)r * cols + col];
        }
    }
    shared_sums[threadIdx.y][threadIdx.x] = s;
    shared_dots[threadIdx.y][threadIdx.x] = d;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        for (int i = 1; i < 8; ++i) {
            s += shared_sums[i][threadIdx.x];
            d += shared_dots[i][threadIdx.x];
        }
        const long long out = (long long)blockIdx.y * cols + col;
        sums[out] = s;
        if (with_dot) dots[out] = d;
    }
}
"""

_ROW_SOURCES = {
    "layer_norm_forward": _LAYER_NORM, "layer_norm_backward": _LAYER_NORM,
    "softmax_forward": _SOFTMAX, "softmax_backward": _SOFTMAX,
    "cross_entropy_labels": _CROSS_ENTROPY, "cross_entropy_soft": _CROSS_ENTROPY,
    "column_sums": _COLUMN_SUMS,
}
_C_TYPES = {"float32": "float", "float64": "double"}

# AdamW (see optim.AdamW): m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
#   θ ← θ − lr·λ·mask·θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
ADAMW_SCALARS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay", "step_size",
                 "inv_sqrt_bias2", "eps")
_ADAMW_MATH = ("const T mi = beta1 * m + one_minus_beta1 * grad;\n"
               "const T vi = beta2 * v + (grad * grad) * one_minus_beta2;\n"
               "m = mi;\n"
               "v = vi;\n"
               "const T p = param - (param * mask) * decay;\n"
               "param = p - (mi / (mv_sqrt(vi) * inv_sqrt_bias2 + eps)) * step_size;")

# name -> (in_params, out_params, operation) of the cupy.ElementwiseKernel objects.
_ELEMENTWISE = {
    # gelu exact: y = x Φ(x), Φ(x) = ½(1 + erf(x/√2));  dx = g (Φ(x) + x φ(x)), φ = e^(−x²/2)/√(2π)
    "gelu_forward": (
        "T x", "T y",
        "y = x * ((T)0.5 * ((T)1 + mv_erf(x * (T)0.70710678118654752440)));"),
    "gelu_backward": (
        "T g, T x", "T dx",
        "const T cdf = (T)0.5 * ((T)1 + mv_erf(x * (T)0.70710678118654752440));\n"
        "const T pdf = (T)0.39894228040143267794 * mv_exp((T)-0.5 * x * x);\n"
        "dx = g * (cdf + x * pdf);"),
    # gelu tanh: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
    #            dx = g (½(1 + t) + ½x(1 − t²) √(2/π)(1 + 3·0.044715x²)), t = tanh u
    "gelu_tanh_forward": (
        "T x", "T y",
        "const T t = mv_tanh((T)0.79788456080286535588 * (x + (T)0.044715 * (x * x * x)));\n"
        "y = (T)0.5 * x * ((T)1 + t);"),
    "gelu_tanh_backward": (
        "T g, T x", "T dx",
        "const T t = mv_tanh((T)0.79788456080286535588 * (x + (T)0.044715 * (x * x * x)));\n"
        "const T du = (T)0.79788456080286535588 * ((T)1 + (T)0.134145 * x * x);\n"
        "dx = g * ((T)0.5 * ((T)1 + t) + (T)0.5 * x * ((T)1 - t * t) * du);"),
    # cross-entropy backward, integer labels (Σq = 1): dx = (p − q)·scale, p = e^(d − L)
    "cross_entropy_labels_backward": (
        "raw T x, raw T row_max, raw T row_logsum, raw int64 labels, T scale, T smoothing, "
        "int32 cols", "T dx",
        "const long long row = i / cols;\n"
        "const T p = mv_exp((x[i] - row_max[row]) - row_logsum[row]);\n"
        "T q = smoothing / (T)cols;\n"
        "if (i - row * cols == labels[row]) q += (T)1 - smoothing;\n"
        "dx = (p - q) * scale;"),
    # cross-entropy backward, soft targets: dx = (p Σq − q)·scale
    "cross_entropy_soft_backward": (
        "raw T x, raw T target, raw T row_max, raw T row_logsum, raw T row_qsum, T scale, "
        "T smoothing, int32 cols", "T dx",
        "const long long row = i / cols;\n"
        "const T p = mv_exp((x[i] - row_max[row]) - row_logsum[row]);\n"
        "const T q = target[i] * ((T)1 - smoothing) + smoothing / (T)cols;\n"
        "dx = (p * row_qsum[row] - q) * scale;"),
    # gradient of the soft target: dq = −log p · scale (1 − ε)
    "cross_entropy_target_backward": (
        "raw T x, raw T row_max, raw T row_logsum, T scale, T smoothing, int32 cols", "T dq",
        "const long long row = i / cols;\n"
        "dq = -((x[i] - row_max[row]) - row_logsum[row]) * (scale * ((T)1 - smoothing));"),
    # the address of matrix (b, h) = i of a batch grid (B, H): base + size·(offset + b·sb + h·sh)
    "batch_addresses": (
        "uint64 base, int64 size, int64 offset, int64 sb, int64 sh, int64 heads", "uint64 a",
        "a = base + (unsigned long long)(size * (offset + (i / heads) * sb + (i % heads) * sh));"),
    # attention probabilities again from the scores and each row's lse: p = e^(s − lse)
    "attention_probs": (
        "T s, raw T lse, int32 cols", "T p",
        "p = mv_exp(s - lse[i / cols]);"),
    # AdamW: the scalars as kernel arguments, or read from a device array (graph replays)
    "adamw": ("T grad, T mask, " + ", ".join(f"T {name}" for name in ADAMW_SCALARS),
              "T param, T m, T v", _ADAMW_MATH),
    "adamw_device_scalars": (
        "T grad, T mask, raw T scalars", "T param, T m, T v",
        "".join(f"const T {name} = scalars[{index}];\n"
                for index, name in enumerate(ADAMW_SCALARS)) + _ADAMW_MATH),
}


def _row_kernel(name, dtype):
    """The cupy.RawKernel `name` for element type `dtype` (built once, compiled on first call)."""
    key = (name, dtype.name)
    if key not in _kernels:
        source = f"typedef {_C_TYPES[dtype.name]} T;\n" + _ROW_SOURCES[name]
        _kernels[key] = _cupy().RawKernel(source, name)
    return _kernels[key]


def _elementwise(name):
    """The cupy.ElementwiseKernel `name` (one object for both dtypes: T is a type placeholder)."""
    key = (name, None)
    if key not in _kernels:
        in_params, out_params, operation = _ELEMENTWISE[name]
        _kernels[key] = _cupy().ElementwiseKernel(in_params, out_params, operation,
                                                  f"minivit_{name}", preamble=_MATH)
    return _kernels[key]


def _threads(cols):
    """Threads per row block: a power of two from 32 (one warp) to 256, about one per column."""
    return min(256, max(32, 1 << max(cols - 1, 0).bit_length()))


def _launch_rows(name, dtype, rows, cols, args):
    if rows:
        _row_kernel(name, dtype)((rows,), (_threads(cols),), args)


# -- column sums (bias and LayerNorm weight gradients) ---------------------------------------
_COLUMN_BLOCKS = 512  # blocks to aim for: a few per multiprocessor (132 on an H100)


def _column_pass(a, b, rows, cols, max_chunks=_COLUMN_BLOCKS):
    """One launch of column_sums over (rows, cols): returns (sums, dots or None), each of shape
    (chunks, cols), chunks <= max_chunks chosen so the grid has about _COLUMN_BLOCKS blocks."""
    cp = _cupy()
    tiles = (cols + 31) // 32
    chunks = max(1, min((rows + 7) // 8, _COLUMN_BLOCKS // tiles, max_chunks))
    chunk_rows = (rows + chunks - 1) // chunks
    chunks = (rows + chunk_rows - 1) // chunk_rows
    sums = cp.empty((chunks, cols), a.dtype)
    dots = cp.empty((chunks, cols), a.dtype) if b is not None else None
    _row_kernel("column_sums", a.dtype)(
        (tiles, chunks), (32, 8),
        (a, a if b is None else b, sums, sums if dots is None else dots, np.int32(rows),
         np.int32(cols), np.int32(chunk_rows), np.int32(b is not None)))
    return sums, dots


def column_sums(a, b=None):
    """Σ over the rows of a 2-D array `a` (its column sums), and with `b` (same shape) also
    Σ_rows a ⊙ b, in one coalesced pass: (sums, dots or None), each of shape (cols,)."""
    cp = _cupy()
    a = cp.ascontiguousarray(a)
    rows, cols = a.shape
    if b is not None:
        b = cp.ascontiguousarray(b)
    if rows == 0 or cols == 0:
        zeros = cp.zeros(cols, a.dtype)
        return zeros, (zeros.copy() if b is not None else None)
    sums, dots = _column_pass(a, b, rows, cols)
    if sums.shape[0] > 1:  # sum the per-chunk partials: one more pass, one chunk
        sums = _column_pass(sums, None, sums.shape[0], cols, max_chunks=1)[0]
        if dots is not None:
            dots = _column_pass(dots, None, dots.shape[0], cols, max_chunks=1)[0]
    return sums.reshape(cols), (dots.reshape(cols) if dots is not None else None)


# -- layer_norm -------------------------------------------------------------------------------
def layer_norm_forward(x, weight, bias, eps):
    """(y, x̂, rstd) for LayerNorm over the last axis; rstd has shape x.shape[:-1] + (1,), as in
    the NumPy path. weight/bias None mean 1/0."""
    cp = _cupy()
    x = cp.ascontiguousarray(x)
    cols = x.shape[-1]
    rows = x.size // cols if cols else 0
    weight = cp.ones(cols, x.dtype) if weight is None else cp.ascontiguousarray(weight)
    bias = cp.zeros(cols, x.dtype) if bias is None else cp.ascontiguousarray(bias)
    out, normalized = cp.empty_like(x), cp.empty_like(x)
    rstd = cp.empty(x.shape[:-1] + (1,), x.dtype)
    _launch_rows("layer_norm_forward", x.dtype, rows, cols,
                 (x, weight, bias, out, normalized, rstd, np.int32(cols), x.dtype.type(eps)))
    return out, normalized, rstd


def layer_norm_backward(grad, normalized, rstd, weight, needs_input_grad):
    """(dx, dw, db) of LayerNorm from the saved x̂ and rstd; None where not needed."""
    cp = _cupy()
    need_x, need_w, need_b = (tuple(needs_input_grad) + (False, False, False))[:3]
    grad = cp.ascontiguousarray(grad)
    cols = grad.shape[-1]
    rows = grad.size // cols if cols else 0
    grad_x = grad_w = grad_b = None
    if need_x:
        w = cp.ones(cols, grad.dtype) if weight is None else cp.ascontiguousarray(weight)
        grad_x = cp.empty_like(grad)
        _launch_rows("layer_norm_backward", grad.dtype, rows, cols,
                     (grad, cp.ascontiguousarray(normalized), cp.ascontiguousarray(rstd), w,
                      grad_x, np.int32(cols)))
    if need_w or need_b:  # db = Σ dy and dw = Σ dy ⊙ x̂ over the rows, in one pass
        grad_b, grad_w = column_sums(grad.reshape(rows, cols),
                                     normalized.reshape(rows, cols) if need_w else None)
    return grad_x, grad_w if need_w else None, grad_b if need_b else None


# -- gelu -------------------------------------------------------------------------------------
def _gelu_name(approximate, direction):
    if approximate == "none":
        return f"gelu_{direction}"
    if approximate == "tanh":
        return f"gelu_tanh_{direction}"
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_forward(x, approximate="none"):
    """GELU (exact erf form or tanh approximation) in one elementwise kernel."""
    return _elementwise(_gelu_name(approximate, "forward"))(x)


def gelu_backward(grad, x, approximate="none"):
    """dx = g · GELU'(x), recomputing Φ(x) (or tanh u) from x instead of storing it."""
    return _elementwise(_gelu_name(approximate, "backward"))(grad, x)


# -- softmax ----------------------------------------------------------------------------------
def softmax(x, log=False, lse=None):
    """softmax (or log_softmax with log=True) over the last axis, one block per row. With
    `lse` (an array of one element per row) each row's log Σ eˣ is written there too."""
    cp = _cupy()
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    cols = x.shape[-1] if x.ndim else 1
    if x.size:
        _launch_rows("softmax_forward", x.dtype, x.size // cols, cols,
                     (x, out, out if lse is None else lse, np.int32(cols),
                      np.int32(1 if log else 0), np.int32(lse is not None)))
    return out


def softmax_backward(probs, grad):
    """p ⊙ (g − Σ g ⊙ p) over the last axis, one block per row."""
    cp = _cupy()
    probs, grad = cp.ascontiguousarray(probs), cp.ascontiguousarray(grad)
    out = cp.empty_like(grad)
    cols = grad.shape[-1] if grad.ndim else 1
    if grad.size:
        _launch_rows("softmax_backward", grad.dtype, grad.size // cols, cols,
                     (probs, grad, out, np.int32(cols)))
    return out


# -- cross_entropy ----------------------------------------------------------------------------
def cross_entropy_forward(logits, target, label_smoothing=0.0):
    """Mean cross-entropy of (B, K) logits against integer labels (B,) or soft targets (B, K),
    already validated by the caller. Returns (loss as a 0-d array, saved state for backward)."""
    cp = _cupy()
    x = cp.ascontiguousarray(logits)
    batch, classes = x.shape
    dtype = x.dtype
    row_max, row_logsum, row_loss = (cp.empty(batch, dtype) for _ in range(3))
    smoothing = dtype.type(label_smoothing)
    if target.dtype.kind in "iu":
        labels = cp.ascontiguousarray(target.astype(cp.int64, copy=False))
        _launch_rows("cross_entropy_labels", dtype, batch, classes,
                     (x, labels, row_max, row_logsum, row_loss, np.int32(classes), smoothing))
        soft, row_qsum = None, None
    else:
        soft = cp.ascontiguousarray(target.astype(dtype, copy=False))
        row_qsum = cp.empty(batch, dtype)
        _launch_rows("cross_entropy_soft", dtype, batch, classes,
                     (x, soft, row_max, row_logsum, row_qsum, row_loss, np.int32(classes),
                      smoothing))
        labels = None
    saved = (x, labels, soft, row_max, row_logsum, row_qsum, smoothing)
    return row_loss.sum() / batch, saved


def cross_entropy_backward(grad, saved, need_target_grad=False):
    """(d logits, d target or None) from cross_entropy_forward's saved state; grad is the 0-d
    gradient of the loss (kept on the device: no host synchronisation)."""
    x, labels, soft, row_max, row_logsum, row_qsum, smoothing = saved
    cp = _cupy()
    batch, classes = x.shape
    scale = grad / batch  # 0-d, broadcast over the flat (B·K,) outputs; raw arrays use index i
    flat_x = x.reshape(-1)
    grad_x = cp.empty(x.size, x.dtype)
    if soft is None:
        _elementwise("cross_entropy_labels_backward")(
            flat_x, row_max, row_logsum, labels, scale, smoothing, classes, grad_x)
    else:
        _elementwise("cross_entropy_soft_backward")(
            flat_x, soft.reshape(-1), row_max, row_logsum, row_qsum, scale, smoothing, classes,
            grad_x)
    grad_target = None
    if need_target_grad:
        grad_target = cp.empty(x.size, x.dtype)
        _elementwise("cross_entropy_target_backward")(
            flat_x, row_max, row_logsum, scale, smoothing, classes, grad_target)
        grad_target = grad_target.reshape(batch, classes)
    return grad_x.reshape(batch, classes), grad_target


# -- AdamW ------------------------------------------------------------------------------------
def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The AdamW kernel's scalars (ADAMW_SCALARS) for the 1-based step count t."""
    t = int(step)
    return (beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr * weight_decay,
            lr / (1.0 - beta1 ** t), 1.0 / (1.0 - beta2 ** t) ** 0.5, eps)


def adamw_update(params, grads, m, v, decay_mask, scalars):
    """One AdamW step over flat buffers in one kernel; params, m and v are updated in place.
    `scalars`: adamw_scalars(...) as numbers, or a device array of them (read by the kernel
    when it runs: what a replayed CUDA graph needs, see CapturedStep)."""
    if isinstance(scalars, tuple):
        dtype_scalar = params.dtype.type
        _elementwise("adamw")(grads, decay_mask, *(dtype_scalar(s) for s in scalars), params,
                              m, v)
    else:
        _elementwise("adamw_device_scalars")(grads, decay_mask, scalars, params, m, v)


# -- self-attention: batched GEMMs straight on the packed qkv -------------------------------
# cuBLAS batched GEMMs take one address per matrix, so q, k, v are read where they lie in qkv
# (B, N, 3D) and O is written straight into (B, n, H, d) = (B, n, D): no split, merge or
# transpose copies (each was a full pass over memory), and the scale rides on alpha.
_OP_N, _OP_T = 0, 1
_DEFAULT_MATH, _TF32_TENSOR_OP_MATH = 0, 3  # cublasMath_t
_pointer_cache = {}  # (address, itemsize, offset, strides, grid) -> device array of addresses


def _batch_pointers(array, offset, strides, grid):
    """Device uint64 array of the addresses array + itemsize · (offset + Σ index_i · stride_i)
    over the batch grid in row-major order. Cached: the same arguments give the same addresses,
    and a training loop's memory pool hands out the same blocks step after step."""
    key = (array.data.ptr, array.itemsize, offset, strides, grid)
    recording = capturing()
    # a graph's addresses live in its own pool and are written by its replays: its own cache
    cache = _capture["pointers"] if recording else _pointer_cache
    pointers = cache.get(key)
    if pointers is None:
        if len(cache) >= 4096 and not recording:
            cache.clear()
        if recording:  # no host-to-device copy may be recorded: a kernel computes them
            (batch, heads), (batch_stride, head_stride) = grid, strides
            pointers = _cupy().empty(batch * heads, np.uint64)
            _elementwise("batch_addresses")(np.uint64(array.data.ptr), np.int64(array.itemsize),
                                            np.int64(offset), np.int64(batch_stride),
                                            np.int64(head_stride), np.int64(heads), pointers)
        else:
            elements = np.zeros((), np.int64)
            for size, stride in zip(grid, strides):
                elements = np.add.outer(elements, np.arange(size, dtype=np.int64) * stride)
            addresses = (elements.ravel() + offset) * array.itemsize + array.data.ptr
            pointers = _cupy().asarray(addresses.astype(np.uint64))
        cache[key] = pointers
    return pointers


def _gemm_batched(dtype, count, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, alpha=1.0):
    """Row-major C_j = alpha · op(A_j) op(B_j) for j < count, from device arrays of addresses:
    A_j is m×k (stored k×m when trans_a), B_j k×n (stored n×k when trans_b), C_j m×n; ld* are
    the row strides in elements. cuBLAS is column-major, so it is asked for C_jᵀ = op(B_j)ᵀ
    op(A_j)ᵀ. float32 runs on TF32 tensor cores when tf32_enabled()."""
    if capturing():
        _direct_cublas().gemm_batched(dtype, count, m, n, k, a, lda, trans_a, b, ldb, trans_b,
                                      c, ldc, alpha)
        return
    from cupy_backends.cuda.libs import cublas
    handle = _cupy().cuda.device.get_cublas_handle()
    single = np.dtype(dtype) == np.float32
    gemm = cublas.sgemmBatched if single else cublas.dgemmBatched
    mode = cublas.getMathMode(handle)
    wanted = _TF32_TENSOR_OP_MATH if single and tf32_enabled() else _DEFAULT_MATH
    if mode != wanted:
        cublas.setMathMode(handle, wanted)
    alpha_beta = np.array([alpha, 0.0], dtype)  # cuBLAS reads them through host pointers
    try:
        gemm(handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
             alpha_beta.ctypes.data, b.data.ptr, ldb, a.data.ptr, lda,
             alpha_beta.ctypes.data + alpha_beta.itemsize, c.data.ptr, ldc, count)
    finally:
        if mode != wanted:
            cublas.setMathMode(handle, mode)


class _Heads:
    """Addresses of the per-(batch, head) matrices of one self-attention call."""

    def __init__(self, qkv, heads, queries):
        self.batch, self.tokens, self.width = qkv.shape
        self.dim = self.width // 3
        self.head_dim, self.heads, self.queries = self.dim // heads, heads, queries
        self.count, self.grid = self.batch * heads, (self.batch, heads)

    def packed(self, array, part):
        """q (part 0), k (1) or v (2) of head h in (B, N, 3D): row stride 3D."""
        return _batch_pointers(array, part * self.dim, (self.tokens * self.width, self.head_dim),
                               self.grid)

    def merged(self, array):
        """Head h of (B, n, D): row stride D."""
        return _batch_pointers(array, 0, (self.queries * self.dim, self.head_dim), self.grid)

    def scores(self, array):
        """(B, H, n, N) C-contiguous: row stride N."""
        size = self.queries * self.tokens
        return _batch_pointers(array, 0, (self.heads * size, size), self.grid)


def _scores(qkv, h, scale, out):
    """S = q kᵀ·s for every (batch, head), written into `out` (B, H, queries, N)."""
    _gemm_batched(qkv.dtype, h.count, h.queries, h.tokens, h.head_dim, h.packed(qkv, 0), h.width,
                  False, h.packed(qkv, 1), h.width, True, h.scores(out), h.tokens, scale)
    return out


def attention_forward(qkv, heads, queries, scale):
    """Self-attention of the first `queries` tokens from a C-contiguous packed qkv (B, N, 3D):
    S = q kᵀ·s, P = softmax(S), O = P v. Returns (O as (B, queries, D), P (B, H, queries, N),
    lse (B, H, queries) = log Σ e^S per row: backward can rebuild P from it, e^(S − lse), so a
    caller need not keep the N×N probabilities)."""
    cp = _cupy()
    h = _Heads(qkv, heads, queries)
    lse = cp.empty((h.batch, heads, queries), qkv.dtype)
    probs = softmax(_scores(qkv, h, scale, cp.empty((h.batch, heads, queries, h.tokens),
                                                    qkv.dtype)), lse=lse)
    out = cp.empty((h.batch, queries, h.dim), qkv.dtype)
    _gemm_batched(qkv.dtype, h.count, queries, h.head_dim, h.tokens, h.scores(probs), h.tokens,
                  False, h.packed(qkv, 2), h.width, False, h.merged(out), h.dim)
    return out, probs, lse


def attention_backward(grad, qkv, probs, lse, heads, scale):
    """d qkv (B, N, 3D) from dO (B, queries, D): dv = Pᵀ dO; dP = dO vᵀ;
    dS = P ⊙ (dP − Σ dP ⊙ P); dq = dS k·s (0 for tokens that did not ask); dk = dSᵀ q·s.
    probs None: P is rebuilt as e^(q kᵀ·s − lse) (one GEMM and one elementwise pass)."""
    cp = _cupy()
    queries = lse.shape[2]
    h = _Heads(qkv, heads, queries)
    if probs is None:
        probs = _scores(qkv, h, scale, cp.empty(lse.shape + (h.tokens,), qkv.dtype))
        _elementwise("attention_probs")(probs, lse, h.tokens, probs)
    grad = cp.ascontiguousarray(grad)
    grad_qkv = cp.empty_like(qkv)
    if queries < h.tokens:
        grad_qkv.reshape(h.batch, h.tokens, 3, h.dim)[:, queries:, 0] = 0
    dtype, count, d, n, width = qkv.dtype, h.count, h.head_dim, h.tokens, h.width
    p, g = h.scores(probs), h.merged(grad)
    _gemm_batched(dtype, count, n, d, queries, p, n, True, g, h.dim, False,
                  h.packed(grad_qkv, 2), width)                                 # dv = Pᵀ dO
    grad_probs = cp.empty_like(probs)
    _gemm_batched(dtype, count, queries, n, d, g, h.dim, False, h.packed(qkv, 2), width, True,
                  h.scores(grad_probs), n)                                      # dP = dO vᵀ
    grad_scores = softmax_backward(probs, grad_probs)
    del grad_probs, probs
    ds = h.scores(grad_scores)
    _gemm_batched(dtype, count, queries, d, n, ds, n, False, h.packed(qkv, 1), width, False,
                  h.packed(grad_qkv, 0), width, scale)                          # dq = dS k·s
    _gemm_batched(dtype, count, n, d, queries, ds, n, True, h.packed(qkv, 0), width, False,
                  h.packed(grad_qkv, 1), width, scale)                          # dk = dSᵀ q·s
    return grad_qkv


# -- TF32 -------------------------------------------------------------------------------------
def set_tf32(enabled=True):
    """Let float32 matmuls (cuBLAS GEMMs behind @, matmul, dot, tensordot, and the batched
    self-attention GEMMs) use TF32 tensor cores (GPUs of compute capability >= 8.0: A100,
    H100, ...). float64 is never affected.

    How: CuPy picks the cuBLAS compute type of every GEMM it runs from
    cupy._core._routines_linalg.get_compute_type(dtype); we set it with its set_compute_type
    (COMPUTE_TYPE_TF32 -> CUBLAS_COMPUTE_32F_FAST_TF32, COMPUTE_TYPE_DEFAULT -> CUBLAS_COMPUTE_32F),
    the same switch CuPy's environment variable CUPY_TF32=1 sets at the first float32 GEMM.
    CuPy passes that compute type explicitly to cublasGemmEx, so the handle's math mode does not
    reach its GEMMs; minivit's own batched attention GEMMs (legacy sgemmBatched, which has no
    compute type) read tf32_enabled() and set the math mode around each call (_gemm_batched).
    CUPY_TF32 is set too, so the choice also holds where CuPy is not imported yet or has no
    set_compute_type. Returns whether TF32 is now on (tf32_enabled())."""
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    try:
        from cupy._core import _routines_linalg as linalg
        compute_type = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, compute_type)  # warns and keeps FP32 below sm_80
    except (ImportError, AttributeError):
        return bool(enabled)  # only the environment variable: read at CuPy's first GEMM
    except Exception:  # noqa: BLE001 - CUDA errors: no usable GPU, nothing to switch
        return False
    return tf32_enabled()


def tf32_enabled():
    """Whether float32 GEMMs may use TF32 (per CuPy's compute type, or CUPY_TF32 before it)."""
    try:
        from cupy._core import _routines_linalg as linalg
        return linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32
    except Exception:  # noqa: BLE001 - CuPy missing or no GPU
        return os.environ.get("CUPY_TF32", "0").strip() not in ("", "0")


# -- timing and memory ------------------------------------------------------------------------
def synchronize():
    """Wait for all queued GPU work (for timing); a no-op where CuPy was never imported."""
    import sys
    if "cupy" in sys.modules:
        sys.modules["cupy"].cuda.Device().synchronize()


def memory_info():
    """Bytes of GPU memory CuPy's default pool has handed out ("used") and holds ("held")."""
    pool = _cupy().get_default_memory_pool()
    return {"used": int(pool.used_bytes()), "held": int(pool.total_bytes())}


class PeakMemory:
    """Context manager: the most bytes in use at once from CuPy's memory pool while it is open
    (``.bytes``; arrays alive before it count), as torch.cuda.max_memory_allocated counts.
    A cupy.cuda.MemoryHook follows every malloc and free of the pool in this thread."""

    def __enter__(self):
        cp = _cupy()
        tracker = self

        class Hook(cp.cuda.MemoryHook):
            name = "minivit_peak_memory"

            def malloc_postprocess(self, **kwargs):
                tracker.used += kwargs["mem_size"]
                tracker.bytes = max(tracker.bytes, tracker.used)

            def free_postprocess(self, **kwargs):
                tracker.used -= kwargs["mem_size"]

        self.used = self.bytes = int(cp.get_default_memory_pool().used_bytes())
        self.hook = Hook()
        self.hook.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.hook.__exit__(*exc_info)


def free_memory():
    """Return the default pool's unused blocks to the driver (between benchmarks)."""
    cp = _cupy()
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()


# -- CUDA graphs (experimental) ---------------------------------------------------------------
# CuPy refuses cuBLAS while a stream is captured: its wrappers' setStream raises "calling cuBLAS
# API during stream capture is currently unsupported". cuBLAS itself allows it once the handle
# has a workspace of its own (cuBLAS documentation, "CUDA Graphs Support"), so while a capture
# is on, minivit's GEMMs call the same libcublas through ctypes on a handle made before the
# capture (_DirectCublas). Anything else a step does that a graph cannot hold has its own
# capture branch: batch addresses computed by a kernel (_batch_pointers), AdamW's scalars read
# from a device array the host refills before each replay (replay_input), the gradient norm
# without cuBLAS, the label-range check of cross-entropy skipped (it reads the labels on the host).

# while a CapturedStep records: its replay inputs, its batch-address cache, and the allocator in
# use before the capture; and the _DirectCublas of this process
_capture = {"inputs": None, "pointers": None, "allocator": None, "cublas": None}
_CUDA_R_32F, _CUDA_R_64F = 0, 1  # cudaDataType
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70  # cublasComputeType_t
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t
_WORKSPACE_BYTES = 32 << 20


def capturing():
    """True while the current CuPy stream is being captured into a CUDA graph (never on ROCm,
    where CuPy's is_capturing raises)."""
    cp = _cupy()
    return not cp.cuda.runtime.is_hip and cp.cuda.get_current_stream().is_capturing()


def recording(array):
    """True when `array` is a CuPy array and a CUDA graph is being recorded: the test of every
    capture branch outside this module (False for NumPy arrays, without touching CuPy)."""
    return backend.backend_of(array) == "cupy" and capturing()


def replay_input(values, shape, dtype):
    """While a CapturedStep records: a device array of `shape` and `dtype` for the graph to
    read, which the CapturedStep fills with `values()` (NumPy) before each replay: for values a
    replay must not keep at their captured value. Its memory is not from the graph's pool,
    whose blocks the graph reuses: a temporary that a replay writes and frees before this array
    is read could share its block and overwrite what the host put there."""
    if _capture["inputs"] is None:
        raise RuntimeError("a CUDA graph is being recorded, but not by minivit's "
                           "cuda.capture_step: record steps that use minivit's optimizers, "
                           "dropout or drop_path with it (it refills their device values before "
                           "each replay)")
    cp = _cupy()
    with cp.cuda.using_allocator(_capture["allocator"]):
        array = cp.empty(shape, dtype)
    _capture["inputs"].append((array, values))
    return array


def _loaded_library(prefix):
    """The path of the shared library named prefix* that this process has loaded (Linux)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith(prefix):
                return path
    return None


class _DirectCublas:
    """libcublas's GEMMs through ctypes, on a handle and workspace of minivit's own."""

    def __init__(self):
        import ctypes

        from cupy_backends.cuda.libs import cublas  # noqa: F401 - loads libcublas
        path = _loaded_library("libcublas.so")
        if path is None:
            raise RuntimeError("CUDA graph capture needs libcublas, which CuPy has not loaded")
        self.ctypes, self.lib = ctypes, ctypes.CDLL(path)
        handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = _cupy().empty(_WORKSPACE_BYTES, np.uint8)  # kept alive with the handle
        i, p = ctypes.c_int, ctypes.c_void_p
        self.lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        self.lib.cublasGemmBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i,
                                                 i, i, i, i]

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _call(self, name, dtype, alpha, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc,
              *count):
        """cublas`name` (GemmEx, or GemmBatchedEx with `count`) for row-major C = alpha · op(A)
        op(B), the conventions of _gemm_batched: cuBLAS is asked for Cᵀ = op(B)ᵀ op(A)ᵀ. The
        handle is bound to the current stream, and the workspace set again (cublasSetStream
        resets it to cuBLAS's own pool, whose allocations a graph must not record)."""
        ctypes = self.ctypes
        if np.dtype(dtype) == np.float64:
            data, compute, scalar = _CUDA_R_64F, _COMPUTE_64F, np.float64
        else:
            data, scalar = _CUDA_R_32F, np.float32
            compute = _COMPUTE_32F_FAST_TF32 if tf32_enabled() else _COMPUTE_32F
        alpha_beta = np.array([alpha, 0.0], scalar)  # read through host pointers, at capture
        self._check(self.lib.cublasSetStream_v2(
            self.handle, ctypes.c_void_p(_cupy().cuda.get_current_stream().ptr)),
            "cublasSetStream")
        self._check(self.lib.cublasSetWorkspace_v2(
            self.handle, ctypes.c_void_p(self.workspace.data.ptr),
            ctypes.c_size_t(_WORKSPACE_BYTES)), "cublasSetWorkspace")
        self._check(getattr(self.lib, f"cublas{name}")(
            self.handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
            alpha_beta.ctypes.data, b, data, ldb, a, data, lda,
            alpha_beta.ctypes.data + alpha_beta.itemsize, c, data, ldc, *count, compute,
            _GEMM_DEFAULT), f"cublas{name}")

    def gemm(self, dtype, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc):
        """Row-major C = op(A) op(B) for device addresses a, b, c."""
        self._call("GemmEx", dtype, 1.0, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc)

    def gemm_batched(self, dtype, count, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc,
                     alpha=1.0):
        """_gemm_batched's product (device arrays of addresses a, b, c) through ctypes."""
        self._call("GemmBatchedEx", dtype, alpha, m, n, k, a.data.ptr, lda, trans_a, b.data.ptr,
                   ldb, trans_b, c.data.ptr, ldc, count)


def _direct_cublas():
    """The one _DirectCublas of this process (made outside any capture: see CapturedStep)."""
    if _capture["cublas"] is None:
        _capture["cublas"] = _DirectCublas()
    return _capture["cublas"]


def _prepare_capture():
    """What a capture cannot make: the cuBLAS handle and workspace, and the capture-only
    kernels compiled and loaded (a warm-up step never runs them)."""
    cp = _cupy()
    _direct_cublas()
    _elementwise("batch_addresses")(np.uint64(0), np.int64(1), np.int64(0), np.int64(0),
                                    np.int64(0), np.int64(1), cp.empty(1, np.uint64))
    for dtype in (np.float32, np.float64):  # on throwaway one-element buffers
        params, grads, m, v, mask = (cp.zeros(1, dtype) for _ in range(5))
        adamw_update(params, grads, m, v, mask, cp.ones(len(ADAMW_SCALARS), dtype))
    cp.cuda.get_current_stream().synchronize()


def _matrix(array):
    """(address, leading dimension, transposed) of a 2-D array for _DirectCublas.gemm: row-major
    with unit column stride, or the transpose of one (a Fortran-ordered block, a .T view)."""
    rows, cols = array.shape
    step_rows, step_cols = (stride // array.itemsize for stride in array.strides)
    if step_cols == 1 and step_rows >= max(cols, 1):
        return array.data.ptr, step_rows, False
    if step_rows == 1 and step_cols >= max(rows, 1):
        return array.data.ptr, step_cols, True
    return None


def matmul(a, b):
    """a @ b for 2-D CuPy arrays: CuPy's matmul, or while a CUDA graph records, one cuBLAS GEMM
    through ctypes (CuPy's would refuse)."""
    if not capturing():
        return a @ b
    if _matrix(a) is None:
        a = _cupy().ascontiguousarray(a)
    if _matrix(b) is None:
        b = _cupy().ascontiguousarray(b)
    left, right = _matrix(a), _matrix(b)
    out = _cupy().empty((a.shape[0], b.shape[1]), a.dtype)
    _direct_cublas().gemm(a.dtype, a.shape[0], b.shape[1], a.shape[1], left[0], left[1],
                          left[2], right[0], right[1], right[2], out.data.ptr, b.shape[1])
    return out


class CapturedStep:
    """EXPERIMENTAL: `fn(*static_inputs)` recorded once as a CUDA graph and replayed.

    Replaying costs ~2 µs per kernel instead of ~18 µs of Python per launch. A whole training
    step may be captured: forward, cross-entropy, backward and optimizer.step() (see the
    section comment above for how GEMMs, attention and AdamW take part). Rules for `fn`:
    - fixed shapes: it always reads `static_inputs` (CuPy arrays); call the CapturedStep with
      new arrays of the same shapes and it copies them in before the replay;
    - no host synchronisation inside: no .item(), float()/int()/bool() of a device value, no
      printing device arrays, no NumPy transfer; integer labels are not range-checked in
      replays (the eager warm-up checked the captured ones);
    - Python numbers given to a kernel are frozen at capture, except the optimizers' learning
      rate and AdamW's step count, which each replay takes from the optimizer as an eager
      step() would (the optimizer's step_count advances once per replay);
    - random numbers: dropout and drop_path draw their uniforms on the host (minivit's NumPy
      generator, see minivit.manual_seed) into a replay_input: new masks in every replay, from
      another generator than eager steps use (one host copy of the mask's size per replay);
    - fused kernels on (MINIVIT_FUSED_KERNELS=0 sends the GEMMs to CuPy's cuBLAS wrappers,
      which refuse to run in a capture);
    - the returned objects are the captured outputs: every replay overwrites them in place.
    Before capture `fn` runs `warmup` (≥ 1) times eagerly (compiling kernels; this work is real:
    a training step trains, and the last run's outputs are kept as `warmup_outputs`). Memory
    allocated during capture comes from a private pool kept alive with the graph, so replays
    never write into memory handed to anyone else; what the host writes before each replay
    (replay_input) lives outside that pool.
    tests/test_cuda.py checks on a GPU that a captured ViT training step and a captured AdamW
    step give exactly what the same eager steps give (float64)."""

    def __init__(self, fn, *static_inputs, warmup=1):
        if warmup < 1:
            raise ValueError(f"capture_step: warmup must be at least 1 (an eager run compiles "
                             f"the kernels a capture cannot), got {warmup}")
        cp = _cupy()
        self.fn, self.inputs = fn, static_inputs
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream:
            for _ in range(warmup):
                self.warmup_outputs = fn(*static_inputs)
        _prepare_capture()
        self.replay_inputs, self.pointers = _capture["inputs"], _capture["pointers"] = [], {}
        _capture["allocator"] = cp.cuda.get_allocator()
        try:
            with cp.cuda.using_allocator(self.pool.malloc), self.stream:
                self.stream.begin_capture()
                try:
                    self.outputs = fn(*static_inputs)
                except BaseException:
                    with contextlib.suppress(Exception):  # the capture is invalid anyway
                        self.stream.end_capture()
                    raise
                self.graph = self.stream.end_capture()
        finally:
            _capture["inputs"] = _capture["pointers"] = _capture["allocator"] = None
        self.stream.synchronize()

    def __call__(self, *inputs):
        """Copy `inputs` into the static inputs (None or the same array: keep), refill the
        step's replay_input arrays, replay the graph after the caller's queued work (the
        previous replay included), and return the outputs."""
        cp = _cupy()
        caller = cp.cuda.get_current_stream()
        for static, new in zip(self.inputs, inputs):
            if new is not None and new is not static:
                static[...] = cp.asarray(new)
        for array, values in self.replay_inputs:
            array.set(np.asarray(values(), array.dtype).reshape(array.shape), stream=caller)
        self.stream.wait_event(caller.record())
        self.graph.launch(stream=self.stream)
        caller.wait_event(self.stream.record())
        return self.outputs


def capture_step(fn, *static_inputs, warmup=1):
    """EXPERIMENTAL: record fn(*static_inputs) as a CUDA graph; see CapturedStep for the rules."""
    return CapturedStep(fn, *static_inputs, warmup=warmup)
