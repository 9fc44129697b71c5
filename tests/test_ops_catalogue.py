"""Every op of the catalogue (minivit.inspect.opchecks): every CPU and plain implementation
runs, non-contiguous inputs match contiguous copies, the plain NumPy code behind the fast
CPU paths passes the gradient check, float32 in -> float32 out (Python and NumPy scalars
included). The per-op values and gradients: tests/test_ops_*.py.
"""

import numpy as np
import pytest
from conftest import (FIXTURE_OK, LAYOUTS, arrays, as_host, away_from_zero, check_gradients,
                      distinct_arrays, floats, layout, on_backend, seeds)
from helpers_ops import forward
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minivit.functional as F
from minivit import Tensor, cpu
from minivit.functional import registry
from minivit.inspect.opchecks import OP_CHECKS
from minivit.optim import AdamW


# -- every op of the catalogue (minivit.inspect.opchecks): layouts, the plain code, float32 ------
OP_CASES = {name: check for name, check in OP_CHECKS.items() if check.whole_model is None}


def strategy(spec):
    """Hypothesis values for one Input of the catalogue."""
    if spec.kind == "index":
        return st.just(np.array(spec.values))
    if spec.kind == "labels":
        return hnp.arrays(np.int64, spec.shape, elements=st.integers(0, spec.classes - 1))
    if spec.kind == "distinct":
        return distinct_arrays(spec.shape)
    elements = {"normal": floats(), "positive": floats(0.1, 3.0), "away": away_from_zero(),
                "probabilities": floats(0.1, 1.0)}
    return arrays(spec.shape, elements=elements[spec.kind])


def test_the_catalogue_runs_every_cpu_and_plain_implementation(monkeypatch):
    """Every "cpu" and "plain" implementation in the registry runs, forward and backward,
    when the catalogue's ops (and an AdamW step) run with the fast CPU paths on and off: the
    tests that go through OP_CASES cover every implementation of every op (the "cuda" ones:
    tests/test_cuda_kernels.py)."""
    ran = set()

    def recorded(impl, method):
        original = getattr(impl, method)

        def run(*args, **kwargs):
            ran.add((impl.op, impl.device, method))
            return original(*args, **kwargs)
        return run

    expected = set()
    for impls in registry.implementations().values():
        for impl in impls:
            for method in ("forward", "backward"):
                if impl.device != "cuda" and hasattr(impl, method):
                    monkeypatch.setattr(impl, method, recorded(impl, method))
                    expected.add((impl.op, impl.device, method))
    rng = np.random.default_rng(0)
    for fast in (True, False):
        with cpu.fast_paths(fast):
            for check in OP_CASES.values():
                inputs = [Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a
                          for a in check.build(rng).values()]
                out = check.fn(*inputs)
                out.backward(rng.standard_normal(out.shape))
            weights = Tensor(rng.standard_normal(4), requires_grad=True)
            weights.grad = rng.standard_normal(4)
            AdamW([("w", weights)]).step()
    assert ran == expected, f"never ran: {sorted(expected - ran)}"


def _run(fn, arrays, upstream):
    """Forward and backward with a given upstream gradient: (output, [input gradients])."""
    tensors = [Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a for a in arrays]
    out = fn(*tensors)
    out.backward(upstream)
    grads = [as_host(t.grad) for t in tensors if isinstance(t, Tensor)]
    return as_host(out.data), grads


@pytest.mark.parametrize("name", sorted(OP_CASES))
@FIXTURE_OK
@given(data=st.data())
def test_non_contiguous_inputs_match_contiguous_copies(backend, name, data):
    fn, specs = OP_CASES[name].fn, OP_CASES[name].inputs
    host = [data.draw(strategy(spec), label=f"input {i}") for i, spec in enumerate(specs)]
    kinds = [data.draw(st.sampled_from(LAYOUTS[1:]), label=f"layout {i}") for i in range(len(host))]
    views = [layout(a, kind) if a.dtype.kind == "f" else on_backend(a)
             for a, kind in zip(host, kinds)]
    assert any(not v.flags.c_contiguous for v in views)
    copies = [on_backend(a) for a in host]
    out_shape = forward(fn, *copies).shape
    upstream = on_backend(np.random.default_rng(data.draw(seeds)).standard_normal(out_shape))
    out_view, grads_view = _run(fn, views, upstream)
    out_copy, grads_copy = _run(fn, copies, upstream)
    np.testing.assert_allclose(out_view, out_copy, rtol=1e-12, atol=1e-12)
    for g_view, g_copy in zip(grads_view, grads_copy):
        np.testing.assert_allclose(g_view, g_copy, rtol=1e-12, atol=1e-12)
    for view, original in zip(views, host):  # inputs are never written to
        np.testing.assert_array_equal(as_host(view), original)


