"""minivit.cuda where no GPU is needed (these run everywhere):
- importing minivit.cuda (and the ops that dispatch to it) does not import CuPy; a bad
  MINIVIT_BACKEND is an error on use, not on import;
- NumPy arrays never reach the CUDA code: every "cuda" implementation in the registry is made
  to raise while every op of the catalogue (minivit.inspect.opchecks) and AdamW run;
- every kernel source (minivit.cuda.device.ROW_SOURCES and ELEMENTWISE, which each family
  module fills) compiles with nvcc, for float and double (skipped where nvcc is missing);
- graph-capture misuse and set_tf32 without a GPU.
The GPU tests: tests/test_cuda_*.py.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minivit import Tensor, cpu, cuda
from minivit import backend as mb
from minivit.cuda import device
from minivit.functional import registry
from minivit.inspect.opchecks import OP_CHECKS
from minivit.optim import AdamW


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
