"""Column sums on the GPU (bias gradients, LayerNorm's dw and db): a coalesced Σ over rows
(CuPy's own sum(axis=0) reads each column with a row-sized stride)."""

import numpy as np

from minivit.cuda.device import cupy, row_kernel, row_kernels

# Column sums of a C-contiguous (rows, cols) array: sums_c = Σ_r a_rc and, with_dot, dots_c =
# Σ_r a_rc b_rc. Block (32, 8): a warp reads 32 neighbouring columns of one row (coalesced), the
# 8 warps take every 8th row of the block's chunk; grid (column tiles, row chunks) writes one
# partial row per chunk, which a second launch over the (chunks, cols) partials sums.
row_kernels(r"""
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
""", "column_sums")

_COLUMN_BLOCKS = 512  # blocks to aim for: a few per multiprocessor (132 on an H100)


def _column_pass(a, b, rows, cols, max_chunks=_COLUMN_BLOCKS):
    """One launch of column_sums over (rows, cols): returns (sums, dots or None), each of shape
    (chunks, cols), chunks <= max_chunks chosen so the grid has about _COLUMN_BLOCKS blocks."""
    cp = cupy()
    tiles = (cols + 31) // 32
    chunks = max(1, min((rows + 7) // 8, _COLUMN_BLOCKS // tiles, max_chunks))
    chunk_rows = (rows + chunks - 1) // chunks
    chunks = (rows + chunk_rows - 1) // chunk_rows
    sums = cp.empty((chunks, cols), a.dtype)
    dots = cp.empty((chunks, cols), a.dtype) if b is not None else None
    row_kernel("column_sums", a.dtype)(
        (tiles, chunks), (32, 8),
        (a, a if b is None else b, sums, sums if dots is None else dots, np.int32(rows),
         np.int32(cols), np.int32(chunk_rows), np.int32(b is not None)))
    return sums, dots


def column_sums(a, b=None):
    """Σ over the rows of a 2-D array `a` (its column sums), and with `b` (same shape) also
    Σ_rows a ⊙ b, in one coalesced pass: (sums, dots or None), each of shape (cols,)."""
    cp = cupy()
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
