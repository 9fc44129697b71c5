"""Helpers shared by the op tests (tests/test_ops_*.py): running an op forward only, drawing
memory layouts for its inputs, and a NumPy softmax reference.

The op tests check forward values against a NumPy reference and gradients against central
differences (minivit.gradcheck, float64, relative error <= 1e-6). Hypothesis draws the shapes,
the values (bounded, no subnormals, no NaN/inf), the memory layout of every input (contiguous,
transposed, strided, reversed view) and the seed of gradcheck's random upstream gradient."""

import numpy as np
from conftest import as_host, layout, layouts

from minivit import Tensor

EXACT = dict(rtol=1e-12, atol=1e-12)


def forward(fn, *arrays):
    """fn on plain Tensors (no gradient), as a host array."""
    return as_host(fn(*[Tensor(a) if hasattr(a, "dtype") and a.dtype.kind == "f" else a
                        for a in arrays]).data)


def draw_inputs(data, *host_arrays):
    """Each host array on the backend in a drawn memory layout."""
    return [layout(a, data.draw(layouts, label=f"layout {i}")) for i, a in enumerate(host_arrays)]


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

