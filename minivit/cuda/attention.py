"""Self-attention on the GPU: batched cuBLAS GEMMs straight on the packed qkv.

cuBLAS batched GEMMs take one address per matrix, so q, k, v are read where they lie in qkv
(B, N, 3D) and O is written straight into (B, n, H, d) = (B, n, D): no split, merge or
transpose copies (each was a full pass over memory), and the scale rides on alpha. The
softmax is minivit.cuda.activation's row kernel; P need not be kept for backward, which can
rebuild it from one log-sum-exp per row.
"""

from minivit.cuda.activation import softmax, softmax_backward
from minivit.cuda.device import cupy, elementwise, elementwise_kernel
from minivit.cuda.gemm import batch_pointers, gemm_batched

# attention probabilities again from the scores and each row's lse: p = e^(s − lse)
elementwise_kernel("attention_probs", "T s, raw T lse, int32 cols", "T p",
                   "p = mv_exp(s - lse[i / cols]);")


class _Heads:
    """Addresses of the per-(batch, head) matrices of one self-attention call."""

    def __init__(self, qkv, heads, queries):
        self.batch, self.tokens, self.width = qkv.shape
        self.dim = self.width // 3
        self.head_dim, self.heads, self.queries = self.dim // heads, heads, queries
        self.count, self.grid = self.batch * heads, (self.batch, heads)

    def packed(self, array, part):
        """q (part 0), k (1) or v (2) of head h in (B, N, 3D): row stride 3D."""
        return batch_pointers(array, part * self.dim, (self.tokens * self.width, self.head_dim),
                               self.grid)

    def merged(self, array):
        """Head h of (B, n, D): row stride D."""
        return batch_pointers(array, 0, (self.queries * self.dim, self.head_dim), self.grid)

    def scores(self, array):
        """(B, H, n, N) C-contiguous: row stride N."""
        size = self.queries * self.tokens
        return batch_pointers(array, 0, (self.heads * size, size), self.grid)


def _scores(qkv, h, scale, out):
    """S = q kᵀ·s for every (batch, head), written into `out` (B, H, queries, N)."""
    gemm_batched(qkv.dtype, h.count, h.queries, h.tokens, h.head_dim, h.packed(qkv, 0), h.width,
                  False, h.packed(qkv, 1), h.width, True, h.scores(out), h.tokens, scale)
    return out


def attention_forward(qkv, heads, queries, scale):
    """Self-attention of the first `queries` tokens from a C-contiguous packed qkv (B, N, 3D):
    S = q kᵀ·s, P = softmax(S), O = P v. Returns (O as (B, queries, D), P (B, H, queries, N),
    lse (B, H, queries) = log Σ e^S per row: backward can rebuild P from it, e^(S − lse), so a
    caller need not keep the N×N probabilities)."""
    cp = cupy()
    h = _Heads(qkv, heads, queries)
    lse = cp.empty((h.batch, heads, queries), qkv.dtype)
    probs = softmax(_scores(qkv, h, scale, cp.empty((h.batch, heads, queries, h.tokens),
                                                    qkv.dtype)), lse=lse)
    out = cp.empty((h.batch, queries, h.dim), qkv.dtype)
    gemm_batched(qkv.dtype, h.count, queries, h.head_dim, h.tokens, h.scores(probs), h.tokens,
                  False, h.packed(qkv, 2), h.width, False, h.merged(out), h.dim)
    return out, probs, lse


def attention_backward(grad, qkv, probs, lse, heads, scale):
    """d qkv (B, N, 3D) from dO (B, queries, D): dv = Pᵀ dO; dP = dO vᵀ;
    dS = P ⊙ (dP − Σ dP ⊙ P); dq = dS k·s (0 for tokens that did not ask); dk = dSᵀ q·s.
    probs None: P is rebuilt as e^(q kᵀ·s − lse) (one GEMM and one elementwise pass)."""
    cp = cupy()
    queries = lse.shape[2]
    h = _Heads(qkv, heads, queries)
    if probs is None:
        probs = _scores(qkv, h, scale, cp.empty(lse.shape + (h.tokens,), qkv.dtype))
        elementwise("attention_probs")(probs, lse, h.tokens, probs)
    grad = cp.ascontiguousarray(grad)
    grad_qkv = cp.empty_like(qkv)
    if queries < h.tokens:
        grad_qkv.reshape(h.batch, h.tokens, 3, h.dim)[:, queries:, 0] = 0
    dtype, count, d, n, width = qkv.dtype, h.count, h.head_dim, h.tokens, h.width
    p, g = h.scores(probs), h.merged(grad)
    gemm_batched(dtype, count, n, d, queries, p, n, True, g, h.dim, False,
                  h.packed(grad_qkv, 2), width)                                 # dv = Pᵀ dO
    grad_probs = cp.empty_like(probs)
    gemm_batched(dtype, count, queries, n, d, g, h.dim, False, h.packed(qkv, 2), width, True,
                  h.scores(grad_probs), n)                                      # dP = dO vᵀ
    grad_scores = softmax_backward(probs, grad_probs)
    del grad_probs, probs
    ds = h.scores(grad_scores)
    gemm_batched(dtype, count, queries, d, n, ds, n, False, h.packed(qkv, 1), width, False,
                  h.packed(grad_qkv, 0), width, scale)                          # dq = dS k·s
    gemm_batched(dtype, count, n, d, queries, ds, n, True, h.packed(qkv, 0), width, False,
                  h.packed(grad_qkv, 1), width, scale)                          # dk = dSᵀ q·s
    return grad_qkv
