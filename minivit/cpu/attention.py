"""Scaled dot-product attention on minivit's threads: per block of (batch, head) pairs, q kᵀ,
softmax and P v while the block's scores are in cache; q, k, v, out and the gradients may be
strided views (of the packed qkv projection, say).
"""

import numpy as np

from minivit.cpu import pool
from minivit.cpu.activation import row_sums, softmax_rows
from minivit.cpu.pool import blocks, run_tasks, scratch
from minivit.cpu.runtime import compiled, state


# -- attention: S = q kᵀ·s, P = softmax(S), O = P v
#    dv = Pᵀ dO;  dP = dO vᵀ;  dS = P ⊙ (dP − Σ dP ⊙ P);  dq = dS k·s;  dk = dSᵀ q·s
def _batch_blocks(batch, per_item):
    per = max(1, (1 << 17) // max(per_item, 1))  # ~128K elements of scores per block
    per = min(per, max(1, -(-batch // (2 * state["threads"]))))
    return blocks(batch, per)


def attention_forward(q, k, v, scale, out):
    """P = softmax(q kᵀ·scale) and out[...] = P v for (B, H, N, d) arrays of any strides
    (out may be a strided view). Returns P (B, H, N, N)."""
    batch, heads, tokens, _ = q.shape
    probs = np.empty((batch, heads, tokens, k.shape[2]), q.dtype)
    in_place = compiled() is None  # the compiled softmax wants its scores in another buffer

    def task(s, e):
        p = probs[s:e]
        scores = p if in_place else scratch(p.size, p.dtype, 6).reshape(p.shape)
        np.matmul(q[s:e], k[s:e].swapaxes(-1, -2), out=scores)
        softmax_rows(scores, p, scale)
        np.matmul(p, v[s:e], out=out[s:e])

    run_tasks([lambda s=s, e=e: task(s, e)
               for s, e in _batch_blocks(batch, heads * tokens * k.shape[2])],
              parallel=probs.size >= pool.MIN_PARALLEL_ROWS)
    return probs


def attention_backward(grad, q, k, v, probs, scale, grad_q, grad_k, grad_v):
    """Write dq, dk, dv (views of any strides, or None) for upstream grad dO (B, H, N, d)."""
    batch, heads, tokens, keys = probs.shape
    f = probs.dtype.type
    kernels = compiled()

    def task(s, e):
        p, g = probs[s:e], grad[s:e]
        if grad_v is not None:
            np.matmul(p.swapaxes(-1, -2), g, out=grad_v[s:e])
        if grad_q is None and grad_k is None:
            return
        ds = scratch(p.size, p.dtype, 6).reshape(p.shape)
        tmp = scratch(p.size, p.dtype, 7).reshape(p.shape)
        if kernels is not None:                                 # dS·s from dP in tmp
            np.matmul(g, v[s:e].swapaxes(-1, -2), out=tmp)
            kernels.softmax_backward(p.reshape(-1, keys), tmp.reshape(-1, keys),
                                      ds.reshape(-1, keys), f(scale))
        else:
            np.matmul(g, v[s:e].swapaxes(-1, -2), out=ds)       # dP
            np.multiply(ds, p, out=tmp)
            dot = row_sums(tmp)
            ds -= dot
            ds *= p
            ds *= f(scale)                                       # dS·s
        if grad_q is not None:
            np.matmul(ds, k[s:e], out=grad_q[s:e])
        if grad_k is not None:
            np.matmul(ds.swapaxes(-1, -2), q[s:e], out=grad_k[s:e])

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in _batch_blocks(batch, heads * tokens * keys)],
              parallel=probs.size >= pool.MIN_PARALLEL_ROWS)
