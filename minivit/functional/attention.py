"""Scaled dot-product attention as one Function (batched matmuls, fused softmax backward)."""

import math

from minivit import backend
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
        self.q, self.k, self.v = q, k, v
        scores = q @ k.swapaxes(-1, -2)
        scores *= self.scale
        self.probs = softmax_array(scores)
        return self.probs @ v

    def backward(self, grad):
        q, k, v, probs = self.q, self.k, self.v, self.probs
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
