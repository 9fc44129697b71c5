"""Tensor: one backend array with an optional gradient.

A `Tensor` wraps one backend array (``.data``) and, when it needs a gradient, remembers the
`Function` that made it. Function, the backward engine, grad mode (no_grad) and the op hook
live in minivit.autograd and stay importable from here.
"""

import numbers

import numpy as np

from minivit import backend
from minivit.errors import DTypeError, GraphError


def as_array(value, dtype=None, like=None):
    """A backend array from a Tensor, array, list or scalar. Python scalars and lists become
    float32 (or `like`'s dtype) so that they never promote float32 work to float64."""
    if isinstance(value, Tensor):
        return value.data
    if isinstance(value, np.ndarray) or backend.backend_of(value) == "cupy":
        return value if dtype is None else value.astype(dtype, copy=False)
    module = backend.array_module(like) if like is not None else backend.xp()
    if dtype is None:
        if like is not None and like.dtype.kind == "f":
            dtype = like.dtype
        elif isinstance(value, np.generic):
            dtype = value.dtype  # a NumPy scalar, e.g. the result of a full reduction
        else:
            dtype = np.float32
    return module.asarray(value, dtype=dtype)


def _comparison(name):
    """A Tensor comparison method: `name` is NumPy's ("less", "equal", ...)."""
    def compare(self, other):
        return _basic.compare(self, other, name)
    return compare


