"""Arithmetic, reductions and shape ops behind the Tensor operators.

Each op is one Function: forward on raw arrays, backward right below it. Broadcasting follows
NumPy; `_unbroadcast` sums a gradient back to the shape of the input it belongs to.
"""

import numbers

import numpy as np

from minivit import backend
from minivit.cpu import pool as cpu_pool
from minivit.errors import ShapeError
from minivit.functional.registry import DispatchedFunction, implementation
from minivit.tensor import Function, Tensor


def _unbroadcast(grad, shape):
    """Sum `grad` over the axes that broadcasting added or stretched to reach `shape`."""
    if grad.shape == shape:
        return grad
    leading = grad.ndim - len(shape)
    axes = tuple(range(leading)) + tuple(
        leading + i for i, n in enumerate(shape) if n == 1 and grad.shape[leading + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


class _Arithmetic(Function):
    """Add, Sub, Mul, Div, MatMul: a raw integer array among their inputs is a number (cast
    to the tensors' dtype, so x * np.arange(3) stays float32), not labels or indices."""

    casts_integer_constants = True


# -- add / sub: d(a ± b) = da ± db   (add saves the two shapes) --------------------------------
class Add(_Arithmetic, DispatchedFunction):
    def forward(self, a, b):
        return self.dispatch("add", (a, b), a, b)


@implementation("add", "plain")
class _PlainAdd:
    def forward(a, b):
        return a + b, (a.shape, b.shape)

    def backward(shapes, grad, needs):
        return _unbroadcast(grad, shapes[0]), _unbroadcast(grad, shapes[1])


@implementation("add", "cpu", accepts=lambda a, b: a.shape == b.shape)
class _ChunkedAdd(_PlainAdd):  # residual adds: threaded chunks
    def forward(a, b):
        return cpu_pool.binary(np.add, a, b), (a.shape, b.shape)


class Sub(_Arithmetic):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, grad):
        grad_b = -_unbroadcast(grad, self.shapes[1]) if self.needs_input_grad[1] else None
        return _unbroadcast(grad, self.shapes[0]), grad_b


# -- mul: d(ab) = b da + a db -------------------------------------------------------------------
class Mul(_Arithmetic):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, grad):
        grad_a = _unbroadcast(grad * self.b, self.a.shape) if self.needs_input_grad[0] else None
        grad_b = _unbroadcast(grad * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


# -- div: d(a/b) = da/b - a db/b² --------------------------------------------------------------
class Div(_Arithmetic):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, grad):
        grad_over_b = grad / self.b
        grad_a = _unbroadcast(grad_over_b, self.a.shape) if self.needs_input_grad[0] else None
        grad_b = (_unbroadcast(-grad_over_b * self.a / self.b, self.b.shape)
                  if self.needs_input_grad[1] else None)
        return grad_a, grad_b


# -- neg: d(-a) = -da -----------------------------------------------------------------------------
class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, grad):
        return (-grad,)


# -- power with a constant exponent: d(aᵖ) = p aᵖ⁻¹ da -----------------------------------------
class Power(Function):
    def forward(self, a, exponent):
        self.a, self.exponent = a, exponent
        return a ** exponent

    def backward(self, grad):
        p, xp = self.exponent, backend.array_module(grad)
        if np.ndim(p) == 0:  # a number; a⁰ = 1 has slope 0 (not 0 · 0⁻¹ = NaN at a = 0)
            slope = p * self.a ** (p - 1) if p != 0 else xp.zeros_like(self.a)
        else:  # an array of exponents, elementwise
            p = xp.asarray(p)
            slope = p * self.a ** xp.where(p == 0, 1, p - 1)
        return (grad * slope.astype(grad.dtype, copy=False),)


# -- exp: d(eᵃ) = eᵃ da ---------------------------------------------------------------------------
class Exp(Function):
    def forward(self, a):
        self.out = backend.array_module(a).exp(a)
        return self.out

    def backward(self, grad):
        return (grad * self.out,)


# -- log: d(ln a) = da / a ----------------------------------------------------------------------
class Log(Function):
    def forward(self, a):
        self.a = a
        return backend.array_module(a).log(a)

    def backward(self, grad):
        return (grad / self.a,)


