"""dropout and drop_path (stochastic depth). Identity in eval mode; random numbers come from
minivit's seeded generator (minivit.manual_seed)."""

from minivit import backend, cuda
from minivit.tensor import Function, Tensor


# -- mask multiply: y = x ⊙ m;  dx = dy ⊙ m  (m holds 0 or 1/(1 − p)) --------------------------
class MaskMultiply(Function):
    def forward(self, x, mask):
        self.mask = mask
        return x * mask

    def backward(self, grad):
        return grad * self.mask, None


def _keep_mask(shape, p, dtype, like):
    keep = 1.0 - p
    array = like.data if isinstance(like, Tensor) else like
    name = backend.backend_of(array)  # x's backend, not the current
    if cuda.recording(array):
        # each replay of a CUDA graph needs new numbers: drawn on the host before each replay
        uniforms = cuda.replay_input(lambda: backend.random_generator("numpy").random(shape),
                                     shape, dtype)
    else:
        uniforms = backend.random_generator(name).random(shape, dtype=dtype)
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
