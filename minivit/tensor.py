"""Tensor, Function and the backward engine.

A `Tensor` wraps one backend array (``.data``) and, when it needs a gradient, remembers the
`Function` that made it. A `Function` computes its forward on raw arrays, keeps only what its
backward needs, and its backward maps the output's gradient to one gradient per input (raw
arrays, first order only). ``Tensor.backward`` walks the graph in reverse topological order
without recursion, accumulates gradients into leaves and frees each Function's saved arrays
as soon as its backward has run.

Rule for every backward: never write into the incoming gradient array (it may be shared).
"""

import contextlib
import numbers
import threading

import numpy as np

from minivit import backend
from minivit.errors import BackendError, DTypeError, GraphError

_grad_mode = threading.local()

# The engine's hook point (set by op_hook); while None it costs one check per forward/backward.
_op_hook = None


@contextlib.contextmanager
def op_hook(hook):
    """Inside this block (process-wide) every Function's forward and backward runs as
    ``hook(function, phase, method, arrays, options)``, phase "forward" or "backward" (arrays
    = (grad,)), which must return ``method(*arrays, **options)``. The per-op profiler
    (minivit.bench.profile) times the ops so."""
    global _op_hook
    previous, _op_hook = _op_hook, hook
    try:
        yield hook
    finally:
        _op_hook = previous


