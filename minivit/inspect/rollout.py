"""Attention maps and attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow").

Inputs are NumPy arrays of attention probabilities, one (B, H, T, T) array per layer with
rows summing to 1 over the keys and the class token at index 0 (bring CuPy arrays to the
host first). Drawing uses matplotlib lazily, as in `minivit.inspect.plots`.
"""

import math

import numpy as np

from minivit.errors import MinivitError, ShapeError
from minivit.inspect.plots import new_figure

HEAD_FUSIONS = {"mean": np.mean, "max": np.max, "min": np.min}


def attention_rollout(attentions, discard_ratio=0.0, head_fusion="mean"):
    """Attention rollout over the layers: (B, T, T), float64, rows summing to 1.

    For each layer: fuse the heads (mean, max or min), set the lowest `discard_ratio`
    fraction of each image's T·T fused weights to zero (the filter of jacobgil's
    vit-explain), add the identity for the residual path, renormalise the rows; then
    multiply the layers, later ones on the left: R = Â_L ··· Â_1. R[b, i, j] is how much
    token i at the output draws on input token j; R[b, 0, 1:] is the class token's map.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise MinivitError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise MinivitError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    layers = [np.asarray(a, dtype=np.float64) for a in attentions]
    if not layers:
        raise MinivitError("attention_rollout needs at least one layer's attention")
    shape = layers[0].shape
    if len(shape) != 4 or shape[2] != shape[3] or any(a.shape != shape for a in layers):
        raise ShapeError(f"expected same-shaped (B, H, T, T) attentions, got {[a.shape for a in layers]}")
    batch, _, tokens, _ = shape
    eye = np.eye(tokens)
    rollout = np.broadcast_to(eye, (batch, tokens, tokens))
    for attention in layers:
        fused = HEAD_FUSIONS[head_fusion](attention, axis=1)
        discard = int(tokens * tokens * discard_ratio)
        if discard:
            flat = fused.reshape(batch, -1)  # a view: zeroing it zeroes `fused`
            lowest = np.argpartition(flat, discard, axis=1)[:, :discard]
            np.put_along_axis(flat, lowest, 0.0, axis=1)
        fused += eye
        fused /= fused.sum(axis=-1, keepdims=True)
        rollout = fused @ rollout
    return rollout


def cls_attention_maps(attn_last_layer, grid):
    """The class token's attention to each patch: (B, H, T, T) -> (B, H, gh, gw).

    `grid` is (gh, gw) or an int for a square grid, with T = 1 + gh·gw. For a rollout's
    map use `cls_attention_maps(rollout[:, None], grid)[:, 0]`.
    """
    attn = np.asarray(attn_last_layer)
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if attn.ndim != 4 or attn.shape[2:] != (1 + gh * gw,) * 2:
        raise ShapeError(f"expected (B, H, {1 + gh * gw}, {1 + gh * gw}) attention for a {gh}x{gw} grid, "
                         f"got {attn.shape}")
    return attn[:, :, 0, 1:].reshape(attn.shape[0], attn.shape[1], gh, gw)


def upsample_nearest(grid_map, size):
    """Nearest-neighbour resize of a (gh, gw) map to size (H, W): each patch's value fills
    the pixels it covers."""
    grid_map = np.asarray(grid_map)
    rows = np.arange(size[0]) * grid_map.shape[0] // size[0]
    cols = np.arange(size[1]) * grid_map.shape[1] // size[1]
    return grid_map[np.ix_(rows, cols)]


def _displayable(image):
    """(C, H, W) with C = 1 or 3 -> (H, W) or (H, W, 3) scaled to [0, 1] for imshow."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ShapeError(f"expected a (C, H, W) image with 1 or 3 channels, got {image.shape}")
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def save_attention_figure(image, head_maps, rollout_map, out_png, title=None,
                          last_title="rollout", block=None):
    """Save a PNG of the input, the class token's attention per head and the rollout.

    image: (C, H, W); head_maps: (H, gh, gw), e.g. `cls_attention_maps(...)[b]`, of block
    number `block` (named in the head panels' titles when given);
    rollout_map: (gh, gw), e.g. `rollout[b, 0, 1:].reshape(gh, gw)`. Head maps are drawn
    over the image's extent; the rollout is upsampled to the image size and laid over it.
    Returns the Figure: axes 0 is the input, 1..H the heads, H+1 the rollout.
    """
    picture = _displayable(image)
    head_maps = np.asarray(head_maps)
    rollout_map = np.asarray(rollout_map)
    if head_maps.ndim != 3 or rollout_map.shape != head_maps.shape[1:]:
        raise ShapeError(f"expected head maps (H, gh, gw) and a rollout map (gh, gw), "
                         f"got {head_maps.shape} and {rollout_map.shape}")
    height, width = picture.shape[:2]
    panels = 2 + len(head_maps)
    ncols = min(panels, 7)
    fig, axes = new_figure(math.ceil(panels / ncols), ncols, panel_inches=(2.0, 2.2))
    gray = "gray" if picture.ndim == 2 else None
    axes[0].imshow(picture, cmap=gray)
    axes[0].set_title("input")
    for i, head_map in enumerate(head_maps):
        axes[1 + i].imshow(head_map, cmap="inferno", interpolation="nearest", extent=(0, width, height, 0))
        axes[1 + i].set_title(f"head {i}" if block is None else f"block {block}, head {i}",
                              fontsize="medium" if block is None else "small")
    rollout_ax = axes[panels - 1]
    rollout_ax.imshow(picture, cmap=gray)
    # colour range from 0, with a scale: a near-uniform rollout must look near-uniform
    overlay = rollout_ax.imshow(upsample_nearest(rollout_map, (height, width)), cmap="inferno",
                                alpha=0.6, vmin=0.0, vmax=float(rollout_map.max()))
    fig.colorbar(overlay, ax=rollout_ax, fraction=0.046, pad=0.04)
    rollout_ax.set_title(last_title, fontsize="medium" if block is None else "small")
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig
