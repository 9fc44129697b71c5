"""Scaled dot-product attention as one Function (batched matmuls, fused softmax backward), and
self-attention straight from the packed qkv projection (no split/merge copies). Both take an
optional additive bias B on the scores (relative position bias, masks): S = q kᵀ·s + B. Fast
implementations, each with the bias: minivit.cpu.attention (CPU, both ops) and
minivit.cuda.attention (GPU, self-attention on the packed qkv; scaled_dot_product_attention on
CuPy runs the plain code, whose softmax is the fused row kernel)."""

import math

import numpy as np

from minivit import backend
from minivit.cpu import attention as cpu_attention
from minivit.cuda import attention as cuda_attention
from minivit.errors import ShapeError
from minivit.functional.activation import row_softmax
from minivit.functional.basic import _unbroadcast
from minivit.functional.registry import DispatchedFunction, implementation


def _check_bias(bias, scores_shape, op):
    """An additive score bias must broadcast to the scores (B, heads, N, M) without growing them."""
    try:
        fits = bias.ndim <= 4 and np.broadcast_shapes(bias.shape, scores_shape) == scores_shape
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"{op}: the bias must broadcast to the scores (B, heads, N, M) = "
                         f"{scores_shape}; got {bias.shape}")


def _bias_grad(grad_scores, shape):
    """dB from dS (B, H, n, N): summed to the bias's shape; zero in the rows of the tokens that
    did not ask (self-attention's queries=n, where the bias has all N rows)."""
    if len(shape) < 2 or shape[-2] in (1, grad_scores.shape[-2]):
        return _unbroadcast(grad_scores, shape)
    rows = _unbroadcast(grad_scores, shape[:-2] + (grad_scores.shape[-2], shape[-1]))
    full = backend.array_module(grad_scores).zeros(shape, grad_scores.dtype)
    full[..., :rows.shape[-2], :] = rows
    return full


# -- attention: S = q kᵀ·s + B (s = d^-½, B an optional bias), P = softmax(S), O = P v
#    dv = Pᵀ dO;  dP = dO vᵀ;  dS = P ⊙ (dP − Σ dP ⊙ P);  dq = dS k·s;  dk = dSᵀ q·s;
#    dB = dS summed over the axes B was broadcast along
#    Every implementation saves (P, q, k, v, s), P first as return_attention hands it out; the
#    plain one also the softmax implementation it ran (its backward runs the same one).
class ScaledDotProductAttention(DispatchedFunction):
    def forward(self, q, k, v, bias=None, scale=None):
        if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ShapeError(f"attention: expected q, k, v of shape (B, heads, N, d) with k "
                             f"equal to q and v matching (B, heads, N); got q {q.shape}, "
                             f"k {k.shape}, v {v.shape}")
        if bias is not None:
            _check_bias(bias, q.shape[:3] + k.shape[2:3], "attention")
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        q, k, v = (backend.matmul_operand(a) for a in (q, k, v))
        out = self.dispatch("attention", (q, k, v, bias), q, k, v, self.scale, bias=bias)
        self.probs = self.saved[0]
        return out


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


def _needs_bias(needs):
    return len(needs) > 3 and needs[3]


@implementation("attention", "cpu")
class _BlockedAttention:  # per batch block: q kᵀ(·s + B), softmax, P v while in cache
    def forward(q, k, v, scale, bias=None):
        out = backend.array_module(q).empty(q.shape[:3] + v.shape[3:], q.dtype)
        probs = cpu_attention.attention_forward(q, k, v, scale, out, bias=bias)
        return out, (probs, q, k, v, scale, None if bias is None else bias.shape)

    def backward(saved, grad, needs):
        probs, q, k, v, scale, bias_shape = saved
        xp = backend.array_module(grad)
        grads = [xp.empty(a.shape, a.dtype) if need else None for a, need in zip((q, k, v), needs)]
        grad_scores = xp.empty(probs.shape, probs.dtype) if _needs_bias(needs) else None
        cpu_attention.attention_backward(grad, q, k, v, probs, scale, *grads,
                                         grad_scores=grad_scores)
        return (*grads, None if grad_scores is None else _bias_grad(grad_scores, bias_shape))


