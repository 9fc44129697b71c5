"""The compiled CPU kernels (minivit.cpu.compiled, numba) on their own: the float32 exp they are built
on, special values (NaN must reach the loss so that training stops), and what happens without
numba. Their agreement with the NumPy code on every op is in test_fast_paths_*.py, which run
all their tests with and without them."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import minivit.functional as F
from minivit import Tensor, cpu
from minivit.cpu import activation as cpu_activation
from minivit.cpu import normalization as cpu_normalization

pytest.importorskip("numba", reason="numba (the 'fast' extra) is not installed")
from minivit.cpu import compiled as kernels  # noqa: E402  (needs numba)
from minivit.cpu.compiled import common  # noqa: E402


@pytest.fixture(scope="module")
def exp_f32():
    import numba

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = common.exp(x[i])

    def run(x):
        out = np.empty_like(x)
        apply(x, out)
        return out

    return run


def test_float32_exp_is_accurate_on_a_dense_grid(exp_f32):
    x = np.concatenate([np.linspace(-87.3, 0, 2_000_001), -np.logspace(-12, 0, 10_001)])
    x = x.astype(np.float32)
    ours = exp_f32(x)
    assert ours.dtype == np.float32
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(ours - ref) / ref
    assert rel.max() < 3e-7, rel.max()
    assert exp_f32(np.zeros(1, np.float32))[0] == 1.0


def test_float32_exp_flushes_below_the_normal_range_and_keeps_nan(exp_f32):
    x = np.array([-87.4, -100.0, -1e30, -np.inf, np.nan], np.float32)
    out = exp_f32(x)
    assert np.all(out[:4] == 0.0)
    assert np.isnan(out[4])


def test_float64_takes_the_exact_exp(exp_f32):
    x = np.linspace(-700, 0, 10_001)
    np.testing.assert_allclose(exp_f32(x), np.exp(x), rtol=3e-16, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate_through_the_kernels(dtype):
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(dtype)
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    with cpu.compiled_kernels(True):
        y, d = cpu_activation.gelu_forward(x, "none", need_grad=True)
        assert np.isnan(y[1, 3]) and np.isnan(d[1, 3])
        assert y[2, 5] == np.inf
        assert np.all(np.isfinite(y[0])) and np.all(np.isfinite(y[3]))
        weight, bias = np.ones(16, dtype), np.zeros(16, dtype)
        out, _, _ = cpu_normalization.layer_norm_forward(x, weight, bias, 1e-6)
        assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))  # (inf − inf in σ²)
        assert np.all(np.isfinite(out[0]))
        probs = cpu_activation.softmax_forward(x)
        assert np.all(np.isnan(probs[1])) and np.all(np.isnan(probs[2]))
        np.testing.assert_allclose(probs[0].sum(), 1.0, rtol=1e-6)


def test_a_nan_input_makes_a_nan_loss():
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    x[0, 0, 0] = np.nan
    with cpu.compiled_kernels(True):
        h = F.gelu(F.layer_norm(Tensor(x), Tensor(np.ones(8, np.float32)),
                                Tensor(np.zeros(8, np.float32))))
        loss = F.cross_entropy(h.reshape(15, 8), np.zeros(15, dtype=np.int64))
    assert math.isnan(float(loss.data))


def test_softmax_kernels_with_a_scale():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 33)).astype(np.float32)
    expected = np.exp(0.25 * x.astype(np.float64))
    expected /= expected.sum(axis=1, keepdims=True)
    probs = np.empty_like(x)
    kernels.softmax_forward(x, probs, np.float32(0.25))
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
    grad = rng.standard_normal(x.shape).astype(np.float32)
    out = np.empty_like(x)
    kernels.softmax_backward(probs, grad, out, np.float32(0.25))
    p64 = probs.astype(np.float64)
    reference = 0.25 * p64 * (grad - (grad * p64).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-7)


def test_layer_norm_backward_adds_into_the_accumulators():
    rng = np.random.default_rng(3)
    grad, normalized = rng.standard_normal((2, 6, 10))
    rstd = rng.random(6) + 0.5
    grad_w, grad_b = np.ones(10), np.ones(10)
    kernels.layer_norm_backward(grad, normalized, rstd, None, None, grad_w, grad_b)
    np.testing.assert_allclose(grad_w, 1 + (grad * normalized).sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(grad_b, 1 + grad.sum(axis=0), rtol=1e-13)


def run_python(code, **env):
    """stdout of `code` in a fresh interpreter with `env` added to the environment."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_numba_the_numpy_code_runs_and_says_why():
    """A fresh interpreter where `import numba` fails: minivit works and says how to get them."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from minivit import cpu, Tensor\n"
        "import minivit.functional as F\n"
        "assert not cpu.compiled_kernels_available()\n"
        "print(cpu.compiled_kernels_info())\n"
        "x = Tensor(np.linspace(-3, 3, 64, dtype=np.float32).reshape(8, 8), requires_grad=True)\n"
        "y = F.layer_norm(F.gelu(x))\n"
        "y.sum().backward()\n"
        "assert x.grad.dtype == np.float32 and np.all(np.isfinite(x.grad))\n"
    )
    out = run_python(code)
    assert "numba is not installed" in out and "minivit[fast]" in out


def test_when_numba_cannot_load_the_kernels_the_numpy_code_runs_and_says_why():
    """numba raises RuntimeError at import when it finds no writable cache folder."""
    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'minivit.cpu.compiled':\n"
        "            raise RuntimeError('cannot cache function: no locator available')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import numpy as np\n"
        "from minivit import cpu, Tensor\n"
        "import minivit.functional as F\n"
        "y = F.gelu(Tensor(np.linspace(-3, 3, 64, dtype=np.float32)))\n"
        "assert not cpu.compiled_kernels_available()\n"
        "print(cpu.compiled_kernels_info())\n"
    )
    out = run_python(code)
    assert "no locator available" in out and "NUMBA_CACHE_DIR" in out


def test_with_numba_disable_jit_the_numpy_code_runs():
    """NUMBA_DISABLE_JIT=1 would run the kernels as plain Python, where the typed helpers do
    not exist: minivit keeps its NumPy code instead."""
    code = ("import numpy as np; from minivit import cpu; from minivit.cpu import activation\n"
            "y, d = activation.gelu_forward(np.linspace(-3, 3, 8, dtype=np.float32))\n"
            "assert y.dtype == np.float32 and not cpu.compiled_kernels_available()\n"
            "print(cpu.compiled_kernels_info())\n")
    assert "NUMBA_DISABLE_JIT is set" in run_python(code, NUMBA_DISABLE_JIT="1")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_kernel_keeps_the_parameters_type_and_skips_zero_decay(dtype):
    """The compiled AdamW agrees with the NumPy code, also for an inf parameter without weight
    decay (p − 0·p would make it NaN)."""
    from minivit.optim import AdamW

    rng = np.random.default_rng(4)
    start = rng.standard_normal(300_000).astype(dtype)
    start[7] = np.inf
    grads = rng.standard_normal(start.size).astype(dtype)
    results = []
    for compiled in (True, False):
        param = Tensor(start.copy(), requires_grad=True)
        optimizer = AdamW([("w", param)], lr=1e-2, weight_decay=0.0)
        with cpu.compiled_kernels(compiled):
            for _ in range(3):
                param.grad = grads.copy()
                optimizer.step()
        results.append(param.data)
    assert results[0].dtype == dtype and results[0][7] == np.inf
    tolerance = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(results[0], results[1], **tolerance)

