"""Function and the backward engine (the Tensor they work on is minivit.tensor's).

A `Function` computes its forward on raw arrays, keeps only what its backward needs, and its
backward maps the output's gradient to one gradient per input (raw arrays, first order only).
``run_backward`` walks the graph in reverse topological order without recursion, accumulates
gradients into leaves and frees each Function's saved arrays as soon as its backward has run.
Grad mode (no_grad) and the op hook (op_hook, for the profiler) live here too; minivit.tensor
re-exports them all.

Rule for every backward: never write into the incoming gradient array (it may be shared).
"""

import contextlib
import threading

from minivit import backend
from minivit.errors import BackendError, DTypeError, GraphError
# minivit.tensor imports this module at its end, once Tensor is defined (minivit/__init__.py
# imports minivit.tensor first)
from minivit.tensor import Tensor, as_array

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


class Function:
    """One differentiable operation. Subclasses define

    forward(*arrays, **options) -> array   compute on raw arrays, save what backward needs
    backward(grad) -> tuple of arrays      one gradient per input (None where not needed)

    ``self.needs_input_grad`` tells backward which gradients are wanted.
    """

    def __call__(self, *inputs, **options):
        tensors = [x if isinstance(x, Tensor) else None for x in inputs]
        like = next((t.data for t in tensors if t is not None), None)
        arrays = [t.data if t is not None else None if x is None else as_array(x, like=like)
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


def check_gradient(grad, tensor, what):
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


def run_backward(root, root_grad):
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
                grad = as_array(replacement)
                check_gradient(grad, tensor, "the gradient returned by a hook")
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
            check_gradient(parent_grad, parent, f"{name}.backward's gradient for input {index}")
            previous = pending.get(id(parent))
            pending[id(parent)] = parent_grad if previous is None else previous + parent_grad
        creator.release()

