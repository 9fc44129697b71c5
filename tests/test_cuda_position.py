"""The relative position bias on the GPU (minivit.cuda.position: its backward as a scatter-add
kernel, no host sync). Written in a session without a GPU: these tests have not run yet.

- forward and the table's gradient on cupy equal NumPy's (float64 to 1e-12, float32 to 1e-5
  and staying float32) for BEiT's index (class token) and Swin's, and the kernel ran;
- the op's forward and backward captured in a CUDA graph (which refuses a host sync) replay
  like eager calls on new tables and upstream gradients.
Whole BEiT and Swin training steps in a CUDA graph: tests/test_cuda_graphs.py
(test_a_captured_training_step_replays_like_eager_steps).
"""

import numpy as np
import pytest
from helpers_cuda import GPU, TOLERANCE, _assert_fused_matches_numpy

import minivit
import minivit.functional as F
from minivit import Tensor, cuda
from minivit import backend as mb
from minivit.functional.position import relative_position_index, relative_table_entries

INDEXES = {"beit": ((3, 2), True), "swin": ((4, 4), False)}  # (grid, class token)


@pytest.fixture(autouse=True)
def _numpy_backend_afterwards():
    yield
    minivit.set_backend("numpy")


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", sorted(INDEXES))
def test_relative_position_bias_on_cupy_matches_numpy(dtype, layout):
    grid, class_token = INDEXES[layout]
    index = relative_position_index(grid, class_token)
    table = np.random.default_rng(1).standard_normal(
        (relative_table_entries(grid, class_token), 3)).astype(dtype)

    def fn(table):  # the index on the table's backend (a mixed pair is a BackendError)
        return F.relative_position_bias(table, mb.to_backend(index, table.backend))

    _assert_fused_matches_numpy(fn, [table], ("relative_position_bias_grad",
                                              np.dtype(dtype).name), dtype)


@GPU
def test_relative_position_bias_in_a_cuda_graph_replays_like_eager():
    import cupy

    index = cupy.asarray(relative_position_index((3, 3), class_token=True))
    table = Tensor(cupy.zeros((relative_table_entries((3, 3), True), 2)), requires_grad=True)
    upstream = cupy.zeros((2, 10, 10))

    def step():
        table.grad = None
        out = F.relative_position_bias(table, index)
        out.backward(upstream)
        return out.data, table.grad

    rng = np.random.default_rng(2)
    captured = cuda.capture_step(step)
    for _ in range(2):
        table.data[...] = cupy.asarray(rng.standard_normal(table.shape))
        upstream[...] = cupy.asarray(rng.standard_normal(upstream.shape))
        replayed = [a.copy() for a in captured()]
        for got, want in zip(replayed, step()):
            np.testing.assert_allclose(mb.to_numpy(got), mb.to_numpy(want),
                                       **TOLERANCE[np.float64])
