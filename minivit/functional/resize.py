"""Resizing a grid of token embeddings (the patch part of a position embedding) to another
grid, bicubic as torch's interpolate(align_corners=False): what lets a ViT read images of a
size other than the one it was built for (DINO's small local crops).

Bicubic resizing is linear and separable: Y = A_h X A_wᵀ per channel, with the (new, old)
matrices of minivit.io.bicubic_matrix, so its backward is the transposed resize."""

from minivit import backend
from minivit.errors import ShapeError
from minivit.io import bicubic_matrix
from minivit.tensor import Function


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
