"""Resizing a grid of token embeddings (the patch part of a position embedding) to another
grid, bicubic as torch's interpolate(align_corners=False): what lets a ViT read images of a
size other than the one it was built for (DINO's small local crops).

Bicubic resizing is linear and separable: Y = A_h X A_wᵀ per channel, with the (new, old)
matrices of bicubic_matrix, so its backward is the transposed resize."""

import numpy as np

from minivit import backend
from minivit.errors import ShapeError
from minivit.tensor import Function


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Cubic-convolution weights (Keys, A = -0.75 as PyTorch) of taps -1, 0, 1, 2 at offset t."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of 1-D bicubic resizing, as torch's interpolate with
    align_corners=False, antialias=False: source x = (i + 0.5) * n_in / n_out - 0.5, taps at
    floor(x) - 1 .. floor(x) + 2 clamped to the border."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x0 = np.floor(x)
    weights = _cubic_weights(x - x0)
    taps = np.clip(x0[:, None].astype(np.int64) + np.arange(-1, 3), 0, n_in - 1)
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
    return matrix


# -- resize_grid: Y[i, j, d] = Σ_ab A_h[i, a] X[a, b, d] A_w[j, b];
#    dX[a, b, d] = Σ_ij A_h[i, a] dY[i, j, d] A_w[j, b]
class ResizeGrid(Function):
    def forward(self, x, old_grid, new_grid):
        (old_h, old_w), (new_h, new_w) = old_grid, new_grid
        if x.ndim != 3 or x.shape[1] != old_h * old_w:
            raise ShapeError(f"resize_grid: expected tokens (batch, {old_h}*{old_w}, dim) of the "
                             f"grid {tuple(old_grid)}; got {tuple(x.shape)}")
        to = backend.backend_of(x)
        self.rows = backend.to_backend(bicubic_matrix(old_h, new_h).astype(x.dtype), to)
        self.cols = backend.to_backend(bicubic_matrix(old_w, new_w).astype(x.dtype), to)
        self.old_grid, self.batch = tuple(old_grid), x.shape[0]
        grid = x.reshape(x.shape[0], old_h, old_w, x.shape[2])
        out = backend.array_module(x).einsum("ia,nabd,jb->nijd", self.rows, grid, self.cols)
        return out.reshape(x.shape[0], new_h * new_w, x.shape[2])

    def backward(self, grad):
        new_h, new_w = self.rows.shape[0], self.cols.shape[0]
        grid = grad.reshape(self.batch, new_h, new_w, grad.shape[2])
        out = backend.array_module(grad).einsum("ia,nijd,jb->nabd", self.rows, grid, self.cols)
        return (out.reshape(self.batch, self.old_grid[0] * self.old_grid[1], grad.shape[2]),)


def resize_grid(x, old_grid, new_grid):
    """Tokens x (B, H·W, D) laid out row by row on the grid old_grid = (H, W), resized bicubically
    to new_grid = (h, w): (B, h·w, D). The same grid in and out returns x's values."""
    return ResizeGrid()(x, old_grid=tuple(old_grid), new_grid=tuple(new_grid))
