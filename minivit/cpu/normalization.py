"""LayerNorm over row blocks on minivit's threads: chunked NumPy (row statistics as GEMVs) or
minivit.cpu.compiled's one-pass kernels. dw and db are summed per block into partials that are
added at the end in a fixed order (deterministic whatever thread ran which block).
"""

import numpy as np

from minivit.cpu import pool
from minivit.cpu.pool import contiguous, row_blocks, run_rows, run_tasks, scratch
from minivit.cpu.runtime import compiled


# -- layer_norm: x̂ = (x − μ)·r, r = 1/√(σ² + ε);  y = x̂ w + b
#    dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂)),  dx̂ = dy w;  dw = Σ dy ⊙ x̂;  db = Σ dy
def _row_mean_vector(features, dtype):
    """A (features,) vector of 1/features: x @ it is the row mean as one GEMV (much cheaper
    in NumPy than a keepdims reduction over short rows)."""
    return np.full(features, 1.0 / features, dtype=dtype)


def layer_norm_forward(x, weight, bias, eps):
    """(y, x̂, r) over the last dimension, row blocks on minivit's threads."""
    features = x.shape[-1]
    x2 = contiguous(x).reshape(-1, features)
    rows = x2.shape[0]
    f = x2.dtype.type
    out = np.empty_like(x2)
    normalized = np.empty_like(x2)
    rstd = np.empty((rows, 1), x2.dtype)
    mean_of = _row_mean_vector(features, x2.dtype)
    kernels = compiled()

    def task(s, e):
        if kernels is not None:
            kernels.layer_norm_forward(x2[s:e], weight, bias, eps, out[s:e], normalized[s:e],
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

    run_rows(task, rows, features)
    shape = x.shape
    return out.reshape(shape), normalized.reshape(shape), rstd.reshape(shape[:-1] + (1,))


def layer_norm_backward(grad, normalized, rstd, weight, needs):
    features = grad.shape[-1]
    g2 = contiguous(grad).reshape(-1, features)
    n2 = normalized.reshape(-1, features)
    r2 = rstd.reshape(-1, 1)
    rows = g2.shape[0]
    mean_of = _row_mean_vector(features, g2.dtype)
    grad_x = np.empty_like(g2) if needs[0] else None
    blocks = row_blocks(rows, features)
    ones = np.ones(max((e - s for s, e in blocks), default=0), g2.dtype)
    kernels = compiled()
    partial_dtype = np.float64 if kernels is not None else g2.dtype  # the kernel adds into it
    partial_w = np.zeros((len(blocks), features), partial_dtype) if needs[1] else None
    partial_b = np.zeros((len(blocks), features), partial_dtype) if needs[2] else None

    def task(index, s, e):
        if kernels is not None:
            kernels.layer_norm_backward(
                g2[s:e], n2[s:e], r2[s:e, 0], weight, None if grad_x is None else grad_x[s:e],
                None if partial_w is None else partial_w[index],
                None if partial_b is None else partial_b[index])
            return
        gs, ns, count = g2[s:e], n2[s:e], e - s
        if partial_b is not None:
            np.matmul(ones[:count], gs, out=partial_b[index])      # Σ dy (column sums, GEMV)
        tmp = scratch(gs.size, gs.dtype, 5).reshape(gs.shape)
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
              parallel=g2.size >= pool.MIN_PARALLEL_ROWS)
    grad_w = partial_w.sum(axis=0).astype(g2.dtype, copy=False) if needs[1] else None
    grad_b = partial_b.sum(axis=0).astype(g2.dtype, copy=False) if needs[2] else None
    return (None if grad_x is None else grad_x.reshape(grad.shape)), grad_w, grad_b
