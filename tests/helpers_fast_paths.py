"""Helpers shared by the fast CPU path tests (tests/test_fast_paths_*.py): the autouse `kernels`
fixture (each test module imports it, so that every test there runs twice: with the compiled
numba kernels and with the chunked NumPy code), thread counts with lowered size thresholds,
and the fast-against-plain comparison. No timing in those tests: speed is measured by
`minivit bench`, never asserted."""

import contextlib

import numpy as np
import pytest

from minivit import Tensor, cpu
from minivit.cpu import pool, runtime


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def kernels(request):
    """Every test here runs twice: with the compiled kernels (minivit.cpu.compiled) and with
    the chunked NumPy code that runs when numba is not installed."""
    if request.param == "numba":
        pytest.importorskip("numba", reason="numba (the 'fast' extra) is not installed")
    with cpu.compiled_kernels(request.param == "numba"):
        assert cpu.compiled_kernels_available() == (request.param == "numba")
        yield request.param


_THRESHOLDS = ("MIN_PARALLEL", "MIN_PARALLEL_ROWS", "MIN_SPLIT_MACS", "MIN_BLOCK_ROWS")


@contextlib.contextmanager
def threads(n):
    """Run on `n` threads, with the size thresholds lowered so that test-sized inputs take the
    threaded code paths too."""
    previous = cpu.num_threads()
    saved = {name: getattr(pool, name) for name in _THRESHOLDS}
    cpu.set_num_threads(n)
    for name in _THRESHOLDS:
        setattr(pool, name, 8 if name == "MIN_BLOCK_ROWS" else 1)
    try:
        yield
    finally:
        cpu.set_num_threads(previous)
        for name, value in saved.items():
            setattr(pool, name, value)


@contextlib.contextmanager
def split_gemms():
    """Skip unless minivit splits GEMMs itself (it needs BLAS on one thread: threadpoolctl)."""
    if not cpu.blas_info()["controlled"] and not runtime.blas_env_is_one():
        pytest.skip("threadpoolctl is not installed: BLAS threads cannot be controlled, "
                    "so minivit does not split GEMMs itself")
    yield


def run_op(fn, arrays, grad_out_seed=0, fast=True):
    """(output, input gradients) of fn(*tensors) with a random upstream gradient."""
    with cpu.fast_paths(fast):
        tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
        out = fn(*tensors)
        upstream = np.random.default_rng(grad_out_seed).standard_normal(out.shape)
        out.backward(upstream.astype(out.dtype))
        return out.data, [t.grad for t in tensors]


def assert_fast_matches_plain(fn, arrays, rtol, atol):
    """Fast and plain outputs and gradients agree; atol is relative to each array's largest
    magnitude (sums over many rows, e.g. a LayerNorm weight's gradient, cancel)."""
    fast_out, fast_grads = run_op(fn, arrays, fast=True)
    plain_out, plain_grads = run_op(fn, arrays, fast=False)
    assert fast_out.dtype == plain_out.dtype == arrays[0].dtype
    for fast, plain in zip([fast_out] + fast_grads, [plain_out] + plain_grads):
        assert fast.dtype == arrays[0].dtype and fast.shape == plain.shape
        scale = max(1.0, float(np.max(np.abs(plain))))
        np.testing.assert_allclose(fast, plain, rtol=rtol, atol=atol * scale)


TOLERANCES = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}

