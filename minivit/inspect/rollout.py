"""Attention maps and attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow").

Inputs are NumPy arrays of attention probabilities, one (B, H, T, T) array per layer with
rows summing to 1 over the keys and the class token at index 0 (bring CuPy arrays to the
host first). Drawing uses matplotlib lazily, as in `minivit.inspect.plots`.
"""

import math
import textwrap

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


def cls_attention_maps(attn_last_layer, grid, prefix_tokens=1):
    """The class token's attention to each patch: (B, H, T, T) -> (B, H, gh, gw).

    `grid` is (gh, gw) or an int for a square grid, with T = prefix_tokens + gh·gw (1: the
    class token; 2: DeiT's class and distillation tokens, the class token's row is shown;
    0: no class token, the patches' mean attention is shown, see attention_map_subject).
    For a rollout's map use `cls_attention_maps(rollout[:, None], grid, prefix_tokens)[:, 0]`.
    """
    attn = np.asarray(attn_last_layer)
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    tokens = prefix_tokens + gh * gw
    if attn.ndim != 4 or attn.shape[2:] != (tokens,) * 2:
        raise ShapeError(f"expected (B, H, {tokens}, {tokens}) attention for a {gh}x{gw} grid "
                         f"and {prefix_tokens} prefix token(s), got {attn.shape}")
    rows = attn[:, :, 0] if prefix_tokens else attn.mean(axis=2)
    return rows[:, :, prefix_tokens:].reshape(attn.shape[0], attn.shape[1], gh, gw)


def attention_map_subject(prefix_tokens):
    """Which token's attention cls_attention_maps shows, in words."""
    return {0: "the patches' mean attention (the model has no class token)",
            1: "the class token's attention",
            2: "the class token's attention (not the distillation token's)"}[prefix_tokens]


def upsample_nearest(grid_map, size):
    """Nearest-neighbour resize of a (gh, gw) map to size (H, W): each patch's value fills
    the pixels it covers."""
    grid_map = np.asarray(grid_map)
    rows = np.arange(size[0]) * grid_map.shape[0] // size[0]
    cols = np.arange(size[1]) * grid_map.shape[1] // size[1]
    return grid_map[np.ix_(rows, cols)]


def map_statistics(maps, images):
    """(entropy, ink) of attention maps (B, K, gh, gw) over their images (B, C, H, W), each
    (B, K): the entropy of each map renormalised over the patches, as a fraction of the uniform
    map's log(gh·gw) (1: attention spread evenly), and the Pearson correlation of each map with
    the patches' mean pixel value (the ink of a digit; 0 where either is constant)."""
    maps = np.asarray(maps, dtype=np.float64)
    batch, _, gh, gw = maps.shape
    images = np.asarray(images, dtype=np.float64)
    ink = images.mean(axis=1).reshape(batch, gh, images.shape[2] // gh, gw,
                                      images.shape[3] // gw).mean(axis=(2, 4))
    p = maps.reshape(batch, maps.shape[1], -1)
    p = p / p.sum(axis=-1, keepdims=True)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1) / np.log(gh * gw)
    a = p - p.mean(axis=-1, keepdims=True)
    b = (ink - ink.mean(axis=(1, 2), keepdims=True)).reshape(batch, 1, -1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    correlation = np.where(norms > 0, (a * b).sum(axis=-1) / np.where(norms > 0, norms, 1.0), 0.0)
    return entropy, correlation


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


def save_attention_comparison(images, rows, out_png, titles=None):
    """Save a PNG comparing models' class-token attention on the same images: for each image,
    one row per model: the input, the mean over the last block's heads, each head, the rollout.

    images: (B, C, H, W); rows: {model name: (head_maps (B, heads, gh, gw), rollout maps (B, gh,
    gw))}, as `cls_attention_maps` gives them; titles: one per image. In a row, the mean and the
    heads share one colour scale from 0 (a near-uniform head looks uniform, and heads compare);
    the rollout, laid over the input, has its own. Returns the Figure.
    """
    heads = max(maps.shape[1] for maps, _ in rows.values())
    ncols = heads + 3
    fig, axes = new_figure(len(images) * len(rows), ncols, panel_inches=(1.3, 1.45))
    for b, image in enumerate(images):
        picture = _displayable(image)
        gray = "gray" if picture.ndim == 2 else None
        height, width = picture.shape[:2]
        for r, (name, (head_maps, rollout_maps)) in enumerate(rows.items()):
            row = axes[(b * len(rows) + r) * ncols:(b * len(rows) + r + 1) * ncols]
            row[0].imshow(picture, cmap=gray)
            label = "\n".join(([] if titles is None else [titles[b]]) + textwrap.wrap(name, 24))
            row[0].text(-0.08, 0.5, label, transform=row[0].transAxes, rotation=90,
                        ha="right", va="center", fontsize="x-small")
            maps = np.concatenate([head_maps[b].mean(axis=0, keepdims=True), head_maps[b]])
            for i, grid_map in enumerate(maps):
                row[1 + i].imshow(grid_map, cmap="inferno", interpolation="nearest", vmin=0.0,
                                  vmax=float(maps.max()), extent=(0, width, height, 0))
            row[-1].imshow(picture, cmap=gray)
            row[-1].imshow(upsample_nearest(rollout_maps[b], (height, width)), cmap="inferno",
                           alpha=0.6, vmin=0.0, vmax=float(rollout_maps[b].max()))
            if b == r == 0:
                row[0].set_title("input", fontsize="x-small")
                row[1].set_title("mean of heads", fontsize="x-small")
                for i in range(head_maps.shape[1]):
                    row[2 + i].set_title(f"last block, head {i}", fontsize="x-small")
                row[-1].set_title("rollout", fontsize="x-small")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out_png)
    return fig
