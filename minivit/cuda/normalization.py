"""LayerNorm on the GPU: forward, one thread block per row (mean, variance, x̂, y, 1/σ in one
pass); backward dx one block per row, dw and db as column sums."""

import numpy as np

from minivit.cuda.device import ROW_COMMON, cupy, launch_rows, row_kernels
from minivit.cuda.reduction import column_sums

row_kernels(ROW_COMMON + r"""
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
""", "layer_norm_forward", "layer_norm_backward")


def layer_norm_forward(x, weight, bias, eps):
    """(y, x̂, rstd) for LayerNorm over the last axis; rstd has shape x.shape[:-1] + (1,), as in
    the NumPy path. weight/bias None mean 1/0."""
    cp = cupy()
    x = cp.ascontiguousarray(x)
    cols = x.shape[-1]
    rows = x.size // cols if cols else 0
    weight = cp.ones(cols, x.dtype) if weight is None else cp.ascontiguousarray(weight)
    bias = cp.zeros(cols, x.dtype) if bias is None else cp.ascontiguousarray(bias)
    out, normalized = cp.empty_like(x), cp.empty_like(x)
    rstd = cp.empty(x.shape[:-1] + (1,), x.dtype)
    launch_rows("layer_norm_forward", x.dtype, rows, cols,
                 (x, weight, bias, out, normalized, rstd, np.int32(cols), x.dtype.type(eps)))
    return out, normalized, rstd


def layer_norm_backward(grad, normalized, rstd, weight, needs_input_grad):
    """(dx, dw, db) of LayerNorm from the saved x̂ and rstd; None where not needed."""
    cp = cupy()
    need_x, need_w, need_b = (tuple(needs_input_grad) + (False, False, False))[:3]
    grad = cp.ascontiguousarray(grad)
    cols = grad.shape[-1]
    rows = grad.size // cols if cols else 0
    grad_x = grad_w = grad_b = None
    if need_x:
        w = cp.ones(cols, grad.dtype) if weight is None else cp.ascontiguousarray(weight)
        grad_x = cp.empty_like(grad)
        launch_rows("layer_norm_backward", grad.dtype, rows, cols,
                     (grad, cp.ascontiguousarray(normalized), cp.ascontiguousarray(rstd), w,
                      grad_x, np.int32(cols)))
    if need_w or need_b:  # db = Σ dy and dw = Σ dy ⊙ x̂ over the rows, in one pass
        grad_b, grad_w = column_sums(grad.reshape(rows, cols),
                                     normalized.reshape(rows, cols) if need_w else None)
    return grad_x, grad_w if need_w else None, grad_b if need_b else None
