"""The autograd engine: backward walk, broadcasting, hooks, no_grad, freeing, deep graphs,
memory, error messages and the backend switch."""

import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest
from conftest import FIXTURE_OK, arrays, as_host, on_backend, seeds
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minivit
import minivit.functional as F
from minivit import Function, Tensor, no_grad
from minivit import backend as mb
from minivit.errors import BackendError, DTypeError, GraphError, MinivitError, ShapeError


def leaf(values, dtype=np.float64):
    return Tensor(on_backend(values, dtype), requires_grad=True)


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
    assert outer == ["forward"] and minivit.tensor._op_hook is None


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


# -- memory -------------------------------------------------------------------------------------
HEADS, DIM, TOKENS, BATCH, CLASSES = 2, 8, 5, 3, 4


def _parameters(rng):
    shapes = {"w1": (DIM, 6), "b1": (DIM,), "g": (DIM,), "beta": (DIM,), "wqkv": (3 * DIM, DIM),
              "wo": (DIM, DIM), "head": (CLASSES, DIM)}
    return {name: leaf(0.3 * rng.standard_normal(shape)) for name, shape in shapes.items()}


def _step(p, x, labels):
    """A small transformer-ish step: linear, layer norm, attention, residual, head, loss."""
    h = F.layer_norm(F.linear(x, p["w1"], p["b1"]), p["g"], p["beta"])
    qkv = F.linear(h, p["wqkv"]).reshape(BATCH, TOKENS, 3, HEADS, DIM // HEADS)
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    merged = attn.transpose(0, 2, 1, 3).reshape(BATCH, TOKENS, DIM)
    out = F.gelu(F.linear(merged, p["wo"])) + h
    logits = F.linear(out.mean(axis=1), p["head"])
    loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    return loss, {"h": h, "qkv": qkv, "attn": attn, "out": out, "logits": logits}


def _live_engine_objects():
    gc.collect()
    return sum(issubclass(type(o), (Tensor, Function)) for o in gc.get_objects())


def test_memory_is_released_after_each_step(backend):
    rng = np.random.default_rng(0)
    params = _parameters(rng)
    x, labels = on_backend(rng.standard_normal((BATCH, TOKENS, 6))), on_backend([0, 3, 1])

    gc_was_enabled = gc.isenabled()
    gc.disable()  # everything below must be freed by reference counting alone: no cycles
    try:
        loss, inter = _step(params, x, labels)
        creators = {name: t._creator for name, t in inter.items()}
        attn_fn, norm_fn = inter["attn"]._creator, inter["h"]._creator
        probs, q = attn_fn.saved[:2]  # every implementation saves (P, q, k, v, s, ...)
        normalized, rstd, _ = norm_fn.saved  # and layer_norm's (x̂, r, w)
        saved = [weakref.ref(a) for a in (probs, q, normalized, rstd)]
        tensor_refs = [weakref.ref(t) for t in inter.values()] + [weakref.ref(loss)]
        function_refs = [weakref.ref(f) for f in creators.values()]
        function_refs.append(weakref.ref(loss._creator))
        del attn_fn, norm_fn, probs, q, normalized, rstd

        loss.backward()
        # saved arrays are dropped as soon as their Function's backward has run ...
        for name, creator in creators.items():
            assert creator.__dict__ == {"released": True}, f"{name}: {creator.__dict__.keys()}"
        assert all(ref() is None for ref in saved), "saved arrays outlive backward"
        # ... intermediate gradients are not kept ...
        assert all(t.grad is None for t in inter.values())
        # ... and the parameters got theirs
        assert all(p.grad is not None and p.grad.shape == p.shape for p in params.values())
        del creators, creator  # (the loop variable would keep the last Function alive)

        for p in params.values():
            p.grad = None
        loss, inter = _step(params, x, labels)  # step 2 rebinds the names of step 1
        loss.backward()
        assert all(ref() is None for ref in tensor_refs), "step-1 tensors still alive"
        assert all(ref() is None for ref in function_refs), "step-1 Functions still alive"
    finally:
        if gc_was_enabled:
            gc.enable()


def test_many_steps_do_not_grow_the_number_of_live_objects(backend):
    rng = np.random.default_rng(1)
    params = _parameters(rng)
    x, labels = on_backend(rng.standard_normal((BATCH, TOKENS, 6))), on_backend([2, 0, 1])

    def train(steps):
        for _ in range(steps):
            for p in params.values():
                p.grad = None
            loss, _ = _step(params, x, labels)
            loss.backward()
            with no_grad():
                for p in params.values():
                    p.data = p.data - 0.01 * p.grad

    train(2)
    before = _live_engine_objects()
    train(20)
    assert _live_engine_objects() == before


def test_a_graph_dropped_without_backward_is_freed(backend):
    rng = np.random.default_rng(2)
    params = _parameters(rng)
    x, labels = on_backend(rng.standard_normal((BATCH, TOKENS, 6))), on_backend([2, 0, 1])
    loss, inter = _step(params, x, labels)
    refs = {"loss creator": weakref.ref(loss._creator),
            "attention probs": weakref.ref(inter["attn"]._creator.probs)}
    refs.update((name, weakref.ref(t)) for name, t in inter.items())
    del loss, inter
    alive = {name: [type(r).__name__ for r in gc.get_referrers(ref())]
             for name, ref in refs.items() if ref() is not None}
    assert not alive, f"still alive (referrers): {alive}"


# -- error messages: expected vs got ------------------------------------------------------------
def test_linear_shape_mismatch_names_both_shapes(backend):
    with pytest.raises(ShapeError, match=r"got input \(2, 3\) and weight \(4, 5\)"):
        F.linear(leaf(np.ones((2, 3))), leaf(np.ones((4, 5))))
    with pytest.raises(ShapeError, match=r"bias must have shape \(4,\), got \(3,\)"):
        F.linear(leaf(np.ones((2, 5))), leaf(np.ones((4, 5))), leaf(np.ones(3)))


def test_patchify_errors(backend):
    weight = leaf(np.ones((8, 3, 4, 4)))
    with pytest.raises(ShapeError, match=r"image size 30x32 is not a multiple of the patch size 4"):
        F.patchify(leaf(np.ones((1, 3, 30, 32))), weight, None, patch_size=4)
    with pytest.raises(ShapeError, match=r"weight must be \(D, 1, 4, 4\).*got \(8, 3, 4, 4\)"):
        F.patchify(leaf(np.ones((1, 1, 32, 32))), weight, None, patch_size=4)
    with pytest.raises(ShapeError,
                       match=r"expected images \(B, C, H, W\), got shape \(3, 32, 32\)"):
        F.patchify(leaf(np.ones((3, 32, 32))), weight, None, patch_size=4)


def test_attention_shape_mismatch_names_q_k_v(backend):
    q = leaf(np.ones((1, 2, 3, 4)))
    with pytest.raises(ShapeError,
                       match=r"got q \(1, 2, 3, 4\), k \(1, 2, 3, 5\), v \(1, 2, 3, 4\)"):
        F.scaled_dot_product_attention(q, leaf(np.ones((1, 2, 3, 5))), q)
    with pytest.raises(ShapeError, match=r"v \(1, 2, 6, 4\)"):
        F.scaled_dot_product_attention(q, q, leaf(np.ones((1, 2, 6, 4))))
    with pytest.raises(ShapeError, match=r"\(B, heads, N, d\)"):
        F.scaled_dot_product_attention(*(leaf(np.ones((2, 3, 4))),) * 3)


def test_cross_entropy_errors(backend):
    logits = leaf(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\] for 5 classes; "
                                         r"got values from 0 to 5"):
        F.cross_entropy(logits, on_backend([0, 5, 2]))
    with pytest.raises(ValueError, match=r"got values from -1 to 2"):
        F.cross_entropy(logits, on_backend([-1, 0, 2]))
    with pytest.raises(ShapeError, match=r"labels must have shape \(3,\).*got \(2,\)"):
        F.cross_entropy(logits, on_backend([0, 1]))
    with pytest.raises(ShapeError, match=r"soft targets must have the logits' shape \(3, 5\); "
                                         r"got \(3, 4\)"):
        F.cross_entropy(logits, on_backend(np.ones((3, 4))))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        F.cross_entropy(logits, on_backend([0, 1, 2]), label_smoothing=1.0)


