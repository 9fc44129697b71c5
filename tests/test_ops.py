"""Every hand-written op: forward values against a NumPy reference, gradients against central
differences (minivit.gradcheck, float64, relative error <= 1e-6), non-contiguous inputs, and
float32 in -> float32 out.

Hypothesis draws the shapes, the values (bounded, no subnormals, no NaN/inf), the memory
layout of every input (contiguous, transposed, strided, reversed view) and the seed of
gradcheck's random upstream gradient. Every test runs on each available backend.
"""

import math

import numpy as np
import pytest
from conftest import (FIXTURE_OK, LAYOUTS, arrays, as_host, away_from_zero, check_gradients,
                      distinct_arrays, floats, layout, layouts, on_backend, seeds, shapes)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import erf

import minivit
import minivit.functional as F
from minivit import Tensor, cpu
from minivit.functional import registry
from minivit.inspect.opchecks import OP_CHECKS
from minivit.optim import AdamW

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


# -- linear -------------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data())
def test_linear(backend, data):
    lead = data.draw(shapes(min_dims=0, max_dims=2, min_side=1, max_side=3), label="leading")
    n_in, n_out = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x, w = data.draw(arrays(lead + (n_in,))), data.draw(arrays((n_out, n_in)))
    host = [x, w]
    if data.draw(st.booleans(), label="bias"):
        host.append(data.draw(arrays((n_out,))))
    inputs = draw_inputs(data, *host)
    expected = x @ w.T + (host[2] if len(host) == 3 else 0.0)
    np.testing.assert_allclose(forward(F.linear, *inputs), expected, **EXACT)
    check_gradients(F.linear, *inputs, seed=data.draw(seeds))


# -- patchify -----------------------------------------------------------------------------------
def reference_patchify(x, w, b, p):
    batch, _, height, width = x.shape
    grid_w = width // p
    out = np.zeros((batch, (height // p) * grid_w, w.shape[0]))
    for i in range(height // p):
        for j in range(grid_w):
            tile = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
            out[:, i * grid_w + j] = np.einsum("bcuv,dcuv->bd", tile, w)
    return out + (0.0 if b is None else b)


@FIXTURE_OK
@given(data=st.data())
def test_patchify(backend, data):
    batch, channels = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    p, dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    grid_h, grid_w = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    if p * p * grid_h * grid_w * channels * batch > 240:  # keep the element-wise check cheap
        grid_h = grid_w = 1
    x = data.draw(arrays((batch, channels, grid_h * p, grid_w * p)))
    w = data.draw(arrays((dim, channels, p, p)))
    b = data.draw(st.none() | arrays((dim,)), label="bias")
    inputs = draw_inputs(data, x, w) + ([] if b is None else [layout(b, "contiguous")])

    def fn(x, w, b=None):
        return F.patchify(x, w, b, patch_size=p)

    out = forward(fn, *inputs)
    assert out.shape == (batch, grid_h * grid_w, dim)
    np.testing.assert_allclose(out, reference_patchify(x, w, b, p), **EXACT)
    check_gradients(fn, *inputs, seed=data.draw(seeds))


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


@FIXTURE_OK
@given(data=st.data())
def test_broadcast_to(backend, data):
    shape, target = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=1, min_dims=0, max_dims=3, max_side=3))
    x = data.draw(arrays(shape[0]))
    (inp,) = draw_inputs(data, x)

    def fn(t):
        return F.broadcast_to(t, target)

    np.testing.assert_array_equal(forward(fn, inp), np.broadcast_to(x, target))
    check_gradients(fn, inp, seed=data.draw(seeds))


# -- softmax / log_softmax ----------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data(), log=st.booleans())
def test_softmax_and_log_softmax(backend, data, log):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = data.draw(arrays(shape))
    (inp,) = draw_inputs(data, x)
    op = F.log_softmax if log else F.softmax

    def fn(x):
        return op(x, axis=axis)

    expected = np_softmax(x, axis)
    np.testing.assert_allclose(forward(fn, inp), np.log(expected) if log else expected, **EXACT)
    check_gradients(fn, inp, seed=data.draw(seeds))


# -- layer_norm ---------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data())
def test_layer_norm(backend, data):
    lead = data.draw(shapes(min_dims=0, max_dims=2, min_side=1, max_side=3), label="leading")
    features = data.draw(st.integers(2, 6))
    x = data.draw(distinct_arrays(lead + (features,)))  # no row collapses to a constant
    w = data.draw(st.none() | arrays((features,)), label="weight")
    b = data.draw(st.none() | arrays((features,)), label="bias")
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.1]), label="eps")
    inputs = draw_inputs(data, x, *[a for a in (w, b) if a is not None])

    def fn(x, *params):
        params = list(params)
        weight = params.pop(0) if w is not None else None
        bias = params.pop(0) if b is not None else None
        return F.layer_norm(x, weight, bias, eps=eps)

    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + eps)
    expected = expected * (1.0 if w is None else w) + (0.0 if b is None else b)
    np.testing.assert_allclose(forward(fn, *inputs), expected, rtol=1e-10, atol=1e-10)
    check_gradients(fn, *inputs, seed=data.draw(seeds))


