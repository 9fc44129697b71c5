"""The Swin Transformer (Liu et al. 2021): hierarchical stages of shifted-window attention.

Parameter names, shapes and computation are timm's ``SwinTransformer`` (timm 1.0): NHWC
feature maps; ``patch_embed.proj`` + ``patch_embed.norm``; ``layers.{i}`` stages whose
``downsample`` (PatchMerging: 2×2 gather, ``norm`` over 4C, ``reduction`` to 2C without bias)
starts stages 1.. ; blocks of ``norm1``, ``attn`` (``relative_position_bias_table``, ``qkv``,
``proj``), ``norm2``, ``mlp``; every second block shifts its windows by half a window; final
``norm``, average pooling and ``head.fc``. LayerNorm eps 1e-5, as timm's Swin. Where a stage's
map is no larger than the window, the window is the whole map and nothing shifts (as timm).
Unlike timm, maps the windows (or patch merging) cannot tile are refused, not padded.
"""

import re

import numpy as np

import minivit.functional as F
from minivit import backend
from minivit.errors import MinivitError
from minivit.functional.position import relative_position_index  # (Swin's layout: no class token)
from minivit.functional.window import pair
from minivit.models.pos_embed import resize_rel_pos_bias_table
from minivit.nn import (Constants, LayerNorm, Linear, Mlp, Module, ModuleList, Parameter,
                        PatchEmbed)
from minivit.nn import init

SWIN_NORM_EPS = 1e-5
MASKED = -100.0  # timm's attention-mask value between tokens of regions that were not adjacent


