"""Fixed 2-D sine-cosine position embeddings in the MAE reference's layout.

For a grid of H × W patches and width D (a multiple of 4): the first D/2 channels encode the
patch's column x, the last D/2 its row y, each as [sin(p·ω_0..ω_{D/4−1}), cos(p·ω_0..)] with
ω_i = 1 / 10000^(i / (D/4)). A class-token row of zeros can be put first. (timm's
build_sincos2d_pos_embed orders the channels differently: [sin h, sin w, cos h, cos w].)
"""

import numpy as np

from minivit.errors import ShapeError


def sincos_2d(dim, grid, class_token=True):
    """(1 + H·W, D) float64 table (without the first zero row when class_token=False); grid is
    (H, W) or a side length. Rows run over the patches row by row, as patch tokens do."""
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if dim % 4:
        raise ShapeError(f"a 2-D sine-cosine position embedding needs a width divisible by 4, "
                         f"got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                             np.arange(width, dtype=np.float64), indexing="ij")

    def encode(positions):
        angles = positions.reshape(-1, 1) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    if class_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table
