"""GEMMs on minivit's threads: one BLAS thread per block (see minivit.cpu.runtime for why).

Large products are split into blocks that the pool's threads take from a shared counter:
dx = dy W by row blocks, dW = dyᵀ x by blocks of the summed-over rows (partials added at the
end in a fixed order, so results do not depend on which thread ran what): 1.9x on 2 cores for
the cifar GEMMs.
"""

import numpy as np

from minivit.cpu import pool
from minivit.cpu.pool import blocks, run_tasks
from minivit.cpu.runtime import split_gemms, state


def matmul(a, b, out=None, bias=None):
    """out = a @ b (+ bias) for 2-D a (m, k) and b (k, n), any strides; row blocks of `a` run
    on minivit's threads when the product is large enough."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.result_type(a, b))
    if not split_gemms() or m * k * n < pool.MIN_SPLIT_MACS or m < 2 * pool.MIN_BLOCK_ROWS:
        np.matmul(a, b, out=out)
        if bias is not None:
            out += bias
        return out
    rows = max(pool.MIN_BLOCK_ROWS, -(-m // (4 * state["threads"])))  # ~4 per thread: balance

    def task(start, stop):
        np.matmul(a[start:stop], b, out=out[start:stop])
        if bias is not None:
            out[start:stop] += bias

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in blocks(m, rows)])
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
    if not split_gemms() or macs < pool.MIN_SPLIT_MACS or rows < 2 * pool.MIN_BLOCK_ROWS:
        if grad_x is not None:
            np.matmul(grad2d, weight, out=grad_x)
        grad_w = np.matmul(grad2d.T, x2d) if needs[1] else None
        grad_b = np.matmul(ones, grad2d) if needs[2] else None
        return grad_x, grad_w, grad_b
    threads = state["threads"]
    tasks = []
    if grad_x is not None:
        step = max(pool.MIN_BLOCK_ROWS, -(-rows // (3 * threads)))
        for s, e in blocks(rows, step):
            tasks.append(lambda s=s, e=e: np.matmul(grad2d[s:e], weight, out=grad_x[s:e]))
    parts = []
    if needs[1] or needs[2]:
        parts = blocks(rows, max(pool.MIN_BLOCK_ROWS, -(-rows // (2 * threads))))
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
