"""Half precision (bf16/fp16 GEMMs) and loss scaling on the GPU (skipped without CuPy and a
GPU; the CPU side is in test_precision.py).

Tolerances come from the formats, not from runs. With unit round-off u (bf16 2⁻⁸, fp16 2⁻¹¹;
fp32 2⁻²⁴ = u₃₂) and γ_K = K·u₃₂/(1 − K·u₃₂) for an fp32 sum of K terms, a GEMM of rounded
operands x̂ = x(1+δ), ŵ = w(1+δ'), |δ|, |δ'| ≤ u, accumulated in fp32, satisfies
    |Σ x̂ŵ (computed) − Σ xw| ≤ (2u + u² + 2γ_K) Σ|x||w|      (elementwise; bias: + its u₃₂)
which the linear tests check for y, dx, dW. Attention: the score error E = (2u + u² + 2γ_d)·s·
|q||k|ᵀ moves each log-probability by at most 2·max_row E, so P̂ = P(1+η), |η| ≤ e^(2 max E) − 1,
and O = P̂ v̂ adds P's and v's rounding and γ_N:
    |Ô − O| ≤ ((1+η)(1+u)²(1+γ_N)(1+8u₃₂) − 1) · P|v|      (8u₃₂: the fp32 softmax)
"""

import math

import numpy as np
import pytest

import minivit
import minivit.functional as F
from minivit import Tensor, cuda
from minivit import backend as mb
from minivit.cuda import attention as cuda_attention
from minivit.cuda import gemm
from minivit.loss_scale import LossScaler, scaled_backward
from minivit.optim import AdamW
from minivit.precision import using_precision

GPU = pytest.mark.skipif(not mb.cupy_available(),
                         reason="half precision: CuPy or a CUDA GPU is not available")
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
U32 = 2.0 ** -24


def gamma(terms):
    return terms * U32 / (1 - terms * U32)


