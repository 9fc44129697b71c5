"""Cross-entropy on the GPU: per row one thread block computes the log-sum-exp and the row's
loss (integer labels or soft targets); backward is one elementwise kernel per gradient."""

import numpy as np

from minivit.cuda.device import (ROW_COMMON, cupy, elementwise, elementwise_kernel, launch_rows,
                                 row_kernels)

row_kernels(ROW_COMMON + r"""
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
""", "cross_entropy_labels", "cross_entropy_soft")

# backward, integer labels (Σq = 1): dx = (p − q)·scale, p = e^(d − L)
elementwise_kernel(
    "cross_entropy_labels_backward",
    "raw T x, raw T row_max, raw T row_logsum, raw int64 labels, T scale, T smoothing, int32 cols",
    "T dx",
    "const long long row = i / cols;\n"
    "const T p = mv_exp((x[i] - row_max[row]) - row_logsum[row]);\n"
    "T q = smoothing / (T)cols;\n"
    "if (i - row * cols == labels[row]) q += (T)1 - smoothing;\n"
    "dx = (p - q) * scale;")
# backward, soft targets: dx = (p Σq − q)·scale
elementwise_kernel(
    "cross_entropy_soft_backward",
    "raw T x, raw T target, raw T row_max, raw T row_logsum, raw T row_qsum, T scale, "
    "T smoothing, int32 cols", "T dx",
    "const long long row = i / cols;\n"
    "const T p = mv_exp((x[i] - row_max[row]) - row_logsum[row]);\n"
    "const T q = target[i] * ((T)1 - smoothing) + smoothing / (T)cols;\n"
    "dx = (p * row_qsum[row] - q) * scale;")
# gradient of the soft target: dq = −log p · scale (1 − ε)
elementwise_kernel(
    "cross_entropy_target_backward",
    "raw T x, raw T row_max, raw T row_logsum, T scale, T smoothing, int32 cols", "T dq",
    "const long long row = i / cols;\n"
    "dq = -((x[i] - row_max[row]) - row_logsum[row]) * (scale * ((T)1 - smoothing));")


def cross_entropy_forward(logits, target, label_smoothing=0.0):
    """Mean cross-entropy of (B, K) logits against integer labels (B,) or soft targets (B, K),
    already validated by the caller. Returns (loss as a 0-d array, saved state for backward)."""
    cp = cupy()
    x = cp.ascontiguousarray(logits)
    batch, classes = x.shape
    dtype = x.dtype
    row_max, row_logsum, row_loss = (cp.empty(batch, dtype) for _ in range(3))
    smoothing = dtype.type(label_smoothing)
    if target.dtype.kind in "iu":
        labels = cp.ascontiguousarray(target.astype(cp.int64, copy=False))
        launch_rows("cross_entropy_labels", dtype, batch, classes,
                     (x, labels, row_max, row_logsum, row_loss, np.int32(classes), smoothing))
        soft, row_qsum = None, None
    else:
        soft = cp.ascontiguousarray(target.astype(dtype, copy=False))
        row_qsum = cp.empty(batch, dtype)
        launch_rows("cross_entropy_soft", dtype, batch, classes,
                     (x, soft, row_max, row_logsum, row_qsum, row_loss, np.int32(classes),
                      smoothing))
        labels = None
    saved = (x, labels, soft, row_max, row_logsum, row_qsum, smoothing)
    return row_loss.sum() / batch, saved


def cross_entropy_backward(grad, saved, need_target_grad=False):
    """(d logits, d target or None) from cross_entropy_forward's saved state; grad is the 0-d
    gradient of the loss (kept on the device: no host synchronisation)."""
    x, labels, soft, row_max, row_logsum, row_qsum, smoothing = saved
    cp = cupy()
    batch, classes = x.shape
    scale = grad / batch  # 0-d, broadcast over the flat (B·K,) outputs; raw arrays use index i
    flat_x = x.reshape(-1)
    grad_x = cp.empty(x.size, x.dtype)
    if soft is None:
        elementwise("cross_entropy_labels_backward")(
            flat_x, row_max, row_logsum, labels, scale, smoothing, classes, grad_x)
    else:
        elementwise("cross_entropy_soft_backward")(
            flat_x, soft.reshape(-1), row_max, row_logsum, row_qsum, scale, smoothing, classes,
            grad_x)
    grad_target = None
    if need_target_grad:
        grad_target = cp.empty(x.size, x.dtype)
        elementwise("cross_entropy_target_backward")(
            flat_x, row_max, row_logsum, scale, smoothing, classes, grad_target)
        grad_target = grad_target.reshape(batch, classes)
    return grad_x.reshape(batch, classes), grad_target
