"""dropout and drop_path (stochastic depth). Identity in eval mode; random numbers come from
minivit's seeded generator (minivit.manual_seed)."""

from minivit import cuda
from minivit.tensor import Function, Tensor


# -- mask multiply: y = x ⊙ m;  dx = dy ⊙ m  (m holds 0 or 1/(1 − p)) --------------------------
class MaskMultiply(Function):
    def forward(self, x, mask):
        self.mask = mask
        return x * mask

    def backward(self, grad):
        return grad * self.mask, None


def _keep_mask(shape, p, dtype, like):
    """1/(1 − p) with probability 1 − p, else 0, on x's backend (not the current one); the
    draws are new in every replay of a recorded CUDA graph (cuda.uniforms)."""
    keep = 1.0 - p
    uniforms = cuda.uniforms(like.data if isinstance(like, Tensor) else like, shape, dtype)
    return (uniforms < keep) / dtype.type(keep)


def dropout(x, p=0.5, training=True):
    """Zero each element with probability p and scale the rest by 1/(1 − p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1); got {p}")
    if not training or p == 0.0:
        return x
    return MaskMultiply()(x, _keep_mask(x.shape, p, x.dtype, x))


def drop_path(x, p=0.0, training=True):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop_path: p must be in [0, 1); got {p}")
    if not training or p == 0.0:
        return x
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return MaskMultiply()(x, _keep_mask(mask_shape, p, x.dtype, x))
