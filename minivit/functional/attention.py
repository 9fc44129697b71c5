"""Scaled dot-product attention as one Function (batched matmuls, fused softmax backward), and
self-attention straight from the packed qkv projection (no split/merge copies)."""

import math

from minivit import backend, cpu, cuda
from minivit.errors import ShapeError
from minivit.functional.activation import softmax_array, softmax_backward_array
from minivit.tensor import Function


# -- attention: S = q kᵀ·s (s = d^-½), P = softmax(S), O = P v
#    dv = Pᵀ dO;  dP = dO vᵀ;  dS = P ⊙ (dP − Σ dP ⊙ P);  dq = dS k·s;  dk = dSᵀ q·s
class ScaledDotProductAttention(Function):
    def forward(self, q, k, v, scale=None):
        if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ShapeError(f"attention: expected q, k, v of shape (B, heads, N, d) with k "
                             f"equal to q and v matching (B, heads, N); got q {q.shape}, "
                             f"k {k.shape}, v {v.shape}")
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        q, k, v = self.q, self.k, self.v = tuple(backend.matmul_operand(a) for a in (q, k, v))
        if cpu.handles(q, k, v):  # per batch block: q kᵀ, softmax, P v while in cache
            out = backend.array_module(q).empty(q.shape[:3] + v.shape[3:], q.dtype)
            self.probs = cpu.attention_forward(q, k, v, self.scale, out)
            return out
        scores = q @ k.swapaxes(-1, -2)
        scores *= self.scale
        self.probs = softmax_array(scores)
        return self.probs @ v

    def backward(self, grad):
        q, k, v, probs, grad = self.q, self.k, self.v, self.probs, backend.matmul_operand(grad)
        if cpu.handles(grad, q, k, v):
            xp = backend.array_module(grad)
            grads = [xp.empty(a.shape, a.dtype) if need else None
                     for a, need in zip((q, k, v), self.needs_input_grad)]
            cpu.attention_backward(grad, q, k, v, probs, self.scale, *grads)
            return tuple(grads)
        grad_v = probs.swapaxes(-1, -2) @ grad if self.needs_input_grad[2] else None
        grad_scores = softmax_backward_array(probs, grad @ v.swapaxes(-1, -2))
        grad_scores *= self.scale
        grad_q = grad_scores @ k if self.needs_input_grad[0] else None
        grad_k = grad_scores.swapaxes(-1, -2) @ q if self.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v


def scaled_dot_product_attention(q, k, v, scale=None, return_attention=False):
    """softmax(q kᵀ / √d) v for q, k, v of shape (B, heads, N, d).

    With return_attention=True also returns the attention probabilities (B, heads, N, N) as a
    raw array (no gradient): they are computed anyway, so asking costs nothing."""
    function = ScaledDotProductAttention()
    out = function(q, k, v, scale=scale)
    if return_attention:
        return out, function.probs
    return out


# -- self-attention from the packed projection: qkv (B, N, 3D) is viewed as (B, N, 3, H, d);
#    q, k, v are its three (B, H, N, d) slices and O = attention(q, k, v) is written back as
#    (B, N, H, d) = (B, N, D). Same math as above; dqkv gathers dq, dk, dv into the packed
#    layout directly (no zero-filled scatter per slice, no split or merge copies).
#    queries=n: only the first n tokens ask (q is (B, H, n, d), O is (B, n, D)); every token
#    is still a key and a value, and dq is zero for the tokens that did not ask.
def _split_heads(qkv, num_heads):
    batch, tokens, width = qkv.shape
    if width % (3 * num_heads):
        raise ShapeError(f"self_attention: the packed qkv width {width} must be 3 · heads · "
                         f"head_dim for {num_heads} heads (timm's Attention.qkv layout)")
    packed = qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads))
    return [packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]  # (B, H, N, d) views


class SelfAttention(Function):
    def forward(self, qkv, num_heads, scale=None, queries=None, keep_probs=True):
        if qkv.ndim != 3:
            raise ShapeError(f"self_attention: expected qkv of shape (B, N, 3·D); got {qkv.shape}")
        if queries is not None and not 1 <= queries <= qkv.shape[1]:
            raise ShapeError(f"self_attention: queries must be between 1 and the {qkv.shape[1]} "
                             f"tokens; got {queries}")
        xp = backend.array_module(qkv)
        q, k, v = _split_heads(qkv, num_heads)
        self.queries = queries
        if queries is not None:
            q = q[:, :, :queries]
        batch, heads, tokens, head_dim = q.shape
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.qkv_shape, self.heads = qkv.shape, heads
        self.gpu_qkv = None
        if cuda.handles(qkv):
            # batched cuBLAS GEMMs read q, k, v where they lie in qkv; P (B, H, n, N) is kept
            # only when asked for, as backward can rebuild it from lse (one value per row)
            self.gpu_qkv = xp.ascontiguousarray(qkv)
            out, probs, self.lse = cuda.attention_forward(self.gpu_qkv, heads, tokens, self.scale)
            self.probs = probs if keep_probs else None
            return out
        out = xp.empty((batch, tokens, heads, head_dim), qkv.dtype)
        self.fast = cpu.handles(qkv)
        if self.fast:  # q, k, v stay views of qkv
            self.probs = cpu.attention_forward(q, k, v, self.scale, out.transpose(0, 2, 1, 3))
        else:  # contiguous copies for the batched GEMMs, saved for backward; s folded into q
            q = xp.ascontiguousarray(q * self.scale)
            k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
            self.probs = softmax_array(q @ k.swapaxes(-1, -2))
            out[...] = (self.probs @ v).transpose(0, 2, 1, 3)
        self.q, self.k, self.v = q, k, v
        return out.reshape(batch, tokens, heads * head_dim)

    def backward(self, grad):
        if self.gpu_qkv is not None:
            return (cuda.attention_backward(grad, self.gpu_qkv, self.probs, self.lse,
                                            self.heads, self.scale),)
        q, k, v, probs = self.q, self.k, self.v, self.probs
        batch, heads, tokens, head_dim = q.shape
        xp = backend.array_module(grad)
        grad4 = grad.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)
        grad_qkv = xp.empty(self.qkv_shape, grad.dtype)
        grad_q, grad_k, grad_v = _split_heads(grad_qkv, heads)
        if self.queries is not None:
            grad_q[:, :, self.queries:] = 0
            grad_q = grad_q[:, :, :self.queries]
        if self.fast and cpu.handles(grad):
            cpu.attention_backward(grad4, q, k, v, probs, self.scale, grad_q, grad_k, grad_v)
            return (grad_qkv,)
        # here q holds q·s (as the forward saved it): dq = dS k·s, dk = dSᵀ (q·s)
        if self.fast:  # the forward ran on the fast path: q is an unscaled view of qkv
            q = q * self.scale
        grad4 = xp.ascontiguousarray(grad4)
        grad_v[...] = probs.swapaxes(-1, -2) @ grad4
        grad_scores = softmax_backward_array(probs, grad4 @ v.swapaxes(-1, -2))
        xp.multiply(grad_scores @ k, self.scale, out=grad_q)
        grad_k[...] = grad_scores.swapaxes(-1, -2) @ q
        return (grad_qkv,)


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
