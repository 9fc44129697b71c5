"""The layer ops (minivit.functional's linear, projection, activation, normalization, loss and
regularization families): linear, patchify, softmax / log_softmax, layer_norm, gelu,
cross_entropy, dropout / drop_path. Forward values against a NumPy reference, gradients
against central differences (minivit.gradcheck, float64, relative error <= 1e-6).

Every test runs on each available backend, on inputs drawn as tests/helpers_ops.py describes.
"""

import math

import numpy as np
import pytest
from conftest import (FIXTURE_OK, arrays, away_from_zero, check_gradients, distinct_arrays, floats,
                      layout, layouts, on_backend, seeds, shapes)
from helpers_ops import EXACT, draw_inputs, forward, np_softmax
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import erf

import minivit
import minivit.functional as F
from minivit import Tensor


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
