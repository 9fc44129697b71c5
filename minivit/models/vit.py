"""The Vision Transformer (Dosovitskiy et al. 2020) as one family of options.

Parameter names and shapes are timm's, so timm weights load by name: ``VisionTransformer``
(class token, learned absolute position embedding, pre-norm blocks, final LayerNorm, a linear
head on the class token) and its options ``global_pool``, ``class_token``, ``fc_norm``,
``no_embed_class``, ``init_values`` (LayerScale), ``norm_eps``; DeiT's distillation token
(``distilled``: timm's ``VisionTransformerDistilled``); BEiT's blocks (``beit``: q/v biases,
``gamma_1``/``gamma_2``) with a relative position bias (``rel_pos_bias``). ``pos_embed`` also
takes minivit's own 'sincos' (fixed, MAE's) and '2d' (learned row + column tables).
"""

import numpy as np

import minivit.functional as F
from minivit import backend
from minivit.errors import MinivitError, ShapeError
from minivit.functional.position import relative_position_index, relative_table_entries
from minivit.models.pos_embed import (resample_abs_pos_embed, resample_table,
                                      resize_rel_pos_bias_table, sincos_2d)
from minivit.models.timm_keys import check_state_dict
from minivit.nn import (Block, Constants, LayerNorm, Linear, Module, ModuleList, Parameter,
                        PatchEmbed)
from minivit.nn import init

POS_EMBEDS = ("learn", "none", "sincos", "2d")
GLOBAL_POOLS = ("token", "avg")


def _check_config(config):
    """Refuse sizes no ViT has (a negative class count, a zero patch, ...) and options that do
    not go together, naming the value."""
    sizes = config["img_size"]
    values = {name: config[name] for name in ("patch_size", "in_chans", "num_classes",
                                              "embed_dim", "depth", "num_heads")}
    values["img_size"] = min(sizes) if isinstance(sizes, (tuple, list)) else sizes
    ratio = config["mlp_ratio"]
    if not ratio > 0:  # also refuses NaN
        raise MinivitError(f"VisionTransformer: mlp_ratio must be greater than 0, got {ratio}")
    lowest = {"num_classes": 0}  # 0: no head (forward returns the pooled features)
    for name, value in values.items():
        if not value >= lowest.get(name, 1):
            raise MinivitError(f"VisionTransformer: {name} must be at least "
                               f"{lowest.get(name, 1)}, got {value}")
    for name, choices in (("pos_embed", POS_EMBEDS), ("global_pool", GLOBAL_POOLS)):
        if config[name] not in choices:
            raise MinivitError(f"VisionTransformer: {name} must be one of {', '.join(choices)}; "
                               f"got {config[name]!r}")
    if config["global_pool"] == "token" and not config["class_token"]:
        raise MinivitError("VisionTransformer: global_pool='token' reads the class token; "
                           "without one (class_token=False) use global_pool='avg'")
    if config["distilled"] and not (config["class_token"] and config["global_pool"] == "token"):
        raise MinivitError("VisionTransformer: distilled=True (DeiT) reads the class and "
                           "distillation tokens: it needs class_token=True, global_pool='token'")
    if config["rel_pos_bias"] and config["distilled"]:
        raise MinivitError("VisionTransformer: the relative position bias serves one class "
                           "token at most; distilled=True adds a second")
    if config["init_values"] is not None and not config["init_values"] > 0:
        raise MinivitError(f"VisionTransformer: init_values (layer scale) must be greater than "
                           f"0 or None, got {config['init_values']}")


