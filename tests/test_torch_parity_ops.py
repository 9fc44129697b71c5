"""Forward values and input gradients against PyTorch's own ops, in float64, with the same
random upstream gradient: relative error (max |ours − torch| / max |torch|) <= 1e-10.

PyTorch is a test-only reference (the `parity` extra); without it this module is skipped."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402
from conftest import (FIXTURE_OK, arrays, as_host, distinct_arrays, floats, layout,  # noqa: E402
                      layouts, on_backend, seeds, shapes)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import minivit.functional as F  # noqa: E402
from minivit import Tensor, optim  # noqa: E402

RTOL = 1e-10


ATOL = 1e-12


def assert_relative(ours, theirs, what):
    """max |ours − torch| <= 1e-10 · max |torch|. A gradient that is zero, or nearly, only
    through cancellation (constant values in v, a 2-feature layer norm) carries the float64
    round-off of the O(1..100) terms that cancelled, ~1e-15..1e-13 in either library: below
    ATOL = 1e-12 two results count as equal."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs torch {theirs.shape}"
    scale = float(np.abs(theirs).max(initial=0.0))
    error = float(np.abs(ours - theirs).max(initial=0.0))
    assert error <= RTOL * scale or error <= ATOL, \
        f"{what}: max error {error:.3e} at scale {scale:.3e}"


def compare(ours_fn, torch_fn, host_inputs, data, differentiable=None):
    """Run both with the same inputs (ours in a drawn memory layout on the active backend) and
    the same random upstream gradient; compare the outputs and every input gradient."""
    differentiable = differentiable or [a.dtype.kind == "f" for a in host_inputs]
    ours_in = [Tensor(layout(a, data.draw(layouts)), requires_grad=True) if d else on_backend(a)
               for a, d in zip(host_inputs, differentiable)]
    theirs_in = [torch.tensor(a, requires_grad=bool(d))
                 for a, d in zip(host_inputs, differentiable)]
    ours_out, theirs_out = ours_fn(*ours_in), torch_fn(*theirs_in)
    upstream = np.random.default_rng(data.draw(seeds)).standard_normal(tuple(theirs_out.shape))
    ours_out.backward(on_backend(upstream))
    theirs_out.backward(torch.tensor(upstream))
    assert_relative(as_host(ours_out.data), theirs_out.detach().numpy(), "forward")
    for i, (o, t, d) in enumerate(zip(ours_in, theirs_in, differentiable)):
        if d:
            assert_relative(as_host(o.grad), t.grad.numpy(), f"gradient of input {i}")


@FIXTURE_OK
@given(data=st.data(), bias=st.booleans())
def test_linear(backend, data, bias):
    lead = data.draw(shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
    n_in, n_out = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    host = [data.draw(arrays(lead + (n_in,))), data.draw(arrays((n_out, n_in)))]
    if bias:
        host.append(data.draw(arrays((n_out,))))
    compare(F.linear, TF.linear, host, data)


@FIXTURE_OK
@given(data=st.data(), bias=st.booleans())
def test_patchify_matches_conv2d_flatten_transpose(backend, data, bias):
    batch, channels = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    p, dim = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    grid_h, grid_w = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    host = [data.draw(arrays((batch, channels, grid_h * p, grid_w * p))),
            data.draw(arrays((dim, channels, p, p)))]
    if bias:
        host.append(data.draw(arrays((dim,))))

    def ours(x, w, b=None):
        return F.patchify(x, w, b, patch_size=p)

    def theirs(x, w, b=None):
        return TF.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2)

    compare(ours, theirs, host, data)


@FIXTURE_OK
@given(data=st.data())
def test_scaled_dot_product_attention(backend, data):
    shape = tuple(data.draw(st.integers(1, n)) for n in (2, 3, 5, 6))
    scale = data.draw(st.none() | floats(0.1, 1.0))
    host = [data.draw(arrays(shape)) for _ in range(3)]
    compare(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale),
            lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, scale=scale), host, data)


@FIXTURE_OK
@given(data=st.data())
def test_self_attention_matches_split_heads_sdpa(backend, data):
    batch, tokens = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    heads, head_dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    host = [data.draw(arrays((batch, tokens, 3 * heads * head_dim)))]

    def theirs(qkv):  # timm's Attention.forward between qkv and proj
        q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        return TF.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, -1)

    compare(lambda qkv: F.self_attention(qkv, num_heads=heads), theirs, host, data)


