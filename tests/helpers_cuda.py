"""Helpers shared by the CUDA tests (tests/test_cuda_*.py): the GPU skip mark, per-dtype
tolerances, a float64 gradient check with a round-off floor, and the check that a fused cupy
kernel equals the NumPy path forward and backward. (The `cp` fixture, CuPy itself: conftest.)"""

import numpy as np
import pytest

import minivit
from minivit import Tensor
from minivit import backend as mb
from minivit.cuda import device

GPU = pytest.mark.skipif(not mb.cupy_available(),
                         reason="fused CUDA kernels: CuPy or a CUDA GPU is not available")
TOLERANCE = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


def check_gradients(fn, *inputs, seed=0):
    """minivit.gradcheck in float64 at relative error 1e-6, with an absolute floor at the round-off
    of central differences (~1e-9 · Σ|f|), as tests/conftest.py's helper of the same name."""
    with minivit.no_grad():
        out = fn(*[Tensor(a) if a.dtype.kind == "f" else a for a in inputs])
    atol = max(1e-10, 1e-9 * float(abs(out.data).sum()))
    report = minivit.gradcheck(fn, *inputs, seed=seed, rtol=1e-6, atol=atol)
    assert report.passed, f"gradient check failed:\n{report}"


def _run(fn, host_inputs, host_upstream, on_gpu):
    """fn on Tensors (float inputs require grad) and backward with a given upstream gradient;
    returns the host output and the host gradients of the float inputs."""
    import cupy
    move = cupy.asarray if on_gpu else np.asarray
    tensors = [Tensor(move(a), requires_grad=True) if a.dtype.kind == "f" else move(a)
               for a in host_inputs]
    out = fn(*tensors)
    out.backward(move(host_upstream))
    grads = [mb.to_numpy(t.grad) for t in tensors if isinstance(t, Tensor)]
    return mb.to_numpy(out.data), grads


def _assert_fused_matches_numpy(fn, host_inputs, kernel, dtype, seed=0):
    """The fused cupy path (which must build `kernel`) equals the NumPy path, forward and
    backward, and keeps the dtype."""
    rng = np.random.default_rng(seed)
    with minivit.no_grad():
        shape = fn(*[Tensor(a) if a.dtype.kind == "f" else a for a in host_inputs]).shape
    upstream = rng.standard_normal(shape).astype(dtype)
    device.kernels.pop(kernel, None)
    out_gpu, grads_gpu = _run(fn, host_inputs, upstream, on_gpu=True)
    assert kernel in device.kernels, f"the fused kernel {kernel} was not used"
    out_cpu, grads_cpu = _run(fn, host_inputs, upstream, on_gpu=False)
    assert out_gpu.dtype == dtype
    np.testing.assert_allclose(out_gpu, out_cpu, **TOLERANCE[dtype])
    for g_gpu, g_cpu in zip(grads_gpu, grads_cpu):
        assert g_gpu.dtype == dtype
        np.testing.assert_allclose(g_gpu, g_cpu, **TOLERANCE[dtype])
