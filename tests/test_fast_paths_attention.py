"""The fast CPU paths (minivit.cpu) of attention against the plain computation:
scaled_dot_product_attention, self_attention and biased attention against the plain
whole-array NumPy code (``cpu.fast_paths(False)``) in float32 and float64 with 1 and 2
threads; the packed self_attention op: its gradient by finite differences (float64), equal to
splitting q, k, v and calling scaled_dot_product_attention, queries=n, and backward running
the implementation its forward chose.
Every test runs with and without numba (tests/helpers_fast_paths.py); no timing asserted.
"""

import numpy as np
import pytest
from helpers_fast_paths import kernels  # noqa: F401 (autouse: every test with and without numba)
from helpers_fast_paths import TOLERANCES, assert_fast_matches_plain, threads

import minivit
import minivit.functional as F
from minivit import Tensor, cpu, gradcheck


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_biased_attention_fast_matches_plain(dtype, n_threads):
    """The additive bias in the row-block kernels (a relative position bias (heads, N, N),
    broadcast over the batch): outputs, dq, dk, dv and dB (dS summed over the batch)."""
    rng = np.random.default_rng(16)
    q, k, v = (rng.standard_normal((5, 3, 17, 8)).astype(dtype) for _ in range(3))
    bias = rng.standard_normal((3, 17, 17)).astype(dtype)
    qkv = rng.standard_normal((9, 13, 3 * 4 * 6)).astype(dtype)
    packed_bias = rng.standard_normal((4, 13, 13)).astype(dtype)
    with threads(n_threads):
        assert_fast_matches_plain(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v,
                                                                                   bias=b),
                                  [q, k, v, bias], **TOLERANCES[dtype])
        for queries in (None, 2):
            assert_fast_matches_plain(lambda t, b: F.self_attention(t, 4, bias=b,
                                                                    queries=queries),
                                      [qkv, packed_bias], **TOLERANCES[dtype])


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
