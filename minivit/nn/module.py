"""Module and Parameter: layers register their parameters and sub-modules by assignment."""

from collections import OrderedDict

import numpy as np

from minivit import backend as backends
from minivit.errors import WeightsError
from minivit.tensor import Tensor


def state_dict_mismatch(expected, state):
    """(missing, unexpected, misshaped) of a state dict against ``expected`` (name -> shape):
    key lists, and (name, expected shape, shape found) for each key of the wrong shape."""
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    misshaped = [(name, tuple(shape), tuple(np.shape(state[name])))
                 for name, shape in expected.items()
                 if name in state and tuple(np.shape(state[name])) != tuple(shape)]
    return missing, unexpected, misshaped


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, backend={self.backend})"


class Module:
    """Base class of every layer.

    Attributes that are Parameters, Modules or ModuleLists are found by walking ``vars(self)``
    in assignment order, so their names are the attribute paths (``blocks.0.attn.qkv.weight``),
    the same as timm's state_dict keys.
    """

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # -- traversal --------------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Parameter):
                yield path, value
            elif isinstance(value, Module):
                yield from value.named_parameters(path)

    def parameters(self):
        return [parameter for _, parameter in self.named_parameters()]

    def num_parameters(self):
        return sum(parameter.size for parameter in self.parameters())

    def zero_grad(self):
        for parameter in self.parameters():
            parameter.grad = None

    # -- modes, placement ---------------------------------------------------------------------
    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, backend=None, dtype=None):
        """Move every parameter to another backend ("numpy"/"cpu" or "cupy"/"cuda"/"gpu";
        any other name is refused) and/or dtype, in place.
        Do this before creating the optimizer (it keeps views of the parameters)."""
        backend = None if backend is None else backends.backend_name(backend)
        for parameter in self.parameters():
            data = backends.to_backend(parameter.data, backend)
            parameter.data = data.astype(dtype, copy=False) if dtype is not None else data
            parameter.grad = None
        return self

    # -- state dict -----------------------------------------------------------------------------
    def state_dict(self):
        """An ordered dict of host NumPy copies, keyed by parameter path (timm's names)."""
        return OrderedDict((name, np.array(backends.to_numpy(p.data)))
                           for name, p in self.named_parameters())

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters, in place (optimizer views stay valid).

        strict=True: every missing, unexpected or mis-shaped key is reported in one
        WeightsError. strict=False: missing and unexpected keys are allowed and returned as
        (missing, unexpected); a mis-shaped key is still a WeightsError (as in PyTorch), and
        nothing is loaded then."""
        parameters = dict(self.named_parameters())
        expected = {name: tuple(p.shape) for name, p in parameters.items()}
        missing, unexpected, misshaped = state_dict_mismatch(expected, state)
        if strict and (missing or unexpected) or misshaped:
            problems = [f"missing {', '.join(missing)}"] if strict and missing else []
            problems += [f"unexpected {', '.join(unexpected)}"] if strict and unexpected else []
            problems += [f"{name}: expected {want}, got {got}" for name, want, got in misshaped]
            raise WeightsError(f"load_state_dict: {len(misshaped)} mis-shaped key(s)"
                               + (f", {len(missing)} missing, {len(unexpected)} unexpected"
                                  if strict else "")
                               + f", nothing loaded: {'; '.join(problems)}")
        for name, parameter in parameters.items():
            if name in state:
                value = backends.to_backend(np.asarray(backends.to_numpy(state[name])),
                                            parameter.backend)
                parameter.data[...] = value.astype(parameter.dtype, copy=False)
        return missing, unexpected

    def __repr__(self):
        children = [f"  ({name}): {child!r}".replace("\n", "\n  ")
                    for name, child in self.named_children()]
        extra = self.extra_repr()
        if not children:
            return f"{type(self).__name__}({extra})"
        return f"{type(self).__name__}({extra}\n" + "\n".join(children) + "\n)"

    def extra_repr(self):
        return ""


class Constants:
    """Fixed host arrays a module computes once (a relative position index, an attention
    mask), each placed on the backend (and, if floating, the dtype) of the tensor it meets the
    first time, and that copy kept: no host-to-device copy per forward, which a CUDA-graph
    capture would refuse. One process uses one GPU, so the backend names the device."""

    def __init__(self, **arrays):
        self.host, self.placed = arrays, {}

    def get(self, name, like):
        """The array `name` on `like`'s backend (and dtype, for floating arrays)."""
        key = (name, like.backend, like.dtype if self.host[name].dtype.kind == "f" else None)
        if key not in self.placed:
            array = self.host[name]
            array = array.astype(like.dtype) if array.dtype.kind == "f" else array
            self.placed[key] = backends.to_backend(array, like.backend)
        return self.placed[key]


class ModuleList(Module):
    """A list of modules named 0, 1, 2, ... (as in timm's ``blocks.0``)."""

    def __init__(self, modules=()):
        for index, module in enumerate(modules):
            setattr(self, str(index), module)

    def __iter__(self):
        return (module for _, module in self.named_children())

    def __len__(self):
        return sum(1 for _ in self.named_children())

    def __getitem__(self, index):
        return getattr(self, str(range(len(self))[index]))
