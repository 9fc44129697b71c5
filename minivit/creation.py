"""New tensors as PyTorch makes them: minivit.tensor(...), zeros, ones, randn. Each is a new leaf
on the current backend."""

import numbers
import sys
import types

import numpy as np

from minivit import backend
from minivit.tensor import Tensor


def _shape(shape):
    """zeros(2, 3) and zeros((2, 3)) alike."""
    return tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], numbers.Integral) \
        else tuple(shape)


def tensor(data, dtype=None, requires_grad=False):
    """A new leaf Tensor holding a copy of `data` (a list, number, array or Tensor) on the
    current backend. Python floats become float32 (PyTorch's default), Python ints int64;
    arrays keep their dtype unless `dtype` is given."""
    array = backend.to_numpy(data.data if isinstance(data, Tensor) else data)
    if dtype is None and array.dtype == np.float64 and not hasattr(data, "dtype"):
        dtype = np.float32
    return Tensor(backend.to_backend(array.astype(dtype or array.dtype)), requires_grad)


def zeros(*shape, dtype="float32", requires_grad=False):
    return Tensor(backend.xp().zeros(_shape(shape), dtype=dtype), requires_grad)


def ones(*shape, dtype="float32", requires_grad=False):
    return Tensor(backend.xp().ones(_shape(shape), dtype=dtype), requires_grad)


def randn(*shape, dtype="float32", requires_grad=False):
    """Standard normal numbers from minivit's generator (seeded by minivit.manual_seed)."""
    values = backend.random_generator().standard_normal(_shape(shape), dtype=dtype)
    return Tensor(values, requires_grad)


class _CallableTensorModule(types.ModuleType):
    """The module minivit.tensor, callable as the constructor: `minivit.tensor([1.0, 2.0])` is
    torch.tensor's habit, while `minivit.tensor.Tensor` and `minivit.tensor.op_hook` stay the
    module's names (a module may take a ModuleType subclass as its __class__)."""

    def __call__(self, data, dtype=None, requires_grad=False):
        return tensor(data, dtype, requires_grad)


sys.modules["minivit.tensor"].__class__ = _CallableTensorModule
