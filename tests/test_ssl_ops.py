"""The ops of self-supervised pretraining (MAE's token gather and un-shuffle, DINO's L2
normalisation and weight-normalised linear layer, the bicubic resize of position embeddings):
forward values against NumPy references, gradients against central differences with a random
upstream gradient (float64, Hypothesis-drawn shapes, values, layouts and seeds)."""

import numpy as np
import pytest
from conftest import (FIXTURE_OK, arrays, as_host, away_from_zero, check_gradients, layouts,
                      layout, on_backend, seeds)
from hypothesis import given
from hypothesis import strategies as st

import minivit.functional as F
from minivit import Tensor
from minivit.errors import ShapeError
from minivit.models.pos_embed import resample_abs_pos_embed

EXACT = dict(rtol=1e-12, atol=1e-12)


def forward(fn, *inputs):
    return as_host(fn(*[Tensor(a) for a in inputs]).data)


@FIXTURE_OK
@given(data=st.data())
def test_gather_tokens(backend, data):
    batch, length, dim = (data.draw(st.integers(1, n)) for n in (3, 5, 3))
    count = data.draw(st.integers(1, 6), label="count")
    ids = np.array(data.draw(st.lists(st.lists(st.integers(0, length - 1), min_size=count,
                                               max_size=count), min_size=batch, max_size=batch),
                             label="ids"))  # repeats allowed: their gradients add up
    x = data.draw(arrays((batch, length, dim)))
    view = layout(x, data.draw(layouts))

    def fn(t):
        return F.gather_tokens(t, on_backend(ids))

    expected = np.stack([x[b, ids[b]] for b in range(batch)])
    np.testing.assert_allclose(forward(fn, view), expected, **EXACT)
    check_gradients(fn, view, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data())
def test_unshuffle_tokens(backend, data):
    batch, length, dim = (data.draw(st.integers(1, n)) for n in (3, 6, 3))
    kept = data.draw(st.integers(1, length), label="kept")
    ids_restore = np.stack([np.random.default_rng(data.draw(seeds)).permutation(length)
                            for _ in range(batch)])
    visible, mask = data.draw(arrays((batch, kept, dim))), data.draw(arrays((1, 1, dim)))
    inputs = [layout(visible, data.draw(layouts)), on_backend(mask)]

    def fn(v, m):
        return F.unshuffle_tokens(v, m, on_backend(ids_restore))

    full = np.concatenate([visible, np.broadcast_to(mask, (batch, length - kept, dim))], axis=1)
    expected = np.stack([full[b, ids_restore[b]] for b in range(batch)])
    np.testing.assert_allclose(forward(fn, *inputs), expected, **EXACT)
    check_gradients(fn, *inputs, seed=data.draw(seeds))


def test_masking_ops_refuse_bad_shapes():
    x = Tensor(np.zeros((2, 4, 3)))
    with pytest.raises(ShapeError, match="integer ids"):
        F.gather_tokens(x, np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ShapeError, match="ids must be integers"):
        F.gather_tokens(x, np.zeros((2, 2)))
    with pytest.raises(ShapeError, match=r"mask token \(1, 1, 3\)"):
        F.unshuffle_tokens(x, Tensor(np.zeros((1, 1, 2))), np.zeros((2, 5), dtype=np.int64))


@FIXTURE_OK
@given(data=st.data())
def test_l2_normalize(backend, data):
    rows, dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    x = data.draw(arrays((rows, dim), elements=away_from_zero()))
    view = layout(x, data.draw(layouts))
    expected = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(forward(F.l2_normalize, view), expected, **EXACT)
    check_gradients(F.l2_normalize, view, seed=data.draw(seeds))


def test_l2_normalize_of_a_zero_vector_is_zero_with_the_floored_slope():
    x = Tensor(np.zeros((1, 3)), requires_grad=True)
    out = F.l2_normalize(x)
    out.backward(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(out.data, 0.0)
    np.testing.assert_allclose(x.grad, np.array([[1.0, 2.0, 3.0]]) / 1e-12)


@FIXTURE_OK
@given(data=st.data())
def test_weight_norm_linear(backend, data):
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2), label="leading")
    n_in, n_out = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x = data.draw(arrays(tuple(lead) + (n_in,)))
    v = data.draw(arrays((n_out, n_in), elements=away_from_zero()))
    g = data.draw(arrays((n_out, 1)))
    inputs = [layout(a, data.draw(layouts)) for a in (x, v, g)]
    expected = x @ (g * v / np.linalg.norm(v, axis=1, keepdims=True)).T
    np.testing.assert_allclose(forward(F.weight_norm_linear, *inputs), expected, **EXACT)
    check_gradients(F.weight_norm_linear, *inputs, seed=data.draw(seeds))


@FIXTURE_OK
@given(data=st.data())
def test_resize_grid(backend, data):
    old = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    new = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    batch, dim = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    x = data.draw(arrays((batch, old[0] * old[1], dim)))
    view = layout(x, data.draw(layouts))

    def fn(t):
        return F.resize_grid(t, old, new)

    expected = np.concatenate([resample_abs_pos_embed(np.concatenate(
        [np.zeros((1, 1, dim)), x[i:i + 1]], axis=1), new, old)[:, 1:] for i in range(batch)])
    np.testing.assert_allclose(forward(fn, view), expected, **EXACT)
    check_gradients(fn, view, seed=data.draw(seeds))


def test_resize_grid_matches_torch_bicubic_interpolation():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 5))
    ours = F.resize_grid(Tensor(x), (4, 4), (2, 3)).data
    grid = torch.from_numpy(x).reshape(1, 4, 4, 5).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).reshape(1, 6, 5).numpy(), **EXACT)