def shift_mask(size, window, shift):
    """(nW, N, N) additive mask of shifted-window attention (timm's attn_mask): after the map is
    rolled by −shift, a window at the edge holds tokens of up to four regions that were not
    neighbours; attention between different regions gets MASKED, within a region 0."""
    regions = np.zeros(size)
    label = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            regions[rows, cols] = label
            label += 1
    wh, ww = window
    windows = regions.reshape(size[0] // wh, wh, size[1] // ww, ww).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, wh * ww)
    return np.where(windows[:, None, :] != windows[:, :, None], MASKED, 0.0)


def window_attention(qkv, num_heads, scale, bias_table, bias_index, mask=None,
                     return_attention=False):
    """Multi-head attention inside each window, with relative position bias and the shift mask.

    qkv (B·nW, N, 3D) in timm's (N, 3, heads, head_dim) layout; bias_table ((2w−1)², heads);
    bias_index (N, N) integer array; mask (nW, N, N) array or None. Returns the merged heads
    (B·nW, N, D), and with return_attention the probabilities (B·nW, heads, N, N) as an array.

        S = q kᵀ·scale + B[h, i, j] (= table[index[i, j], h]) + mask[w, i, j];  O = softmax(S) v

    The mask is tiled over the batch (B·nW, 1, N, N, no heads axis) so that B + mask is the
    one bias the packed self-attention takes; its gradient sums back to B's (heads, N, N)."""
    bias = F.relative_position_bias(bias_table, bias_index)
    if mask is not None:
        xp = backend.array_module(mask)
        bias = bias + xp.tile(mask[:, None], (qkv.shape[0] // mask.shape[0], 1, 1, 1))
    return F.self_attention(qkv, num_heads, scale=scale, return_attention=return_attention,
                            bias=bias)


class WindowAttention(Module):
    """W-MSA: attention inside w×w windows with a learned bias per relative offset and head.

    Set ``keep_attention = True`` to keep the last forward's probabilities
    (B·nW, heads, N, N) in ``self.attention``."""

    def __init__(self, dim, num_heads, window, qkv_bias=True):
        self.num_heads, self.window, self.scale = num_heads, window, (dim // num_heads) ** -0.5
        self.relative_position_bias_table = Parameter(init.trunc_normal(
            ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)))
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.constants = Constants(index=relative_position_index(window))
        self.keep_attention, self.attention = False, None

    def forward(self, windows, mask=None):
        """(B·nW, N, D) → (B·nW, N, D); mask (nW, N, N) array or None."""
        index = self.constants.get("index", windows)
        out = window_attention(self.qkv(windows), self.num_heads, self.scale,
                               self.relative_position_bias_table, index, mask,
                               return_attention=self.keep_attention)
        if self.keep_attention:
            out, self.attention = out
        return self.proj(out)

    def set_window(self, window):
        """Serve another window, in place (timm's set_window_size): the bias table resized as
        timm resizes it (resize_rel_pos_bias_table), the index rebuilt."""
        table = self.relative_position_bias_table
        table.data = backend.to_backend(resize_rel_pos_bias_table(
            backend.to_numpy(table.data), window, old_window=self.window), table.backend)
        table.grad = None
        self.window = window
        self.constants = Constants(index=relative_position_index(window))

    def extra_repr(self):
        return f"heads={self.num_heads}, window={self.window[0]}x{self.window[1]}"


class SwinTransformerBlock(Module):
    """x + attention of windows (shifted by `shift`, with its mask), then x + MLP; NHWC."""

    def __init__(self, dim, num_heads, size, window, shift, mlp_ratio, qkv_bias, drop_path):
        self.window = window
        self.norm1 = LayerNorm(dim, eps=SWIN_NORM_EPS)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.norm2 = LayerNorm(dim, eps=SWIN_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.set_size(size, shift)

    def set_size(self, size, shift):
        """The (H, W) map this block takes, and its shift (its mask is rebuilt)."""
        self.size, self.shift = size, shift
        self.constants = Constants(mask=shift_mask(size, self.window, shift)) \
            if any(shift) else None

    def forward(self, x):
        height, width = self.size
        y = self.norm1(x)
        mask = None
        if self.constants is not None:
            y = F.roll(y, (-self.shift[0], -self.shift[1]), (1, 2))
            mask = self.constants.get("mask", x)
        y = self.attn(F.window_partition(y, self.window), mask)
        y = F.window_reverse(y, self.window, height, width)
        if self.constants is not None:
            y = F.roll(y, self.shift, (1, 2))
        x = x + F.drop_path(y, self.drop_path, self.training)
        return x + F.drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def extra_repr(self):
        return (f"map={self.size[0]}x{self.size[1]}, window={self.window[0]}x{self.window[1]}, "
                f"shift={self.shift[0]}")


class PatchMerging(Module):
    """(B, H, W, C) → (B, H/2, W/2, 2C): 2×2 neighbours' channels gathered, normed, reduced."""

    def __init__(self, dim):
        self.norm = LayerNorm(4 * dim, eps=SWIN_NORM_EPS)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        return self.reduction(self.norm(F.patch_merge(x)))


class SwinTransformerStage(Module):
    def __init__(self, dim, downsample, blocks):
        self.downsample = PatchMerging(dim // 2) if downsample else None
        self.blocks = ModuleList(blocks)

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SwinPatchEmbed(PatchEmbed):
    """PatchEmbed with a LayerNorm after it, returning the NHWC map (B, gh, gw, D)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = LayerNorm(embed_dim, eps=SWIN_NORM_EPS)

    def forward(self, x):
        tokens = super().forward(x)
        return self.norm(tokens.reshape(tokens.shape[0], *self.grid_size, tokens.shape[-1]))


class ClassifierHead(Module):
    """Average pooling over the map, dropout, then ``fc`` (None with num_classes=0)."""

    def __init__(self, dim, num_classes, drop_rate=0.0):
        self.fc = Linear(dim, num_classes) if num_classes > 0 else None
        self.drop_rate = drop_rate

    def forward(self, x):
        pooled = F.dropout(x.mean(axis=(1, 2)), self.drop_rate, self.training)
        return self.fc(pooled) if self.fc is not None else pooled


def stage_layout(img_size, patch_size, depths, num_heads, window_size, embed_dim=None):
    """[(map size, window, shift, dim, heads)] per stage, checked: a clear MinivitError naming
    the numbers where the image, patch, windows or patch merging do not fit together."""
    depths, num_heads = tuple(depths), tuple(num_heads)
    if len(depths) != len(num_heads) or not depths:
        raise MinivitError(f"SwinTransformer: depths {depths} and num_heads {num_heads} need one "
                           f"entry per stage; got {len(depths)} and {len(num_heads)}")
    size, window = pair(img_size), pair(window_size)
    if patch_size < 1 or min(window) < 1 or size[0] % patch_size or size[1] % patch_size:
        raise MinivitError(f"SwinTransformer: image size {size[0]}x{size[1]} is not a multiple "
                           f"of the patch size {patch_size}")
    grid = (size[0] // patch_size, size[1] // patch_size)
    stages = []
    for index, heads in enumerate(num_heads):
        scale = 2 ** index
        if grid[0] % scale or grid[1] % scale:
            raise MinivitError(f"SwinTransformer: image {size[0]}x{size[1]} with patch size "
                               f"{patch_size} gives a {grid[0]}x{grid[1]} patch grid, which "
                               f"the patch merging before stage {index} cannot halve evenly "
                               f"(each side must be a multiple of {scale})")
        res = (grid[0] // scale, grid[1] // scale)
        win = tuple(min(r, w) for r, w in zip(res, window))  # window = map when map <= window
        if res[0] % win[0] or res[1] % win[1]:
            raise MinivitError(f"SwinTransformer: stage {index}'s {res[0]}x{res[1]} map (image "
                               f"{size[0]}x{size[1]}, patch {patch_size}) does not tile into "
                               f"{win[0]}x{win[1]} windows (window_size {window_size})")
        shift = tuple(0 if r <= w else w // 2 for r, w in zip(res, window))
        dim = None if embed_dim is None else embed_dim * scale
        if dim is not None and (heads < 1 or dim % heads):
            raise MinivitError(f"SwinTransformer: stage {index}'s width {dim} (embed_dim "
                               f"{embed_dim} · {scale}) is not divisible by its {heads} heads")
        stages.append((res, win, shift, dim, heads))
    return stages


class SwinTransformer(Module):
    HEAD = "head.fc."  # the classifier's state-dict prefix (timm's ClassifierHead)

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, drop_rate=0.0, drop_path_rate=0.1):
        for name, value, lowest in (("in_chans", in_chans, 1), ("num_classes", num_classes, 0),
                                    ("embed_dim", embed_dim, 1), ("mlp_ratio", mlp_ratio, 1e-9)):
            if not value >= lowest:
                raise MinivitError(f"SwinTransformer: {name} must be at least {lowest}, got "
                                   f"{value}")
        if any(depth < 1 for depth in depths):
            raise MinivitError(f"SwinTransformer: every stage needs a block; depths {depths}")
        stages = stage_layout(img_size, patch_size, depths, num_heads, window_size, embed_dim)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           num_classes=num_classes, embed_dim=embed_dim, depths=list(depths),
                           num_heads=list(num_heads), window_size=window_size,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                           drop_path_rate=drop_path_rate)
        self.num_classes = num_classes
        self.patch_embed = SwinPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        # stochastic depth grows linearly over all blocks (timm's calculate_drop_path_rates)
        rates = iter(np.linspace(0.0, drop_path_rate, sum(depths)).tolist())
        self.layers = ModuleList(
            SwinTransformerStage(dim, index > 0, [
                SwinTransformerBlock(dim, heads, size, window, (0, 0) if j % 2 == 0 else shift,
                                     mlp_ratio, qkv_bias, next(rates))
                for j in range(depth)])
            for index, (depth, (size, window, shift, dim, heads)) in enumerate(zip(depths, stages)))
        self.num_features = stages[-1][3]
        self.norm = LayerNorm(self.num_features, eps=SWIN_NORM_EPS)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)

    def forward_features(self, x):
        """The normed last-stage map (B, H/(p·2^(S−1)), W/(p·2^(S−1)), C·2^(S−1)), NHWC."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, features):
        return self.head(features)

    def forward(self, x):
        """Logits (B, num_classes) for images x (B, C, H, W)."""
        return self.forward_head(self.forward_features(x))

    def set_img_size(self, img_size):
        """Take images of another size, in place. Swin's positions are relative to windows,
        so mostly only the shift masks change; a stage whose window changes (its map no
        larger than window_size: the window is the map) gets its bias tables resized as
        timm's loading of such a checkpoint resizes them (resize_rel_pos_bias_table). Make the
        optimizer afterwards if a window changed: those tables get new arrays."""
        c = self.config
        stages = stage_layout(img_size, c["patch_size"], c["depths"], c["num_heads"],
                              c["window_size"], c["embed_dim"])
        for stage, (size, window, shift, *_) in zip(self.layers, stages):
            for j, block in enumerate(stage.blocks):
                if window != block.window:
                    block.attn.set_window(window)
                    block.window = window
                block.set_size(size, (0, 0) if j % 2 == 0 else shift)
        embed = self.patch_embed
        embed.img_size = pair(img_size)
        embed.grid_size = (embed.img_size[0] // c["patch_size"],
                           embed.img_size[1] // c["patch_size"])
        embed.num_patches = embed.grid_size[0] * embed.grid_size[1]
        c["img_size"] = img_size if isinstance(img_size, int) else list(img_size)
        return self

    def attention_modules(self):
        """[(name, WindowAttention)] of every block, in order."""
        return [(f"layers.{i}.blocks.{j}.attn", block.attn)
                for i, stage in enumerate(self.layers) for j, block in enumerate(stage.blocks)]

    def forward_with_attention(self, x):
        """(logits, attention): one (B·nW, heads, N, N) array of window-attention probabilities
        per block (N = the tokens of one window; see attention_modules for the names)."""
        modules = [attn for _, attn in self.attention_modules()]
        for attn in modules:
            attn.keep_attention = True
        try:
            logits = self(x)
            return logits, [attn.attention for attn in modules]
        finally:
            for attn in modules:
                attn.keep_attention, attn.attention = False, None

    @staticmethod
    def adapt_state_dict(state):
        """(state in timm's layout, notes), as timm's checkpoint_filter_fn: the fixed buffers
        (relative_position_index, attn_mask) some files carry are dropped, and the original
        Microsoft layout (downsample at the end of stages 0.., ``head.`` for ``head.fc.``),
        recognised by ``layers.0.downsample``, is renamed to timm's."""
        state = {k: v for k, v in state.items()
                 if not k.endswith(("relative_position_index", "attn_mask"))}
        if "layers.0.downsample.reduction.weight" not in state:
            return state, []
        def rename(key):
            key = re.sub(r"^layers\.(\d+)\.downsample",
                         lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
            return re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        return {rename(k): v for k, v in state.items()}, [
            "renamed the original Swin checkpoint layout (downsample at the end of stages, "
            "head.*) to timm's (downsample at the start of the next stage, head.fc.*)"]

    def extra_repr(self):
        return ", ".join(f"{key}={value}" for key, value in self.config.items())


# name -> SwinTransformer arguments. The ImageNet ones are timm's; the small-data ones fit the
# embedded 8x8 digits, 28x28 MNIST/Fashion-MNIST and 32x32 CIFAR.
MODEL_CONFIGS = {
    "swin_tiny_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=96,
                                         depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=96,
                                          depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=128,
                                         depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_digits": dict(img_size=8, patch_size=1, in_chans=1, num_classes=10, embed_dim=40,
                        depths=(2, 2), num_heads=(2, 4), window_size=4, drop_path_rate=0.0),
    "swin_mnist": dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=48,
                       depths=(2, 2), num_heads=(3, 6), window_size=7, drop_path_rate=0.0),
    "swin_cifar": dict(img_size=32, patch_size=2, in_chans=3, num_classes=10, embed_dim=64,
                       depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4,
                       drop_path_rate=0.0),
}
