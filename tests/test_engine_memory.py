"""The autograd engine's memory: what a training step leaves alive after backward, over many
steps, and a graph dropped without backward.
"""

import gc
import weakref

import numpy as np
from conftest import leaf, on_backend

import minivit.functional as F
from minivit import Function, Tensor, no_grad


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
