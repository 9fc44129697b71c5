"""minivit.gradcheck itself: it must catch a wrong backward, and only a RANDOM upstream
gradient makes that possible for softmax- and LayerNorm-like ops."""

import numpy as np
import pytest
from conftest import (FIXTURE_OK, as_host, check_gradients, distinct_arrays, layout,
                      on_backend, seeds, shapes)
from hypothesis import given
from hypothesis import strategies as st

import minivit
import minivit.functional as F
from minivit import Tensor, no_grad
from minivit.functional.activation import Softmax
from minivit.functional.normalization import LayerNorm


# -- deliberately wrong backwards ---------------------------------------------------------------
class SoftmaxMissingSumTerm(Softmax):
    """dx = p ⊙ dp: drops the − p ⊙ Σ(dp ⊙ p) term of the true
    dx = p ⊙ (dp − Σ dp ⊙ p)."""

    def backward(self, grad):
        probs, _ = self.saved  # every softmax implementation saves (p, axis)
        return (probs * grad,)


class SoftmaxMissingProbsFactor(Softmax):
    """dx = dp − Σ dp ⊙ p: forgets the outer p ⊙. Zero for dp = 1, like the true gradient."""

    def backward(self, grad):
        probs, axis = self.saved
        return (grad - (grad * probs).sum(axis=axis, keepdims=True),)


class LayerNormMissingTerm(LayerNorm):
    """dx = r (dx̂ − mean dx̂): drops the − x̂ mean(dx̂ ⊙ x̂) term."""

    def backward(self, grad):
        normalized, rstd, weight = self.saved  # every layer_norm implementation saves (x̂, r, w)
        grad_normalized = grad * weight if weight is not None else grad
        mean_grad = grad_normalized.mean(axis=-1, keepdims=True)
        grad_x = rstd * (grad_normalized - mean_grad)
        leading = tuple(range(grad.ndim - 1))
        grad_w = (grad * normalized).sum(axis=leading) if self.needs_input_grad[1] else None
        grad_b = grad.sum(axis=leading) if self.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def bad_softmax(x):
    return SoftmaxMissingSumTerm()(x, axis=-1)


def bad_softmax_no_probs(x):
    return SoftmaxMissingProbsFactor()(x, axis=-1)


def bad_layer_norm(x, weight=None, bias=None):
    return LayerNormMissingTerm()(x, weight, bias, eps=1e-6)


def ones_upstream_check(fn, x, eps=1e-6):
    """What a checker with an all-ones upstream gradient would see: the analytic gradient of
    Σ fn(x) from backward(ones) against central differences of Σ fn(x). (max abs error,
    max |numeric gradient|)."""
    x = np.array(as_host(x), dtype=np.float64)
    tensor = Tensor(on_backend(x), requires_grad=True)
    out = fn(tensor)
    out.backward(minivit.backend.xp().ones(out.shape))
    analytic = as_host(tensor.grad)
    numeric = np.empty_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        with no_grad():
            numeric[i] = (float(fn(Tensor(on_backend(plus))).data.sum())
                          - float(fn(Tensor(on_backend(minus))).data.sum())) / (2 * eps)
    return float(np.abs(analytic - numeric).max()), float(np.abs(numeric).max())


@FIXTURE_OK
@given(data=st.data())
def test_gradcheck_catches_softmax_without_the_sum_term(backend, data):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=2, max_side=4))
    x = layout(data.draw(distinct_arrays(shape)), data.draw(st.sampled_from(["contiguous",
                                                                              "transposed"])))
    seed = data.draw(seeds)
    check_gradients(F.softmax, x, seed=seed)  # the real backward passes
    report = minivit.gradcheck(bad_softmax, x, seed=seed)
    assert not report.passed, f"the wrong softmax backward was not caught:\n{report}"
    assert "FAIL" in str(report)


@FIXTURE_OK
@given(data=st.data(), with_weight=st.booleans())
def test_gradcheck_catches_layer_norm_without_the_projection_term(backend, data, with_weight):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=2, max_side=4))
    x = on_backend(data.draw(distinct_arrays(shape)))
    weight = on_backend(data.draw(distinct_arrays((shape[-1],))))
    inputs = (x, weight) if with_weight else (x,)
    seed = data.draw(seeds)
    check_gradients(F.layer_norm, *inputs, seed=seed)  # the real backward passes
    report = minivit.gradcheck(bad_layer_norm, *inputs, seed=seed)
    assert not report.passed, f"the wrong layer norm backward was not caught:\n{report}"
    assert not report.inputs[0].passed  # the input's gradient is the wrong one ...
    if with_weight:
        assert report.inputs[1].passed  # ... the weight's is right


