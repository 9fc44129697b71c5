"""Position embeddings in NumPy: resampling a learned (1, prefix + H*W, D) embedding to another
patch grid, exactly as timm's ``resample_abs_pos_embed`` (torch's bicubic ``interpolate``), and
a 1-D table (a '2d' embedding's row or column table) alike; resizing a relative position bias
table to another window, exactly as timm's ``resize_rel_pos_bias_table``; and the fixed 2-D
sine-cosine table of the MAE reference.
"""

from __future__ import annotations

import math

import numpy as np

from minivit.errors import ShapeError, WeightsError
from minivit.functional.resize import bicubic_matrix

__all__ = ["resample_abs_pos_embed", "resample_table", "resize_rel_pos_bias_table",
           "relative_table_window", "sincos_2d"]


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


def resample_table(table: np.ndarray, new_length: int) -> np.ndarray:
    """Resize a learned 1-D table (length, D) along its first axis, bicubic as above (the row
    or column table of a '2d' position embedding)."""
    table = np.asarray(table)
    resized = bicubic_matrix(table.shape[0], new_length) @ table.astype(np.float64)
    return resized.astype(table.dtype)


def relative_table_window(entries: int, extra: int = 0) -> tuple[int, int] | None:
    """The square window (w, w) whose relative position table has ``entries`` rows,
    (2w − 1)² offsets + ``extra`` (BEiT's 3 class-token rows), or None when there is none."""
    offsets = entries - extra
    side = math.isqrt(max(offsets, 0))
    if side * side != offsets or side % 2 == 0:
        return None
    return ((side + 1) // 2,) * 2


def resize_rel_pos_bias_table(table: np.ndarray, new_window: tuple[int, int], extra: int = 0,
                              old_window: tuple[int, int] | None = None) -> np.ndarray:
    """A relative position bias table (offsets + extra, heads) learned for ``old_window``,
    resized to ``new_window`` exactly as timm's ``resize_rel_pos_bias_table`` (what its BEiT
    and Swin checkpoint filters and ``set_input_size`` use; BEiT's fine-tuning code).

    The (2h−1)×(2w−1) offsets of each head are a grid whose points sit at geometrically
    spaced distances from the centre (ratio q found by bisection so the old half-width spans
    the new one) and are read at the new integer offsets by linear interpolation (timm's
    ``RegularGridInterpolator``; beyond the last point, that point's value). As timm does, this
    runs in float32 and returns the input's dtype; the ``extra`` last rows (BEiT's class
    token) are kept. ``old_window`` defaults to the square window the table's size implies.
    """
    table = np.asarray(table)
    new_size = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if table.ndim != 2:
        raise WeightsError(f"a relative position bias table is (offsets + {extra}, heads); got "
                           f"shape {table.shape}")
    if old_window is None:
        old_window = relative_table_window(table.shape[0], extra)
        if old_window is None and table.shape[0] - extra == new_size[0] * new_size[1]:
            old_window = tuple(new_window)  # a non-square table of the model's own size
        if old_window is None:
            raise WeightsError(f"cannot tell the window of a relative position bias table of "
                               f"{table.shape[0]} rows: not (2w - 1)^2 + {extra} offsets of a "
                               f"square w x w window; pass old_window")
    old_size = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    if old_size[0] * old_size[1] + extra != table.shape[0]:
        raise WeightsError(f"a relative position bias table of a {old_window[0]}x"
                           f"{old_window[1]} window has {old_size[0]}*{old_size[1]} + {extra} "
                           f"rows; got {table.shape[0]}")
    if old_size == new_size:
        return table
    values = table[:table.shape[0] - extra].astype(np.float32).reshape(*old_size, -1)
    (rows, row_weights), (cols, col_weights) = (
        _linear_taps(_geometric_points(old, new), new) for old, new in zip(old_size, new_size))
    resized = None
    for a in (0, 1):  # the four corners, summed in timm's order
        for b in (0, 1):
            weight = row_weights[1 - a][:, None] * col_weights[1 - b][None, :]
            term = values[rows[a][:, None], cols[b][None, :]] * weight[..., None]
            resized = term if resized is None else resized + term
    spans = (row_weights[0] + row_weights[1])[:, None] * (col_weights[0] + col_weights[1])
    resized = (resized / spans[..., None]).reshape(new_size[0] * new_size[1], -1)
    return np.concatenate([resized.astype(table.dtype), table[table.shape[0] - extra:]])


def _geometric_points(old: int, new: int) -> np.ndarray:
    """BEiT's source points of a table row of ``old`` offsets read at ``new`` offsets: 0 and
    ±(1 + q + ... + q^(k−1)) for k = 1 .. old // 2, q bisected in [1.01, 1.5] so that the last
    reaches new // 2 (float64 arithmetic as timm's Python, float32 points as its tensors)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (old // 2)) / (1.0 - q) > new // 2:
            right = q
        else:
            left = q
    distances, current = [], 1
    for i in range(old // 2):
        distances.append(current)
        current += q ** (i + 1)
    return np.array([-d for d in reversed(distances)] + [0] + distances, dtype=np.float32)


def _linear_taps(points: np.ndarray, count: int):
    """((left, right) indices, (to_left, to_right) distances) of linear interpolation of
    ``points`` at the integer offsets −(count // 2) .. count // 2, as timm's
    RegularGridInterpolator computes them in float32 (a distance past the ends is 0, and
    both are 1 where both are 0)."""
    targets = np.arange(-(count // 2), count // 2 + 1, dtype=np.float32)
    right = np.minimum(np.searchsorted(points, targets), len(points) - 1)
    left = np.clip(right - 1, 0, len(points) - 1)
    to_left = np.maximum(targets - points[left], np.float32(0))
    to_right = np.maximum(points[right] - targets, np.float32(0))
    both_zero = (to_left == 0) & (to_right == 0)
    to_left[both_zero] = to_right[both_zero] = 1
    return (left, right), (to_left, to_right)
