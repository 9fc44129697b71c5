"""minivit.cuda: the fused CUDA kernels of the cupy backend.

Everywhere (no GPU needed):
- importing minivit.cuda (and the ops that dispatch to it) does not import CuPy;
- NumPy arrays never reach the CUDA code: every "cuda" implementation in the registry is made
  to raise while every op of the catalogue (minivit.inspect.opchecks) and AdamW run;
- every kernel source (minivit.cuda.device.ROW_SOURCES and ELEMENTWISE, which each family
  module fills) compiles with nvcc, for float and double (skipped where nvcc is missing).

On a GPU (skipped where CuPy or a GPU is missing):
- each fused kernel against the plain NumPy path on the same data, forward and backward
  (float64 to 1e-12, float32 to 1e-5), over row lengths that use 1 to 8 warps per block;
- gradcheck of each op on the cupy backend in float64;
- the AdamW kernel against the NumPy AdamW over 5 steps;
- float32 stays float32 through a whole ViT step; a 2-epoch training run whose loss falls;
- set_tf32, memory_info and the experimental CUDA-graph capture: a whole training step (ViT,
  BEiT, Swin) recorded and replayed against eager steps, and the capture path of each piece (GEMMs through
  ctypes, batch addresses from a kernel) run eagerly against the usual path.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import minivit
import minivit.functional as F
from minivit import Tensor, cpu, cuda
from minivit import backend as mb
from minivit.cuda import capture, device, gemm
from minivit.cuda import attention as cuda_attention
from minivit.functional import registry
from minivit.inspect.opchecks import OP_CHECKS
from minivit.optim import AdamW

GPU = pytest.mark.skipif(not mb.cupy_available(),
                         reason="fused CUDA kernels: CuPy or a CUDA GPU is not available")
TOLERANCE = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture(autouse=True)
def _numpy_backend_afterwards():
    yield
    minivit.set_backend("numpy")


def check_gradients(fn, *inputs, seed=0):
    """minivit.gradcheck in float64 at relative error 1e-6, with an absolute floor at the round-off
    of central differences (~1e-9 · Σ|f|), as tests/conftest.py's helper of the same name."""
    with minivit.no_grad():
        out = fn(*[Tensor(a) if a.dtype.kind == "f" else a for a in inputs])
    atol = max(1e-10, 1e-9 * float(abs(out.data).sum()))
    report = minivit.gradcheck(fn, *inputs, seed=seed, rtol=1e-6, atol=atol)
    assert report.passed, f"gradient check failed:\n{report}"