def test_layer_norm_and_matmul_shape_errors(backend):
    with pytest.raises(ShapeError, match=r"weight must have shape \(4,\).*got \(3,\)"):
        F.layer_norm(leaf(np.ones((2, 4))), leaf(np.ones(3)))
    with pytest.raises(ShapeError, match=r"got \(2, 3\) @ \(4, 2\)"):
        leaf(np.ones((2, 3))) @ leaf(np.ones((4, 2)))


# -- dtypes: constants never promote, tensors never mix --------------------------------------------
@pytest.mark.parametrize("constant", [np.arange(3), np.ones(3), [1.0, 2.0, 3.0]])
def test_a_constant_keeps_the_tensors_dtype_forward_and_backward(backend, constant):
    x = Tensor(on_backend(np.ones((2, 3)), np.float32), requires_grad=True)
    raw = constant if isinstance(constant, list) else on_backend(constant)
    for y in (x * raw, raw * x, x + raw, x - raw, raw / (x + 1), x @ on_backend(np.ones((3, 2)))):
        assert y.dtype == np.float32
    (x * raw).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(as_host(x.grad), np.broadcast_to(np.asarray(constant), (2, 3)))


def test_tensors_of_two_float_dtypes_in_one_op_are_a_clear_error(backend):
    x32 = Tensor(on_backend(np.ones(3), np.float32), requires_grad=True)
    x64 = Tensor(on_backend(np.ones(3)))
    with pytest.raises(DTypeError, match=r"add: inputs of different dtypes \(float32, float64\)"):
        x32 + x64
    weight = Tensor(on_backend(np.ones((2, 3)), np.float32), requires_grad=True)
    with pytest.raises(DTypeError, match="linear: inputs of different dtypes"):
        F.linear(x64, weight)


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(DTypeError, match="only floating-point tensors can require gradients"):
        Tensor(np.array([1, 2, 3]), requires_grad=True)
    Tensor(np.array([1, 2, 3]))  # without gradients they are fine


