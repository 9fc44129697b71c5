"""The attention and position ops: scaled_dot_product_attention, self_attention from packed
qkv, additive score biases, position_embedding_2d and relative_position_bias (and its
index). Forward values against a NumPy reference, gradients against central differences
(minivit.gradcheck, float64, relative error <= 1e-6).

Each test runs on every available backend (inputs drawn as tests/helpers_ops.py says).
"""

import math

import numpy as np
import pytest
from conftest import FIXTURE_OK, arrays, as_host, check_gradients, floats, on_backend, seeds
from helpers_ops import EXACT, draw_inputs, forward, np_softmax
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minivit
import minivit.functional as F
from minivit import Tensor


# -- attention ----------------------------------------------------------------------------------
def bias_shapes(full):
    """Shapes that broadcast to `full` (B, heads, N, M): leading axes dropped, axes set to 1."""
    return st.integers(0, len(full)).flatmap(lambda drop: st.tuples(*[
        st.sampled_from((n, 1)) for n in full[drop:]])).map(tuple)


@FIXTURE_OK
@given(data=st.data())
def test_scaled_dot_product_attention(backend, data):
    shape = tuple(data.draw(st.integers(1, n)) for n in (2, 2, 4, 4))  # (B, heads, N, d)
    q, k, v = (data.draw(arrays(shape)) for _ in range(3))
    scale = data.draw(st.none() | floats(0.1, 1.0), label="scale")
    inputs = draw_inputs(data, q, k, v)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    s = 1.0 / math.sqrt(shape[-1]) if scale is None else scale
    expected = np_softmax(q @ k.swapaxes(-1, -2) * s) @ v
    np.testing.assert_allclose(forward(fn, *inputs), expected, **EXACT)
    out, probs = F.scaled_dot_product_attention(*[Tensor(a) for a in inputs], scale=scale,
                                                return_attention=True)
    np.testing.assert_allclose(as_host(probs), np_softmax(q @ k.swapaxes(-1, -2) * s), **EXACT)
    check_gradients(fn, *inputs, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data())
def test_self_attention_from_packed_qkv(backend, data):
    """With or without an additive bias of any broadcastable shape (its rows sliced with
    queries=n, dB zero in the others)."""
    batch, tokens = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    heads, head_dim = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    qkv = data.draw(arrays((batch, tokens, 3 * heads * head_dim)))
    scale = data.draw(st.none() | floats(0.1, 1.0), label="scale")
    queries = data.draw(st.none() | st.integers(1, tokens), label="queries")  # first n only
    bias_shape = data.draw(st.none() | bias_shapes((batch, heads, tokens, tokens)), label="bias")
    host = [qkv] if bias_shape is None else [qkv, data.draw(arrays(bias_shape))]
    inputs = draw_inputs(data, *host)

    def fn(qkv, bias=None):
        return F.self_attention(qkv, num_heads=heads, scale=scale, queries=queries, bias=bias)

    q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    s = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = q @ k.swapaxes(-1, -2) * s + (host[1] if bias_shape else 0.0)
    expected = (np_softmax(scores) @ v).transpose(0, 2, 1, 3)
    expected = expected.reshape(batch, tokens, -1)[:, :queries]
    np.testing.assert_allclose(forward(fn, *inputs), expected, **EXACT)
    check_gradients(fn, *inputs, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data())
def test_attention_with_an_additive_bias(backend, data):
    """S = q kᵀ·s + B with B of any broadcastable shape: dB is dS summed over its broadcast
    axes (gradcheck with a random upstream gradient checks it with dq, dk, dv)."""
    shape = tuple(data.draw(st.integers(1, n)) for n in (2, 2, 4, 3))  # (B, heads, N, d)
    q, k, v = (data.draw(arrays(shape)) for _ in range(3))
    bias = data.draw(arrays(data.draw(bias_shapes(shape[:3] + shape[2:3]), label="bias")))
    inputs = draw_inputs(data, q, k, v, bias)

    def fn(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, bias=bias)

    expected = np_softmax(q @ k.swapaxes(-1, -2) / math.sqrt(shape[-1]) + bias) @ v
    np.testing.assert_allclose(forward(fn, *inputs), expected, **EXACT)
    check_gradients(fn, *inputs, seed=data.draw(seeds))


def test_attention_rejects_a_bias_that_does_not_broadcast_to_the_scores():
    q = Tensor(np.zeros((1, 2, 3, 4)))
    with pytest.raises(minivit.errors.ShapeError, match=r"broadcast to the scores"):
        F.scaled_dot_product_attention(q, q, q, bias=Tensor(np.zeros((3, 3, 3))))
    with pytest.raises(minivit.errors.ShapeError, match=r"\(1, 2, 3, 3\); got \(2, 4, 3\)"):
        F.self_attention(Tensor(np.zeros((1, 3, 12))), 2, bias=Tensor(np.zeros((2, 4, 3))))