# -- gelu ---------------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data(), approximate=st.sampled_from(["none", "tanh"]))
def test_gelu(backend, data, approximate):
    x = data.draw(arrays(data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))))
    (inp,) = draw_inputs(data, x)

    def fn(x):
        return F.gelu(x, approximate=approximate)

    if approximate == "none":
        expected = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    else:
        expected = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(forward(fn, inp), expected, **EXACT)
    check_gradients(fn, inp, seed=data.draw(seeds))


def test_gelu_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'none' or 'tanh'"):
        F.gelu(Tensor(np.ones(3)), approximate="erf")


# -- cross_entropy ------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data(), soft=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1]) | floats(0.0, 0.9))
def test_cross_entropy(backend, data, soft, smoothing):
    batch, classes = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    logits = data.draw(arrays((batch, classes)))
    (logits_in,) = draw_inputs(data, logits)
    if soft:
        target = data.draw(arrays((batch, classes), elements=floats(0.0, 1.0)))
        target_in = layout(target, data.draw(layouts))
        q = target
    else:
        labels = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, classes - 1)))
        target_in = on_backend(labels)
        q = np.eye(classes)[labels]
    q = q * (1.0 - smoothing) + smoothing / classes

    def fn(logits, target):
        return F.cross_entropy(logits, target, label_smoothing=smoothing)

    log_p = np.log(np_softmax(logits))
    expected = -(q * log_p).sum() / batch
    np.testing.assert_allclose(forward(fn, logits_in, target_in), expected, rtol=1e-12, atol=1e-12)
    check_gradients(fn, logits_in, target_in, seed=data.draw(seeds))  # soft: target grad too


# -- dropout / drop_path ------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data(), which=st.sampled_from(["dropout", "drop_path"]))
def test_dropout_and_drop_path(backend, data, which):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    x = data.draw(arrays(shape, elements=away_from_zero(0.1, 3.0)))
    p = data.draw(st.sampled_from([0.0, 0.5]) | floats(0.0, 0.9), label="p")
    mask_seed = data.draw(seeds, label="mask seed")
    (inp,) = draw_inputs(data, x)
    op = getattr(F, which)

    def fn(x):
        minivit.manual_seed(mask_seed)  # the same mask on every call: deterministic
        return op(x, p=p, training=True)

    out = forward(fn, inp)
    np.testing.assert_array_equal(out, forward(fn, inp))
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1.0 - p), rtol=1e-14)
    if which == "drop_path":  # a whole sample is kept or dropped
        per_sample = kept.reshape(shape[0], -1)
        assert (per_sample.all(axis=1) | ~per_sample.any(axis=1)).all()
    np.testing.assert_array_equal(forward(lambda t: op(t, p=p, training=False), inp), x)
    check_gradients(fn, inp, seed=data.draw(seeds))


@pytest.mark.parametrize("op", [F.dropout, F.drop_path])
def test_dropout_rejects_p_of_one(op):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        op(Tensor(np.ones((2, 2))), p=1.0)


