"""The fast CPU paths (minivit.cpu) of the GEMMs and AdamW against the plain computation:
linear and patchify through split GEMMs (really split into several tasks), the matmul kernel,
and AdamW's chunked update and gradient gathering.
Every test runs with and without numba (tests/helpers_fast_paths.py); no timing asserted.
"""

import numpy as np
import pytest
from helpers_fast_paths import kernels  # noqa: F401 (autouse: every test with and without numba)
from helpers_fast_paths import TOLERANCES, assert_fast_matches_plain, split_gemms, threads

import minivit
import minivit.functional as F
from minivit import Tensor, cpu
from minivit.cpu import gemm
from minivit.models import create_model
from minivit.optim import AdamW


# -- GEMMs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [2, 3])
def test_linear_split_gemms_match_plain(dtype, n_threads):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, 43, 40)).astype(dtype)  # 258 rows: ragged row blocks
    w = rng.standard_normal((50, 40)).astype(dtype) * 0.1
    b = rng.standard_normal(50).astype(dtype)
    with threads(n_threads), split_gemms():
        assert_fast_matches_plain(F.linear, [x, w, b], **TOLERANCES[dtype])


def test_large_gemms_really_are_split_into_several_tasks(monkeypatch):
    sizes = []
    original = gemm.run_tasks

    def counting(tasks, parallel=True):
        sizes.append(len(tasks))
        return original(tasks, parallel)

    monkeypatch.setattr(gemm, "run_tasks", counting)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((64, 40)).astype(np.float32)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    with threads(2), split_gemms():
        assert_fast_matches_plain(F.linear, [x, w], **TOLERANCES[np.float32])
    assert len(sizes) >= 2 and min(sizes) > 1  # forward, then backward (dx, dW, db blocks)


def test_linear_split_gemm_without_bias_and_with_transposed_input():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 300)).T  # (300, 40), Fortran-ordered
    w = rng.standard_normal((24, 40))
    with threads(2), split_gemms():
        assert_fast_matches_plain(F.linear, [x, w], **TOLERANCES[np.float64])


def test_patchify_split_gemms_match_plain():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((9, 3, 16, 16)).astype(np.float32)
    w = rng.standard_normal((20, 3, 4, 4)).astype(np.float32) * 0.1
    b = rng.standard_normal(20).astype(np.float32)
    with threads(2), split_gemms():
        assert_fast_matches_plain(lambda x, w, b: F.patchify(x, w, b, 4), [x, w, b],
                                  **TOLERANCES[np.float32])


def test_matmul_kernel_matches_numpy():
    rng = np.random.default_rng(13)
    a, b = rng.standard_normal((517, 33)), rng.standard_normal((33, 29))
    bias = rng.standard_normal(29)
    with threads(3), split_gemms():
        np.testing.assert_allclose(cpu.matmul(a, b, bias=bias), a @ b + bias, rtol=1e-12)
        out = np.empty((517, 29))
        assert cpu.matmul(a, b, out=out) is out
        np.testing.assert_allclose(out, a @ b, rtol=1e-12)


# -- AdamW ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_chunked_update_matches_plain(dtype):
    def run(fast):
        minivit.manual_seed(0)
        model = create_model("vit_digits", depth=1).to(dtype=dtype)
        optimizer = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
        rng = np.random.default_rng(14)
        with cpu.fast_paths(fast), threads(2):
            for _ in range(3):
                for p in optimizer.parameters:
                    p.grad = rng.standard_normal(p.shape).astype(dtype)
                optimizer.step(max_grad_norm=1.0)
        return optimizer.flat.copy(), optimizer.m.copy(), optimizer.v.copy()

    for fast, plain in zip(run(True), run(False)):
        assert fast.dtype == dtype
        np.testing.assert_allclose(fast, plain, rtol=1e-6 if dtype == np.float32 else 1e-13,
                                   atol=1e-7 if dtype == np.float32 else 1e-15)


def test_gather_grads_counts_a_missing_gradient_as_zero_and_refuses_a_wrong_size():
    rng = np.random.default_rng(15)
    named = [(name, Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True))
             for name, shape in (("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (2, 2)))]
    optimizer = AdamW(named)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for _, p in named]
    for (_, p), grad in zip(named, grads):
        p.grad = grad
    np.testing.assert_array_equal(optimizer.gather_grads(),
                                  np.concatenate([g.ravel() for g in grads]))
    named[1][1].grad = None  # a parameter the loss did not reach
    np.testing.assert_array_equal(optimizer.gather_grads(),
                                  np.concatenate([grads[0].ravel(), np.zeros(3), grads[2].ravel()]))
    named[1][1].grad = np.ones(2, np.float32)  # wrong size: an error, not a shifted copy
    with pytest.raises(ValueError):
        optimizer.gather_grads()