# == everywhere ================================================================================
def test_importing_minivit_cuda_does_not_import_cupy():
    code = ("import sys, minivit, minivit.cuda, minivit.functional, minivit.optim\n"
            "assert 'cupy' not in sys.modules, 'minivit imported cupy'\n")
    env = {k: v for k, v in os.environ.items() if k != "MINIVIT_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_bad_minivit_backend_is_an_error_on_use_not_on_import():
    """MINIVIT_BACKEND=foo (or cupy without a GPU): `import minivit` works, the first use of
    the backend raises the BackendError, set_backend overrides it, and the command line
    prints it as an error instead of a traceback."""
    code = ("import minivit, numpy\n"
            "from minivit.errors import BackendError\n"
            "try:\n"
            "    minivit.Tensor([1.0, 2.0])\n"
            "except BackendError as error:\n"
            "    print('raised:', error)\n"
            "minivit.set_backend('numpy')\n"
            "print(minivit.Tensor([1.0, 2.0]).sum().item())\n")
    env = {**os.environ, "MINIVIT_BACKEND": "foo"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "raised: MINIVIT_BACKEND=foo: unknown backend 'foo'" in result.stdout
    assert result.stdout.strip().endswith("3.0")
    cli = subprocess.run([sys.executable, "-m", "minivit.cli", "bench", "--config", "tiny",
                          "--steps", "1", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert "error: MINIVIT_BACKEND=foo: unknown backend 'foo'" in cli.stderr


def _every_op_forward_and_backward(dtype):
    """Every op of the catalogue, forward and backward, on NumPy arrays of `dtype`, and an
    AdamW step; returns the dtypes of the outputs."""
    rng = np.random.default_rng(0)
    dtypes = []
    for check in OP_CHECKS.values():
        if check.whole_model is not None:
            continue
        inputs = [Tensor(a.astype(dtype), requires_grad=True) if a.dtype.kind == "f" else a
                  for a in check.build(rng).values()]
        out = check.fn(*inputs)
        out.backward(rng.standard_normal(out.shape).astype(dtype))
        dtypes.append(out.dtype)
    weights = Tensor(rng.standard_normal((4, 3)).astype(dtype), requires_grad=True)
    weights.grad = rng.standard_normal((4, 3)).astype(dtype)
    AdamW([("w", weights)], lr=1e-3).step()
    return dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cpu_fast_paths", [True, False])
def test_numpy_arrays_never_reach_the_cuda_kernels(monkeypatch, dtype, cpu_fast_paths):
    def refuse(*args, **kwargs):
        raise AssertionError("a NumPy computation reached a cuda implementation")

    fused = [impl for impls in registry.implementations().values() for impl in impls
             if impl.device == "cuda"]
    assert {impl.op for impl in fused} >= {"gelu", "softmax", "log_softmax", "layer_norm",
                                          "linear", "self_attention", "cross_entropy", "adamw"}
    for impl in fused:
        monkeypatch.setattr(impl, "forward", refuse)
        monkeypatch.setattr(impl, "backward", refuse, raising=False)
    with cpu.fast_paths(cpu_fast_paths):  # off: the plain code, where the CuPy arrays go too
        assert set(_every_op_forward_and_backward(dtype)) == {np.dtype(dtype)}
    assert not cuda.handles(np.ones(3, dtype))
    assert not cuda.handles(None)


def test_fused_kernels_switch_is_restored():
    before = cuda.fused_kernels_enabled()
    with cuda.fused_kernels(False):
        assert not cuda.fused_kernels_enabled()
        with cuda.fused_kernels(True):
            assert cuda.fused_kernels_enabled()
        assert not cuda.fused_kernels_enabled()
    assert cuda.fused_kernels_enabled() == before


def _params(spec):
    """[(raw, type, name)] from a CuPy parameter list such as 'raw T x, int32 cols'."""
    params = []
    for item in spec.split(","):
        words = item.split()
        raw = words[0] == "raw"
        params.append((raw,) + tuple(words[raw:]))
    return params


def _nvcc_check_source(c_type):
    """One .cu file with every kernel for element type `c_type`: the RawKernel sources as they
    are, each ElementwiseKernel body inside a stand-in kernel (non-raw arguments as values at
    i, outputs as references, raw arguments as pointers), as CuPy would wrap it."""
    common = device.ROW_COMMON
    parts = [f"typedef {c_type} T;", common]
    for source in dict.fromkeys(device.ROW_SOURCES.values()):  # each file once, in order
        parts.append(source[len(common):] if source.startswith(common) else source)
    c_types = {"T": "T", "int32": "int", "int64": "long long", "uint64": "unsigned long long",
               "float32": "float", "uint16": "unsigned short", "bool": "bool"}
    for name, (in_params, out_params, operation) in device.ELEMENTWISE.items():
        signature, locals_ = ["long long n"], []
        for raw, kind, arg in _params(in_params):
            signature.append(f"const {c_types[kind]}* {arg}{'' if raw else '_at'}")
            if not raw:
                locals_.append(f"const {c_types[kind]} {arg} = {arg}_at[i];")
        for _, kind, arg in _params(out_params):
            signature.append(f"{c_types[kind]}* {arg}_at")
            locals_.append(f"{c_types[kind]}& {arg} = {arg}_at[i];")
        parts.append(f'extern "C" __global__ void check_{name}({", ".join(signature)}) {{\n'
                     f"  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
                     f"  if (i >= n) return;\n  {' '.join(locals_)}\n  {{ {operation} }}\n}}")
    return "\n".join(parts)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
@pytest.mark.parametrize("c_type", ["float", "double"])
def test_kernel_sources_compile_with_nvcc(tmp_path, c_type):
    source = tmp_path / f"minivit_kernels_{c_type}.cu"
    source.write_text(_nvcc_check_source(c_type))
    result = subprocess.run(["nvcc", "--ptx", "-arch=sm_80", "-o", str(tmp_path / "out.ptx"),
                             str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stderr}"


def test_graph_capture_misuse_is_a_clear_error_before_any_cuda_call():
    """Checked before CuPy is touched (so this runs anywhere): a replay_input outside
    capture_step's recording, a capture without the eager warm-up that compiles the kernels."""
    with pytest.raises(RuntimeError, match="not by minivit's cuda.capture_step"):
        cuda.replay_input(lambda: 0.0, (), np.float32)
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        cuda.capture_step(lambda: None, warmup=0)


def test_set_tf32_without_a_gpu_only_sets_the_environment(monkeypatch):
    if mb.cupy_available():
        pytest.skip("a GPU is present: test_tf32_switch covers it")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    cuda.set_tf32(True)
    assert os.environ["CUPY_TF32"] == "1"
    cuda.set_tf32(False)
    assert os.environ["CUPY_TF32"] == "0"
    assert not cuda.tf32_enabled()


# == on a GPU ==================================================================================
@pytest.fixture
def cp():
    import cupy
    return cupy


def _run(fn, host_inputs, host_upstream, on_gpu):
    """fn on Tensors (float inputs require grad) and backward with a given upstream gradient;
    returns the host output and the host gradients of the float inputs."""
    import cupy
    move = cupy.asarray if on_gpu else np.asarray
    tensors = [Tensor(move(a), requires_grad=True) if a.dtype.kind == "f" else move(a)
               for a in host_inputs]
    out = fn(*tensors)
    out.backward(move(host_upstream))
    grads = [mb.to_numpy(t.grad) for t in tensors if isinstance(t, Tensor)]
    return mb.to_numpy(out.data), grads


def _assert_fused_matches_numpy(fn, host_inputs, kernel, dtype, seed=0):
    """The fused cupy path (which must build `kernel`) equals the NumPy path, forward and
    backward, and keeps the dtype."""
    rng = np.random.default_rng(seed)
    with minivit.no_grad():
        shape = fn(*[Tensor(a) if a.dtype.kind == "f" else a for a in host_inputs]).shape
    upstream = rng.standard_normal(shape).astype(dtype)
    device.kernels.pop(kernel, None)
    out_gpu, grads_gpu = _run(fn, host_inputs, upstream, on_gpu=True)
    assert kernel in device.kernels, f"the fused kernel {kernel} was not used"
    out_cpu, grads_cpu = _run(fn, host_inputs, upstream, on_gpu=False)
    assert out_gpu.dtype == dtype
    np.testing.assert_allclose(out_gpu, out_cpu, **TOLERANCE[dtype])
    for g_gpu, g_cpu in zip(grads_gpu, grads_cpu):
        assert g_gpu.dtype == dtype
        np.testing.assert_allclose(g_gpu, g_cpu, **TOLERANCE[dtype])


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


@GPU
def test_fused_and_plain_cupy_paths_agree_on_a_vit_step_in_float32(cp):
    """A whole small ViT, forward and backward in float32: fused kernels against the plain
    CuPy path (fused_kernels(False)) on the same device; every gradient stays float32."""
    from minivit.models import create_model

    def step():
        minivit.set_backend("cupy")
        minivit.manual_seed(0)
        model = create_model("vit_digits", num_classes=10, img_size=8, in_chans=1,
                             drop_path_rate=0.0).to(backend="cupy", dtype="float32")
        images = cp.asarray(np.random.default_rng(6).standard_normal((16, 1, 8, 8)), cp.float32)
        loss = F.cross_entropy(model(images), cp.arange(16) % 10, label_smoothing=0.1)
        loss.backward()
        return loss, dict(model.named_parameters())

    loss, params = step()
    with cuda.fused_kernels(False):
        plain_loss, plain_params = step()
    assert loss.dtype == np.float32
    np.testing.assert_allclose(float(loss.item()), float(plain_loss.item()), rtol=1e-5)
    for name, p in params.items():
        assert p.grad.dtype == np.float32, name
        np.testing.assert_allclose(mb.to_numpy(p.grad), mb.to_numpy(plain_params[name].grad),
                                   rtol=1e-4, atol=1e-5, err_msg=name)


@GPU
def test_two_epochs_of_training_on_the_gpu_lower_the_loss(tmp_path):
    import json

    from minivit.train import TrainConfig, train
    train(TrainConfig(backend="cupy", epochs=2, warmup=0, out=str(tmp_path / "run"),
                      progress=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 2 and losses[1] < losses[0], losses


@GPU
def test_tf32_switch(cp):
    before = cuda.tf32_enabled()
    try:
        major = cp.cuda.Device().compute_capability[0]
        assert cuda.set_tf32(True) == (int(major) >= 8)
        a = cp.asarray(np.random.default_rng(7).standard_normal((256, 256)), cp.float32)
        np.testing.assert_allclose(mb.to_numpy(a @ a), mb.to_numpy(a.astype(cp.float64) @ a),
                                   rtol=2e-2, atol=2e-1)  # TF32 keeps a 10-bit mantissa
        assert cuda.set_tf32(False) is False
        assert not cuda.tf32_enabled()
    finally:
        cuda.set_tf32(before)


@GPU
def test_memory_info_and_synchronize(cp):
    keep = cp.zeros(1 << 20, cp.float32)
    cuda.synchronize()
    info = cuda.memory_info()
    assert info["used"] >= keep.nbytes and info["held"] >= info["used"]


@GPU
def test_peak_memory_counts_the_most_bytes_in_use_at_once(cp):
    before = cp.get_default_memory_pool().used_bytes()
    with cuda.PeakMemory() as peak:
        big = cp.empty(8 << 20, cp.uint8)
        del big
        small = cp.empty(4 << 20, cp.uint8)
    assert peak.bytes == before + (8 << 20)
    assert peak.used == before + (4 << 20) == cp.get_default_memory_pool().used_bytes()
    with cuda.PeakMemory():  # the hook was removed on exit: a second one may start
        del small


@GPU
def test_captured_forward_backward_replays_like_eager(cp):
    """Experimental CUDA graph: LayerNorm + GELU + soft-target cross-entropy, forward and
    backward, captured once and replayed on new inputs, equal to running it eagerly."""
    rng = np.random.default_rng(8)
    w = Tensor(cp.asarray(rng.standard_normal(48), cp.float32), requires_grad=True)
    b = Tensor(cp.asarray(rng.standard_normal(48), cp.float32), requires_grad=True)

    def step(x, target):
        w.grad = b.grad = None
        loss = F.cross_entropy(F.gelu(F.layer_norm(Tensor(x), w, b)), target)
        loss.backward()
        return loss.data, w.grad, b.grad

    def batch(seed):
        r = np.random.default_rng(seed)
        return (cp.asarray(r.standard_normal((16, 48)), cp.float32),
                cp.asarray(r.dirichlet(np.ones(48), 16), cp.float32))

    captured = cuda.capture_step(step, *batch(0))
    for seed in (1, 2):
        x, target = batch(seed)
        replayed = [a.copy() for a in captured(x, target)]
        eager = step(x, target)
        for got, want in zip(replayed, eager):
            np.testing.assert_allclose(mb.to_numpy(got), mb.to_numpy(want), rtol=1e-5, atol=1e-6)


# -- whole-step CUDA graphs: the capture path of GEMMs, attention, AdamW --------------------------
# (written in a session without a GPU: these tests have not run yet)
@pytest.fixture
def capture_path(cp, monkeypatch):
    """Run the code a CUDA graph records, eagerly: minivit.cuda believes a capture is on."""
    monkeypatch.setattr(capture, "capturing", lambda: True)
    gemm.pointer_cache.clear()
    yield
    gemm.pointer_cache.clear()


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("left, right", [("C", "C"), ("C", "T"), ("T", "C"), ("T", "T"),
                                         ("strided", "C")])
def test_direct_cublas_gemm_matches_cupy(cp, capture_path, dtype, left, right):
    rng = np.random.default_rng(11)

    def operand(rows, cols, layout):
        if layout == "T":
            return cp.asarray(rng.standard_normal((cols, rows)), dtype).T
        if layout == "strided":  # every other column: no unit stride, copied first
            return cp.asarray(rng.standard_normal((rows, 2 * cols)), dtype)[:, ::2]
        return cp.asarray(rng.standard_normal((rows, cols)), dtype)

    a, b = operand(37, 19, left), operand(19, 23, right)
    got = cuda.matmul(a, b)
    np.testing.assert_allclose(mb.to_numpy(got), mb.to_numpy(a) @ mb.to_numpy(b),
                               **TOLERANCE[dtype])


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("queries", [None, 1])
@pytest.mark.parametrize("biased", [False, True])
def test_attention_on_the_capture_path_matches_the_eager_path(cp, monkeypatch, dtype, queries,
                                                              biased):
    """Batch addresses computed by a kernel and GEMMs through ctypes give what the host
    addresses and CuPy's cuBLAS give, also with a (heads, n, N) bias (rows of the queries)."""
    rng = np.random.default_rng(12)
    qkv = cp.asarray(rng.standard_normal((3, 7, 3 * 8)), dtype)
    grad = cp.asarray(rng.standard_normal((3, queries or 7, 8)), dtype)
    bias = cp.asarray(rng.standard_normal((2, 7, 7)), dtype)[:, :queries or 7] if biased else None

    def run():
        gemm.pointer_cache.clear()
        out, probs, lse, _ = cuda_attention.attention_forward(qkv, 2, queries or 7, 0.5,
                                                              bias=bias)
        return (out, probs) + cuda_attention.attention_backward(grad, qkv, None, lse, 2, 0.5,
                                                                bias=bias)

    eager = run()
    monkeypatch.setattr(capture, "capturing", lambda: True)
    monkeypatch.setitem(capture.state, "pointers", {})  # the cache a CapturedStep would give
    captured_path = run()
    for got, want in zip(captured_path, eager):
        np.testing.assert_allclose(mb.to_numpy(got), mb.to_numpy(want), **TOLERANCE[dtype])


@GPU
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_a_captured_optimizer_step_replays_like_eager_steps(cp, max_grad_norm):
    """AdamW alone, recorded with fixed gradients: 3 replays after the warm-up equal 4 eager
    steps exactly (the scalars a replay reads are refilled before it, in memory that no
    temporary of the graph shares: a shared block once overwrote β₁ in every replay)."""
    from minivit.nn import Parameter

    rng = np.random.default_rng(14)
    shapes = [(5, 3), (3,), (4, 7)]
    values = [rng.standard_normal(shape) for shape in shapes]
    grads = [cp.asarray(rng.standard_normal(shape)) for shape in shapes]

    def setup():
        named = [(f"p{i}", Parameter(cp.asarray(value))) for i, value in enumerate(values)]
        for (_, parameter), grad in zip(named, grads):
            parameter.grad = grad
        return AdamW(named, lr=1e-2, weight_decay=0.05)

    eager, graph = setup(), setup()
    for _ in range(4):
        eager.step(max_grad_norm=max_grad_norm)
    captured = cuda.capture_step(lambda: graph.step(max_grad_norm=max_grad_norm))
    for _ in range(3):
        captured()
    assert graph.step_count == eager.step_count == 4
    for name in ("flat", "m", "v"):
        np.testing.assert_allclose(mb.to_numpy(getattr(graph, name)),
                                   mb.to_numpy(getattr(eager, name)), rtol=1e-13, err_msg=name)


# model, its options, image size: a ViT; BEiT and Swin (relative position bias, Swin's shift
# masks), whose fixed index and masks must be on the GPU before the capture, and whose bias
# gradient a capture can hold (a scatter-add of known size, no host sync)
CAPTURED_MODELS = {"vit": ("vit_digits", dict(depth=2), 8),
                   "beit": ("beit_digits", dict(depth=2), 8),
                   "swin": ("swin_digits", {}, 8)}


@GPU
@pytest.mark.parametrize("name", sorted(CAPTURED_MODELS))
def test_a_captured_training_step_replays_like_eager_steps(cp, name):
    """A whole training step (forward, integer-label cross-entropy, backward, AdamW)
    recorded as a CUDA graph: its warm-up and 3 replays equal 4 eager steps, in float64, and
    the optimizer counts every replay as a step."""
    from minivit.models import create_model

    model_name, options, size = CAPTURED_MODELS[name]

    def setup():
        minivit.set_backend("cupy")
        minivit.manual_seed(0)
        model = create_model(model_name, drop_path_rate=0.0, **options)
        model = model.to(backend="cupy", dtype="float64")
        return model, AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05)

    rng = np.random.default_rng(13)
    images = cp.asarray(rng.standard_normal((16, 1, size, size)))
    labels = cp.asarray(rng.integers(0, 10, 16))

    def step_of(model, optimizer):
        def step():
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(max_grad_norm=1.0)
            return loss.data
        return step

    eager_model, eager_optimizer = setup()
    eager_step = step_of(eager_model, eager_optimizer)
    eager_losses = [float(eager_step()) for _ in range(4)]
    graph_model, graph_optimizer = setup()
    captured = cuda.capture_step(step_of(graph_model, graph_optimizer))  # warm-up: step 1
    graph_losses = []
    for _ in range(3):
        graph_losses.append(float(captured()))
    assert graph_optimizer.step_count == eager_optimizer.step_count == 4
    np.testing.assert_allclose(graph_losses, eager_losses[1:], rtol=1e-10)
    for (name, got), (_, want) in zip(graph_model.named_parameters(),
                                      eager_model.named_parameters()):
        # atol: a parameter whose true gradient is 0 (the key bias: softmax ignores a shift)
        # moves by AdamW's lr·g/ε on rounding noise g, which two GEMM paths round differently
        np.testing.assert_allclose(mb.to_numpy(got.data), mb.to_numpy(want.data), rtol=1e-9,
                                   atol=1e-8, err_msg=name)


@GPU
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_drop_path_in_a_captured_step_draws_new_masks_in_every_replay(cp, dtype):
    """Recorded drop_path: each replay keeps the samples that the host's draws for it say
    (minivit's NumPy generator, seeded by manual_seed; the eager warm-up used CuPy's), scaled
    by 1/(1 − p): new masks every replay, read after the host wrote them."""
    minivit.manual_seed(16)
    ones = Tensor(cp.ones((4000, 3), dtype))
    captured = cuda.capture_step(lambda: F.drop_path(ones, 0.25, training=True).data)
    host = np.random.default_rng(16)
    masks = []
    for _ in range(3):
        out = mb.to_numpy(captured())
        kept = host.random((4000, 1)).astype(dtype) < 0.75
        np.testing.assert_array_equal(out, np.where(kept, dtype(1 / 0.75), 0) * np.ones(3))
        masks.append(kept)
    assert (masks[0] != masks[1]).any() and (masks[1] != masks[2]).any()


def _train_run(tmp_path, name, **overrides):
    """A short digits run on the GPU; returns its metrics records and last weights."""
    import json

    from minivit.io import load_weights
    from minivit.train import TrainConfig, train

    config = dict(dataset="digits", model="vit_digits", epochs=2, warmup=1, batch_size=64,
                  augment=False, progress=False, backend="cupy", out=str(tmp_path / name))
    train(TrainConfig(**dict(config, **overrides)))
    records = [json.loads(line)
               for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return records, load_weights(tmp_path / name / "last.safetensors")[0]


@GPU
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_with_cuda_graphs_equals_eager_training(tmp_path, optimizer):
    """minivit train --cuda-graph: the 22 full batches of 64 of an epoch replay a graph
    recorded on the first, the last 30 images run eagerly, the learning rate follows its
    warm-up schedule in the replays (AdamW's scalars, SGD's rate); in float64 without
    drop-path the metrics and the weights equal an eager run's."""
    common = dict(dtype="float64", drop_path=0.0, optimizer=optimizer, log_grads=True)
    eager_records, eager_weights = _train_run(tmp_path, "eager", **common)
    graph_records, graph_weights = _train_run(tmp_path, "graph", cuda_graph=True, **common)
    assert [r["split"] for r in graph_records] == [r["split"] for r in eager_records]
    for got, want in zip(graph_records, eager_records):
        for key in ("loss", "accuracy", "lr", "step"):
            if key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)
        for key in ("grad_norms", "update_ratios"):
            for layer in want.get(key, {}):
                np.testing.assert_allclose(got[key][layer], want[key][layer], rtol=1e-8,
                                           err_msg=f"{key} {layer}")
    for name, want in eager_weights.items():
        # atol: see test_a_captured_training_step_replays_like_eager_steps (the key bias)
        np.testing.assert_allclose(graph_weights[name], want, rtol=1e-9, atol=1e-8,
                                   err_msg=name)


@GPU
def test_training_with_cuda_graphs_and_drop_path_learns(tmp_path):
    """Drop-path in the recorded step (float32, the default rate 0.2): new masks each replay,
    and the run learns as an eager one does."""
    records, _ = _train_run(tmp_path, "graph", cuda_graph=True, epochs=8)
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    test_accuracy = [r["accuracy"] for r in records if r["split"] == "test"]
    assert all(np.isfinite(train_losses)) and train_losses[-1] < 0.8 * train_losses[0]
    assert test_accuracy[-1] > 0.3  # chance is 0.1


@GPU
def test_bench_with_cuda_graphs_on_a_tiny_config(capsys):
    from minivit.cli import main

    assert main(["bench", "--config", "tiny", "--backend", "cupy", "--cuda-graph", "--steps",
                 "2", "--warmup-steps", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs" in out and "train" in out and "infer" in out