# -- concat / stack -----------------------------------------------------------------------------
def check_join(data, pieces, join, numpy_join, axis):
    """join(tensors, axis) equals numpy_join(pieces, axis), and its gradients check out."""
    inputs = draw_inputs(data, *pieces)

    def fn(*tensors):
        return join(tensors, axis=axis)

    np.testing.assert_array_equal(forward(fn, *inputs), numpy_join(pieces, axis=axis))
    check_gradients(fn, *inputs, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data(), count=st.integers(1, 3))
def test_concat(backend, data, count):
    base = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=3))
    axis = data.draw(st.integers(-len(base), len(base) - 1), label="axis")
    pieces = []
    for _ in range(count):
        shape = list(base)
        shape[axis] = data.draw(st.integers(0, 3), label="length along axis")
        pieces.append(data.draw(arrays(tuple(shape))))
    check_join(data, pieces, F.concat, np.concatenate, axis)


@FIXTURE_OK
@given(data=st.data(), count=st.integers(1, 3))
def test_stack(backend, data, count):
    shape = data.draw(shapes(min_dims=0, max_dims=3, min_side=1, max_side=3))
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)), label="axis")
    check_join(data, [data.draw(arrays(shape)) for _ in range(count)], F.stack, np.stack, axis)


# -- indexing -----------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data())
def test_basic_indexing(backend, data):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    index = data.draw(hnp.basic_indices(shape, min_dims=0, allow_newaxis=True,
                                        allow_ellipsis=True), label="index")
    x = data.draw(arrays(shape))
    (inp,) = draw_inputs(data, x)

    def fn(x):
        return x[index]

    np.testing.assert_array_equal(forward(fn, inp), x[index])
    check_gradients(fn, inp, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data(),
       form=st.sampled_from(["first", "first+slice", "slice+last", "all", "tensor"]))
def test_fancy_indexing_with_repeated_indices(backend, data, form):
    shape = data.draw(shapes(min_dims=2, max_dims=3, min_side=1, max_side=4))
    x = data.draw(arrays(shape))
    (inp,) = draw_inputs(data, x)

    def positions(n):  # indices along an axis of length n, negative ones and repeats included
        drawn = data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=5))
        return np.array(drawn + drawn[:1], dtype=np.int64)  # at least one index repeats

    if form == "first":
        host_index = positions(shape[0])
    elif form == "first+slice":
        host_index = (positions(shape[0]), slice(None, None, -1))
    elif form == "slice+last":
        host_index = (Ellipsis, positions(shape[-1]))
    elif form == "all":
        host_index = data.draw(hnp.integer_array_indices(shape, result_shape=shapes(
            min_dims=1, max_dims=2, min_side=1, max_side=4)), label="integer arrays")
    else:
        host_index = positions(shape[0])
    if isinstance(host_index, tuple):
        index = tuple(on_backend(i) if isinstance(i, np.ndarray) else i for i in host_index)
    else:
        index = on_backend(host_index)
    if form == "tensor":
        index = Tensor(index)

    def fn(x):
        return x[index]

    np.testing.assert_array_equal(forward(fn, inp), x[host_index])
    check_gradients(fn, inp, seed=data.draw(seeds))


# -- Tensor operators ---------------------------------------------------------------------------
BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b}


@FIXTURE_OK
@given(data=st.data(), op=st.sampled_from(sorted(BINARY)),
       operands=st.sampled_from(["tensors", "scalar right", "scalar left"]))
def test_arithmetic_operators_with_broadcasting(backend, data, op, operands):
    a_shape, b_shape = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=3, max_side=3)).input_shapes
    a = data.draw(arrays(a_shape))
    b = data.draw(arrays(b_shape, elements=away_from_zero() if op == "/" else floats()))
    fn_op = BINARY[op]
    if operands == "tensors":
        inputs = draw_inputs(data, a, b)
        fn, expected = fn_op, fn_op(a, b)
    else:
        scalar = data.draw(away_from_zero() if op == "/" else floats(), label="scalar")
        if operands == "scalar right":
            inputs = draw_inputs(data, a)
            fn, expected = (lambda t: fn_op(t, scalar)), fn_op(a, scalar)
        else:
            inputs = draw_inputs(data, b)
            fn, expected = (lambda t: fn_op(scalar, t)), fn_op(scalar, b)
    np.testing.assert_allclose(forward(fn, *inputs), expected, **EXACT)
    check_gradients(fn, *inputs, seed=data.draw(seeds))


