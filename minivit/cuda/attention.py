"""Self-attention on the GPU: batched cuBLAS GEMMs straight on the packed qkv.

cuBLAS batched GEMMs take one address per matrix, so q, k, v are read where they lie in qkv
(B, N, 3D) and O is written straight into (B, n, H, d) = (B, n, D): no split, merge or
transpose copies (each was a full pass over memory), and the scale rides on alpha. The
softmax is minivit.cuda.activation's row kernel; P need not be kept for backward, which can
rebuild it from one log-sum-exp per row.

An additive bias B (relative position bias, Swin's shift mask) is added to the scores buffer
in one elementwise pass between the score GEMM and the softmax (CuPy's broadcasting add reads B
through its own strides, so a (heads, n, N) bias is never copied out to (B, heads, n, N)), and
inside the kernel that rebuilds P in backward; its gradient is dS, which backward returns.

With half GEMMs on (minivit.precision bf16/fp16), qkv, P, dO and dS are rounded to the half
format as GEMM operands (gemm_operand) while S, P, dP, dS, the softmax and O stay float32
(fp32 accumulation); the rounded qkv is what backward keeps.
"""

from minivit.cuda.activation import softmax, softmax_backward
from minivit.cuda.device import cupy, elementwise, elementwise_kernel
from minivit.cuda.gemm import batch_pointers, gemm_batched, gemm_operand, operand_format
from minivit.cuda.settings import half_gemms

# attention probabilities again from the scores and each row's lse: p = e^(s − lse), or
# p = e^(s + b − lse) with the bias b broadcast to the scores (i runs over the scores)
elementwise_kernel("attention_probs", "T s, raw T lse, int32 cols", "T p",
                   "p = mv_exp(s - lse[i / cols]);")
elementwise_kernel("attention_probs_bias", "T s, T b, raw T lse, int32 cols", "T p",
                   "p = mv_exp(s + b - lse[i / cols]);")


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
    """S = q kᵀ·s for every (batch, head), written into `out` (B, H, queries, N); qkv may
    hold half operands (then S is float32 all the same)."""
    gemm_batched(qkv.dtype, h.count, h.queries, h.tokens, h.head_dim, h.packed(qkv, 0), h.width,
                  False, h.packed(qkv, 1), h.width, True, h.scores(out), h.tokens, scale)
    return out


def attention_forward(qkv, heads, queries, scale, bias=None):
    """Self-attention of the first `queries` tokens from a C-contiguous packed qkv (B, N, 3D):
    S = q kᵀ·s (+ bias), P = softmax(S), O = P v. `bias`: a CuPy array of qkv's dtype that
    broadcasts to the scores (B, H, queries, N) (the caller slices a bias of all N rows).
    Returns (O as (B, queries, D), P (B, H, queries, N), lse (B, H, queries) = log Σ e^S per
    row: backward can rebuild P from it, e^(S − lse), so a caller need not keep the N×N
    probabilities, and qkv as the GEMMs read it: rounded to the half format when half GEMMs
    are on, for backward to keep)."""
    cp = cupy()
    dtype, half_format = qkv.dtype, half_gemms()
    qkv = gemm_operand(qkv, half_format)
    h = _Heads(qkv, heads, queries)
    lse = cp.empty((h.batch, heads, queries), dtype)
    scores = _scores(qkv, h, scale, cp.empty((h.batch, heads, queries, h.tokens), dtype))
    if bias is not None:
        cp.add(scores, bias, out=scores)  # one pass; B read through its broadcast strides
    probs = softmax(scores, lse=lse)
    del scores
    out = cp.empty((h.batch, queries, h.dim), dtype)
    gemm_batched(qkv.dtype, h.count, queries, h.head_dim, h.tokens,
                  h.scores(gemm_operand(probs, half_format)), h.tokens, False, h.packed(qkv, 2),
                  h.width, False, h.merged(out), h.dim)
    return out, probs, lse, qkv


def attention_backward(grad, qkv, probs, lse, heads, scale, bias=None):
    """(d qkv (B, N, 3D), dS (B, H, queries, N)) from dO (B, queries, D): dv = Pᵀ dO;
    dP = dO vᵀ; dS = P ⊙ (dP − Σ dP ⊙ P); dq = dS k·s (0 for tokens that did not ask);
    dk = dSᵀ q·s. dS is what a bias's gradient is summed from (minivit.functional.attention).
    probs None: P is rebuilt as e^(q kᵀ·s + bias − lse) (one GEMM and one elementwise pass;
    `bias` as attention_forward took it). `qkv`: as attention_forward returned it (half
    operands: P, dO and dS are rounded alike)."""
    cp = cupy()
    queries, half_format = lse.shape[2], operand_format(qkv.dtype)
    h = _Heads(qkv, heads, queries)
    if probs is None:
        probs = _scores(qkv, h, scale, cp.empty(lse.shape + (h.tokens,), lse.dtype))
        if bias is None:
            elementwise("attention_probs")(probs, lse, h.tokens, probs)
        else:
            elementwise("attention_probs_bias")(probs, bias, lse, h.tokens, probs)
    grad = cp.ascontiguousarray(grad)
    grad_qkv = cp.empty(qkv.shape, lse.dtype)
    if queries < h.tokens:
        grad_qkv.reshape(h.batch, h.tokens, 3, h.dim)[:, queries:, 0] = 0
    dtype, count, d, n, width = qkv.dtype, h.count, h.head_dim, h.tokens, h.width
    grad = gemm_operand(grad, half_format)
    p, g = h.scores(gemm_operand(probs, half_format)), h.merged(grad)
    gemm_batched(dtype, count, n, d, queries, p, n, True, g, h.dim, False,
                  h.packed(grad_qkv, 2), width)                                 # dv = Pᵀ dO
    grad_probs = cp.empty_like(probs)
    gemm_batched(dtype, count, queries, n, d, g, h.dim, False, h.packed(qkv, 2), width, True,
                  h.scores(grad_probs), n)                                      # dP = dO vᵀ
    grad_scores = softmax_backward(probs, grad_probs)
    del grad_probs, probs
    ds = h.scores(gemm_operand(grad_scores, half_format))
    gemm_batched(dtype, count, queries, d, n, ds, n, False, h.packed(qkv, 1), width, False,
                  h.packed(grad_qkv, 0), width, scale)                          # dq = dS k·s
    gemm_batched(dtype, count, n, d, queries, ds, n, True, h.packed(qkv, 0), width, False,
                  h.packed(grad_qkv, 1), width, scale)                          # dk = dSᵀ q·s
    return grad_qkv, grad_scores