@implementation("attention", "plain")
class _PlainAttention:  # (on CuPy the softmax runs in the fused row kernels)
    def forward(q, k, v, scale, bias=None):
        scores = q @ k.swapaxes(-1, -2)
        scores *= scale
        if bias is not None:
            scores += bias
        probs, softmax = row_softmax(scores)
        return probs @ v, (probs, q, k, v, scale, softmax, None if bias is None else bias.shape)

    def backward(saved, grad, needs):
        probs, q, k, v, scale, softmax, bias_shape = saved
        grad = backend.matmul_operand(grad)
        grad_v = probs.swapaxes(-1, -2) @ grad if needs[2] else None
        grad_scores = softmax.backward((probs, -1), grad @ v.swapaxes(-1, -2), (True,))[0]
        grad_bias = _bias_grad(grad_scores, bias_shape).copy() if _needs_bias(needs) else None
        grad_scores *= scale
        grad_q = grad_scores @ k if needs[0] else None
        grad_k = grad_scores.swapaxes(-1, -2) @ q if needs[1] else None
        return grad_q, grad_k, grad_v, grad_bias


# -- self-attention from the packed projection: qkv (B, N, 3D) is viewed as (B, N, 3, H, d);
#    q, k, v are its three (B, H, N, d) slices and O = attention(q, k, v) is written back as
#    (B, N, H, d) = (B, N, D). Same math as above; dqkv gathers dq, dk, dv into the packed
#    layout directly (no zero-filled scatter per slice, no split or merge copies).
#    queries=n: only the first n tokens ask (q is (B, H, n, d), O is (B, n, D)); every token
#    is still a key and a value, and dq is zero for the tokens that did not ask; a bias's rows
#    are sliced alike (its first n) and dB is zero in the others.
#    saved, P first (or None where the GPU does not keep it): CPU and plain (P, q, k, v, s,
#    qkv's shape) with q unscaled, plain also its softmax; GPU (P, qkv as its GEMMs read it,
#    half operands with half GEMMs on, lse, heads, s, the bias's rows); each ends with the
#    bias's shape (None without one).
def _split_heads(qkv, num_heads):
    batch, tokens, width = qkv.shape
    if width % (3 * num_heads):
        raise ShapeError(f"self_attention: the packed qkv width {width} must be 3 · heads · "
                         f"head_dim for {num_heads} heads (timm's Attention.qkv layout)")
    packed = qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads))
    return [packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]  # (B, H, N, d) views


class SelfAttention(DispatchedFunction):
    def forward(self, qkv, bias=None, num_heads=1, scale=None, queries=None, keep_probs=True):
        if qkv.ndim != 3:
            raise ShapeError(f"self_attention: expected qkv of shape (B, N, 3·D); got {qkv.shape}")
        if queries is not None and not 1 <= queries <= qkv.shape[1]:
            raise ShapeError(f"self_attention: queries must be between 1 and the {qkv.shape[1]} "
                             f"tokens; got {queries}")
        q = _split_heads(qkv, num_heads)[0]  # (checks the width)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        queries = queries or qkv.shape[1]
        if bias is not None:
            _check_bias(bias, q.shape[:3] + q.shape[2:3], "self_attention")
        out = self.dispatch("self_attention", (qkv, bias), qkv, num_heads, scale, queries,
                            keep_probs, bias=bias)
        self.probs = self.saved[0]
        return out