def bf16_bits(x):
    """The reference rounding: float32 → bfloat16 bits, to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def special_values():
    rng = np.random.default_rng(0)
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact ties
    return np.concatenate([rng.standard_normal(1000).astype(np.float32) * 1e3, ties,
                           np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38,
                                     1e-40, 65504.0, 65520.0], np.float32)])


def test_the_bf16_reference_rounds_as_torch_does():
    """Checks the reference (bf16_bits) where PyTorch is: its bfloat16 cast rounds to nearest
    even too (NaNs compared as NaNs)."""
    torch = pytest.importorskip("torch")
    values = special_values()
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = bf16_bits(values)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan((got[~finite].astype(np.uint32) << 16).view(np.float32)).all()


@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    minivit.set_backend("cupy")
    yield cupy
    minivit.set_backend("numpy")


@GPU
def test_the_bf16_kernel_rounds_as_the_reference(cp):
    values = special_values()
    got = cp.asnumpy(gemm.gemm_operand(cp.asarray(values), "bf16"))
    np.testing.assert_array_equal(got, bf16_bits(values))


@GPU
@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_linear_in_half_precision_is_within_the_format_bound(cp, half):
    rng = np.random.default_rng(1)
    rows, inner, outer = 50, 384, 70
    x, w, b = (rng.standard_normal(shape) for shape in ((rows, inner), (outer, inner), (outer,)))
    grad = rng.standard_normal((rows, outer))
    u = UNIT_ROUNDOFF[half]
    with using_precision(half, "cupy"):
        tensors = [Tensor(cp.asarray(a, cp.float32), requires_grad=True) for a in (x, w, b)]
        y = F.linear(*tensors)
        y.backward(cp.asarray(grad, cp.float32))
    assert y.dtype == np.float32 and tensors[1].grad.dtype == np.float32
    checks = [(y.data, x @ w.T + b, abs(x) @ abs(w).T + abs(b), inner),
              (tensors[0].grad, grad @ w, abs(grad) @ abs(w), outer),
              (tensors[1].grad, grad.T @ x, abs(grad).T @ abs(x), rows),
              (tensors[2].grad, grad.sum(0), abs(grad).sum(0), rows)]
    for index, (got, want, magnitude, terms) in enumerate(checks):
        bound = (2 * u + u * u + 2 * gamma(terms)) * magnitude + U32 * abs(want)
        if index == 3:  # db: an fp32 column sum of dy, no half operand
            bound = 2 * gamma(terms) * magnitude
        error = abs(cp.asnumpy(got).astype(np.float64) - want)
        assert (error <= bound).all(), f"output {index}: max excess {(error - bound).max()}"
        if index < 3:  # and the half path ran: far more than fp32's ~√K·u₃₂ somewhere
            assert error.max() > 16 * U32 * abs(want).max()


@GPU
@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_self_attention_in_half_precision_is_within_the_format_bound(cp, half):
    rng = np.random.default_rng(2)
    batch, tokens, heads, head_dim = 2, 17, 2, 16
    qkv = rng.standard_normal((batch, tokens, 3 * heads * head_dim))
    scale, u = 1 / math.sqrt(head_dim), UNIT_ROUNDOFF[half]
    with using_precision(half, "cupy"):
        out = cuda_attention.attention_forward(cp.asarray(qkv, cp.float32), heads, tokens,
                                               scale)[0]
    q, k, v = (qkv.reshape(batch, tokens, 3, heads, head_dim)[:, :, i].transpose(0, 2, 1, 3)
               for i in range(3))
    scores = q @ k.swapaxes(-1, -2) * scale
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)
    score_error = (2 * u + u * u + 2 * gamma(head_dim)) * scale * (abs(q) @ abs(k).swapaxes(-1, -2))
    eta = np.expm1(2 * score_error.max(-1, keepdims=True))
    factor = (1 + eta) * (1 + u) ** 2 * (1 + gamma(tokens)) * (1 + 8 * U32) - 1
    bound = (factor * (probs @ abs(v))).transpose(0, 2, 1, 3).reshape(want.shape)
    error = abs(cp.asnumpy(out).astype(np.float64) - want)
    assert (error <= bound).all(), f"max excess {(error - bound).max()}"
    assert out.dtype == np.float32


@GPU
@pytest.mark.parametrize("half", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["vit_digits", "beit_digits", "swin_digits"])
def test_a_vit_forward_in_half_precision_is_near_float64(cp, half, name):
    """Whole model (BEiT and Swin: attention with a relative bias, Swin's shift masks): each of
    the G GEMMs on the way to the logits rounds its two operands (relative 2u each), so the
    logits move by at most ~2u·G of their scale (LayerNorm keeps each block's input at unit
    scale); and the half path really ran (more than fp32's error)."""
    from minivit.models import create_model, model_config
    minivit.manual_seed(0)
    config = model_config(name)
    model = create_model(name).to(backend="cupy", dtype="float64").eval()
    images = np.random.default_rng(3).standard_normal((16, 1, 8, 8))
    with minivit.no_grad():
        want = cp.asnumpy(model(cp.asarray(images)).data)
        model.to(dtype="float32")
        fp32 = cp.asnumpy(model(cp.asarray(images, cp.float32)).data)
        with using_precision(half, "cupy"):
            got = cp.asnumpy(model(cp.asarray(images, cp.float32)).data)
    blocks = sum(config["depths"]) if "depths" in config else config["depth"]
    merges = len(config.get("depths", ())) - 1 if "depths" in config else 0  # Swin's reductions
    gemms = 2 + 6 * blocks + merges  # patch embedding, head; qkv, QK, PV, proj, fc1, fc2
    scale = abs(want).max()
    assert abs(got - want).max() <= 2 * UNIT_ROUNDOFF[half] * gemms * scale
    assert abs(got - want).max() > 4 * abs(fp32 - want).max()


# -- loss scaling and graphs ------------------------------------------------------------------
def _setup(cp, seed=0):
    from minivit.models import create_model
    minivit.manual_seed(seed)
    model = create_model("vit_digits", depth=2, drop_path_rate=0.0).to(backend="cupy")
    rng = np.random.default_rng(seed)
    images = cp.asarray(rng.standard_normal((16, 1, 8, 8)), cp.float32)
    labels = cp.asarray(rng.integers(0, 10, 16))
    return model, AdamW(model.named_parameters(), lr=1e-3), images, labels


def _step_of(model, optimizer):
    def step(images, labels):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        scaled_backward(loss, optimizer)
        optimizer.step(max_grad_norm=1.0)
        return loss.data
    return step


def _state(optimizer):
    return [cuda_array.get() for cuda_array in (optimizer.flat, optimizer.m, optimizer.v)]


@GPU
@pytest.mark.parametrize("graph", [False, True])
def test_fp16_overflow_on_the_gpu_skips_the_step_and_lowers_the_scale(cp, graph):
    """A batch with an inf pixel makes every gradient NaN: the step (eager, or a replay of the
    recorded graph, whose AdamW kernel reads the device flag) leaves weights, moments and step
    count as they were, and halves the scale; the next good step trains."""
    with using_precision("fp16", "cupy"):
        model, optimizer, images, labels = _setup(cp)
        scaler = LossScaler(optimizer)
        step = _step_of(model, optimizer)
        run = cuda.capture_step(step, images, labels) if graph else step
        if not graph:
            step(images, labels)
        assert scaler.update() is False and optimizer.step_count == 1
        bad = images.copy()
        bad[0, 0, 0, 0] = cp.inf
        before = _state(optimizer)
        run(bad, labels)
        assert scaler.update() is True
        assert scaler.scale == 2.0 ** 15 and optimizer.step_count == 1
        for got, want in zip(_state(optimizer), before):
            np.testing.assert_array_equal(got, want)
        run(images, labels)
        assert scaler.update() is False and optimizer.step_count == 2
        assert not np.array_equal(_state(optimizer)[0], before[0])


@GPU
def test_an_overflow_in_the_capture_warm_up_counts_no_step(cp):
    """The eager warm-up of a capture may overflow (a first fp16 step often does): it is
    skipped like any eager step, and update() gives back no step count it never took."""
    with using_precision("fp16", "cupy"):
        model, optimizer, images, labels = _setup(cp)
        scaler = LossScaler(optimizer)
        bad = images.copy()
        bad[0, 0, 0, 0] = cp.inf
        captured = cuda.capture_step(_step_of(model, optimizer), bad, labels)
        assert scaler.update() is True and optimizer.step_count == 0
        captured(images, labels)
        assert scaler.update() is False and optimizer.step_count == 1


@GPU
@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_a_captured_half_precision_step_replays_like_eager_steps(cp, half):
    """Warm-up + 3 replays equal 4 eager steps in the same precision (fp16 with its loss
    scaler). atol: the capture's gradient norm is a plain sum where eager calls cuBLAS's
    dot, so clipping differs in the last bits (as in test_cuda's float64 version)."""
    results = []
    for graph in (False, True):
        with using_precision(half, "cupy"):
            model, optimizer, images, labels = _setup(cp, seed=4)
            if half == "fp16":
                LossScaler(optimizer)
            step = _step_of(model, optimizer)
            losses = []
            if graph:
                captured = cuda.capture_step(step, images, labels)
                losses.append(float(captured.warmup_outputs))
                losses += [float(captured(images, labels)) for _ in range(3)]
            else:
                losses += [float(step(images, labels)) for _ in range(4)]
            results.append((losses, _state(optimizer), optimizer.step_count))
    (eager_losses, eager_state, eager_steps), (graph_losses, graph_state, graph_steps) = results
    assert graph_steps == eager_steps == 4
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-5)
    for got, want in zip(graph_state, eager_state):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
