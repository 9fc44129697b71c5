"""GELU and softmax on the GPU: GELU (exact erf form and tanh form) as one elementwise kernel
each way, its backward recomputing Φ (or tanh u) from x instead of storing it; softmax and
log_softmax one thread block per row, forward and backward."""

import numpy as np

from minivit.cuda.device import (ROW_COMMON, cupy, elementwise, elementwise_kernel, launch_rows,
                                 row_kernels)
from minivit.mathconst import INV_SQRT_2, INV_SQRT_2PI, SQRT_2_OVER_PI, TANH_COEFF

# gelu exact: y = x Φ(x), Φ(x) = ½(1 + erf(x/√2));  dx = g (Φ(x) + x φ(x)), φ = e^(−x²/2)/√(2π)
_CDF = f"(T)0.5 * ((T)1 + mv_erf(x * (T){INV_SQRT_2!r}))"
elementwise_kernel("gelu_forward", "T x", "T y", f"y = x * ({_CDF});")
elementwise_kernel("gelu_backward", "T g, T x", "T dx",
                   f"const T cdf = {_CDF};\n"
                   f"const T pdf = (T){INV_SQRT_2PI!r} * mv_exp((T)-0.5 * x * x);\n"
                   "dx = g * (cdf + x * pdf);")
# gelu tanh: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
#            dx = g (½(1 + t) + ½x(1 − t²) √(2/π)(1 + 3·0.044715x²)), t = tanh u
_TANH = f"const T t = mv_tanh((T){SQRT_2_OVER_PI!r} * (x + (T){TANH_COEFF!r} * (x * x * x)));\n"
elementwise_kernel("gelu_tanh_forward", "T x", "T y", _TANH + "y = (T)0.5 * x * ((T)1 + t);")
elementwise_kernel("gelu_tanh_backward", "T g, T x", "T dx",
                   _TANH + f"const T du = (T){SQRT_2_OVER_PI!r} * "
                   f"((T)1 + (T){3 * TANH_COEFF!r} * x * x);\n"
                   "dx = g * ((T)0.5 * ((T)1 + t) + (T)0.5 * x * ((T)1 - t * t) * du);")

row_kernels(ROW_COMMON + r"""
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
""", "softmax_forward", "softmax_backward")


def _gelu_name(approximate, direction):
    if approximate == "none":
        return f"gelu_{direction}"
    if approximate == "tanh":
        return f"gelu_tanh_{direction}"
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_forward(x, approximate="none"):
    """GELU (exact erf form or tanh approximation) in one elementwise kernel."""
    return elementwise(_gelu_name(approximate, "forward"))(x)


def gelu_backward(grad, x, approximate="none"):
    """dx = g · GELU'(x), recomputing Φ(x) (or tanh u) from x instead of storing it."""
    return elementwise(_gelu_name(approximate, "backward"))(grad, x)


# -- softmax ----------------------------------------------------------------------------------
def softmax(x, log=False, lse=None):
    """softmax (or log_softmax with log=True) over the last axis, one block per row. With
    `lse` (an array of one element per row) each row's log Σ eˣ is written there too."""
    cp = cupy()
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    cols = x.shape[-1] if x.ndim else 1
    if x.size:
        launch_rows("softmax_forward", x.dtype, x.size // cols, cols,
                     (x, out, out if lse is None else lse, np.int32(cols),
                      np.int32(1 if log else 0), np.int32(lse is not None)))
    return out


def softmax_backward(probs, grad):
    """p ⊙ (g − Σ g ⊙ p) over the last axis, one block per row."""
    cp = cupy()
    probs, grad = cp.ascontiguousarray(probs), cp.ascontiguousarray(grad)
    out = cp.empty_like(grad)
    cols = grad.shape[-1] if grad.ndim else 1
    if grad.size:
        launch_rows("softmax_backward", grad.dtype, grad.size // cols, cols,
                     (probs, grad, out, np.int32(cols)))
    return out
