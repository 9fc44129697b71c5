"""Scaled dot-product attention as one Function (batched matmuls, fused softmax backward), and
self-attention straight from the packed qkv projection (no split/merge copies). Fast
implementations: minivit.cpu.attention (CPU) and minivit.cuda.attention (GPU, self-attention)."""

import math

from minivit import backend
from minivit.cpu import attention as cpu_attention
from minivit.cuda import attention as cuda_attention
from minivit.errors import ShapeError
from minivit.functional.activation import row_softmax
from minivit.functional.registry import DispatchedFunction, implementation


# -- attention: S = q kᵀ·s (s = d^-½), P = softmax(S), O = P v
#    dv = Pᵀ dO;  dP = dO vᵀ;  dS = P ⊙ (dP − Σ dP ⊙ P);  dq = dS k·s;  dk = dSᵀ q·s
#    Every implementation saves (P, q, k, v, s), P first as return_attention hands it out; the
#    plain one also the softmax implementation it ran (its backward runs the same one).
class ScaledDotProductAttention(DispatchedFunction):
    def forward(self, q, k, v, scale=None):
        if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ShapeError(f"attention: expected q, k, v of shape (B, heads, N, d) with k "
                             f"equal to q and v matching (B, heads, N); got q {q.shape}, "
                             f"k {k.shape}, v {v.shape}")
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        q, k, v = (backend.matmul_operand(a) for a in (q, k, v))
        out = self.dispatch("attention", (q, k, v), q, k, v, self.scale)
        self.probs = self.saved[0]
        return out


def scaled_dot_product_attention(q, k, v, scale=None, return_attention=False):
    """softmax(q kᵀ / √d) v for q, k, v of shape (B, heads, N, d).

    With return_attention=True also returns the attention probabilities (B, heads, N, N) as a
    raw array (no gradient): they are computed anyway, so asking costs nothing."""
    function = ScaledDotProductAttention()
    out = function(q, k, v, scale=scale)
    if return_attention:
        return out, function.probs
    return out


@implementation("attention", "cpu")
class _BlockedAttention:  # per batch block: q kᵀ, softmax, P v while in cache
    def forward(q, k, v, scale):
        out = backend.array_module(q).empty(q.shape[:3] + v.shape[3:], q.dtype)
        return out, (cpu_attention.attention_forward(q, k, v, scale, out), q, k, v, scale)

    def backward(saved, grad, needs):
        probs, q, k, v, scale = saved
        xp = backend.array_module(grad)
        grads = [xp.empty(a.shape, a.dtype) if need else None for a, need in zip((q, k, v), needs)]
        cpu_attention.attention_backward(grad, q, k, v, probs, scale, *grads)
        return tuple(grads)


@implementation("attention", "plain")
class _PlainAttention:  # (on CuPy the softmax runs in the fused row kernels)
    def forward(q, k, v, scale):
        scores = q @ k.swapaxes(-1, -2)
        scores *= scale
        probs, softmax = row_softmax(scores)
        return probs @ v, (probs, q, k, v, scale, softmax)

    def backward(saved, grad, needs):
        probs, q, k, v, scale, softmax = saved
        grad = backend.matmul_operand(grad)
        grad_v = probs.swapaxes(-1, -2) @ grad if needs[2] else None
        grad_scores = softmax.backward((probs, -1), grad @ v.swapaxes(-1, -2), (True,))[0]
        grad_scores *= scale
        grad_q = grad_scores @ k if needs[0] else None
        grad_k = grad_scores.swapaxes(-1, -2) @ q if needs[1] else None
        return grad_q, grad_k, grad_v


# -- self-attention from the packed projection: qkv (B, N, 3D) is viewed as (B, N, 3, H, d);
#    q, k, v are its three (B, H, N, d) slices and O = attention(q, k, v) is written back as
#    (B, N, H, d) = (B, N, D). Same math as above; dqkv gathers dq, dk, dv into the packed
#    layout directly (no zero-filled scatter per slice, no split or merge copies).
#    queries=n: only the first n tokens ask (q is (B, H, n, d), O is (B, n, D)); every token
#    is still a key and a value, and dq is zero for the tokens that did not ask.
#    saved, P first (or None where the GPU does not keep it): CPU and plain (P, q, k, v, s,
#    qkv's shape) with q unscaled, plain also its softmax; GPU (P, qkv, lse, heads, s).
def _split_heads(qkv, num_heads):
    batch, tokens, width = qkv.shape
    if width % (3 * num_heads):
        raise ShapeError(f"self_attention: the packed qkv width {width} must be 3 · heads · "
                         f"head_dim for {num_heads} heads (timm's Attention.qkv layout)")
    packed = qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads))
    return [packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]  # (B, H, N, d) views


class SelfAttention(DispatchedFunction):
    def forward(self, qkv, num_heads, scale=None, queries=None, keep_probs=True):
        if qkv.ndim != 3:
            raise ShapeError(f"self_attention: expected qkv of shape (B, N, 3·D); got {qkv.shape}")
        if queries is not None and not 1 <= queries <= qkv.shape[1]:
            raise ShapeError(f"self_attention: queries must be between 1 and the {qkv.shape[1]} "
                             f"tokens; got {queries}")
        head_dim = _split_heads(qkv, num_heads)[0].shape[-1]  # (checks the width)
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        out = self.dispatch("self_attention", (qkv,), qkv, num_heads, scale,
                            queries or qkv.shape[1], keep_probs)
        self.probs = self.saved[0]
        return out


