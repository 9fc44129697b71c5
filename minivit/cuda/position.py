"""The relative position bias's backward on the GPU: the scatter-add of the (heads, N, M)
gradient into the (entries, heads) table through the fixed index, one atomicAdd per element.
CuPy's bincount would size its output from the index's maximum, read back to the host: a sync
per block per step, and a CUDA-graph capture refuses it; here the size is the table's."""

import numpy as np

from minivit.cuda.device import cupy, row_kernel, row_kernels

# dT[I[p], h] += g[h, p] for each head h and pair p = n·M + m of the C-contiguous g (heads, N·M)
# and I (N·M); atomics: the pairs that share an entry add in no fixed order (not bit-for-bit
# reproducible, unlike the CPU's bincount).
row_kernels(r"""
extern "C" __global__ void relative_position_bias_grad(
        const T* __restrict__ grad, const long long* __restrict__ index,
        T* __restrict__ table_grad, const int heads, const long long pairs) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= heads * pairs) return;
    const long long head = i / pairs;
    atomicAdd(&table_grad[index[i - head * pairs] * heads + head], grad[i]);
}
""", "relative_position_bias_grad")

_THREADS = 256


def relative_position_bias_backward(grad, index, table_shape):
    """d table (entries, heads) of b[h, n, m] = table[index[n, m], h] for the upstream `grad`
    (heads, N, M); `index` (N, M) is a device integer array within the table (checked on the
    host before it was placed)."""
    cp = cupy()
    grad = cp.ascontiguousarray(grad)
    index = cp.ascontiguousarray(index, dtype=np.int64)
    table_grad = cp.zeros(table_shape, grad.dtype)
    heads, pairs = grad.shape[0], index.size
    if grad.size:
        row_kernel("relative_position_bias_grad", grad.dtype)(
            ((grad.size + _THREADS - 1) // _THREADS,), (_THREADS,),
            (grad, index, table_grad, np.int32(heads), np.int64(pairs)))
    return table_grad
