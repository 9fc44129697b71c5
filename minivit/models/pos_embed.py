"""Position embeddings in NumPy: resampling a learned (1, prefix + H*W, D) embedding to another
patch grid, exactly as timm's ``resample_abs_pos_embed`` (torch's bicubic ``interpolate``), and
the fixed 2-D sine-cosine table of the MAE reference.
"""

from __future__ import annotations

import math

import numpy as np

from minivit.errors import ShapeError, WeightsError
from minivit.functional.resize import bicubic_matrix

__all__ = ["resample_abs_pos_embed", "sincos_2d"]


def resample_abs_pos_embed(
    pos_embed: np.ndarray,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> np.ndarray:
    """Resize a learned position embedding to another patch grid, as timm's function does.

    ``pos_embed`` is (1, num_prefix_tokens + H*W, D). The prefix (class) tokens are kept; the
    patch part, as a (D, H, W) grid, is resized to ``new_size`` (h, w) exactly like
    ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``, computed in
    float64 and returned in the input's dtype. ``old_size`` (H, W) defaults to a square grid.
    """
    pos_embed = np.asarray(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise WeightsError(
            f"pos_embed must have shape (1, tokens, dim), got {pos_embed.shape}"
        )
    n_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(max(n_patches, 0))
        if side * side != n_patches:
            raise WeightsError(
                f"pos_embed has {pos_embed.shape[1]} tokens = {num_prefix_tokens} prefix + "
                f"{n_patches} patches, not a square grid; pass old_size=(H, W) or the right "
                "num_prefix_tokens"
            )
        old_size = (side, side)
    (old_h, old_w), (new_h, new_w) = tuple(old_size), tuple(new_size)
    if old_h * old_w != n_patches or min(old_h, old_w, new_h, new_w) < 1:
        raise WeightsError(
            f"cannot resample pos_embed of {pos_embed.shape[1]} tokens ({num_prefix_tokens} "
            f"prefix + {n_patches} patches) from grid {old_size} to {new_size}: expected "
            "positive grid sizes with H*W equal to the number of patches"
        )
    dim = pos_embed.shape[2]
    grid = pos_embed[0, num_prefix_tokens:].astype(np.float64).reshape(old_h, old_w, dim)
    grid = np.einsum("ia,abd->ibd", bicubic_matrix(old_h, new_h), grid)
    grid = np.einsum("jb,ibd->ijd", bicubic_matrix(old_w, new_w), grid)
    patches = grid.reshape(1, new_h * new_w, dim).astype(pos_embed.dtype)
    return np.concatenate([pos_embed[:, :num_prefix_tokens], patches], axis=1)


def sincos_2d(dim, grid, class_token=True):
    """MAE's fixed 2-D sine-cosine table (util/pos_embed.py's layout): (1 + H·W, D) float64,
    without the first (class token, zeros) row when class_token=False; grid is (H, W) or a side.

    Rows run over the patches row by row, as patch tokens do. The first D/2 channels encode the
    patch's column x, the last D/2 its row y, each as [sin(p·ω_0..ω_{D/4−1}), cos(p·ω_0..)]
    with ω_i = 1 / 10000^(i / (D/4)). (timm's build_sincos2d_pos_embed orders the channels
    differently: [sin h, sin w, cos h, cos w].)"""
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
