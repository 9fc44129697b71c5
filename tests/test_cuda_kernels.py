"""The fused CUDA kernels of the cupy backend on a GPU (skipped where CuPy or a GPU is missing):
- every op with a "cuda" implementation picks it for CuPy arrays;
- each fused kernel against the plain NumPy path on the same data, forward and backward
  (float64 to 1e-12, float32 to 1e-5), over row lengths that use 1 to 8 warps per block;
- gradcheck of each op on the cupy backend in float64;
- the AdamW kernel against the NumPy AdamW over 5 steps.
"""

import numpy as np
import pytest
from helpers_cuda import GPU, TOLERANCE, _assert_fused_matches_numpy, check_gradients

import minivit
import minivit.functional as F
from minivit import Tensor, cuda
from minivit import backend as mb
from minivit.cuda import device, gemm
from minivit.cuda import attention as cuda_attention
from minivit.functional import registry
from minivit.inspect.opchecks import OP_CHECKS
from minivit.optim import AdamW


@GPU
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_op_with_a_cuda_implementation_picks_it_for_cupy_arrays(cp, monkeypatch, dtype):
    """The registry on the GPU: every catalogue op, forward and backward on CuPy arrays,
    runs its "cuda" implementation where it has one (and a NumPy twin the same op never)."""
    minivit.set_backend("cupy")
    chosen, original = {}, registry.choose

    def recording_choose(op, *arrays, **options):
        impl = original(op, *arrays, **options)
        chosen.setdefault(op, set()).add(impl.device)
        return impl

    monkeypatch.setattr(registry, "choose", recording_choose)
    rng = np.random.default_rng(0)
    for check in OP_CHECKS.values():
        if check.whole_model is None:
            inputs = [Tensor(cp.asarray(a, dtype), requires_grad=True) if a.dtype.kind == "f"
                      else cp.asarray(a) for a in check.build(rng).values()]
            out = check.fn(*inputs)
            out.backward(cp.asarray(rng.standard_normal(out.shape), dtype))
    fused = {impl.op for impls in registry.implementations().values() for impl in impls
             if impl.device == "cuda"}
    assert "cpu" not in set().union(*chosen.values())
    assert {op for op in fused if op in chosen and "cuda" not in chosen[op]} == set()


COLUMNS = [1, 5, 32, 33, 65, 200, 257, 1000]  # 1 to 8 warps per row block, strided loops


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cols", COLUMNS)
@pytest.mark.parametrize("affine", ["weight and bias", "none"])
def test_layer_norm_kernel_matches_numpy(dtype, cols, affine):
    rng = np.random.default_rng(cols)
    x = (rng.standard_normal((3, 4, cols)) * 2 + 1).astype(dtype)
    if affine == "none":
        fn, inputs = (lambda x: F.layer_norm(x)), [x]
    else:
        fn = F.layer_norm
        inputs = [x, rng.standard_normal(cols).astype(dtype), rng.standard_normal(cols).astype(dtype)]
    _assert_fused_matches_numpy(fn, inputs, ("layer_norm_forward", np.dtype(dtype).name), dtype)
    assert ("layer_norm_backward", np.dtype(dtype).name) in device.kernels


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (8, 32), (9, 33), (0, 4), (3, 1000),
                                   (4099, 65), (12608, 384), (20000, 1)])