# -- position ops -------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data())
def test_position_embedding_2d(backend, data):
    height, width, dim = (data.draw(st.integers(1, n)) for n in (3, 3, 3))
    row, col = data.draw(arrays((height, dim))), data.draw(arrays((width, dim)))
    inputs = draw_inputs(data, row, col)
    expected = (row[:, None] + col[None]).reshape(height * width, dim)
    np.testing.assert_allclose(forward(F.position_embedding_2d, *inputs), expected, **EXACT)
    check_gradients(F.position_embedding_2d, *inputs, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data())
def test_relative_position_bias(backend, data):
    """A gather through a fixed index with repeats (every entry of a real index is reached by
    several pairs): dT is the scatter-add of the (heads, N, M) gradient."""
    entries, heads = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3))
    rows, cols = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    table = data.draw(arrays((entries, heads)))
    index = data.draw(hnp.arrays(np.int64, (rows, cols), elements=st.integers(0, entries - 1)))
    (inp,) = draw_inputs(data, table)

    def fn(table):
        return F.relative_position_bias(table, on_backend(index))

    np.testing.assert_allclose(forward(fn, inp), table[index].transpose(2, 0, 1), **EXACT)
    check_gradients(fn, inp, seed=data.draw(seeds))


@pytest.mark.parametrize("class_token", [False, True])
def test_relative_position_index_is_beit_and_swin_layout(class_token):
    """Patch pairs (dy + H − 1)(2W − 1) + dx + W − 1 (query minus key); with the class token
    BEiT's three extra entries; every entry reached, the diagonal all one entry."""
    from minivit.functional.position import relative_position_index, relative_table_entries

    grid = (2, 3)
    index = relative_position_index(grid, class_token)
    entries = relative_table_entries(grid, class_token)
    offset = 1 if class_token else 0
    assert index.shape == (6 + offset,) * 2 and entries == 15 + 3 * offset
    assert sorted(set(index.ravel().tolist())) == list(range(entries))
    # patch 0 is (0, 0), patch 5 is (1, 2): query 5 to key 0 is dy = 1, dx = 2
    assert index[offset + 5, offset + 0] == (1 + 1) * 5 + (2 + 2)
    assert len(set(np.diag(index)[offset:].tolist())) == 1
    if class_token:
        assert (index[0, 0], index[0, 1], index[1, 0]) == (entries - 1, entries - 3, entries - 2)


@pytest.mark.parametrize("index, message", [
    (np.array([[0, 5]]), "the index reaches entries 0..5 of a table of 4"),
    (np.array([[-1, 2]]), "the index reaches entries -1..2 of a table of 4"),
    (np.array([[0.0, 1.0]]), r"expected a table \(entries, heads\) and an integer index "
                             r"\(N, N\); got \(4, 2\) and \(1, 2\) float64"),
])
def test_relative_position_bias_rejects_an_index_beyond_the_table(index, message):
    with pytest.raises(minivit.errors.ShapeError, match=message):
        F.relative_position_bias(Tensor(np.zeros((4, 2))), index)


class _DeviceArray(np.ndarray):
    """A NumPy array posing as a CuPy one whose values must not be read to check it: on the
    GPU that read would be a host sync."""

    def min(self, *args, **kwargs):
        raise AssertionError("the device index's values were read to check it")

    max = min


def test_relative_position_bias_checks_a_device_index_without_reading_it(monkeypatch):
    """A device index is trusted (a copy of a checked host one): only its shape and dtype are
    checked; the range of a host index is read on the host (the test above)."""
    from minivit.functional.position import relative_position_index

    monkeypatch.setitem(minivit.backend._backend_of_type, _DeviceArray, "cupy")
    monkeypatch.setattr(minivit.backend, "_import_cupy", lambda: np)  # NumPy is its module
    host = relative_position_index((2, 2))
    table = np.random.default_rng(0).standard_normal((9, 2))
    device_table = Tensor(table.view(_DeviceArray))
    out = F.relative_position_bias(device_table, host.view(_DeviceArray))
    np.testing.assert_array_equal(np.asarray(out.data), table[host].transpose(2, 0, 1))
    with pytest.raises(minivit.errors.ShapeError, match=r"integer index \(N, N\); got \(9, 2\) "
                                                        r"and \(4,\) int64"):
        F.relative_position_bias(device_table, host[0].view(_DeviceArray))