class Tensor:
    """An n-dimensional array with an optional gradient.

    data: the backend array; grad: its gradient (array) after backward, or None;
    requires_grad: whether backward should compute a gradient for it.
    """

    __array_priority__ = 1000  # numpy_array * tensor dispatches to Tensor.__rmul__

    def __init__(self, data, requires_grad=False, name=None):
        self.data = as_array(data)
        if requires_grad and self.data.dtype.kind != "f":
            raise DTypeError(f"only floating-point tensors can require gradients; got dtype "
                             f"{self.data.dtype} (convert the data, e.g. .astype(np.float32))")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.name = name
        self._creator = None  # the Function that produced this tensor (None for leaves)
        self._retains_grad = False
        self._hooks = []

    # -- basic properties -------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    is_leaf = property(lambda self: self._creator is None)
    backend = property(lambda self: backend.backend_of(self.data))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def numpy(self):
        """A host NumPy copy of the data (from either backend)."""
        return np.array(backend.to_numpy(self.data))

    def item(self):
        return self.data.item()

    def detach(self):
        """The same data, cut off from the graph."""
        return Tensor(self.data)

    def to(self, backend_name=None, dtype=None):
        """A copy on another backend ("numpy"/"cpu" or "cupy"/"cuda"/"gpu") and/or dtype (a
        new leaf; an integer dtype needs no grad)."""
        data = backend.to_backend(self.data, backend_name)
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        return Tensor(data, requires_grad=self.requires_grad and data.dtype.kind == "f")

    def retain_grad(self):
        """Keep this intermediate tensor's gradient in ``.grad`` after backward."""
        self._retains_grad = True
        return self

    def register_hook(self, hook):
        """Call ``hook(grad_tensor)`` when this tensor's gradient is complete during backward.
        A hook may return a replacement gradient (Tensor or array) or None."""
        if not self.requires_grad:
            raise GraphError("register_hook on a tensor that does not require grad: "
                             "its gradient is never computed")
        self._hooks.append(hook)
        return hook

    # -- backward -------------------------------------------------------------------------
    def backward(self, grad=None, create_graph=False):
        """Backpropagate from this tensor. `grad` defaults to 1 for a one-element tensor."""
        if create_graph:
            raise GraphError("second-order gradients are not supported: every backward in "
                             "minivit works on raw arrays (first order only)")
        if not self.requires_grad:
            raise GraphError("backward() on a tensor that does not require grad: no input of "
                             "the computation had requires_grad=True (or it ran under no_grad)")
        if grad is None:
            if self.size != 1:
                raise GraphError(f"backward() without a gradient needs a one-element tensor, "
                                 f"got shape {self.shape}: pass grad= of that shape")
            grad = backend.array_module(self.data).ones_like(self.data)
        else:
            grad = as_array(grad, like=self.data)
            check_gradient(grad, self, "the gradient passed to backward()")
        run_backward(self, grad)

    # -- operators (each one Function in minivit.functional.basic, reduction, shape) -----
    def __add__(self, other):
        return _basic.add(self, other)

    def __radd__(self, other):
        return _basic.add(other, self)

    def __sub__(self, other):
        return _basic.sub(self, other)

    def __rsub__(self, other):
        return _basic.sub(other, self)

    def __mul__(self, other):
        return _basic.mul(self, other)

    def __rmul__(self, other):
        return _basic.mul(other, self)

    def __truediv__(self, other):
        return _basic.div(self, other)

    def __rtruediv__(self, other):
        return _basic.div(other, self)

    def __neg__(self):
        return _basic.neg(self)

    def __pow__(self, exponent):
        return _basic.power(self, exponent)

    def __rpow__(self, base):
        """base ** tensor for a real number base > 0: e^(tensor · ln base)."""
        if not isinstance(base, numbers.Real):
            return NotImplemented
        if not base > 0:
            raise ValueError(f"number ** tensor needs a base > 0 (it is e^(tensor · ln base)); "
                             f"got {base}")
        return _basic.exp(self * float(np.log(base)))

    # a one-element tensor as a Python value, as in PyTorch
    def _python_value(self, kind):
        if self.size != 1:
            raise TypeError(f"only a one-element tensor converts to a Python {kind.__name__}; "
                            f"this one has shape {self.shape}")
        return kind(self.data.item())

    def __bool__(self):
        return self._python_value(bool)

    def __float__(self):
        return self._python_value(float)

    def __int__(self):
        return self._python_value(int)

    def __matmul__(self, other):
        return _basic.matmul(self, other)

    def __rmatmul__(self, other):
        return _basic.matmul(other, self)

    def __getitem__(self, index):
        return _shape.getitem(self, index)

    def reshape(self, *shape):
        return _shape.reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        return _shape.transpose(self, axes[0] if len(axes) == 1 else (axes or None))

    @property
    def T(self):
        return _shape.transpose(self, None)

    # reductions take NumPy's axis/keepdims or PyTorch's dim/keepdim
    def sum(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _reduction.reduce_sum(self, *axis_and_keepdims(axis, dim, keepdims, keepdim))

    def mean(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _reduction.reduce_mean(self, *axis_and_keepdims(axis, dim, keepdims, keepdim))

    def max(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """The largest values (only the values: PyTorch's max(dim=) also returns indices,
        which argmax gives here)."""
        return _reduction.reduce_max(self, *axis_and_keepdims(axis, dim, keepdims, keepdim))

    def argmax(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """Indices of the largest values (an integer tensor, outside the graph)."""
        return _reduction.argmax(self, *axis_and_keepdims(axis, dim, keepdims, keepdim))

    def softmax(self, axis=None, *, dim=None):
        """Along `axis` (or `dim`), the last one by default."""
        return _activation.softmax(self, axis, dim=dim)

    def log_softmax(self, axis=None, *, dim=None):
        return _activation.log_softmax(self, axis, dim=dim)

    def exp(self):
        return _basic.exp(self)

    def log(self):
        return _basic.log(self)

    # -- the PyTorch names a newcomer reaches for -------------------------------------------
    def view(self, *shape):
        return self.reshape(*shape)

    def permute(self, *dims):
        return self.transpose(*dims)

    def clone(self):
        """A copy in new memory that stays in the graph (its gradient flows back to self)."""
        return _basic.copy(self)

    def requires_grad_(self, requires_grad=True):
        """Set requires_grad of a leaf tensor in place; returns the tensor."""
        if not self.is_leaf:
            raise GraphError("requires_grad_ on a tensor computed by an op: only a leaf's flag can "
                             "be set (use .detach() for a leaf with the same data)")
        if requires_grad and self.data.dtype.kind != "f":
            raise DTypeError(f"only floating-point tensors can require gradients; got dtype "
                             f"{self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        return self

    def numel(self):
        return self.size

    def tolist(self):
        """The data as (nested) Python numbers."""
        return backend.to_numpy(self.data).tolist()

    # comparisons give boolean tensors outside the graph; a tensor hashes by identity, as in
    # PyTorch, so tensors can still key dicts and sets
    __hash__ = object.__hash__

    __eq__, __ne__ = _comparison("equal"), _comparison("not_equal")
    __lt__, __le__ = _comparison("less"), _comparison("less_equal")
    __gt__, __ge__ = _comparison("greater"), _comparison("greater_equal")


def axis_and_keepdims(axis, dim, keepdims=False, keepdim=None):
    """(axis, keepdims) from NumPy's names or PyTorch's (dim, keepdim): the one home of the
    alias, for Tensor's methods and the functional ops alike."""
    if dim is not None and axis is not None:
        raise TypeError(f"pass axis or dim (PyTorch's name for it), not both: got axis={axis}, "
                        f"dim={dim}")
    return (axis if dim is None else dim), (keepdims if keepdim is None else bool(keepdim))


# Function, the engine, grad mode and the op hook build on Tensor: imported last, and kept
# importable from here (minivit.tensor.Function, op_hook, no_grad, is_grad_enabled)
from minivit.autograd import (Function, check_gradient, is_grad_enabled,  # noqa: E402, F401
                              no_grad, op_hook, run_backward)

# The operators above dispatch here; imported last because the ops build on Function.
from minivit.functional import activation as _activation  # noqa: E402
from minivit.functional import basic as _basic  # noqa: E402
from minivit.functional import reduction as _reduction  # noqa: E402
from minivit.functional import shape as _shape  # noqa: E402