@pytest.mark.parametrize("with_dot", [False, True])
def test_column_sums_match_numpy(cp, dtype, shape, with_dot):
    """One or two passes (row chunks), partial column tiles, empty input; sums and dots."""
    rng = np.random.default_rng(shape[0])
    a = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape).astype(dtype) if with_dot else None
    sums, dots = cuda.column_sums(cp.asarray(a), cp.asarray(b) if with_dot else None)
    assert sums.dtype == dtype and sums.shape == (shape[1],)
    scale = max(1.0, shape[0] ** 0.5)  # float32 round-off grows with the number of rows
    tolerance = {"rtol": TOLERANCE[dtype]["rtol"], "atol": TOLERANCE[dtype]["atol"] * scale}
    np.testing.assert_allclose(cp.asnumpy(sums), a.astype(np.float64).sum(axis=0), **tolerance)
    if with_dot:
        expected = (a.astype(np.float64) * b).sum(axis=0)
        np.testing.assert_allclose(cp.asnumpy(dots), expected, **tolerance)
    else:
        assert dots is None


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_kernels_match_numpy(dtype, approximate):
    x = np.random.default_rng(1).standard_normal((4, 5, 67)).astype(dtype) * 3
    name = "gelu_forward" if approximate == "none" else "gelu_tanh_forward"
    _assert_fused_matches_numpy(lambda x: F.gelu(x, approximate=approximate), [x], (name, None),
                                dtype)


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cols", COLUMNS)
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "attention"])
def test_softmax_kernels_match_numpy(dtype, cols, op):
    rng = np.random.default_rng(cols)
    if op == "attention":  # softmax forward and backward inside attention, rows of length N
        q, k, v = (rng.standard_normal((2, 3, cols, 4)).astype(dtype) for _ in range(3))
        fn, inputs = F.scaled_dot_product_attention, [q, k, v]
    else:
        inputs = [(rng.standard_normal((3, 2, cols)) * 3).astype(dtype)]
        fn = getattr(F, op)
    _assert_fused_matches_numpy(fn, inputs, ("softmax_forward", np.dtype(dtype).name), dtype)


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch, tokens, heads, head_dim", [(1, 1, 1, 1), (2, 5, 3, 4),
                                                            (3, 65, 3, 64), (2, 197, 6, 64)])
@pytest.mark.parametrize("queries", [None, 1, 3])
@pytest.mark.parametrize("keep_probs", [False, True])
def test_self_attention_gemms_match_numpy(dtype, batch, tokens, heads, head_dim, queries,
                                          keep_probs):
    """The batched-GEMM path on the packed qkv (addresses per (batch, head), scale on alpha,
    O written straight into (B, n, D)) equals the NumPy path, outputs and d qkv, whether
    backward gets the probabilities kept (return_attention) or rebuilds them from lse."""
    queries = min(queries, tokens) if queries else None
    qkv = np.random.default_rng(tokens).standard_normal((batch, tokens, 3 * heads * head_dim))
    gemm.pointer_cache.clear()
    device.kernels.pop(("attention_probs", None), None)

    def attention(x):
        out = F.self_attention(x, heads, queries=queries, return_attention=keep_probs)
        return out[0] if keep_probs else out
    _assert_fused_matches_numpy(attention, [qkv.astype(dtype)],
                                ("softmax_forward", np.dtype(dtype).name), dtype)
    assert gemm.pointer_cache, "the batched-GEMM attention path did not run"
    rebuilt = ("attention_probs", None) in device.kernels
    assert rebuilt != keep_probs, "backward rebuilt P though it was kept, or kept it unasked"
    if keep_probs:  # the probabilities handed out equal NumPy's
        host = qkv.astype(dtype)
        got = F.self_attention(Tensor(mb.to_backend(host, "cupy")), heads, queries=queries,
                               return_attention=True)[1]
        want = F.self_attention(Tensor(host), heads, queries=queries, return_attention=True)[1]
        np.testing.assert_allclose(mb.to_numpy(got), want, **TOLERANCE[dtype])


@GPU
def test_batched_gemms_use_tf32_only_when_it_is_on(cp):
    """float32 attention GEMMs follow set_tf32: TF32 (10-bit mantissa) errors of ~1e-3 with
    it on, float32 round-off (~1e-6) with it off."""
    rng = np.random.default_rng(9)
    qkv = cp.asarray(rng.standard_normal((2, 16, 3 * 256)), cp.float32)
    exact = qkv.astype(cp.float64)
    before = cuda.tf32_enabled()
    try:
        errors = {}
        for enabled in (False, True):
            cuda.set_tf32(enabled)
            got = cuda_attention.attention_forward(qkv, 1, 16, 1.0 / 16)[0]
            want = cuda_attention.attention_forward(exact, 1, 16, 1.0 / 16)[0]
            errors[enabled] = float(cp.abs(got - want).max())
        assert errors[False] < 1e-5
        if int(cp.cuda.Device().compute_capability[0]) >= 8:
            assert errors[True] > 10 * errors[False]
    finally:
        cuda.set_tf32(before)


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("classes", [1, 3, 10, 1000])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_kernels_match_numpy(dtype, classes, soft, smoothing):
    rng = np.random.default_rng(classes)
    logits = (rng.standard_normal((6, classes)) * 3).astype(dtype)
    target = rng.uniform(0, 1, (6, classes)).astype(dtype) if soft else rng.integers(0, classes, 6)
    name = "cross_entropy_soft" if soft else "cross_entropy_labels"
    _assert_fused_matches_numpy(lambda x, t: F.cross_entropy(x, t, label_smoothing=smoothing),
                                [logits, target], (name, np.dtype(dtype).name), dtype)


