"""Reductions behind Tensor.sum/mean/max/argmax: sum, mean, max (one Function each) and
argmax (outside the graph)."""

import numpy as np

from minivit import backend
from minivit.tensor import Function, Tensor


# -- sum: the gradient of a sum is its upstream gradient, broadcast back ------------------------
def _expand_reduced(grad, shape, axis, keepdims):
    """Reshape a reduced gradient so that it broadcasts against the input's `shape`."""
    if axis is not None and not keepdims:
        axes = (axis,) if np.isscalar(axis) else axis
        grad = backend.array_module(grad).expand_dims(grad, tuple(a % len(shape) for a in axes))
    elif axis is None and not keepdims:
        grad = grad.reshape((1,) * len(shape))
    return grad


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, grad):
        xp = backend.array_module(grad)
        expanded = _expand_reduced(grad, self.shape, self.axis, self.keepdims)
        return (xp.broadcast_to(expanded, self.shape).copy(),)


# -- mean: d mean(a) = da / n -------------------------------------------------------------------
class Mean(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        out = a.mean(axis=axis, keepdims=keepdims)
        self.count = a.size // max(out.size, 1)
        return out.astype(a.dtype, copy=False) if a.dtype.kind == "f" else out  # ints: NumPy's

    def backward(self, grad):
        xp = backend.array_module(grad)
        expanded = _expand_reduced(grad, self.shape, self.axis, self.keepdims) / self.count
        return (xp.broadcast_to(expanded, self.shape).copy(),)


# -- max: the gradient goes to the maxima (split evenly between ties) ---------------------------
class Max(Function):
    def forward(self, a, axis=None, keepdims=False):
        out = a.max(axis=axis, keepdims=keepdims)
        self.is_max = a == _expand_reduced(out, a.shape, axis, keepdims)
        self.axis, self.keepdims = axis, keepdims
        return out

    def backward(self, grad):
        shape, axis, keepdims = self.is_max.shape, self.axis, self.keepdims
        ties = self.is_max.sum(axis=axis, keepdims=True)
        share = _expand_reduced(grad, shape, axis, keepdims) / ties.astype(grad.dtype)
        return (self.is_max * share,)


def argmax(a, axis=None, keepdims=False):
    """Indices of the largest values of Tensor `a`: an integer Tensor, outside the graph."""
    indices = a.data.argmax(axis=axis)
    if keepdims:
        indices = backend.array_module(indices).expand_dims(
            indices, tuple(range(a.ndim)) if axis is None else axis)
    return Tensor(indices)


# -- the functional API ---------------------------------------------------------------------------
def reduce_sum(a, axis=None, keepdims=False):
    return Sum()(a, axis=axis, keepdims=keepdims)


def reduce_mean(a, axis=None, keepdims=False):
    return Mean()(a, axis=axis, keepdims=keepdims)


def reduce_max(a, axis=None, keepdims=False):
    return Max()(a, axis=axis, keepdims=keepdims)
