"""Scaled dot-product attention as one Function (batched matmuls, fused softmax backward), and
self-attention straight from the packed qkv projection (no split/merge copies). Both take an
optional additive bias B on the scores (relative position bias, masks): S = q kᵀ·s + B."""

import math

import numpy as np

from minivit import backend, cpu, cuda
from minivit.errors import ShapeError
from minivit.functional.activation import softmax_array, softmax_backward_array
from minivit.functional.basic import _unbroadcast
from minivit.tensor import Function


def _check_bias(bias, scores_shape, op):
    """An additive score bias must broadcast to the scores (B, heads, N, M) without growing them."""
    try:
        fits = bias.ndim <= 4 and np.broadcast_shapes(bias.shape, scores_shape) == scores_shape
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"{op}: the bias must broadcast to the scores (B, heads, N, M) = "
                         f"{scores_shape}; got {bias.shape}")


# -- attention: S = q kᵀ·s + B (s = d^-½, B an optional bias), P = softmax(S), O = P v
#    dv = Pᵀ dO;  dP = dO vᵀ;  dS = P ⊙ (dP − Σ dP ⊙ P);  dq = dS k·s;  dk = dSᵀ q·s;
#    dB = dS summed over the axes B was broadcast along
class ScaledDotProductAttention(Function):
    def forward(self, q, k, v, bias=None, scale=None):
        if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ShapeError(f"attention: expected q, k, v of shape (B, heads, N, d) with k "
                             f"equal to q and v matching (B, heads, N); got q {q.shape}, "
                             f"k {k.shape}, v {v.shape}")
        if bias is not None:
            _check_bias(bias, q.shape[:3] + k.shape[2:3], "attention")
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        q, k, v = self.q, self.k, self.v = tuple(backend.matmul_operand(a) for a in (q, k, v))
        self.bias_shape = None if bias is None else bias.shape
        if cpu.handles(q, k, v):  # per batch block: q kᵀ, softmax, P v while in cache
            out = backend.array_module(q).empty(q.shape[:3] + v.shape[3:], q.dtype)
            self.probs = cpu.attention_forward(q, k, v, self.scale, out, bias=bias)
            return out
        scores = q @ k.swapaxes(-1, -2)
        scores *= self.scale
        if bias is not None:
            scores += bias
        self.probs = softmax_array(scores)
        return self.probs @ v

    def backward(self, grad):
        q, k, v, probs, grad = self.q, self.k, self.v, self.probs, backend.matmul_operand(grad)
        need_bias = len(self.needs_input_grad) > 3 and self.needs_input_grad[3]
        if cpu.handles(grad, q, k, v):
            xp = backend.array_module(grad)
            grads = [xp.empty(a.shape, a.dtype) if need else None
                     for a, need in zip((q, k, v), self.needs_input_grad)]
            grad_scores = xp.empty(probs.shape, probs.dtype) if need_bias else None
            cpu.attention_backward(grad, q, k, v, probs, self.scale, *grads,
                                   grad_scores=grad_scores)
            bias = _unbroadcast(grad_scores, self.bias_shape) if need_bias else None
            return (*grads, bias)
        grad_v = probs.swapaxes(-1, -2) @ grad if self.needs_input_grad[2] else None
        grad_scores = softmax_backward_array(probs, grad @ v.swapaxes(-1, -2))
        grad_bias = _unbroadcast(grad_scores, self.bias_shape).copy() if need_bias else None
        grad_scores *= self.scale
        grad_q = grad_scores @ k if self.needs_input_grad[0] else None
        grad_k = grad_scores.swapaxes(-1, -2) @ q if self.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v, grad_bias


def scaled_dot_product_attention(q, k, v, scale=None, return_attention=False, bias=None):
    """softmax(q kᵀ / √d + bias) v for q, k, v of shape (B, heads, N, d); bias (optional, with
    a gradient) broadcasts to the scores (B, heads, N, N), e.g. a (heads, N, N) relative
    position bias.

    With return_attention=True also returns the attention probabilities (B, heads, N, N) as a
    raw array (no gradient): they are computed anyway, so asking costs nothing."""
    function = ScaledDotProductAttention()
    out = function(q, k, v, bias, scale=scale)
    if return_attention:
        return out, function.probs
    return out


# -- self-attention from the packed projection: qkv (B, N, 3D) is viewed as (B, N, 3, H, d);
#    q, k, v are its three (B, H, N, d) slices and O = attention(q, k, v) is written back as
#    (B, N, H, d) = (B, N, D). Same math as above; dqkv gathers dq, dk, dv into the packed
#    layout directly (no zero-filled scatter per slice, no split or merge copies).
#    queries=n: only the first n tokens ask (q is (B, H, n, d), O is (B, n, D)); every token
#    is still a key and a value, and dq is zero for the tokens that did not ask; a bias's rows
#    are sliced alike and dB is zero in the others.
def _split_heads(qkv, num_heads):
    batch, tokens, width = qkv.shape
    if width % (3 * num_heads):
        raise ShapeError(f"self_attention: the packed qkv width {width} must be 3 · heads · "
                         f"head_dim for {num_heads} heads (timm's Attention.qkv layout)")
    packed = qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads))
    return [packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]  # (B, H, N, d) views


