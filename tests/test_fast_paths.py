"""Every fast CPU path (minivit.cpu) against the plain or exact computation.

- every test twice: with the compiled numba kernels (minivit.cpu.compiled) and with the
  chunked NumPy code used without numba;
- float32 GELU (erfc-based Φ, chunked, threaded) against float64 exact GELU (scipy erf);
- LayerNorm, softmax, attention, linear/patchify (split GEMMs) and AdamW: the chunked,
  threaded kernels against the plain whole-array NumPy code (``cpu.fast_paths(False)``), in
  float32 and float64, with 1 and several threads and sizes that leave ragged last blocks;
- the packed self_attention op: its gradient by finite differences (float64), and equal to
  splitting q, k, v and calling scaled_dot_product_attention;
- one training step keeps every floating-point array float32 (parameters, gradients,
  optimizer buffers, and every array a Function saves for backward).

No timing here: speed is measured by `minivit bench`, never asserted in tests.
"""

import contextlib

import numpy as np
import pytest

import minivit
import minivit.functional as F
from minivit import Tensor, cpu, gradcheck
from minivit.cpu import activation as cpu_activation
from minivit.cpu import gemm, pool, runtime
from minivit.models import create_model
from minivit.optim import AdamW


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


# -- attention ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_scaled_dot_product_attention_fast_matches_plain(dtype, n_threads):
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((5, 3, 17, 8)).astype(dtype) for _ in range(3))
    with threads(n_threads):
        assert_fast_matches_plain(F.scaled_dot_product_attention, [q, k, v], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_self_attention_fast_matches_plain(dtype, n_threads):
    qkv = np.random.default_rng(7).standard_normal((9, 13, 3 * 4 * 6)).astype(dtype)
    with threads(n_threads):
        assert_fast_matches_plain(lambda t: F.self_attention(t, 4), [qkv], **TOLERANCES[dtype])


@pytest.mark.parametrize("fast", [True, False])
def test_self_attention_equals_split_heads_attention(fast):
    batch, tokens, heads, head_dim = 3, 7, 2, 5
    rng = np.random.default_rng(8)
    qkv_data = rng.standard_normal((batch, tokens, 3 * heads * head_dim))
    upstream = rng.standard_normal((batch, tokens, heads * head_dim))
    with cpu.fast_paths(fast):
        packed = Tensor(qkv_data, requires_grad=True)
        out, probs = F.self_attention(packed, heads, return_attention=True)
        out.backward(upstream)

        split = Tensor(qkv_data, requires_grad=True)
        parts = split.reshape(batch, tokens, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        ref, ref_probs = F.scaled_dot_product_attention(parts[0], parts[1], parts[2],
                                                        return_attention=True)
        ref = ref.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)
        ref.backward(upstream)
    np.testing.assert_allclose(out.data, ref.data, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(packed.grad, split.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fast", [True, False])
def test_self_attention_gradcheck(fast):
    qkv = np.random.default_rng(9).standard_normal((2, 5, 3 * 2 * 3))
    with cpu.fast_paths(fast):
        report = gradcheck(lambda t: F.self_attention(t, 2), qkv)
    assert report.passed, str(report)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("queries", [1, 3])
def test_self_attention_for_the_first_tokens_only(fast, queries):
    """queries=n gives the first n rows of the full output, and the gradient of a loss on
    those rows (all of qkv's, with dq zero for the tokens that did not ask)."""
    rng = np.random.default_rng(11)
    qkv_data = rng.standard_normal((3, 6, 3 * 2 * 4))
    upstream = rng.standard_normal((3, queries, 8))
    with cpu.fast_paths(fast):
        part = Tensor(qkv_data, requires_grad=True)
        out, probs = F.self_attention(part, 2, return_attention=True, queries=queries)
        out.backward(upstream)
        whole = Tensor(qkv_data, requires_grad=True)
        ref, ref_probs = F.self_attention(whole, 2, return_attention=True)
        ref[:, :queries].backward(upstream)
        report = gradcheck(lambda t: F.self_attention(t, 2, queries=queries), qkv_data)
    assert out.shape == (3, queries, 8) and probs.shape == (3, 2, queries, 6)
    np.testing.assert_allclose(out.data, ref.data[:, :queries], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(probs, ref_probs[:, :, :queries], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(part.grad, whole.grad, rtol=1e-12, atol=1e-14)
    assert report.passed, str(report)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("forward_fast", [True, False])
@pytest.mark.parametrize("queries", [None, 2])
def test_backward_runs_the_implementation_its_forward_chose(dtype, forward_fast, queries):
    """Fast paths switched between forward and backward: the Function kept the
    implementation its forward chose (and what that one saved), so backward runs it again and
    gives what an unswitched backward gives, bit for bit."""
    rng = np.random.default_rng(12)
    qkv_data = rng.standard_normal((3, 6, 3 * 2 * 4)).astype(dtype)
    upstream = rng.standard_normal((3, queries or 6, 8)).astype(dtype)
    grads = []
    for backward_fast in (forward_fast, not forward_fast):
        qkv = Tensor(qkv_data, requires_grad=True)
        with cpu.fast_paths(forward_fast):
            out = F.self_attention(qkv, 2, queries=queries)
        assert out._creator.impl.device == ("cpu" if forward_fast else "plain")
        with cpu.fast_paths(backward_fast):
            out.backward(upstream)
        grads.append(qkv.grad)
    assert grads[1].dtype == dtype
    np.testing.assert_array_equal(grads[1], grads[0])


@pytest.mark.parametrize("queries", [0, 7])
def test_self_attention_rejects_queries_outside_the_tokens(queries):
    with pytest.raises(minivit.errors.ShapeError, match="between 1 and the 6 tokens"):
        F.self_attention(Tensor(np.zeros((1, 6, 12))), 2, queries=queries)


def test_self_attention_rejects_a_width_that_is_not_three_heads_wide():
    with pytest.raises(minivit.errors.ShapeError, match="3 · heads"):
        F.self_attention(Tensor(np.zeros((1, 4, 10), np.float32)), 2)


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


# -- the thread pool -------------------------------------------------------------------------------
def test_run_tasks_runs_every_task_once_and_reraises_errors():
    seen = []
    with threads(3):
        cpu.run_tasks([lambda i=i: seen.append(i) for i in range(50)])
        assert sorted(seen) == list(range(50))

        def boom():
            raise ValueError("task failed")

        with pytest.raises(ValueError, match="task failed"):
            cpu.run_tasks([lambda: None, boom, lambda: None])
        # nested use from inside a task runs inline instead of deadlocking
        inner = []
        cpu.run_tasks([lambda: cpu.run_tasks([lambda: inner.append(1)] * 4)] * 3)
        assert len(inner) == 12


def test_handles_only_numpy_float_arrays_of_one_dtype():
    f32, f64 = np.zeros(3, np.float32), np.zeros(3)
    assert cpu.handles(f32, None, f32) and cpu.handles(f64)
    assert not cpu.handles(f32, f64)
    assert not cpu.handles(np.zeros(3, np.int64))
    assert not cpu.handles(None) and not cpu.handles()  # no array: nothing to run on
    with cpu.fast_paths(False):
        assert not cpu.handles(f32)


# -- whole model -------------------------------------------------------------------------------------
def _train_step(fast, dtype):
    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=2, drop_path_rate=0.0).to(dtype=dtype)
    rng = np.random.default_rng(15)
    x = rng.standard_normal((16, 1, 8, 8)).astype(dtype)
    y = rng.integers(0, 10, 16)
    with cpu.fast_paths(fast):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_model_gradients_fast_match_plain(dtype):
    fast_loss, fast_grads = _train_step(True, dtype)
    plain_loss, plain_grads = _train_step(False, dtype)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-13)
    assert fast_loss == pytest.approx(plain_loss, rel=tol["rtol"])
    for name in fast_grads:
        np.testing.assert_allclose(fast_grads[name], plain_grads[name], err_msg=name, **tol)


def _float_arrays(value, seen):
    """Every floating-point NumPy array in `value` (arrays, lists/tuples/dicts of them)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and id(value) not in seen:
            seen.add(id(value))
            yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _float_arrays(item, seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _float_arrays(item, seen)


def test_one_training_step_keeps_every_array_float32(monkeypatch):
    from minivit.tensor import Function

    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=2, drop_path_rate=0.1, drop_rate=0.1)
    optimizer = AdamW(model.named_parameters())
    saved = []  # (op name, attribute, dtype) of every float array a Function keeps
    original_call = Function.__call__

    def recording_call(self, *inputs, **options):
        out = original_call(self, *inputs, **options)
        for name, value in vars(self).items():
            if name == "inputs":
                continue
            for array in _float_arrays(value, set()):
                saved.append((type(self).__name__, name, array.dtype))
        saved.append((type(self).__name__, "output", out.dtype))
        return out

    monkeypatch.setattr(Function, "__call__", recording_call)
    rng = np.random.default_rng(16)
    x = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    optimizer.zero_grad()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    optimizer.step(max_grad_norm=1.0)

    assert saved, "no Function ran"
    wrong = [entry for entry in saved if entry[2] != np.float32]
    assert not wrong, f"float arrays that are not float32: {wrong}"
    assert {op for op, _, _ in saved} >= {"Linear", "LayerNorm", "GELU", "SelfAttention",
                                          "Patchify", "CrossEntropy"}
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == np.float32, name
    for name, p in model.named_parameters():
        assert p.data.dtype == np.float32, name
    for buffer in (optimizer.flat, optimizer.flat_grad, optimizer.m, optimizer.v,
                   optimizer.decay_mask):
        assert buffer.dtype == np.float32
    assert loss.dtype == np.float32


def test_without_blas_control_gemms_are_not_split_but_still_right(monkeypatch):
    """Without threadpoolctl minivit cannot put BLAS on one thread, so it leaves the GEMMs
    whole (BLAS threads them) rather than run two threaded BLAS calls at once."""
    monkeypatch.setitem(runtime.state, "blas", {"controlled": False, "threads": None,
                                             "libraries": []})
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert not runtime.split_gemms()
    rng = np.random.default_rng(18)
    x = rng.standard_normal((600, 40)).astype(np.float32)
    w = rng.standard_normal((30, 40)).astype(np.float32)
    b = rng.standard_normal(30).astype(np.float32)
    with threads(2):
        assert_fast_matches_plain(F.linear, [x, w, b], **TOLERANCES[np.float32])


def test_freed_large_arrays_are_kept_for_reuse_on_glibc():
    """cpu.configure() (not importing minivit, nor asking cpu.handles) raises glibc's
    mmap/trim thresholds (minivit.cpu.runtime explains why); MINIVIT_KEEP_MEMORY=0 leaves malloc
    alone. Checked in fresh interpreters."""
    import os
    import platform
    import subprocess
    import sys

    code = ("import numpy as np; from minivit import cpu; from minivit.cpu import runtime; "
            "assert cpu.handles(np.zeros(2, np.float32)); "
            "assert runtime.state['malloc'] is None and runtime.state['blas'] is None; "
            "cpu.configure(); print(runtime.state['malloc'], cpu.memory_info())")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MINIVIT_KEEP_MEMORY": "0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert off.stdout.startswith("False malloc left as it is")
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert on.stdout.startswith("True glibc keeps freed arrays")


def test_bad_thread_counts_in_the_environment_warn_and_fall_back():
    import os
    import subprocess
    import sys

    code = ("from minivit import cpu; cpu.configure(); "
            "print(cpu.num_threads() >= 1, cpu.blas_info()['threads'])")
    env = {**os.environ, "MINIVIT_NUM_THREADS": "abc", "MINIVIT_BLAS_THREADS": "two"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "MINIVIT_NUM_THREADS='abc' is not a whole number" in result.stderr
    assert "MINIVIT_BLAS_THREADS='two' is not a whole number; using 1" in result.stderr
    assert result.stdout.split()[0] == "True"

