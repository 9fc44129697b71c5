"""The Vision Transformer (Dosovitskiy et al. 2020) and its named configurations.

Parameter names and shapes are timm's (``VisionTransformer`` with class token, learned absolute
position embedding, pre-norm blocks, final LayerNorm and a linear head on the class token), so
timm weights load by name.
"""

import minivit.functional as F
from minivit import backend
from minivit.errors import MinivitError, ShapeError
from minivit.models.pos_embed import resample_abs_pos_embed
from minivit.models.timm_keys import check_state_dict
from minivit.nn import Block, LayerNorm, Linear, Module, ModuleList, Parameter, PatchEmbed
from minivit.nn import init


def _check_config(**values):
    """Refuse sizes no ViT has (a negative class count, a zero patch, ...), naming the value."""
    sizes = values.pop("img_size")
    values["img_size"] = min(sizes) if isinstance(sizes, (tuple, list)) else sizes
    ratio = values.pop("mlp_ratio")
    if not ratio > 0:  # also refuses NaN
        raise MinivitError(f"VisionTransformer: mlp_ratio must be greater than 0, got {ratio}")
    lowest = {"num_classes": 0}  # 0: no head (forward returns the pooled features)
    for name, value in values.items():
        if not value >= lowest.get(name, 1):
            raise MinivitError(f"VisionTransformer: {name} must be at least "
                               f"{lowest.get(name, 1)}, got {value}")


class VisionTransformer(Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
                 drop_path_rate=0.0):
        _check_config(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                      num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                      num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = Parameter(init.normal((1, 1, embed_dim), std=1e-6))
        self.pos_embed = Parameter(init.trunc_normal((1, self.patch_embed.num_patches + 1,
                                                      embed_dim)))
        self.drop_rate = drop_rate
        # stochastic depth grows linearly with depth, as in timm
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, rate)
                                 for rate in rates)
        self.norm = LayerNorm(embed_dim)
        self.head = Linear(embed_dim, num_classes) if num_classes > 0 else None
        self.full_last_block = False  # True: forward computes every token (see forward)

    def forward_features(self, x, class_token_only=False):
        """Tokens after the final norm: (B, N + 1, D), the class token first. With
        class_token_only=True, only the class token (B, 1, D): the last block then computes
        just that token's output (see forward)."""
        x = self.patch_embed(x)
        cls = F.broadcast_to(self.cls_token, (x.shape[0], 1, x.shape[2]))
        x = F.concat([cls, x], axis=1) + self.pos_embed
        x = F.dropout(x, self.drop_rate, self.training)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, queries=1 if class_token_only and index == last else None)
        return self.norm(x)

    def forward_head(self, features):
        pooled = features[:, 0]
        return self.head(pooled) if self.head is not None else pooled

    def forward(self, x):
        """Logits (B, num_classes) for images x (B, C, H, W).

        The head reads only the class token, so the last block computes only its output:
        the other tokens still serve as keys and values, but skip the output projection, the
        MLP and the final norm (for cifar's 6 blocks, ~12% of a step's multiply-adds). The
        logits and every gradient are those of forward_head(forward_features(x)) to rounding
        (with dropout, drop_rate > 0, in training: the same in distribution, as the last
        block then draws its masks for the class token only); set
        ``model.full_last_block = True`` to compute every token as timm does."""
        return self.forward_head(self.forward_features(x, not self.full_last_block))

    def forward_with_attention(self, x):
        """(logits, attention) where attention is a list with one (B, heads, N+1, N+1) array of
        attention probabilities per block."""
        attentions = [block.attn for block in self.blocks]
        for attn in attentions:
            attn.keep_attention = True
        try:
            logits = self.forward_head(self.forward_features(x))  # every block in full
            return logits, [attn.attention for attn in attentions]
        finally:
            for attn in attentions:
                attn.keep_attention, attn.attention = False, None

    def resample_pos_embed(self, img_size):
        """Change the input image size in place: the patch grid becomes img_size / patch_size
        and pos_embed's patch part is resized to it (bicubic, as timm; the class token's entry
        is kept). Make the optimizer afterwards: pos_embed gets a new array."""
        patch_embed = self.patch_embed
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = patch_embed.patch_size
        if len(size) != 2 or min(size) < patch or size[0] % patch or size[1] % patch:
            raise ShapeError(f"image size {size} must be positive multiples of the patch size "
                             f"{patch}")
        grid = (size[0] // patch, size[1] // patch)
        if grid != patch_embed.grid_size:
            old = backend.to_numpy(self.pos_embed.data)
            new = resample_abs_pos_embed(old, grid, patch_embed.grid_size)
            self.pos_embed.data = backend.to_backend(new, self.pos_embed.backend)
            self.pos_embed.grad = None
        patch_embed.img_size, patch_embed.grid_size = size, grid
        patch_embed.num_patches = grid[0] * grid[1]
        self.config["img_size"] = img_size if isinstance(img_size, int) else list(size)
        return self

    def load_state_dict(self, state, strict=True):
        """Module.load_state_dict; strict, a state dict that does not fit is reported against
        timm's names (options minivit lacks named, hints for another image size or head)."""
        if strict:
            check_state_dict({name: tuple(p.shape) for name, p in self.named_parameters()},
                             state)
        return super().load_state_dict(state, strict)

    def extra_repr(self):
        return ", ".join(f"{key}={value}" for key, value in self.config.items())


# name -> VisionTransformer arguments. The ImageNet ones are timm's; the small-data ones fit the
# embedded 8x8 digits, 28x28 MNIST/Fashion-MNIST and 32x32 CIFAR.
MODEL_CONFIGS = {
    "vit_tiny_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12,
                                 num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12,
                                  num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                 num_heads=12),
    "vit_base_patch32_224": dict(img_size=224, patch_size=32, embed_dim=768, depth=12,
                                 num_heads=12),
    "vit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24,
                                  num_heads=16),
    "vit_huge_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32,
                                 num_heads=16),
    "vit_digits": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64,
                       depth=4, num_heads=4),
    "vit_mnist": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                      depth=6, num_heads=3),
    "vit_cifar": dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192,
                      depth=6, num_heads=3),
}
