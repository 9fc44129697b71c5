"""Shared test set-up: Hypothesis profiles, the backend fixture, array and layout helpers.

Profiles (pick with HYPOTHESIS_PROFILE=...): ``default`` (quick, for every run) and ``ci``
(more examples). The ``backend`` fixture runs a test once per array backend; the cupy run is
skipped where CuPy or a GPU is missing. Tests build their arrays with `on_backend`/`layout`
so that the same test body runs on NumPy and CuPy, and compare through `to_numpy`.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minivit
from minivit import backend as mb
from minivit import Tensor, cpu

cpu.configure()  # the process set-up the command line and train() make (BLAS threads, malloc)

settings.register_profile("default", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Hypothesis tests that take the function-scoped `backend` fixture use this: the fixture only
# flips the global backend, which every example of the test shares on purpose.
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])

_CUPY_SKIP = pytest.mark.skipif(not mb.cupy_available(),
                                reason="cupy backend: CuPy or a CUDA GPU is not available")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=_CUPY_SKIP)])
def backend(request):
    """Run the test on each array backend; "numpy" is restored afterwards."""
    minivit.set_backend(request.param)
    try:
        yield request.param
    finally:
        minivit.set_backend("numpy")


@pytest.fixture
def cp():
    """CuPy itself, for the GPU tests (which skip first where it is missing)."""
    import cupy
    return cupy


@pytest.fixture(autouse=True)
def _numpy_backend_around_each_test():
    """Every test starts and ends on the numpy backend, whatever the previous one did."""
    minivit.set_backend("numpy")
    yield
    minivit.set_backend("numpy")


def stop_after(epochs):
    """An on_epoch_end for train()/pretrain() that interrupts the run (KeyboardInterrupt, as
    Ctrl-C) once epoch `epochs` has ended and its checkpoint is written."""
    def on_epoch_end(epoch, summary):
        if epoch == epochs:
            raise KeyboardInterrupt
    return on_epoch_end


# -- arrays on the active backend ---------------------------------------------------------------
def on_backend(values, dtype=None):
    """A C-contiguous array with `values` on the active backend (minivit.backend.xp())."""
    host = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    return mb.xp().asarray(np.array(host, order="C"))


def leaf(values, dtype=np.float64):
    """A Tensor that requires grad, on the active backend."""
    return Tensor(on_backend(values, dtype), requires_grad=True)


@pytest.fixture
def make_array():
    """The `on_backend` helper as a fixture, for tests that prefer fixtures to imports."""
    return on_backend


LAYOUTS = ("contiguous", "transposed", "strided", "reversed")


def layout(values, kind):
    """`values` on the active backend as a view with the memory layout `kind`:

    contiguous  a plain C-contiguous array;
    transposed  a view of a contiguous array stored with its axes reversed (Fortran order);
    strided     every other element of a twice-as-long last axis;
    reversed    a negative-stride view of the first axis.
    The values are always exactly `values`; only the strides differ."""
    host = np.asarray(values)
    xp = mb.xp()
    if kind == "contiguous" or host.ndim == 0:
        return xp.asarray(np.array(host, order="C"))
    if kind == "transposed":
        return xp.asarray(np.array(host.T, order="C")).T
    if kind == "strided":
        big = xp.zeros(host.shape[:-1] + (2 * host.shape[-1],), dtype=host.dtype)
        big[..., ::2] = xp.asarray(host)
        return big[..., ::2]
    if kind == "reversed":
        return xp.asarray(np.array(host[::-1], order="C"))[::-1]
    raise ValueError(kind)


def as_host(array):
    """A host NumPy copy of a backend array (or Tensor data), for comparisons."""
    return np.array(mb.to_numpy(array))


# -- Hypothesis strategies ----------------------------------------------------------------------
def floats(low=-3.0, high=3.0):
    """Bounded finite floats without subnormals."""
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def away_from_zero(low=0.5, high=3.0):
    """Floats with low <= |x| <= high (denominators)."""
    return floats(low, high) | floats(-high, -low)


def arrays(shape, elements=None, dtype=np.float64, unique=False):
    return hnp.arrays(dtype, shape, elements=floats() if elements is None else elements,
                      unique=unique)


def distinct_arrays(shape, spacing=1.0 / 128, dtype=np.float64):
    """Arrays whose values are pairwise at least `spacing` apart (no ties for max; rows of a
    layer norm never collapse to a constant). Drawn from a grid in [-3, 3]; for arrays too
    large for that grid the spacing shrinks to 3 / size."""
    size = int(np.prod(shape))
    limit = max(int(3.0 / spacing), size)
    step = 3.0 / limit
    grid = hnp.arrays(np.int64, shape, elements=st.integers(-limit, limit), unique=True)
    return grid.map(lambda a: (a * step).astype(dtype))


shapes = hnp.array_shapes
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**32 - 1)


def check_gradients(fn, *inputs, seed=0, **kwargs):
    """minivit.gradcheck in float64 at relative error 1e-6 (and gradcheck's default round-off
    floor, 1e-8·Σ|f|, for gradients that are themselves tiny); the report is shown on failure."""
    report = minivit.gradcheck(fn, *inputs, seed=seed, rtol=1e-6, **kwargs)
    assert report.passed, f"gradient check failed (seed={seed}):\n{report}"
    return report
