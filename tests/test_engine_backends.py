"""The backend switch: mixed backends refused, CuPy missing explained, unknown names, the backend
fixture, repeatable dropout, and an engine that does not import torch.
"""

import subprocess
import sys

import numpy as np
import pytest
from conftest import as_host, leaf, on_backend

import minivit
import minivit.functional as F
from minivit import Tensor
from minivit import backend as mb
from minivit.errors import BackendError


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
