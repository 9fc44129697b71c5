"""The Tensor ops (minivit.functional's basic, shape and reduction families): broadcast_to,
concat / stack, basic and fancy indexing, the arithmetic, matmul, power and unary
operators, clone, reshape / transpose, sum / mean / max. Forward values against NumPy,
gradients against central differences (minivit.gradcheck, float64, relative error <= 1e-6).

Every test runs on each available backend; tests/helpers_ops.py says how inputs are drawn.
"""

import numpy as np
from conftest import (FIXTURE_OK, arrays, as_host, away_from_zero, check_gradients, distinct_arrays,
                      floats, layout, on_backend, seeds, shapes)
from helpers_ops import EXACT, draw_inputs, forward, np_softmax
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minivit.functional as F
from minivit import Tensor


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