# -- matmul: C = A B, dA = dC Bᵀ, dB = Aᵀ dC (batched over leading dims) ------------------------
# A 1-D operand is promoted as NumPy and PyTorch do: a vector a (k,) on the left is the matrix
# (1, k), one on the right (k, 1); the promoted axis is dropped from C (and added back to dC).
class MatMul(_Arithmetic):
    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ShapeError(f"matmul needs (..., n, k) @ (..., k, m), where a 1-D operand is "
                             f"(k,); got {a.shape} @ {b.shape}")
        self.shapes = a.shape, b.shape
        self.a = backend.matmul_operand(a[None, :] if a.ndim == 1 else a)
        self.b = backend.matmul_operand(b[:, None] if b.ndim == 1 else b)
        out = self.a @ self.b
        self.out_shape = out.shape
        squeezed = out.shape[:-2] + out.shape[-2:-1] * (a.ndim > 1) + out.shape[-1:] * (b.ndim > 1)
        return out.reshape(squeezed)

    def backward(self, grad):
        a, b = self.a, self.b
        grad = backend.matmul_operand(grad.reshape(self.out_shape))
        grad_a = grad_b = None
        if self.needs_input_grad[0]:
            grad_a = _unbroadcast(grad @ b.swapaxes(-1, -2), a.shape).reshape(self.shapes[0])
        if self.needs_input_grad[1]:
            grad_b = _unbroadcast(a.swapaxes(-1, -2) @ grad, b.shape).reshape(self.shapes[1])
        return grad_a, grad_b


# -- copy: d copy(a) = da (Tensor.clone: new memory, still in the graph) -----------------------
class Copy(Function):
    def forward(self, a):
        return a.copy()

    def backward(self, grad):
        return (grad,)


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


# -- broadcast_to: the gradient of a broadcast is summed back over the broadcast axes ----------
class BroadcastTo(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return backend.array_module(a).broadcast_to(a, shape)

    def backward(self, grad):
        return (_unbroadcast(grad, self.shape),)


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


# -- comparisons: boolean results outside the graph (they have no gradient) --------------------
def compare(a, b, name):
    """The Tensor a <name> b elementwise, `name` a NumPy comparison ("less", "equal", ...);
    NotImplemented when b is no number, array or tensor (None, a string), so that == is then
    False and < a TypeError, as Python does for objects that cannot be compared."""
    if not isinstance(b, (Tensor, numbers.Number, list, tuple)) and not hasattr(b, "dtype"):
        return NotImplemented
    a_data = a.data
    b_data = b.data if isinstance(b, Tensor) else b if hasattr(b, "dtype") else \
        backend.array_module(a_data).asarray(b)
    return Tensor(getattr(backend.array_module(a_data, b_data), name)(a_data, b_data))


def argmax(a, axis=None, keepdims=False):
    """Indices of the largest values of Tensor `a`: an integer Tensor, outside the graph."""
    indices = a.data.argmax(axis=axis)
    if keepdims:
        indices = backend.array_module(indices).expand_dims(
            indices, tuple(range(a.ndim)) if axis is None else axis)
    return Tensor(indices)


# -- the functional API ---------------------------------------------------------------------------
def add(a, b):
    return Add()(a, b)


def sub(a, b):
    return Sub()(a, b)


def mul(a, b):
    return Mul()(a, b)


def div(a, b):
    return Div()(a, b)


def neg(a):
    return Neg()(a)


def power(a, exponent):
    if isinstance(exponent, Tensor):
        raise TypeError("Tensor ** Tensor is not supported: the exponent must be a number")
    if isinstance(exponent, np.generic):
        exponent = exponent.item()  # a NumPy scalar (np.float64(2)) must not promote float32
    return Power()(a, exponent=exponent)


def exp(a):
    return Exp()(a)


def log(a):
    return Log()(a)


def matmul(a, b):
    return MatMul()(a, b)


def copy(a):
    return Copy()(a)


def reduce_sum(a, axis=None, keepdims=False):
    return Sum()(a, axis=axis, keepdims=keepdims)


def reduce_mean(a, axis=None, keepdims=False):
    return Mean()(a, axis=axis, keepdims=keepdims)


def reduce_max(a, axis=None, keepdims=False):
    return Max()(a, axis=axis, keepdims=keepdims)


def reshape(a, shape):
    return Reshape()(a, shape=shape)


def transpose(a, axes=None):
    return Transpose()(a, axes=axes)


def broadcast_to(a, shape):
    """A read-only broadcast view of `a` with `shape` (numpy.broadcast_to)."""
    return BroadcastTo()(a, shape=tuple(shape))


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
