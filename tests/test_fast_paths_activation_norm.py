"""The fast CPU paths (minivit.cpu) of GELU, LayerNorm and softmax against the plain or exact
computation:
- float32 GELU (erfc-based Φ, chunked, threaded) against float64 exact GELU (scipy erf);
- the chunked, threaded GELU, LayerNorm and softmax against the plain whole-array NumPy code
  (``cpu.fast_paths(False)``), in float32 and float64, with 1 and several threads and sizes
  that leave ragged last blocks.
Every test runs with and without numba (tests/helpers_fast_paths.py); no timing asserted.
"""

import numpy as np
import pytest
from helpers_fast_paths import kernels  # noqa: F401 (autouse: every test with and without numba)
from helpers_fast_paths import TOLERANCES, assert_fast_matches_plain, threads

import minivit
import minivit.functional as F
from minivit import Tensor, cpu
from minivit.cpu import activation as cpu_activation


# -- GELU ---------------------------------------------------------------------------------------------
def exact_gelu64(x):
    from scipy.special import ndtr

    x = np.asarray(x, dtype=np.float64)
    cdf = ndtr(x)
    return x * cdf, cdf + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


def dense_grid():
    grid = np.linspace(-12, 12, 400_001)
    tiny = np.logspace(-30, 1, 20_001)
    return np.concatenate([grid, tiny, -tiny]).astype(np.float32)


def test_float32_gelu_matches_exact_gelu_to_float32_rounding():
    x = dense_grid()
    y, d = cpu_activation.gelu_forward(x, "none", need_grad=True)
    assert y.dtype == d.dtype == np.float32
    ref_y, ref_d = exact_gelu64(x)
    # Φ itself: y = max(x, 0) − |x|·e recovers Φ everywhere to ~2 float32 ulps of 1
    scale = np.maximum(np.abs(x), 1.0)
    assert np.max(np.abs(y - ref_y) / scale) < 2.5e-7
    # relative accuracy of y where it is not vanishingly small (x > -8: |y| > 1e-14)
    keep = (x > -8) & (np.abs(ref_y) > 1e-30)
    rel = np.abs(y[keep] - ref_y[keep]) / np.abs(ref_y[keep])
    assert rel.max() < 5e-6, rel.max()
    assert np.max(rel[x[keep] > -3]) < 2e-6
    # the derivative, absolutely (it is O(1)), to a few float32 ulps
    assert np.max(np.abs(d - ref_d)) < 5e-7


def test_half_erfc_float32_relative_error_on_a_dense_grid():
    from scipy.special import erfc

    a = np.linspace(0, 14, 1_000_001).astype(np.float32)
    out, t, u = (np.empty_like(a) for _ in range(3))
    cpu_activation.half_erfc_float32(a, out, t, u)
    ref = 0.5 * erfc(a.astype(np.float64) / np.sqrt(2.0))
    keep = ref > 1e-37  # float32's normal range
    rel = np.abs(out[keep] - ref[keep]) / ref[keep]
    # Numerical Recipes' erfcc is good to 1.2e-7 relative; evaluating it in float32 adds a few
    # ulps (the Horner sum of ~1-sized alternating terms, ~5e-7 near 0) plus the rounding of
    # the exponent −a²/2 + ..., which grows like a² ulps: float32's own conditioning there
    assert np.all(rel < 7e-7 + 1e-7 * a[keep] ** 2)
    assert np.max(rel[a[keep] < 2]) < 7e-7


def test_float32_gelu_error_is_no_worse_than_plain_float32_with_exact_erf():
    """The plain float32 path (scipy erf, then x·½(1 + erf)) is the 'exact' float32 baseline."""
    x = dense_grid()
    ref_y, _ = exact_gelu64(x)
    fast, _ = cpu_activation.gelu_forward(x, "none", need_grad=False)
    with cpu.fast_paths(False):
        plain = F.gelu(Tensor(x)).data
    assert plain.dtype == np.float32
    keep = np.abs(ref_y) > 1e-30
    fast_err = np.abs(fast[keep] - ref_y[keep]) / np.abs(ref_y[keep])
    plain_err = np.abs(plain[keep] - ref_y[keep]) / np.abs(ref_y[keep])
    assert fast_err.max() <= plain_err.max()


def test_float32_gelu_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000) * 3, np.linspace(-6, 6, 100_001)])
    x = x.astype(np.float32)
    ours = F.gelu(Tensor(x)).data
    theirs = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    # PyTorch's float32 erf (Abramowitz-Stegun 7.1.26, inside x·½(1 + erf)) is off by up to
    # ~1.2e-6 absolutely where GELU is small and negative; elsewhere the two agree to 1e-5
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1.5e-6)
    exact, _ = exact_gelu64(x)
    assert np.max(np.abs(ours - exact)) < np.max(np.abs(theirs - exact))
    ours_tanh = F.gelu(Tensor(x), approximate="tanh").data
    theirs_tanh = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(ours_tanh, theirs_tanh, rtol=1e-5, atol=1e-6)


def test_float64_gelu_keeps_the_exact_erf():
    x = np.linspace(-9, 9, 20_001)
    from scipy.special import erf

    y, d = cpu_activation.gelu_forward(x, "none", need_grad=True)
    cdf = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    np.testing.assert_allclose(y, x * cdf, rtol=1e-14, atol=1e-15)  # the plain formula
    ref_y, ref_d = exact_gelu64(x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(d, ref_d, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_gelu_fast_matches_plain(dtype, approximate, n_threads):
    # 2 x 140_001 elements: several threaded chunks plus a ragged end
    x = np.random.default_rng(1).standard_normal((2, 140_001)).astype(dtype) * 3
    tol = dict(rtol=1e-5, atol=5e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    with threads(n_threads):
        assert_fast_matches_plain(lambda t: F.gelu(t, approximate=approximate), [x], **tol)


def test_gelu_without_grad_keeps_no_derivative():
    x = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    function = F.activation.GELU()
    with minivit.no_grad():
        function(Tensor(x, requires_grad=True))
    assert function.impl.device == "cpu" and function.saved is None  # saved: dy/dx, not made


# -- LayerNorm, softmax --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1037, 192), (2, 65, 64)])
def test_layer_norm_fast_matches_plain(dtype, n_threads, shape):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    b = rng.standard_normal(shape[-1]).astype(dtype)
    with threads(n_threads):
        assert_fast_matches_plain(lambda t, w, b: F.layer_norm(t, w, b), [x, w, b],
                                  **TOLERANCES[dtype])


def test_layer_norm_without_affine_and_on_a_strided_input():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((40, 2 * 48))
    x = base[:, ::2]  # non-contiguous
    assert_fast_matches_plain(lambda t: F.layer_norm(t), [x], **TOLERANCES[np.float64])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_softmax_fast_matches_plain(dtype, n_threads):
    x = (np.random.default_rng(5).standard_normal((3, 301, 67)) * 4).astype(dtype)
    with threads(n_threads):
        assert_fast_matches_plain(lambda t: F.softmax(t), [x], **TOLERANCES[dtype])
