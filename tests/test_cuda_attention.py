"""The GPU self-attention path (minivit.cuda.attention) with an additive score bias: relative
position bias (heads, N, N), Swin-style masks (B, 1, N, N), key masks (B, 1, 1, N), a full
(B, heads, N, N) bias, each also with queries=n (the bias's first n rows).

Everywhere: the registry would hand a biased self-attention call on GPU arrays to the "cuda"
implementation (it does not decline the bias).

On a GPU (skipped where CuPy or a GPU is missing; written in a session without a GPU):
- the fused path equals the NumPy path, output, d qkv and d bias, float64 to 1e-12 and
  float32 to 1e-5 (staying float32), with the probabilities kept or rebuilt in backward
  (rebuilt: the attention_probs_bias kernel ran), and the registry chose the "cuda" path;
- gradcheck of biased self-attention on the cupy backend (float64);
- Swin (relative bias + shift masks), BEiT (relative bias) and a ViT with --rel-pos-bias
  (queries=1 in its last block): forward and every gradient on cupy equal NumPy in float64,
  every self-attention call on cupy ran the "cuda" implementation, and float32 stays float32.
The capture path with a bias: tests/test_cuda_graphs.py (test_attention_on_the_capture_path_...).
"""

import numpy as np
import pytest
from helpers_cuda import GPU, _assert_fused_matches_numpy, check_gradients

import minivit
import minivit.functional as F
from minivit import Tensor
from minivit import backend as mb
from minivit.cuda import device, gemm
from minivit.functional import registry
from minivit.models import create_model

BATCH, TOKENS, HEADS, HEAD_DIM = 2, 7, 3, 4
BIAS_SHAPES = {"relative": (HEADS, TOKENS, TOKENS), "mask": (BATCH, 1, TOKENS, TOKENS),
               "key_mask": (BATCH, 1, 1, TOKENS), "full": (BATCH, HEADS, TOKENS, TOKENS)}


@pytest.fixture(autouse=True)
def _numpy_backend_afterwards():
    yield
    minivit.set_backend("numpy")


def _cuda_self_attention():
    return next(impl for impl in registry.implementations("self_attention")
                if impl.device == "cuda")


@pytest.mark.parametrize("kind", sorted(BIAS_SHAPES))
def test_the_cuda_self_attention_takes_a_bias(monkeypatch, kind):
    """With arrays the GPU path handles, choose() picks it for a biased call too (NumPy
    arrays stand in for CuPy ones: the GPU test below checks the real dispatch)."""
    monkeypatch.setattr(_cuda_self_attention(), "handles", lambda *arrays: True)
    qkv = np.zeros((BATCH, TOKENS, 3 * HEADS * HEAD_DIM))
    bias = np.zeros(BIAS_SHAPES[kind])
    assert registry.choose("self_attention", qkv, bias, bias=bias).device == "cuda"


# == on a GPU ====================================================================================
@pytest.fixture
def chosen(monkeypatch):
    """The devices of the implementations that choose() picked, per op."""
    picked, original = {}, registry.choose

    def recording_choose(op, *arrays, **options):
        impl = original(op, *arrays, **options)
        picked.setdefault(op, []).append(impl.device)
        return impl

    monkeypatch.setattr(registry, "choose", recording_choose)
    return picked


def _biased_attention(queries, keep_probs):
    def attention(qkv, bias):
        out = F.self_attention(qkv, HEADS, queries=queries, return_attention=keep_probs,
                               bias=bias)
        return out[0] if keep_probs else out
    return attention


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", sorted(BIAS_SHAPES))
@pytest.mark.parametrize("queries", [None, 3])
@pytest.mark.parametrize("keep_probs", [False, True])
def test_biased_self_attention_on_the_gpu_matches_numpy(cp, chosen, dtype, kind, queries,
                                                        keep_probs):
    """Output, d qkv and d bias (dS summed to the bias's shape; zero in the rows of the
    tokens that did not ask) equal the NumPy path's."""
    rng = np.random.default_rng(len(kind))
    qkv = rng.standard_normal((BATCH, TOKENS, 3 * HEADS * HEAD_DIM)).astype(dtype)
    bias = rng.standard_normal(BIAS_SHAPES[kind]).astype(dtype)
    gemm.pointer_cache.clear()
    device.kernels.pop(("attention_probs_bias", None), None)
    _assert_fused_matches_numpy(_biased_attention(queries, keep_probs), [qkv, bias],
                                ("softmax_forward", np.dtype(dtype).name), dtype)
    assert gemm.pointer_cache, "the batched-GEMM attention path did not run"
    assert "cuda" in chosen["self_attention"], chosen["self_attention"]
    rebuilt = ("attention_probs_bias", None) in device.kernels
    assert rebuilt != keep_probs, "backward rebuilt P though it was kept, or kept it unasked"


@GPU
@pytest.mark.parametrize("kind", ["relative", "mask"])
@pytest.mark.parametrize("queries", [None, 2])
def test_gradcheck_of_biased_self_attention_on_the_cupy_backend(cp, kind, queries):
    rng = np.random.default_rng(3)
    qkv = cp.asarray(rng.standard_normal((2, 5, 18)))  # 2 heads of 3
    bias = cp.asarray(rng.standard_normal({"relative": (2, 5, 5), "mask": (2, 1, 5, 5)}[kind]))
    check_gradients(lambda x, b: F.self_attention(x, 2, queries=queries, bias=b), qkv, bias,
                    seed=3)


# -- whole models with biased attention ----------------------------------------------------
SWIN = dict(img_size=16, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depths=(2, 2),
            num_heads=(1, 2), window_size=4)  # 8x8 map, 4 shifted windows (masks); then 4x4
MODELS = {"swin": ("swin_digits", SWIN, 16),
          "beit": ("beit_digits", dict(depth=2, num_classes=3), 8),
          "vit_rel_pos_bias": ("vit_digits", dict(depth=2, num_classes=3, rel_pos_bias=True),
                               8)}


def _model_step(name, backend, dtype, chosen):
    """Logits and every parameter gradient (host arrays) of one forward and backward
    (drop-path off: the two backends would draw different masks)."""
    model_name, options, size = MODELS[name]
    rng = np.random.default_rng(5)
    images = rng.standard_normal((2, 1, size, size)).astype(dtype)
    minivit.set_backend(backend)
    minivit.manual_seed(0)
    model = create_model(model_name, drop_path_rate=0.0, **options)
    model = model.to(backend=backend, dtype=np.dtype(dtype).name)
    chosen.clear()
    logits = model(Tensor(mb.to_backend(images, backend)))
    logits.backward(mb.to_backend(rng.standard_normal(logits.shape).astype(dtype), backend))
    return [mb.to_numpy(logits.data)] + [mb.to_numpy(p.grad) for p in model.parameters()]


@GPU
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_with_biased_attention_on_the_cupy_backend_match_numpy(cp, chosen, name):
    want = _model_step(name, "numpy", np.float64, chosen)
    got = _model_step(name, "cupy", np.float64, chosen)
    assert chosen["self_attention"] and set(chosen["self_attention"]) == {"cuda"}, chosen
    assert len(got) == len(want)
    for index, (ours, reference) in enumerate(zip(got, want)):
        np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12,
                                   err_msg=f"output {index} (0: logits, then parameters)")
    assert all(a.dtype == np.float32 for a in _model_step(name, "cupy", np.float32, chosen))