@GPU
def test_cross_entropy_still_checks_labels_on_the_gpu(cp):
    with pytest.raises(ValueError, match="labels must lie in"):
        F.cross_entropy(Tensor(cp.zeros((2, 3))), cp.asarray([0, 3]))


@GPU
@pytest.mark.parametrize("op", ["layer_norm", "gelu", "gelu_tanh", "softmax", "log_softmax",
                                "attention", "self_attention", "class_token_attention",
                                "cross_entropy_labels", "cross_entropy_soft"])
def test_gradcheck_on_the_cupy_backend(cp, op):
    rng = np.random.default_rng(2)
    x = cp.asarray(rng.standard_normal((3, 7)))
    if op == "layer_norm":
        inputs = [x, cp.asarray(rng.standard_normal(7)), cp.asarray(rng.standard_normal(7))]
        fn = F.layer_norm
    elif op in ("gelu", "gelu_tanh"):
        inputs = [x]
        fn = (lambda x: F.gelu(x, approximate="tanh" if op == "gelu_tanh" else "none"))
    elif op in ("softmax", "log_softmax"):
        inputs, fn = [x], getattr(F, op)
    elif op == "attention":
        inputs = [cp.asarray(rng.standard_normal((1, 2, 5, 3))) for _ in range(3)]
        fn = F.scaled_dot_product_attention
    elif op in ("self_attention", "class_token_attention"):
        inputs = [cp.asarray(rng.standard_normal((2, 5, 18)))]  # 2 heads of 3
        queries = 1 if op == "class_token_attention" else None
        fn = (lambda qkv: F.self_attention(qkv, 2, queries=queries))
    else:
        target = (cp.asarray(rng.integers(0, 7, 3)) if op == "cross_entropy_labels"
                  else cp.asarray(rng.uniform(0, 1, (3, 7))))
        inputs = [x, target]
        fn = (lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1))
    check_gradients(fn, *inputs, seed=3)


def _adamw_pair(dtype, on_gpu):
    import cupy
    rng = np.random.default_rng(4)
    move = cupy.asarray if on_gpu else np.asarray
    named = [("blocks.0.weight", Tensor(move(rng.standard_normal((17, 9)).astype(dtype)), True)),
             ("blocks.0.bias", Tensor(move(rng.standard_normal(17).astype(dtype)), True)),
             ("pos_embed", Tensor(move(rng.standard_normal((1, 5, 9)).astype(dtype)), True))]
    return named, AdamW(named, lr=3e-2, weight_decay=0.05)


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_kernel_matches_numpy_over_five_steps(dtype):
    (gpu_named, gpu_opt), (cpu_named, cpu_opt) = _adamw_pair(dtype, True), _adamw_pair(dtype, False)
    rng = np.random.default_rng(5)
    device.kernels.pop(("adamw", None), None)
    for _ in range(5):
        for (_, p_gpu), (_, p_cpu) in zip(gpu_named, cpu_named):
            grad = rng.standard_normal(p_cpu.shape).astype(dtype)
            p_cpu.grad, p_gpu.grad = grad, mb.to_backend(grad, "cupy")
        gpu_opt.step(max_grad_norm=1.0)
        cpu_opt.step(max_grad_norm=1.0)
    assert ("adamw", None) in device.kernels, "the fused AdamW kernel was not used"
    for gpu_buffer, cpu_buffer in [(gpu_opt.flat, cpu_opt.flat), (gpu_opt.m, cpu_opt.m),
                                   (gpu_opt.v, cpu_opt.v)]:
        assert gpu_buffer.dtype == dtype
        np.testing.assert_allclose(mb.to_numpy(gpu_buffer), cpu_buffer, **TOLERANCE[dtype])
    for (_, p_gpu), (_, p_cpu) in zip(gpu_named, cpu_named):  # the views still see the buffer
        np.testing.assert_allclose(mb.to_numpy(p_gpu.data), p_cpu.data, **TOLERANCE[dtype])