# -- the plain NumPy code behind the fast CPU paths -----------------------------------------------
def case_arrays(specs, rng, floats, dtype=None):
    """One array per input spec of an OP_CASES entry: integer labels or indices, distinct
    values (of `dtype`) where the spec asks for them, else floats(spec)."""
    arrays = []
    for spec in specs:
        if spec.kind == "index":
            arrays.append(on_backend(np.array(spec.values)))
        elif spec.kind == "labels":
            arrays.append(on_backend(rng.integers(0, spec.classes, spec.shape)))
        elif spec.kind == "distinct":
            values = rng.permutation(np.prod(spec.shape)).reshape(spec.shape) / 7.0
            arrays.append(on_backend(values, dtype))
        else:
            arrays.append(floats(spec))
    return arrays


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_gradients_with_the_fast_cpu_paths_off(name):
    """The Hypothesis tests above run the default dispatch (minivit.cpu's chunked kernels for
    NumPy arrays); the whole-array NumPy code under them (MINIVIT_FAST_CPU=0, and the code
    the cupy backend shares) gets the same gradient check here, one drawn-once example per op."""
    fn, specs = OP_CASES[name].fn, OP_CASES[name].inputs
    rng = np.random.default_rng(sorted(OP_CASES).index(name))
    lowest = {"positive": 0.1, "away": 0.5, "probabilities": 0.1}
    inputs = case_arrays(specs, rng, lambda spec: layout(
        rng.uniform(lowest.get(spec.kind, -3.0), 3.0, spec.shape), "transposed"))
    with cpu.fast_paths(False):
        check_gradients(fn, *inputs, seed=7)


# -- float32 stays float32 ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_float32_inputs_give_float32_outputs_and_gradients(backend, name):
    fn, specs = OP_CASES[name].fn, OP_CASES[name].inputs
    rng = np.random.default_rng(0)
    arrays32 = case_arrays(specs, rng, lambda spec: on_backend(rng.uniform(0.5, 2.0, spec.shape),
                                                               np.float32), np.float32)
    tensors = [Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a for a in arrays32]
    out = fn(*tensors)
    assert out.dtype == np.float32, f"{name}: output is {out.dtype}"
    out.backward(on_backend(rng.standard_normal(out.shape), np.float32))
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor):
            assert t.grad.dtype == np.float32, f"{name}: gradient of input {i} is {t.grad.dtype}"


SCALAR_MIXES = {
    "x * 0.5": lambda x: x * 0.5,
    "0.5 * x": lambda x: 0.5 * x,
    "x + 1.0": lambda x: x + 1.0,
    "2.0 - x": lambda x: 2.0 - x,
    "x / 3.0": lambda x: x / 3.0,
    "1.0 / x": lambda x: 1.0 / x,
    "x ** 2.0": lambda x: x ** 2.0,
    "x ** 2": lambda x: x ** 2,
    "x * np.float64": lambda x: x * np.float64(0.5),
    "np.float64 * x": lambda x: np.float64(0.5) * x,
    "x + np.float64": lambda x: x + np.float64(1.0),
    "np.float64 - x": lambda x: np.float64(2.0) - x,
    "x / np.float64": lambda x: x / np.float64(3.0),
    "np.float64 / x": lambda x: np.float64(1.0) / x,
    "x ** np.float64": lambda x: x ** np.float64(2.0),
    "x.mean()": lambda x: x.mean(),
    "x.mean(axis=0)": lambda x: x.mean(axis=0),
    "x.sum() / n": lambda x: x.sum() / x.size,
    "layer_norm eps": lambda x: F.layer_norm(x, eps=1e-5),
    "attention scale": lambda x: F.scaled_dot_product_attention(
        x.reshape(1, 1, 2, 3), x.reshape(1, 1, 2, 3), x.reshape(1, 1, 2, 3), scale=0.3),
    "cross_entropy smoothing": lambda x: F.cross_entropy(x, on_backend([0, 2]),
                                                         label_smoothing=0.1),
}


@pytest.mark.parametrize("name", sorted(SCALAR_MIXES))
def test_python_and_numpy_scalars_do_not_promote_float32(backend, name):
    x = Tensor(on_backend([[0.5, 1.0, 1.5], [2.0, 2.5, 3.0]], np.float32), requires_grad=True)
    out = SCALAR_MIXES[name](x)
    assert out.dtype == np.float32, f"{name}: output is {out.dtype}"
    out.sum().backward()
    assert x.grad.dtype == np.float32, f"{name}: gradient is {x.grad.dtype}"