def test_batched_matmuls_of_reversed_views(backend):
    """Negative strides in batched matmuls (CuPy's own raised OverflowError on them: the case
    Hypothesis found on a GPU, a larger one, and attention's q, k, v), forward and backward."""
    rng = np.random.default_rng(17)
    for a_shape, b_shape in (((1, 1), (1, 2, 1, 1)), ((2, 3, 4), (2, 4, 5))):
        a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
        inputs = [layout(a, "reversed"), layout(b, "reversed")]
        np.testing.assert_allclose(forward(lambda x, y: x @ y, *inputs), a @ b, **EXACT)
        check_gradients(lambda x, y: x @ y, *inputs, seed=17)
    q, k, v = (rng.standard_normal((2, 2, 3, 4)) for _ in range(3))
    inputs = [layout(a, "reversed") for a in (q, k, v)]
    expected = np_softmax(q @ k.swapaxes(-1, -2) / 2.0) @ v
    np.testing.assert_allclose(forward(F.scaled_dot_product_attention, *inputs), expected,
                               **EXACT)
    check_gradients(F.scaled_dot_product_attention, *inputs, seed=17)


@FIXTURE_OK
@given(data=st.data())
def test_matmul_operator(backend, data):
    batch_a, batch_b = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=2, max_side=3)).input_shapes
    n, k, m = (data.draw(st.integers(1, 3)) for _ in range(3))
    a, b = data.draw(arrays(batch_a + (n, k))), data.draw(arrays(batch_b + (k, m)))
    inputs = draw_inputs(data, a, b)
    np.testing.assert_allclose(forward(lambda x, y: x @ y, *inputs), a @ b, **EXACT)
    check_gradients(lambda x, y: x @ y, *inputs, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data(), case=st.sampled_from(["vector @ matrix", "matrix @ vector",
                                             "vector @ vector", "batched @ vector",
                                             "vector @ batched"]))
def test_matmul_with_a_1d_operand_as_numpy_defines_it(backend, data, case):
    """A 1-D operand is a row on the left, a column on the right; its axis leaves the result."""
    batch = data.draw(shapes(min_dims=1, max_dims=2, min_side=1, max_side=3), label="batch")
    n, k, m = (data.draw(st.integers(1, 3)) for _ in range(3))
    left, right = case.split(" @ ")
    a_shape = {"vector": (k,), "matrix": (n, k), "batched": batch + (n, k)}[left]
    b_shape = {"vector": (k,), "matrix": (k, m), "batched": batch + (k, m)}[right]
    a, b = data.draw(arrays(a_shape)), data.draw(arrays(b_shape))
    inputs = draw_inputs(data, a, b)
    out = forward(lambda x, y: x @ y, *inputs)
    assert out.shape == (a @ b).shape
    np.testing.assert_allclose(out, a @ b, **EXACT)
    check_gradients(lambda x, y: x @ y, *inputs, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data())
def test_clone(backend, data):
    x = data.draw(arrays(data.draw(shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))))
    (inp,) = draw_inputs(data, x)
    copy = Tensor(inp).clone()
    np.testing.assert_array_equal(as_host(copy.data), x)
    copy.data[...] = 7.0  # its own memory: the source keeps its values
    np.testing.assert_array_equal(as_host(inp), x)
    check_gradients(lambda t: t.clone() * t, inp, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data(), exponent=st.sampled_from([2, 3, 0, -1, 0.5, 1.5, -2.5, np.float64(2.0)]))