def _query_rows(bias, queries):
    """The bias rows of the tokens that ask (all of a bias broadcast along the rows)."""
    if bias is None or bias.ndim < 2 or bias.shape[-2] == 1:
        return bias
    return bias[..., :queries, :]


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
    otherwise backward rebuilds them from one log-sum-exp per row (less memory)."""
    function = SelfAttention()
    out = function(qkv, bias, num_heads=num_heads, scale=scale, queries=queries,
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
    when asked for, as backward can rebuild it from lse (one value per row) and the bias."""

    def forward(qkv, heads, scale, queries, keep_probs, bias=None):
        qkv = backend.array_module(qkv).ascontiguousarray(qkv)
        rows = _query_rows(bias, queries)
        out, probs, lse, operands = cuda_attention.attention_forward(qkv, heads, queries, scale,
                                                                     bias=rows)
        return out, (probs if keep_probs else None, operands, lse, heads, scale, rows,
                     None if bias is None else bias.shape)

    def backward(saved, grad, needs):
        probs, qkv, lse, heads, scale, rows, bias_shape = saved
        grad_qkv, grad_scores = cuda_attention.attention_backward(grad, qkv, probs, lse, heads,
                                                                  scale, bias=rows)
        return grad_qkv, _bias_grad(grad_scores, bias_shape) if needs[1] else None


@implementation("self_attention", "cpu")
class _BlockedSelfAttention:  # q, k, v stay views of qkv; O written through a strided view
    def forward(qkv, heads, scale, queries, keep_probs, bias=None):
        q, k, v = _split_heads(qkv, heads)
        q = q[:, :, :queries]
        batch, _, _, head_dim = q.shape
        out = backend.array_module(qkv).empty((batch, queries, heads, head_dim), qkv.dtype)
        probs = cpu_attention.attention_forward(q, k, v, scale, out.transpose(0, 2, 1, 3),
                                                bias=_query_rows(bias, queries))
        return out.reshape(batch, queries, heads * head_dim), \
            (probs, q, k, v, scale, qkv.shape, None if bias is None else bias.shape)

    def backward(saved, grad, needs):
        probs, q, k, v, scale, qkv_shape, bias_shape = saved
        grad_qkv, grads, grad4 = _grad_qkv(grad, q.shape, qkv_shape)
        grad_scores = backend.array_module(grad).empty(probs.shape, probs.dtype) \
            if needs[1] else None
        cpu_attention.attention_backward(grad4, q, k, v, probs, scale, *grads,
                                         grad_scores=grad_scores)
        return grad_qkv, None if grad_scores is None else _bias_grad(grad_scores, bias_shape)


@implementation("self_attention", "plain")
class _PlainSelfAttention:  # contiguous copies for the batched GEMMs; s folded into q
    def forward(qkv, heads, scale, queries, keep_probs, bias=None):
        xp = backend.array_module(qkv)
        q, k, v = _split_heads(qkv, heads)
        q = xp.ascontiguousarray(q[:, :, :queries])
        k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
        scores = (q * scale) @ k.swapaxes(-1, -2)
        if bias is not None:
            scores += _query_rows(bias, queries)
        probs, softmax = row_softmax(scores)
        batch, _, _, head_dim = q.shape
        out = xp.empty((batch, queries, heads, head_dim), qkv.dtype)
        out[...] = (probs @ v).transpose(0, 2, 1, 3)
        return out.reshape(batch, queries, heads * head_dim), \
            (probs, q, k, v, scale, qkv.shape, softmax, None if bias is None else bias.shape)

    def backward(saved, grad, needs):
        probs, q, k, v, scale, qkv_shape, softmax, bias_shape = saved
        xp = backend.array_module(grad)
        grad_qkv, (grad_q, grad_k, grad_v), grad4 = _grad_qkv(grad, q.shape, qkv_shape)
        grad4 = xp.ascontiguousarray(grad4)
        grad_v[...] = probs.swapaxes(-1, -2) @ grad4
        grad_scores = softmax.backward((probs, -1), grad4 @ v.swapaxes(-1, -2), (True,))[0]
        grad_bias = _bias_grad(grad_scores, bias_shape) if needs[1] else None
        xp.multiply(grad_scores @ k, scale, out=grad_q)
        grad_k[...] = grad_scores.swapaxes(-1, -2) @ (q * scale)
        return grad_qkv, grad_bias