def test_small_numeric_edge_cases(backend):
    assert float(Tensor(on_backend(np.array([1, 2]))).mean()) == 1.5  # not truncated to 1
    x = Tensor(on_backend(np.array([0.0, 4.0])), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(as_host(x.grad), [0.0, 0.0])  # not NaN at 0
    t = Tensor(on_backend(np.array([1.0, 3.0])), requires_grad=True)
    y = 2 ** t
    y.sum().backward()
    np.testing.assert_allclose(as_host(y.data), [2.0, 8.0])
    np.testing.assert_allclose(as_host(t.grad), [2.0 * np.log(2), 8.0 * np.log(2)])
    np.testing.assert_allclose(as_host((np.float32(2) ** t).data), [2.0, 8.0])
    with pytest.raises(ValueError, match="needs a base > 0"):
        0 ** t
    # an array of exponents, one of them 0 at a = 0: slopes 0, 1, 3a²
    a = Tensor(on_backend(np.array([0.0, 2.0, 3.0])), requires_grad=True)
    (a ** on_backend(np.array([0.0, 1.0, 3.0]))).sum().backward()
    np.testing.assert_array_equal(as_host(a.grad), [0.0, 1.0, 27.0])
    assert t.to(dtype="int32").requires_grad is False  # integers carry no gradient


def test_one_element_tensors_convert_to_python_values():
    assert bool(Tensor(np.zeros(1))) is False and bool(Tensor(2.0)) is True
    assert float(Tensor([2.5])) == 2.5 and int(Tensor(3.0)) == 3
    with pytest.raises(TypeError, match="only a one-element tensor converts"):
        bool(Tensor([1.0, 2.0]))


def test_cross_entropy_takes_a_list_of_labels(backend):
    logits = Tensor(on_backend(np.random.default_rng(0).standard_normal((4, 5)), np.float32),
                    requires_grad=True)
    from_list = F.cross_entropy(logits, [0, 4, 2, 1])
    from_array = F.cross_entropy(logits, on_backend(np.array([0, 4, 2, 1])))
    assert float(from_list) == float(from_array)


def test_errors_are_minivit_errors():
    assert issubclass(ShapeError, MinivitError) and issubclass(ShapeError, ValueError)
    assert issubclass(BackendError, MinivitError) and issubclass(GraphError, MinivitError)


# -- backends -----------------------------------------------------------------------------------
class FakeCupyArray:
    """Looks like a CuPy array to backend_of (its class lives in a "cupy..." module)."""

    __module__ = "cupy._core.core"
    shape, dtype = (2,), np.dtype(np.float64)


def test_array_module_refuses_mixed_backends():
    with pytest.raises(BackendError, match="numpy and cupy") as error:
        mb.array_module(np.ones(2), FakeCupyArray())
    assert "Move every tensor to one backend" in str(error.value)
    assert mb.backend_of(FakeCupyArray()) == "cupy" and mb.backend_of(np.ones(1)) == "numpy"
    assert mb.array_module(np.ones(2), None) is np


def test_an_op_on_mixed_backends_raises(monkeypatch):
    pretend_gpu = np.ones((1, 3))  # backend_of now calls this one a CuPy array
    real_backend_of = mb.backend_of
    monkeypatch.setattr(mb, "backend_of",
                        lambda a: "cupy" if a is pretend_gpu else real_backend_of(a))
    a, b = leaf(np.ones((1, 3))), Tensor(pretend_gpu)
    for op in (lambda: a + b, lambda: b * a, lambda: F.linear(a, b), lambda: F.concat([a, b])):
        with pytest.raises(BackendError, match="numpy and cupy"):
            op()


def test_cupy_backend_without_cupy_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(minivit.backend, "_checked_modules", {})  # forget a GPU seen before
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now fails on any machine
    # ... and a GPU machine must not answer from backend's once-per-process CuPy check
    monkeypatch.setattr(mb, "_checked_modules", {}, raising=False)
    with pytest.raises(BackendError, match="needs CuPy, which is not installed") as error:
        minivit.set_backend("cupy")
    assert "pip install 'minivit[gpu]'" in str(error.value)
    assert "--backend numpy" in str(error.value)
    assert minivit.get_backend() == "numpy" and mb.xp() is np
    assert not mb.cupy_available()


def test_unknown_backend_name():
    with pytest.raises(BackendError, match=r"unknown backend 'jax': expected numpy or cpu \(the "
                                           r"CPU\), or cupy, cuda or gpu \(an NVIDIA GPU\)"):
        minivit.set_backend("jax")
    assert minivit.get_backend() == "numpy"
    minivit.set_backend("CPU")  # PyTorch's name for it
    assert minivit.get_backend() == "numpy"


def test_backend_fixture_selects_the_backend(backend):
    assert minivit.get_backend() == backend
    assert mb.backend_of(on_backend([1.0])) == backend
    t = Tensor([1.0, 2.0])
    assert t.backend == backend and t.dtype == np.float32
    np.testing.assert_array_equal(t.numpy(), [1.0, 2.0])


def test_manual_seed_makes_dropout_repeatable(backend):
    x = Tensor(on_backend(np.ones((4, 6))))
    minivit.manual_seed(3)
    first = as_host(F.dropout(x, p=0.5).data)
    second = as_host(F.dropout(x, p=0.5).data)
    minivit.manual_seed(3)
    np.testing.assert_array_equal(as_host(F.dropout(x, p=0.5).data), first)
    assert not np.array_equal(first, second)
    assert F.dropout(x, p=0.5, training=False) is x and F.drop_path(x, p=0.0) is x


def test_the_engine_does_not_import_torch():
    code = ("import sys, minivit, minivit.functional, minivit.gradcheck, minivit.cli, "
            "minivit.bench, minivit.models, minivit.torch_reference; "
            "assert 'torch' not in sys.modules, 'minivit imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