class VisionTransformer(Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 global_pool="token", embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, init_values=None, class_token=True, pos_embed="learn",
                 no_embed_class=False, fc_norm=None, norm_eps=1e-6, rel_pos_bias=False,
                 distilled=False, beit=False, drop_rate=0.0, drop_path_rate=0.0):
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           num_classes=num_classes, global_pool=global_pool, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           qkv_bias=qkv_bias, init_values=init_values, class_token=class_token,
                           pos_embed=pos_embed, no_embed_class=no_embed_class, fc_norm=fc_norm,
                           norm_eps=norm_eps, rel_pos_bias=rel_pos_bias, distilled=distilled,
                           beit=beit, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        _check_config(self.config)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_prefix_tokens = int(class_token) + int(distilled)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        if class_token:
            self.cls_token = Parameter(init.normal((1, 1, embed_dim), std=1e-6))
        if distilled:
            self.dist_token = Parameter(init.trunc_normal((1, 1, embed_dim)))
        self.no_embed_class = no_embed_class
        self.pos_embed_kind = pos_embed
        self._init_position(self.patch_embed.grid_size, embed_dim)
        self.drop_rate = drop_rate
        # stochastic depth grows linearly with depth, as in timm
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        grid = self.patch_embed.grid_size if rel_pos_bias else None
        self.blocks = ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, rate,
                                       init_values, norm_eps, beit, grid, class_token)
                                 for rate in rates)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        if not use_fc_norm:  # timm: the final norm becomes fc_norm after the pooling
            self.norm = LayerNorm(embed_dim, norm_eps)
        else:
            self.fc_norm = LayerNorm(embed_dim, norm_eps)
        self.head = Linear(embed_dim, num_classes) if num_classes > 0 else None
        if distilled:
            self.head_dist = Linear(embed_dim, num_classes) if num_classes > 0 else None
        self.distilled_training = False  # True: training forward returns (class, dist) logits
        self.full_last_block = False  # True: forward computes every token (see forward)

    # -- position embeddings ----------------------------------------------------------------
    @property
    def pos_prefix_tokens(self):
        """Prefix tokens the position embedding covers (none with no_embed_class)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def _init_position(self, grid, dim):
        kind, prefix = self.pos_embed_kind, self.pos_prefix_tokens
        if kind == "learn":
            self.pos_embed = Parameter(init.trunc_normal((1, prefix + grid[0] * grid[1], dim)))
        elif kind == "2d":  # e(i, j) = row(i) + col(j); the prefix tokens own a vector each
            self.pos_embed_row = Parameter(init.trunc_normal((grid[0], dim)))
            self.pos_embed_col = Parameter(init.trunc_normal((grid[1], dim)))
            if prefix:
                self.pos_embed_cls = Parameter(init.trunc_normal((1, prefix, dim)))
        elif kind == "sincos":  # fixed; the prefix tokens get zeros, as in MAE
            table = np.concatenate([np.zeros((prefix, dim)),
                                    sincos_2d(dim, grid, class_token=False)])
            self.constants = Constants(sincos=table[None])

    def position_embedding(self, like):
        """The (1, tokens, D) position embedding added to the tokens, or None ('none')."""
        kind = self.pos_embed_kind
        if kind == "learn":
            return self.pos_embed
        if kind == "2d":
            patches = F.position_embedding_2d(self.pos_embed_row, self.pos_embed_col)
            patches = patches.reshape(1, *patches.shape)
            if not hasattr(self, "pos_embed_cls"):
                return patches
            return F.concat([self.pos_embed_cls, patches], axis=1)
        if kind == "sincos":  # one copy per backend and dtype
            return self.constants.get("sincos", like)
        return None

    def _embed(self, x):
        """Patch tokens (B, N, D) → (B, prefix + N, D): prefix tokens and positions added."""
        batch, _, dim = x.shape
        prefix = [F.broadcast_to(token, (batch, 1, dim)) for token in
                  (getattr(self, "cls_token", None), getattr(self, "dist_token", None))
                  if token is not None]
        position = self.position_embedding(x)
        if self.no_embed_class and position is not None:  # DeiT-III: patches only
            x, position = x + position, None
        if prefix:
            x = F.concat(prefix + [x], axis=1)
        return x if position is None else x + position

    # -- forward ----------------------------------------------------------------------------
    def forward_features(self, x, prefix_only=False):
        """Tokens after the final norm: (B, prefix + N, D), the class (and distillation)
        token first. With prefix_only=True, only the prefix tokens (B, prefix, D): the last
        block then computes just their outputs (see forward)."""
        x = F.dropout(self._embed(self.patch_embed(x)), self.drop_rate, self.training)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, queries=self.num_prefix_tokens if prefix_only and index == last
                      else None)
        return self.norm(x) if hasattr(self, "norm") else x

    def forward_head(self, features):
        if self.global_pool == "avg":
            pooled = features[:, self.num_prefix_tokens:].mean(axis=1)
        else:
            pooled = features[:, 0]
        if hasattr(self, "fc_norm"):
            pooled = self.fc_norm(pooled)
        logits = self.head(pooled) if self.head is not None else pooled
        if not hasattr(self, "dist_token"):
            return logits
        distilled = features[:, 1]
        if self.head is not None:
            distilled = self.head_dist(distilled)
        if self.distilled_training and self.training:
            return logits, distilled
        return (logits + distilled) * 0.5  # timm's VisionTransformerDistilled at inference

    def forward(self, x):
        """Logits (B, num_classes) for images x (B, C, H, W); a distilled model (DeiT) averages
        its two heads, or returns both (class, distillation) in training with
        ``distilled_training = True``.

        With global_pool='token' the head reads only the prefix tokens, so the last block
        computes only their outputs: the other tokens still serve as keys and values, but skip
        the output projection, the MLP and the final norm (for cifar's 6 blocks, ~12% of a
        step's multiply-adds). The logits and every gradient are those of
        forward_head(forward_features(x)) to rounding (with dropout, drop_rate > 0, in
        training: the same in distribution, as the last block then draws its masks for the
        prefix tokens only); set ``model.full_last_block = True`` to compute every token as
        timm does."""
        prefix_only = self.global_pool == "token" and not self.full_last_block
        return self.forward_head(self.forward_features(x, prefix_only))

    def forward_with_attention(self, x):
        """(logits, attention) where attention is a list with one (B, heads, T, T) array of
        attention probabilities per block, T = num_prefix_tokens + N: the class token (and
        DeiT's distillation token) first, then the patches."""
        attentions = [block.attn for block in self.blocks]
        for attn in attentions:
            attn.keep_attention = True
        try:
            logits = self.forward_head(self.forward_features(x))  # every block in full
            return logits, [attn.attention for attn in attentions]
        finally:
            for attn in attentions:
                attn.keep_attention, attn.attention = False, None

    # -- image size -------------------------------------------------------------------------
    def resample_pos_embed(self, img_size):
        """Change the input image size in place: the patch grid becomes img_size / patch_size;
        a learned pos_embed's patch part is resized to it (bicubic, as timm; the prefix
        tokens' entries are kept), the 2-D tables alike, a 'sincos' table recomputed, and
        relative position bias tables resized as timm's ``set_input_size`` resizes them (its
        resize_rel_pos_bias_table; the class token's rows kept). Make the optimizer
        afterwards: the embeddings get new arrays."""
        patch_embed = self.patch_embed
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = patch_embed.patch_size
        if len(size) != 2 or min(size) < patch or size[0] % patch or size[1] % patch:
            raise ShapeError(f"image size {size} must be positive multiples of the patch size "
                             f"{patch}")
        grid, old = (size[0] // patch, size[1] // patch), patch_embed.grid_size
        if grid != old:
            for block in self.blocks if self.config["rel_pos_bias"] else ():
                self._resize_relative_table(block.attn, grid)
            if self.pos_embed_kind == "learn":
                self._replace(self.pos_embed, resample_abs_pos_embed(
                    backend.to_numpy(self.pos_embed.data), grid, old, self.pos_prefix_tokens))
            elif self.pos_embed_kind == "2d":
                for parameter, axis in ((self.pos_embed_row, 0), (self.pos_embed_col, 1)):
                    self._replace(parameter, resample_table(backend.to_numpy(parameter.data),
                                                            grid[axis]))
            elif self.pos_embed_kind == "sincos":
                self._init_position(grid, self.config["embed_dim"])
        patch_embed.img_size, patch_embed.grid_size = size, grid
        patch_embed.num_patches = grid[0] * grid[1]
        self.config["img_size"] = img_size if isinstance(img_size, int) else list(size)
        return self

    def _resize_relative_table(self, attn, grid):
        """An attention's relative position bias for another patch grid (timm's
        set_window_size): its table resized, its index rebuilt."""
        table = attn.relative_position_bias_table
        extra = table.shape[0] - relative_table_entries(attn.window)  # the class token's rows
        self._replace(table, resize_rel_pos_bias_table(backend.to_numpy(table.data), grid, extra,
                                                       attn.window))
        attn.window = grid
        attn.constants = Constants(relative_position_index=relative_position_index(grid,
                                                                                   extra > 0))

    @staticmethod
    def _replace(parameter, values):
        parameter.data = backend.to_backend(values, parameter.backend)
        parameter.grad = None

    def load_state_dict(self, state, strict=True):
        """Module.load_state_dict; strict, a state dict that does not fit is reported against
        timm's names (options minivit lacks named, hints for another image size or head)."""
        if strict:
            check_state_dict({name: tuple(p.shape) for name, p in self.named_parameters()},
                             state)
        return super().load_state_dict(state, strict)

    def extra_repr(self):
        return ", ".join(f"{key}={value}" for key, value in self.config.items())