def self_attention(qkv, num_heads, scale=None, return_attention=False, queries=None):
    """Multi-head self-attention from the packed qkv projection (B, N, 3·D) — timm's layout,
    (B, N, 3, heads, head_dim) — to the merged heads (B, N, D), ready for the output
    projection. Equal to splitting q, k, v and calling scaled_dot_product_attention, without
    the split and merge copies. return_attention=True also returns the probabilities
    (B, heads, N, N) as a raw array. queries=n computes the outputs of the first n tokens only
    (B, n, D), attending to all N: the rows [:, :n] of the full result, for less work.
    On the GPU the N×N probabilities are kept for backward only with return_attention=True;
    otherwise backward rebuilds them from one log-sum-exp per row (less memory)."""
    function = SelfAttention()
    out = function(qkv, num_heads=num_heads, scale=scale, queries=queries,
                   keep_probs=return_attention)
    if return_attention:
        return out, function.probs
    return out


def _grad_qkv(grad, q_shape, qkv_shape):
    """dqkv (B, N, 3D) and its dq, dk, dv views (dq zero past the queries), and dO as
    (B, H, n, d)."""
    batch, heads, queries, head_dim = q_shape
    grad_qkv = backend.array_module(grad).empty(qkv_shape, grad.dtype)
    grad_q, grad_k, grad_v = _split_heads(grad_qkv, heads)
    grad_q[:, :, queries:] = 0
    grad4 = grad.reshape(batch, queries, heads, head_dim).transpose(0, 2, 1, 3)
    return grad_qkv, (grad_q[:, :, :queries], grad_k, grad_v), grad4


@implementation("self_attention", "cuda")
class _FusedSelfAttention:
    """Batched cuBLAS GEMMs read q, k, v where they lie in qkv; P (B, H, n, N) is kept only
    when asked for, as backward can rebuild it from lse (one value per row)."""

    def forward(qkv, heads, scale, queries, keep_probs):
        qkv = backend.array_module(qkv).ascontiguousarray(qkv)
        out, probs, lse = cuda_attention.attention_forward(qkv, heads, queries, scale)
        return out, (probs if keep_probs else None, qkv, lse, heads, scale)

    def backward(saved, grad, needs):
        probs, qkv, lse, heads, scale = saved
        return (cuda_attention.attention_backward(grad, qkv, probs, lse, heads, scale),)


@implementation("self_attention", "cpu")
class _BlockedSelfAttention:  # q, k, v stay views of qkv; O written through a strided view
    def forward(qkv, heads, scale, queries, keep_probs):
        q, k, v = _split_heads(qkv, heads)
        q = q[:, :, :queries]
        batch, _, _, head_dim = q.shape
        out = backend.array_module(qkv).empty((batch, queries, heads, head_dim), qkv.dtype)
        probs = cpu_attention.attention_forward(q, k, v, scale, out.transpose(0, 2, 1, 3))
        return out.reshape(batch, queries, heads * head_dim), (probs, q, k, v, scale, qkv.shape)

    def backward(saved, grad, needs):
        probs, q, k, v, scale, qkv_shape = saved
        grad_qkv, grads, grad4 = _grad_qkv(grad, q.shape, qkv_shape)
        cpu_attention.attention_backward(grad4, q, k, v, probs, scale, *grads)
        return (grad_qkv,)


@implementation("self_attention", "plain")
class _PlainSelfAttention:  # contiguous copies for the batched GEMMs; s folded into q
    def forward(qkv, heads, scale, queries, keep_probs):
        xp = backend.array_module(qkv)
        q, k, v = _split_heads(qkv, heads)
        q = xp.ascontiguousarray(q[:, :, :queries])
        k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
        probs, softmax = row_softmax((q * scale) @ k.swapaxes(-1, -2))
        batch, _, _, head_dim = q.shape
        out = xp.empty((batch, queries, heads, head_dim), qkv.dtype)
        out[...] = (probs @ v).transpose(0, 2, 1, 3)
        return out.reshape(batch, queries, heads * head_dim), \
            (probs, q, k, v, scale, qkv.shape, softmax)

    def backward(saved, grad, needs):
        probs, q, k, v, scale, qkv_shape, softmax = saved
        xp = backend.array_module(grad)
        grad_qkv, (grad_q, grad_k, grad_v), grad4 = _grad_qkv(grad, q.shape, qkv_shape)
        grad4 = xp.ascontiguousarray(grad4)
        grad_v[...] = probs.swapaxes(-1, -2) @ grad4
        grad_scores = softmax.backward((probs, -1), grad4 @ v.swapaxes(-1, -2), (True,))[0]
        xp.multiply(grad_scores @ k, scale, out=grad_q)
        grad_k[...] = grad_scores.swapaxes(-1, -2) @ (q * scale)
        return (grad_qkv,)
