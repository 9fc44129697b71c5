"""Shape ops behind the Tensor methods: reshape, transpose, indexing, concat and stack. Each
op is one Function whose backward moves the gradient back to the input's layout."""

import numpy as np

from minivit import backend
from minivit.tensor import Function, Tensor


# -- reshape / transpose: gradients move back through the inverse ------------------------------
class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, grad):
        return (grad.reshape(self.shape),)


class Transpose(Function):
    def forward(self, a, axes=None):
        self.axes = axes
        return a.transpose(axes)

    def backward(self, grad):
        if self.axes is None:
            return (grad.transpose(),)
        return (grad.transpose(tuple(np.argsort(np.atleast_1d(self.axes) % grad.ndim).tolist())),)


# -- indexing: scatter the gradient back into a zero array of the input's shape ----------------
def _is_basic_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, np.integer, slice)) or p is None or p is Ellipsis for p in parts)


class GetItem(Function):
    def forward(self, a, index):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, grad):
        xp = backend.array_module(grad)
        grad_a = xp.zeros(self.shape, dtype=self.dtype)
        if _is_basic_index(self.index):
            grad_a[self.index] = grad  # basic indexing never selects an element twice
        else:
            backend.scatter_add(grad_a, self.index, grad)
        return (grad_a,)


# -- concat / stack: split the gradient back into the pieces ----------------------------------
class Concat(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.bounds = np.cumsum([a.shape[axis] for a in arrays])[:-1]
        return backend.array_module(*arrays).concatenate(arrays, axis=axis)

    def backward(self, grad):
        xp = backend.array_module(grad)
        return tuple(xp.split(grad, self.bounds, axis=self.axis))


class Stack(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        return backend.array_module(*arrays).stack(arrays, axis=axis)

    def backward(self, grad):
        xp = backend.array_module(grad)
        count = grad.shape[self.axis]
        return tuple(xp.take(grad, i, axis=self.axis) for i in range(count))


# -- the functional API ---------------------------------------------------------------------------
def reshape(a, shape):
    return Reshape()(a, shape=shape)


def transpose(a, axes=None):
    return Transpose()(a, axes=axes)


def getitem(a, index):
    if isinstance(index, Tensor):
        index = index.data
    return GetItem()(a, index=index)


def concat(tensors, axis=0):
    """Join tensors along an existing axis (numpy.concatenate)."""
    return Concat()(*tensors, axis=axis)


def stack(tensors, axis=0):
    """Join tensors along a new axis (numpy.stack)."""
    return Stack()(*tensors, axis=axis)
