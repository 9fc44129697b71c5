"""The runtime around minivit's fast CPU paths: the thread pool, what the fast paths handle,
whole-model gradients fast against plain, one training step keeping every array float32, GEMMs
without BLAS thread control, glibc malloc tuning, and bad thread counts in the environment.
Every test runs with and without numba (tests/helpers_fast_paths.py); no timing asserted.
"""

import numpy as np
import pytest
from helpers_fast_paths import kernels  # noqa: F401 (autouse: every test with and without numba)
from helpers_fast_paths import TOLERANCES, assert_fast_matches_plain, threads

import minivit
import minivit.functional as F
from minivit import cpu
from minivit.cpu import runtime
from minivit.models import create_model
from minivit.optim import AdamW


# -- the thread pool -------------------------------------------------------------------------------
def test_run_tasks_runs_every_task_once_and_reraises_errors():
    seen = []
    with threads(3):
        cpu.run_tasks([lambda i=i: seen.append(i) for i in range(50)])
        assert sorted(seen) == list(range(50))

        def boom():
            raise ValueError("task failed")

        with pytest.raises(ValueError, match="task failed"):
            cpu.run_tasks([lambda: None, boom, lambda: None])
        # nested use from inside a task runs inline instead of deadlocking
        inner = []
        cpu.run_tasks([lambda: cpu.run_tasks([lambda: inner.append(1)] * 4)] * 3)
        assert len(inner) == 12


def test_handles_only_numpy_float_arrays_of_one_dtype():
    f32, f64 = np.zeros(3, np.float32), np.zeros(3)
    assert cpu.handles(f32, None, f32) and cpu.handles(f64)
    assert not cpu.handles(f32, f64)
    assert not cpu.handles(np.zeros(3, np.int64))
    assert not cpu.handles(None) and not cpu.handles()  # no array: nothing to run on
    with cpu.fast_paths(False):
        assert not cpu.handles(f32)


# -- whole model -------------------------------------------------------------------------------------
def _train_step(fast, dtype):
    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=2, drop_path_rate=0.0).to(dtype=dtype)
    rng = np.random.default_rng(15)
    x = rng.standard_normal((16, 1, 8, 8)).astype(dtype)
    y = rng.integers(0, 10, 16)
    with cpu.fast_paths(fast):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_model_gradients_fast_match_plain(dtype):
    fast_loss, fast_grads = _train_step(True, dtype)
    plain_loss, plain_grads = _train_step(False, dtype)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-13)
    assert fast_loss == pytest.approx(plain_loss, rel=tol["rtol"])
    for name in fast_grads:
        np.testing.assert_allclose(fast_grads[name], plain_grads[name], err_msg=name, **tol)


def _float_arrays(value, seen):
    """Every floating-point NumPy array in `value` (arrays, lists/tuples/dicts of them)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and id(value) not in seen:
            seen.add(id(value))
            yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _float_arrays(item, seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _float_arrays(item, seen)


def test_one_training_step_keeps_every_array_float32(monkeypatch):
    from minivit.tensor import Function

    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=2, drop_path_rate=0.1, drop_rate=0.1)
    optimizer = AdamW(model.named_parameters())
    saved = []  # (op name, attribute, dtype) of every float array a Function keeps
    original_call = Function.__call__

    def recording_call(self, *inputs, **options):
        out = original_call(self, *inputs, **options)
        for name, value in vars(self).items():
            if name == "inputs":
                continue
            for array in _float_arrays(value, set()):
                saved.append((type(self).__name__, name, array.dtype))
        saved.append((type(self).__name__, "output", out.dtype))
        return out

    monkeypatch.setattr(Function, "__call__", recording_call)
    rng = np.random.default_rng(16)
    x = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    optimizer.zero_grad()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    optimizer.step(max_grad_norm=1.0)

    assert saved, "no Function ran"
    wrong = [entry for entry in saved if entry[2] != np.float32]
    assert not wrong, f"float arrays that are not float32: {wrong}"
    assert {op for op, _, _ in saved} >= {"Linear", "LayerNorm", "LinearGELU", "SelfAttention",
                                          "Patchify", "CrossEntropy"}
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == np.float32, name
    for name, p in model.named_parameters():
        assert p.data.dtype == np.float32, name
    for buffer in (optimizer.flat, optimizer.flat_grad, optimizer.m, optimizer.v,
                   optimizer.decay_mask):
        assert buffer.dtype == np.float32
    assert loss.dtype == np.float32


def test_without_blas_control_gemms_are_not_split_but_still_right(monkeypatch):
    """Without threadpoolctl minivit cannot put BLAS on one thread, so it leaves the GEMMs
    whole (BLAS threads them) rather than run two threaded BLAS calls at once."""
    monkeypatch.setitem(runtime.state, "blas", {"controlled": False, "threads": None,
                                             "libraries": []})
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert not runtime.split_gemms()
    rng = np.random.default_rng(18)
    x = rng.standard_normal((600, 40)).astype(np.float32)
    w = rng.standard_normal((30, 40)).astype(np.float32)
    b = rng.standard_normal(30).astype(np.float32)
    with threads(2):
        assert_fast_matches_plain(F.linear, [x, w, b], **TOLERANCES[np.float32])


def test_freed_large_arrays_are_kept_for_reuse_on_glibc():
    """cpu.configure() (not importing minivit, nor asking cpu.handles) raises glibc's
    mmap/trim thresholds (minivit.cpu.runtime explains why); MINIVIT_KEEP_MEMORY=0 leaves malloc
    alone. Checked in fresh interpreters."""
    import os
    import platform
    import subprocess
    import sys

    code = ("import numpy as np; from minivit import cpu; from minivit.cpu import runtime; "
            "assert cpu.handles(np.zeros(2, np.float32)); "
            "assert runtime.state['malloc'] is None and runtime.state['blas'] is None; "
            "cpu.configure(); print(runtime.state['malloc'], cpu.memory_info())")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MINIVIT_KEEP_MEMORY": "0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert off.stdout.startswith("False malloc left as it is")
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert on.stdout.startswith("True glibc keeps freed arrays")


def test_bad_thread_counts_in_the_environment_warn_and_fall_back():
    import os
    import subprocess
    import sys

    code = ("from minivit import cpu; cpu.configure(); "
            "print(cpu.num_threads() >= 1, cpu.blas_info()['threads'])")
    env = {**os.environ, "MINIVIT_NUM_THREADS": "abc", "MINIVIT_BLAS_THREADS": "two"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "MINIVIT_NUM_THREADS='abc' is not a whole number" in result.stderr
    assert "MINIVIT_BLAS_THREADS='two' is not a whole number; using 1" in result.stderr
    assert result.stdout.split()[0] == "True"