def test_power_operator(backend, data, exponent):
    shape = data.draw(shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
    integral = float(exponent).is_integer() and exponent >= 0  # x⁰: any x, 0 included
    x = data.draw(arrays(shape, elements=floats() if integral else floats(0.5, 3.0)))
    (inp,) = draw_inputs(data, x)
    np.testing.assert_allclose(forward(lambda t: t ** exponent, inp), x ** exponent, **EXACT)
    check_gradients(lambda t: t ** exponent, inp, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data(), base=st.sampled_from([2, 0.5, 10.0]))
def test_number_to_the_power_of_a_tensor(backend, data, base):
    shape = data.draw(shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
    x = data.draw(arrays(shape, elements=floats(-3.0, 3.0)))
    (inp,) = draw_inputs(data, x)
    np.testing.assert_allclose(forward(lambda t: base ** t, inp), float(base) ** x, rtol=1e-12)
    check_gradients(lambda t: base ** t, inp, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data(), op=st.sampled_from(["neg", "exp", "log"]))
def test_unary_operators(backend, data, op):
    shape = data.draw(shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
    x = data.draw(arrays(shape, elements=floats(0.1, 3.0) if op == "log" else floats()))
    (inp,) = draw_inputs(data, x)
    fn = {"neg": lambda t: -t, "exp": lambda t: t.exp(), "log": lambda t: t.log()}[op]
    expected = {"neg": np.negative, "exp": np.exp, "log": np.log}[op](x)
    np.testing.assert_allclose(forward(fn, inp), expected, **EXACT)
    check_gradients(fn, inp, seed=data.draw(seeds))


# -- shape methods ------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data(), spread=st.booleans())
def test_reshape(backend, data, spread):
    shape = data.draw(shapes(min_dims=0, max_dims=4, min_side=1, max_side=3))
    new_shape = list(data.draw(st.permutations(shape)))
    new_shape.insert(data.draw(st.integers(0, len(new_shape))), 1)
    if new_shape and data.draw(st.booleans(), label="infer one dim"):
        new_shape[data.draw(st.integers(0, len(new_shape) - 1))] = -1
    x = data.draw(arrays(shape))
    (inp,) = draw_inputs(data, x)

    def fn(t):
        return t.reshape(*new_shape) if spread else t.reshape(tuple(new_shape))

    np.testing.assert_array_equal(forward(fn, inp), x.reshape(new_shape))
    check_gradients(fn, inp, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data(), form=st.sampled_from(["axes", "spread", "none", "T"]))
def test_transpose(backend, data, form):
    shape = data.draw(shapes(min_dims=1, max_dims=4, min_side=1, max_side=3))
    perm = data.draw(st.permutations(range(len(shape))))
    axes = [a - len(shape) if data.draw(st.booleans(), label="negative") else a for a in perm]
    x = data.draw(arrays(shape))
    (inp,) = draw_inputs(data, x)
    fn, expected = {
        "axes": (lambda t: t.transpose(tuple(axes)), x.transpose(axes)),
        "spread": (lambda t: t.transpose(*axes), x.transpose(axes)),
        "none": (lambda t: t.transpose(), x.transpose()),
        "T": (lambda t: t.T, x.T),
    }[form]
    np.testing.assert_array_equal(forward(fn, inp), expected)
    check_gradients(fn, inp, seed=data.draw(seeds))


# -- reductions ---------------------------------------------------------------------------------
@FIXTURE_OK
@given(data=st.data(), reduction=st.sampled_from(["sum", "mean", "max"]), keepdims=st.booleans())
def test_reductions(backend, data, reduction, keepdims):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    ndim = len(shape)
    axis = data.draw(st.none() | st.integers(-ndim, ndim - 1)
                     | hnp.valid_tuple_axes(ndim, min_size=1), label="axis")
    # max: values at least 1/128 apart, so no ties and no max flips under the ±1e-6 steps
    x = data.draw(distinct_arrays(shape) if reduction == "max" else arrays(shape))
    (inp,) = draw_inputs(data, x)

    def fn(t):
        return getattr(t, reduction)(axis=axis, keepdims=keepdims)

    expected = getattr(x, reduction)(axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(forward(fn, inp), expected, **EXACT)
    check_gradients(fn, inp, seed=data.draw(seeds))


def test_max_splits_the_gradient_between_ties():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]]), requires_grad=True)
    x.max(axis=1).backward(np.array([1.0, 4.0]))
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5], [4.0, 0.0, 0.0]])


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
    tests/test_cuda.py)."""
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