@FIXTURE_OK
@given(data=st.data(), log=st.booleans())
def test_softmax_and_log_softmax(backend, data, log):
    shape = data.draw(shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    host = [data.draw(arrays(shape, elements=floats(-10.0, 10.0)))]
    ours, theirs = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    compare(lambda x: ours(x, axis=axis), lambda x: theirs(x, dim=axis), host, data)


@FIXTURE_OK
@given(data=st.data(), weight=st.booleans(), bias=st.booleans())
def test_layer_norm(backend, data, weight, bias):
    lead = data.draw(shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    features = data.draw(st.integers(2, 8))
    host = [data.draw(distinct_arrays(lead + (features,), spacing=1.0 / 16))]
    host += [data.draw(arrays((features,))) for flag in (weight, bias) if flag]

    def unpack(params):
        params = list(params)
        return (params.pop(0) if weight else None), (params.pop(0) if bias else None)

    compare(lambda x, *ps: F.layer_norm(x, *unpack(ps), eps=1e-6),
            lambda x, *ps: TF.layer_norm(x, (features,), *unpack(ps), eps=1e-6), host, data)


@FIXTURE_OK
@given(data=st.data(), approximate=st.sampled_from(["none", "tanh"]))
def test_gelu(backend, data, approximate):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
    host = [data.draw(arrays(shape, elements=floats(-6.0, 6.0)))]
    compare(lambda x: F.gelu(x, approximate=approximate),
            lambda x: TF.gelu(x, approximate=approximate), host, data)


@FIXTURE_OK
@given(data=st.data(), soft=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1]) | floats(0.0, 0.9))
def test_cross_entropy(backend, data, soft, smoothing):
    batch, classes = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 7))
    logits = data.draw(arrays((batch, classes), elements=floats(-10.0, 10.0)))
    if soft:  # probabilities (mixup/distillation targets); torch differentiates them too
        raw = data.draw(arrays((batch, classes), elements=floats(0.01, 1.0)))
        target = raw / raw.sum(axis=1, keepdims=True)
    else:
        target = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, classes - 1)))
    compare(lambda x, t: F.cross_entropy(x, t, label_smoothing=smoothing),
            lambda x, t: TF.cross_entropy(x, t, label_smoothing=smoothing),
            [logits, target], data)



# the same hyper-parameters on both sides; torch gets the decay as two parameter groups
OPTIMIZERS = {
    "AdamW": (lambda params: optim.AdamW(params, lr=0.1, betas=(0.8, 0.95), eps=1e-6,
                                         weight_decay=0.3),
              lambda groups: torch.optim.AdamW(groups, lr=0.1, betas=(0.8, 0.95), eps=1e-6)),
    "SGD": (lambda params: optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.3),
            lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9)),
}


@FIXTURE_OK
@given(seed=seeds, max_norm=st.sampled_from([None, 0.5, 2.0, 100.0]),
       optimizer_name=st.sampled_from(sorted(OPTIMIZERS)))
def test_optimizer_steps_with_gradient_clipping(backend, seed, max_norm, optimizer_name):
    """Five AdamW or SGD-with-momentum steps (decay on the matrix, none on the bias) with the
    global gradient norm clipped as torch.nn.utils.clip_grad_norm_ does: parameters and norms
    equal torch's."""
    make_ours, make_theirs = OPTIMIZERS[optimizer_name]
    rng = np.random.default_rng(seed)
    host = {"layer.weight": rng.standard_normal((3, 4)), "layer.bias": rng.standard_normal(4)}
    ours = {name: Tensor(on_backend(value), requires_grad=True) for name, value in host.items()}
    theirs = {name: torch.tensor(value, requires_grad=True) for name, value in host.items()}
    optimizer = make_ours(ours.items())
    reference = make_theirs([{"params": [theirs["layer.weight"]], "weight_decay": 0.3},
                             {"params": [theirs["layer.bias"]], "weight_decay": 0.0}])
    for step in range(5):
        grads = {name: rng.standard_normal(value.shape) * 2.0 ** step
                 for name, value in host.items()}
        for name, grad in grads.items():
            ours[name].grad = on_backend(grad)
            theirs[name].grad = torch.tensor(grad)
        norm = optimizer.step(max_grad_norm=max_norm)
        expected_norm = torch.nn.utils.clip_grad_norm_(list(theirs.values()),
                                                       max_norm if max_norm else float("inf"))
        reference.step()
        assert_relative(as_host(norm), expected_norm.numpy(), f"gradient norm, step {step}")
        for name in host:
            assert_relative(as_host(ours[name].data), theirs[name].detach().numpy(),
                            f"{optimizer_name}: {name} after step {step}")


@FIXTURE_OK
@given(data=st.data(), left=st.integers(1, 4), right=st.integers(1, 4))
def test_matmul_with_1d_and_batched_operands_matches_torch(backend, data, left, right):
    """`@` for every pair of operand ranks 1..4 (1-D promoted as torch.matmul does), with
    broadcast batch dimensions."""
    batch_a, batch_b = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=2, max_side=3)).input_shapes
    n, k, m = (data.draw(st.integers(1, 3)) for _ in range(3))
    a_shape = (k,) if left == 1 else (batch_a + (n, k))[-left:] if left > 2 else (n, k)
    b_shape = (k,) if right == 1 else (batch_b + (k, m))[-right:] if right > 2 else (k, m)
    host = [data.draw(arrays(a_shape)), data.draw(arrays(b_shape))]
    compare(lambda a, b: a @ b, torch.matmul, host, data)
