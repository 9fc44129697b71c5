"""The autograd engine's graph: backward walk, broadcasting, gradient accumulation, retain_grad,
hooks, no_grad, detach, the op hook, backward misuse (freed graphs, wrong gradients) and deep
graphs. Memory: test_engine_memory.py; errors and dtypes: test_engine_errors.py; backends:
test_engine_backends.py.
"""

import gc
import sys
import weakref

import numpy as np
import pytest
from conftest import FIXTURE_OK, arrays, as_host, leaf, on_backend, seeds
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minivit
import minivit.functional as F
from minivit import Function, Tensor, no_grad
from minivit.errors import GraphError


# -- broadcasting -------------------------------------------------------------------------------
def test_broadcast_gradients_sum_back_to_input_shapes(backend):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 1, 4)), rng.standard_normal((5, 4))
    upstream = rng.standard_normal((3, 5, 4))
    ta, tb = leaf(a), leaf(b)
    (ta * tb + ta - tb).backward(on_backend(upstream))
    assert ta.grad.shape == (3, 1, 4) and tb.grad.shape == (5, 4)
    np.testing.assert_allclose(as_host(ta.grad), (upstream * (b + 1)).sum(axis=1, keepdims=True),
                               rtol=1e-12)
    np.testing.assert_allclose(as_host(tb.grad), (upstream * (a - 1)).sum(axis=0), rtol=1e-12)


@FIXTURE_OK
@given(data=st.data())
def test_broadcast_gradients_for_drawn_shapes(backend, data):
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3,
                                                         max_side=3)).input_shapes
    values = [data.draw(arrays(s)) for s in shapes]
    tensors = [leaf(v) for v in values]
    out = tensors[0] * tensors[1] + tensors[2]
    upstream = np.random.default_rng(data.draw(seeds)).standard_normal(out.shape)
    out.backward(on_backend(upstream))
    for tensor in tensors:
        assert tensor.grad.shape == tensor.shape
    full = np.broadcast_shapes(*shapes)

    def summed(grad, shape):  # reference: sum the broadcast gradient back to `shape`
        grad = grad.sum(axis=tuple(range(len(full) - len(shape))))
        return grad.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True)

    np.testing.assert_allclose(as_host(tensors[2].grad), summed(upstream, shapes[2]), rtol=1e-12)
    np.testing.assert_allclose(as_host(tensors[0].grad),
                               summed(upstream * np.broadcast_to(values[1], full), shapes[0]),
                               rtol=1e-12, atol=1e-12)


def test_gradients_accumulate_over_uses_and_backward_calls(backend):
    x = leaf([1.0, -2.0, 3.0])
    (x * x + x).sum().backward()
    np.testing.assert_allclose(as_host(x.grad), [3.0, -3.0, 7.0])
    (x * 2.0).sum().backward()  # a new graph: leaf gradients add up, as in PyTorch
    np.testing.assert_allclose(as_host(x.grad), [5.0, -1.0, 9.0])


def test_leaves_never_share_one_gradient_array(backend):
    """Add hands the same upstream array to both inputs; each leaf still gets its own, so
    editing one .grad in place leaves the other alone."""
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (a + b).backward(on_backend([0.5, -1.0]))
    assert a.grad is not b.grad
    a.grad *= 10.0
    np.testing.assert_allclose(as_host(b.grad), [0.5, -1.0])
    np.testing.assert_allclose(as_host(a.grad), [5.0, -10.0])