class SelfAttention(Function):
    def forward(self, qkv, bias=None, num_heads=1, scale=None, queries=None, keep_probs=True):
        if qkv.ndim != 3:
            raise ShapeError(f"self_attention: expected qkv of shape (B, N, 3·D); got {qkv.shape}")
        if queries is not None and not 1 <= queries <= qkv.shape[1]:
            raise ShapeError(f"self_attention: queries must be between 1 and the {qkv.shape[1]} "
                             f"tokens; got {queries}")
        xp = backend.array_module(qkv)
        q, k, v = _split_heads(qkv, num_heads)
        self.queries = queries
        self.bias_shape = None if bias is None else bias.shape
        if bias is not None:
            _check_bias(bias, q.shape[:3] + k.shape[2:3], "self_attention")
            if queries is not None and bias.ndim >= 2 and bias.shape[-2] > 1:
                bias = bias[..., :queries, :]  # the rows of the tokens that ask
        if queries is not None:
            q = q[:, :, :queries]
        batch, heads, tokens, head_dim = q.shape
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.qkv_shape, self.heads = qkv.shape, heads
        self.gpu_qkv = None
        if cuda.handles(qkv) and bias is None:  # biased attention takes the plain CuPy path
            # batched cuBLAS GEMMs read q, k, v where they lie in qkv; P (B, H, n, N) is kept
            # only when asked for, as backward can rebuild it from lse (one value per row)
            self.gpu_qkv = xp.ascontiguousarray(qkv)
            out, probs, self.lse = cuda.attention_forward(self.gpu_qkv, heads, tokens, self.scale)
            self.probs = probs if keep_probs else None
            return out
        out = xp.empty((batch, tokens, heads, head_dim), qkv.dtype)
        self.fast = cpu.handles(qkv)
        if self.fast:  # q, k, v stay views of qkv
            self.probs = cpu.attention_forward(q, k, v, self.scale, out.transpose(0, 2, 1, 3),
                                               bias=bias)
        else:  # contiguous copies for the batched GEMMs, saved for backward; s folded into q
            q = xp.ascontiguousarray(q * self.scale)
            k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
            scores = q @ k.swapaxes(-1, -2)
            if bias is not None:
                scores += bias
            self.probs = softmax_array(scores)
            out[...] = (self.probs @ v).transpose(0, 2, 1, 3)
        self.q, self.k, self.v = q, k, v
        return out.reshape(batch, tokens, heads * head_dim)

    def backward(self, grad):
        if self.gpu_qkv is not None:
            return (cuda.attention_backward(grad, self.gpu_qkv, self.probs, self.lse,
                                            self.heads, self.scale), None)
        q, k, v, probs = self.q, self.k, self.v, self.probs
        batch, heads, tokens, head_dim = q.shape
        xp = backend.array_module(grad)
        need_bias = self.needs_input_grad[1]
        grad4 = grad.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)
        grad_qkv = xp.empty(self.qkv_shape, grad.dtype)
        grad_q, grad_k, grad_v = _split_heads(grad_qkv, heads)
        if self.queries is not None:
            grad_q[:, :, self.queries:] = 0
            grad_q = grad_q[:, :, :self.queries]
        if self.fast and cpu.handles(grad):
            grad_scores = xp.empty(probs.shape, probs.dtype) if need_bias else None
            cpu.attention_backward(grad4, q, k, v, probs, self.scale, grad_q, grad_k, grad_v,
                                   grad_scores=grad_scores)
            return grad_qkv, self._bias_grad(grad_scores)
        # here q holds q·s (as the forward saved it): dq = dS k·s, dk = dSᵀ (q·s)
        if self.fast:  # the forward ran on the fast path: q is an unscaled view of qkv
            q = q * self.scale
        grad4 = xp.ascontiguousarray(grad4)
        grad_v[...] = probs.swapaxes(-1, -2) @ grad4
        grad_scores = softmax_backward_array(probs, grad4 @ v.swapaxes(-1, -2))
        grad_bias = self._bias_grad(grad_scores.copy() if need_bias else None)
        xp.multiply(grad_scores @ k, self.scale, out=grad_q)
        grad_k[...] = grad_scores.swapaxes(-1, -2) @ q
        return grad_qkv, grad_bias

    def _bias_grad(self, grad_scores):
        """dB from dS (B, H, n, N): summed to the bias's shape, zero in the rows of the tokens
        that did not ask (queries=n)."""
        if grad_scores is None:
            return None
        shape = self.bias_shape
        if len(shape) < 2 or shape[-2] in (1, grad_scores.shape[-2]):
            return _unbroadcast(grad_scores, shape)
        xp = backend.array_module(grad_scores)
        rows = _unbroadcast(grad_scores, shape[:-2] + (grad_scores.shape[-2], shape[-1]))
        full = xp.zeros(shape, grad_scores.dtype)
        full[..., :rows.shape[-2], :] = rows
        return full


def self_attention(qkv, num_heads, scale=None, return_attention=False, queries=None, bias=None):
    """Multi-head self-attention from the packed qkv projection (B, N, 3·D) — timm's layout,
    (B, N, 3, heads, head_dim) — to the merged heads (B, N, D), ready for the output
    projection. Equal to splitting q, k, v and calling scaled_dot_product_attention, without
    the split and merge copies. return_attention=True also returns the probabilities
    (B, heads, N, N) as a raw array. queries=n computes the outputs of the first n tokens only
    (B, n, D), attending to all N: the rows [:, :n] of the full result, for less work.
    bias (optional, with a gradient): added to the scaled scores, broadcastable to
    (B, heads, N, N) (with queries=n its first n rows are used).
    On the GPU the N×N probabilities are kept for backward only with return_attention=True;
    otherwise backward rebuilds them from one log-sum-exp per row (less memory). Biased
    attention runs on CuPy's plain batched matmuls instead of the fused GEMM path."""
    function = SelfAttention()
    out = function(qkv, bias, num_heads=num_heads, scale=scale, queries=queries,
                   keep_probs=return_attention)
    if return_attention:
        return out, function.probs
    return out
