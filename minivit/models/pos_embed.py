"""Position-embedding resampling: a learned (1, prefix + H*W, D) embedding to another patch
grid, exactly as timm's ``resample_abs_pos_embed`` (torch's bicubic ``interpolate``), in NumPy.
"""

from __future__ import annotations

import math

import numpy as np

from minivit.errors import WeightsError

__all__ = ["resample_abs_pos_embed"]


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Cubic-convolution weights (Keys, A = -0.75 as PyTorch) of taps -1, 0, 1, 2 at offset t."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
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
    grid = np.einsum("ia,abd->ibd", _bicubic_matrix(old_h, new_h), grid)
    grid = np.einsum("jb,ibd->ijd", _bicubic_matrix(old_w, new_w), grid)
    patches = grid.reshape(1, new_h * new_w, dim).astype(pos_embed.dtype)
    return np.concatenate([pos_embed[:, :num_prefix_tokens], patches], axis=1)