@pytest.mark.parametrize("bad_fn", [bad_layer_norm, bad_softmax_no_probs])
def test_an_all_ones_upstream_gradient_would_miss_the_bug(backend, bad_fn):
    """Σ softmax(x) = 1 and Σ layer_norm(x) = 0 whatever x is, so with an all-ones upstream
    gradient the true input gradient is exactly zero, and so is the gradient of these wrong
    backwards: the check compares 0 with 0 and passes. gradcheck's random upstream
    gradient exposes both."""
    x = on_backend(np.random.default_rng(0).uniform(-3, 3, (3, 5)))
    abs_error, numeric_scale = ones_upstream_check(bad_fn, x)
    assert numeric_scale < 1e-8  # the true gradient of the sum is zero ...
    assert abs_error < 1e-8  # ... and the wrong backward returns zero too: not caught
    for seed in range(5):
        assert not minivit.gradcheck(bad_fn, x, seed=seed).passed


def test_an_all_ones_upstream_catches_only_some_softmax_bugs(backend):
    """Dropping the Σ term entirely (dx = p ⊙ dp) happens to show even with ones (dx = p where
    the truth is 0); forgetting the p ⊙ factor, or a sign flip, does not. A random upstream
    gradient catches all of them."""
    x = on_backend(np.random.default_rng(1).uniform(-3, 3, (2, 4)))
    abs_error, _ = ones_upstream_check(bad_softmax, x)
    assert abs_error > 0.05
    abs_error, _ = ones_upstream_check(bad_softmax_no_probs, x)
    assert abs_error < 1e-8


# -- the report and the options -----------------------------------------------------------------
def test_report_lists_each_differentiable_input(backend):
    rng = np.random.default_rng(2)
    logits = on_backend(rng.standard_normal((3, 4)))
    labels = on_backend([0, 3, 1])
    report = minivit.gradcheck(F.cross_entropy, logits, labels, names=["logits", "labels"])
    assert report.passed and len(report.inputs) == 1  # integer labels are passed through
    check = report.inputs[0]
    assert (check.name, check.shape, check.mode, check.index) == ("logits", (3, 4), "full", 0)
    assert check.max_rel_error <= 1e-6
    text = str(report)
    assert "max rel err" in text and "logits" in text and "pass" in text


def test_directional_mode_for_large_inputs_also_catches_bugs(backend):
    x = on_backend(np.random.default_rng(3).uniform(-3, 3, (4, 8)))
    good = minivit.gradcheck(F.softmax, x, full_check_limit=10, directions=4)
    assert good.passed and good.inputs[0].mode == "directional"
    bad = minivit.gradcheck(bad_softmax, x, full_check_limit=10, directions=4)
    assert not bad.passed and bad.inputs[0].mode == "directional"


def test_raise_on_failure_raises_with_the_report(backend):
    x = on_backend(np.random.default_rng(4).uniform(-3, 3, (2, 3)))
    with pytest.raises(AssertionError, match="gradient check failed") as error:
        minivit.gradcheck(bad_softmax, x, raise_on_failure=True)
    assert "FAIL" in str(error.value)


def test_same_seed_same_report_and_the_seed_changes_the_upstream(backend):
    x = on_backend(np.random.default_rng(5).uniform(-3, 3, (2, 3)))
    first, again = (minivit.gradcheck(bad_softmax, x, seed=7) for _ in range(2))
    other = minivit.gradcheck(bad_softmax, x, seed=8)
    assert first.inputs[0].max_abs_error == again.inputs[0].max_abs_error
    assert first.inputs[0].max_abs_error != other.inputs[0].max_abs_error


def test_inputs_are_checked_in_float64_keeping_their_layout_and_are_not_modified(backend):
    host = np.random.default_rng(6).uniform(-1, 1, (3, 4)).astype(np.float32)
    view = layout(host, "transposed")
    seen = []

    def fn(x):
        seen.append((x.dtype, x.data.flags.c_contiguous))
        return F.gelu(x)

    assert minivit.gradcheck(fn, view).passed
    assert set(seen) == {(np.dtype(np.float64), False)}
    np.testing.assert_array_equal(as_host(view), host)
    assert view.dtype == np.float32


def test_an_input_that_does_not_reach_the_output_has_zero_gradient(backend):
    a, b = (on_backend(np.ones((2, 2))) for _ in range(2))
    report = minivit.gradcheck(lambda x, unused: x * 2.0, a, b)
    assert report.passed and report.inputs[1].max_abs_error == 0.0
