"""Swin's token moves (minivit.functional.window): forward values against NumPy references
written independently (loops over windows and 2×2 blocks), gradients against central
differences with a random upstream gradient (float64), any memory layout, every backend."""

import numpy as np
import pytest
from conftest import FIXTURE_OK, arrays, check_gradients, layout, layouts, seeds
from hypothesis import given
from hypothesis import strategies as st

import minivit.functional as F
from minivit import Tensor
from minivit.errors import ShapeError

EXACT = dict(rtol=0, atol=0)


def _map(data, window=(1, 1), even=False):
    """A drawn (B, H, W, C) map whose sides are multiples of `window` (and even if asked)."""
    step = (2 * window[0], 2 * window[1]) if even else window
    batch, channels = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    rows, cols = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    host = data.draw(arrays((batch, rows * step[0], cols * step[1], channels)))
    return host, layout(host, data.draw(layouts, label="layout"))


def reference_partition(x, wh, ww):
    batch, height, width, channels = x.shape
    windows = []
    for b in range(batch):
        for i in range(0, height, wh):
            for j in range(0, width, ww):
                windows.append(x[b, i:i + wh, j:j + ww].reshape(wh * ww, channels))
    return np.stack(windows)


@FIXTURE_OK
@given(data=st.data())
def test_window_partition_and_reverse(backend, data):
    window = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    host, x = _map(data, window)
    height, width = host.shape[1:3]
    windows = F.window_partition(Tensor(x), window)
    np.testing.assert_allclose(windows.numpy(), reference_partition(host, *window), **EXACT)
    back = F.window_reverse(windows, window, height, width)
    np.testing.assert_allclose(back.numpy(), host, **EXACT)
    seed = data.draw(seeds)
    check_gradients(lambda t: F.window_partition(t, window), x, seed=seed)
    check_gradients(lambda t: F.window_reverse(t, window, height, width),
                    layout(reference_partition(host, *window), "transposed"), seed=seed)


@FIXTURE_OK
@given(data=st.data())
def test_roll(backend, data):
    host, x = _map(data)
    shifts = (data.draw(st.integers(-4, 4)), data.draw(st.integers(-4, 4)))
    out = F.roll(Tensor(x), shifts, (1, 2))
    np.testing.assert_allclose(out.numpy(), np.roll(host, shifts, (1, 2)), **EXACT)
    check_gradients(lambda t: F.roll(t, shifts, (1, 2)), x, seed=data.draw(seeds))


def reference_patch_merge(x):
    x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
    x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    return np.concatenate([x0, x1, x2, x3], axis=-1)  # the original Swin's order


@FIXTURE_OK
@given(data=st.data())
def test_patch_merge(backend, data):
    host, x = _map(data, even=True)
    out = F.patch_merge(Tensor(x))
    np.testing.assert_allclose(out.numpy(), reference_patch_merge(host), **EXACT)
    check_gradients(F.patch_merge, x, seed=data.draw(seeds))


@pytest.mark.parametrize("call, message", [
    (lambda x: F.window_partition(x, 4), "a 6x8 map does not tile into 4x4 windows"),
    (lambda x: F.window_partition(x[0], 2), "expected a feature map (B, H, W, C)"),
    (lambda x: F.window_reverse(x.reshape(6, 8, 1), 2, 6, 8), "expected windows (B·12, 4, C)"),
    (lambda x: F.patch_merge(x[:, :5]), "even H and W; got shape (1, 5, 8, 1)"),
])
def test_bad_shapes_are_named(call, message):
    with pytest.raises(ShapeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(Tensor(np.zeros((1, 6, 8, 1))))