def is_grad_enabled():
    return getattr(_grad_mode, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Inside this block operations build no graph (inference, parameter updates)."""
    previous = is_grad_enabled()
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


def _as_array(value, dtype=None, like=None):
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
        self.data = _as_array(data)
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
            grad = _as_array(grad, like=self.data)
            _check_gradient(grad, self, "the gradient passed to backward()")
        _run_backward(self, grad)

    # -- operators (each one Function in minivit.functional.basic) -----------------------
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
        return _basic.getitem(self, index)

    def reshape(self, *shape):
        return _basic.reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        return _basic.transpose(self, axes[0] if len(axes) == 1 else (axes or None))

    @property
    def T(self):
        return _basic.transpose(self, None)

    # reductions take NumPy's axis/keepdims or PyTorch's dim/keepdim
    def sum(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _basic.reduce_sum(self, *_axis(axis, dim, keepdims, keepdim))

    def mean(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return _basic.reduce_mean(self, *_axis(axis, dim, keepdims, keepdim))

    def max(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """The largest values (only the values: PyTorch's max(dim=) also returns indices,
        which argmax gives here)."""
        return _basic.reduce_max(self, *_axis(axis, dim, keepdims, keepdim))

    def argmax(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """Indices of the largest values (an integer tensor, outside the graph)."""
        return _basic.argmax(self, *_axis(axis, dim, keepdims, keepdim))

    def softmax(self, axis=None, *, dim=None):
        """Along `axis` (or `dim`), the last one by default."""
        axis = _axis(axis, dim)[0]
        return _activation.softmax(self, axis=-1 if axis is None else axis)

    def log_softmax(self, axis=None, *, dim=None):
        axis = _axis(axis, dim)[0]
        return _activation.log_softmax(self, axis=-1 if axis is None else axis)

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


def _axis(axis, dim, keepdims=False, keepdim=None):
    """(axis, keepdims) from NumPy's names or PyTorch's (dim, keepdim)."""
    if dim is not None and axis is not None:
        raise TypeError(f"pass axis or dim (PyTorch's name for it), not both: got axis={axis}, "
                        f"dim={dim}")
    return (axis if dim is None else dim), (keepdims if keepdim is None else bool(keepdim))


class Function:
    """One differentiable operation. Subclasses define

    forward(*arrays, **options) -> array   compute on raw arrays, save what backward needs
    backward(grad) -> tuple of arrays      one gradient per input (None where not needed)

    ``self.needs_input_grad`` tells backward which gradients are wanted.
    """

    def __call__(self, *inputs, **options):
        tensors = [x if isinstance(x, Tensor) else None for x in inputs]
        like = next((t.data for t in tensors if t is not None), None)
        arrays = [t.data if t is not None else None if x is None else _as_array(x, like=like)
                  for t, x in zip(tensors, inputs)]
        backend.array_module(*arrays)  # raises on mixed numpy/cupy inputs
        arrays = self._same_float_dtype(tensors, arrays)
        self.needs_input_grad = tuple(t is not None and t.requires_grad for t in tensors)
        if _op_hook is None:
            output = Tensor(self.forward(*arrays, **options))
        else:
            output = Tensor(_op_hook(self, "forward", self.forward, arrays, options))
        if is_grad_enabled() and any(self.needs_input_grad):
            output.requires_grad = True
            output._creator = self
            self.inputs = tensors
        return output

    # raw (non-Tensor) integer arrays are labels or indices unless the op says they are numbers
    casts_integer_constants = False

    def _same_float_dtype(self, tensors, arrays):
        """The floating Tensor inputs share one dtype (DTypeError naming both otherwise); raw
        floating arrays, and raw integer arrays of arithmetic ops, are cast to it: a constant
        never promotes float32 work to float64 (a float64 result would meet a float32
        gradient in backward)."""
        dtype, raw = None, False
        for tensor, array in zip(tensors, arrays):
            if tensor is None:
                raw = raw or array is not None
            elif array.dtype.kind == "f":
                if dtype is None:
                    dtype = array.dtype
                elif array.dtype != dtype:
                    raise DTypeError(f"{type(self).__name__.lower()}: inputs of different dtypes "
                                     f"({', '.join(sorted((str(dtype), str(array.dtype))))}); "
                                     f"convert one with Tensor.to(dtype=...) or "
                                     f"model.to(dtype=...)")
        if dtype is None or not raw:
            return arrays
        kinds = "fiub" if self.casts_integer_constants else "f"
        return [a.astype(dtype) if t is None and a is not None and a.dtype.kind in kinds
                and a.dtype != dtype else a for t, a in zip(tensors, arrays)]

    def forward(self, *arrays, **options):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def release(self):
        """Drop the saved arrays and the links to the inputs after backward has used them."""
        self.__dict__.clear()
        self.released = True


def _check_gradient(grad, tensor, what):
    """A gradient must match its tensor's shape, dtype and backend: anything else is a bug."""
    if type(grad) is not type(tensor.data) and \
            backend.backend_of(grad) != backend.backend_of(tensor.data):
        raise BackendError(f"{what} is a {backend.backend_of(grad)} array but the tensor lives "
                           f"on {backend.backend_of(tensor.data)}")
    if grad.shape != tensor.shape or grad.dtype != tensor.dtype:
        raise GraphError(f"{what} has shape {grad.shape} and dtype {grad.dtype}; expected "
                         f"shape {tensor.shape} and dtype {tensor.dtype}")


def _topological_order(root):
    """Tensors reachable from `root` through Functions, inputs before outputs (no recursion)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        tensor, inputs_done = stack.pop()
        if inputs_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        creator = tensor._creator
        if creator is not None and not getattr(creator, "released", False):
            for parent in creator.inputs:
                if parent is not None and parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def _owner(array):
    """The array that owns `array`'s memory (itself unless it is a view)."""
    while array.base is not None and hasattr(array.base, "base"):
        array = array.base
    return array


def _run_backward(root, root_grad):
    pending = {id(root): root_grad}  # gradients still being accumulated, by tensor id
    # memory already handed out (as some tensor's .grad, or the caller's own upstream array),
    # by the id of the array that owns it: a view of it (reshape, transpose) is the same memory
    stored = {id(_owner(root_grad))}
    for tensor in reversed(_topological_order(root)):
        grad = pending.pop(id(tensor), None)
        if grad is None:
            continue
        for hook in tensor._hooks:
            replacement = hook(Tensor(grad))
            if replacement is not None:
                grad = _as_array(replacement)
                _check_gradient(grad, tensor, "the gradient returned by a hook")
        creator = tensor._creator
        if creator is None or tensor._retains_grad:
            if tensor.grad is not None:
                tensor.grad = tensor.grad + grad
            else:  # an op may hand one array (or views of it) to several inputs: a + b
                owner = id(_owner(grad))
                tensor.grad = grad.copy() if owner in stored else grad
                stored.add(owner if tensor.grad is grad else id(tensor.grad))
        if creator is None:
            continue
        if getattr(creator, "released", False):
            raise GraphError("backward through a graph that was already freed: a previous "
                             "backward() released its saved arrays. Run the forward pass again "
                             "(or add the losses and call backward() once).")
        if _op_hook is None:
            input_grads = creator.backward(grad)
        else:
            input_grads = _op_hook(creator, "backward", creator.backward, (grad,), {})
        name = type(creator).__name__
        for index, (parent, parent_grad) in enumerate(zip(creator.inputs, input_grads)):
            if parent is None or not parent.requires_grad or parent_grad is None:
                continue
            _check_gradient(parent_grad, parent, f"{name}.backward's gradient for input {index}")
            previous = pending.get(id(parent))
            pending[id(parent)] = parent_grad if previous is None else previous + parent_grad
        creator.release()


# The operators above dispatch here; imported last because basic.py builds on Function.
from minivit.functional import activation as _activation  # noqa: E402
from minivit.functional import basic as _basic  # noqa: E402