def test_leaves_never_share_gradient_memory_through_views(backend):
    """reshape and transpose hand back views of the upstream gradient; the caller's own
    upstream array is not stored as a .grad either."""
    a, b, c = leaf([[1.0, 2.0], [3.0, 4.0]]), leaf([1.0, 1.0, 1.0, 1.0]), leaf([[0.0, 0.0]] * 2)
    upstream = on_backend([1.0, 2.0, 3.0, 4.0])
    (a.reshape(4) + b + c.T.reshape(4)).backward(upstream)
    a.grad *= 10.0
    c.grad *= 100.0
    np.testing.assert_allclose(as_host(b.grad), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(as_host(upstream), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(as_host(a.grad), [[10.0, 20.0], [30.0, 40.0]])
    np.testing.assert_allclose(as_host(c.grad), [[100.0, 300.0], [200.0, 400.0]])


def test_leaf_without_requires_grad_gets_no_gradient(backend):
    x, c = leaf([1.0, 2.0]), Tensor(on_backend([3.0, 4.0]))
    (x * c).sum().backward()
    assert c.grad is None and not c.requires_grad
    np.testing.assert_allclose(as_host(x.grad), [3.0, 4.0])


# -- retain_grad, hooks, no_grad ----------------------------------------------------------------
def test_retain_grad_keeps_an_intermediate_gradient(backend):
    x = leaf([1.0, 2.0, 3.0])
    y = (x * 2.0).retain_grad()
    z = x * 3.0  # not retained
    (y * y + z).sum().backward()
    np.testing.assert_allclose(as_host(y.grad), 2.0 * as_host(y.data))  # d(y²)/dy = 2y
    assert z.grad is None
    np.testing.assert_allclose(as_host(x.grad), 8.0 * np.array([1.0, 2.0, 3.0]) + 3.0)


def test_retain_grad_on_attention_output(backend):
    rng = np.random.default_rng(1)
    q, k, v = (leaf(rng.standard_normal((1, 2, 3, 4))) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v).retain_grad()
    upstream = rng.standard_normal(out.shape)
    (out * on_backend(upstream)).sum().backward()
    np.testing.assert_allclose(as_host(out.grad), upstream, rtol=1e-15)


def test_register_hook_sees_the_gradient_and_can_replace_it(backend):
    x = leaf([1.0, 2.0])
    y = x * 3.0
    seen = []
    y.register_hook(lambda g: seen.append(as_host(g.data)))
    y.register_hook(lambda g: g * 10.0)  # replaces the gradient flowing on to x
    (y * y).sum().backward()
    np.testing.assert_allclose(seen[0], [6.0, 12.0])  # 2y
    np.testing.assert_allclose(as_host(x.grad), [180.0, 360.0])  # 10 · 2y · 3


def test_register_hook_on_a_leaf_and_returning_an_array(backend):
    x = leaf([1.0, 2.0])
    x.register_hook(lambda g: g.data * 0.5)
    (x * 4.0).sum().backward()
    np.testing.assert_allclose(as_host(x.grad), [2.0, 2.0])


def test_hook_returning_a_wrong_shape_is_an_error(backend):
    x = leaf([1.0, 2.0])
    x.register_hook(lambda g: on_backend([1.0, 2.0, 3.0]))
    with pytest.raises(GraphError, match=r"expected shape \(2,\)"):
        (x * 1.0).sum().backward()


def test_register_hook_needs_requires_grad():
    with pytest.raises(GraphError, match="does not require grad"):
        Tensor(np.ones(2)).register_hook(lambda g: g)


def test_no_grad_builds_no_graph(backend):
    x = leaf([1.0, 2.0])
    assert minivit.is_grad_enabled()
    with no_grad():
        assert not minivit.is_grad_enabled()
        y = F.layer_norm(F.linear(x.reshape(1, 2), leaf([[1.0, 2.0], [3.0, 4.0]])))
        z = x * 2.0
    assert minivit.is_grad_enabled()
    for out in (y, z):
        assert not out.requires_grad and out._creator is None and out.is_leaf
    with pytest.raises(GraphError, match="does not require grad"):
        z.sum().backward()


def test_no_grad_restores_the_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert minivit.is_grad_enabled()


def test_detach_cuts_the_graph(backend):
    x = leaf([1.0, 2.0])
    y = (x * 2.0).detach()
    assert not y.requires_grad and y.is_leaf


# -- the op hook (the profiler's) ---------------------------------------------------------------
def test_op_hook_sees_every_forward_and_backward_and_changes_nothing():
    rng = np.random.default_rng(0)
    x0, w0 = rng.standard_normal((3, 4)), rng.standard_normal((4,))

    def run():
        x, w = Tensor(x0, requires_grad=True), Tensor(w0, requires_grad=True)
        loss = F.gelu(x * w).sum()
        loss.backward()
        return loss.item(), x.grad, w.grad

    calls = []

    def hook(function, phase, method, arrays, options):
        calls.append((type(function).__name__, phase))
        return method(*arrays, **options)

    plain = run()
    with minivit.tensor.op_hook(hook) as given_hook:
        hooked = run()
    assert given_hook is hook
    assert calls[:3] == [("Mul", "forward"), ("GELU", "forward"), ("Sum", "forward")]
    assert sorted(calls[3:]) == sorted((name, "backward") for name, _ in calls[:3])
    assert hooked[0] == plain[0]
    for ours, theirs in zip(hooked[1:], plain[1:]):
        np.testing.assert_array_equal(ours, theirs)
    run()  # after the block the hook is gone
    assert len(calls) == 6


def test_op_hook_is_restored_after_an_error_and_when_nested():
    outer = []

    def hook(function, phase, method, arrays, options):
        outer.append(phase)
        return method(*arrays, **options)

    def failing(function, phase, method, arrays, options):
        raise RuntimeError("from the hook")

    with minivit.tensor.op_hook(hook):
        with pytest.raises(RuntimeError, match="from the hook"):
            with minivit.tensor.op_hook(failing):
                Tensor([1.0], requires_grad=True) * 2
        Tensor([1.0], requires_grad=True) * 2  # the outer hook again
    assert outer == ["forward"] and minivit.autograd._op_hook is None


# -- backward misuse ----------------------------------------------------------------------------
def test_backward_twice_through_a_freed_graph_raises(backend):
    x = leaf([1.0, 2.0])
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(GraphError, match="already freed") as error:
        loss.backward()
    assert "forward pass again" in str(error.value)


def test_backward_through_a_freed_intermediate_raises(backend):
    x = leaf([1.0, 2.0])
    y = x * x
    y.sum().backward()
    with pytest.raises(GraphError, match="already freed"):
        (y * 2.0).sum().backward()


def test_backward_on_a_non_scalar_needs_a_gradient(backend):
    y = leaf([[1.0, 2.0], [3.0, 4.0]]) * 2.0
    with pytest.raises(GraphError, match=r"one-element tensor, got shape \(2, 2\)"):
        y.backward()


def test_backward_with_a_gradient_of_the_wrong_shape_raises(backend):
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(GraphError, match=r"shape \(3,\).*expected shape \(2,\)"):
        y.backward(on_backend([1.0, 1.0, 1.0]))


def test_create_graph_is_refused_clearly(backend):
    loss = (leaf([1.0]) * 2.0).sum()
    with pytest.raises(GraphError, match="second-order"):
        loss.backward(create_graph=True)


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(GraphError, match="does not require grad"):
        Tensor(np.ones(1)).backward()


def test_a_backward_returning_the_wrong_shape_or_dtype_is_caught(backend):
    class WrongShape(Function):
        def forward(self, x):
            return x * 2.0

        def backward(self, grad):
            return (grad.sum(axis=0),)

    class WrongDtype(WrongShape):
        def backward(self, grad):
            return (grad.astype(np.float32),)

    with pytest.raises(GraphError, match=r"WrongShape.backward's gradient for input 0"):
        WrongShape()(leaf([[1.0, 2.0]])).sum().backward()
    with pytest.raises(GraphError, match=r"dtype float32; expected shape \(2,\) and dtype float64"):
        WrongDtype()(leaf([1.0, 2.0])).sum().backward()


# -- deep graphs --------------------------------------------------------------------------------
def test_a_5000_op_chain_backward_does_not_hit_the_recursion_limit(backend):
    x = leaf([1.0, 2.0])
    y = x
    for _ in range(5000):
        y = y * 1.0001 + 0.0  # 10,000 Functions deep
    assert 10_000 > sys.getrecursionlimit()
    y.sum().backward()
    np.testing.assert_allclose(as_host(x.grad), [1.0001 ** 5000] * 2, rtol=1e-10)


def test_a_deep_forward_only_graph_is_freed_without_recursion(backend):
    x = leaf([1.0])
    y = x
    for _ in range(20_000):
        y = y * 1.0
    first = weakref.ref(y._creator)
    del y  # deallocating 20,000 nested Tensor -> Function -> Tensor links must not crash
    gc.collect()
    assert first() is None
