"""timm's Vision Transformer in plain PyTorch: the reference minivit is checked and timed against.

``reference_vit(config)`` builds timm's ``VisionTransformer`` with its defaults (Conv2d patch
embedding, class token, learned absolute position embedding, pre-norm blocks with LayerNorm
eps 1e-6, fused qkv, ``F.scaled_dot_product_attention`` as timm uses, exact GELU, final norm,
linear head on the class token) from a minivit ``model.config`` dict. Its ``state_dict()``
keys and shapes are exactly timm's and minivit's, so weights move between the three by name.
It is written out here so that the parity tests need torch but not timm; ``minivit bench
--against torch`` runs the same model. A Swin's reference is timm's own (``reference_swin``).

PyTorch is an optional extra (``minivit[parity]``): it is imported when a reference is first
built, never when this module is imported.
"""

import functools
import types

from minivit.errors import MinivitError

# the VisionTransformer arguments the reference takes (dropout rates are left out: the
# reference is deterministic)
ARCHITECTURE_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                     "num_heads", "mlp_ratio", "qkv_bias")


def import_torch(purpose="the PyTorch reference", instead="leave it out"):
    """Import PyTorch, or raise a MinivitError that says how to get it."""
    try:
        import torch
    except ImportError as error:
        raise MinivitError(f"{purpose} needs PyTorch, which is not installed ({error}): "
                           f"pip install torch (or 'minivit[parity]'), or {instead}") from None
    return torch


def reference_vit(config):
    """A reference ViT (a torch.nn.Module, float32, on the CPU) with the architecture of a
    minivit model configuration; other keys of the dict (drop rates) are ignored."""
    return _modules().ReferenceViT(**{k: config[k] for k in ARCHITECTURE_KEYS if k in config})


def reference_swin(config):
    """timm's own SwinTransformer (float32, CPU, without stochastic depth) of a minivit Swin
    configuration: minivit's Swin has its names and computation. Needs timm."""
    import_torch("the PyTorch reference Swin")
    try:
        from timm.models.swin_transformer import SwinTransformer
    except ImportError as error:
        raise MinivitError(f"the reference Swin is timm's SwinTransformer, and timm is not "
                           f"installed ({error}): pip install timm (or 'minivit[parity]')") from None
    return SwinTransformer(**dict(config, drop_path_rate=0.0))


def reference_layers():
    """The reference's torch.nn.Module classes (PatchEmbed, Block, ReferenceViT), for PyTorch
    twins of other reference models built from timm's blocks (tests/reference_ssl.py)."""
    return _modules()


def resample_pos_embed_torch(pos_embed, new_grid, old_grid, num_prefix_tokens=1):
    """timm's resample_abs_pos_embed on a torch tensor: the patch part as a (1, D, H, W) grid
    through torch.nn.functional.interpolate(mode="bicubic", align_corners=False)."""
    torch = import_torch()
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=tuple(new_grid), mode="bicubic",
                                           align_corners=False, antialias=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, patches], dim=1)


@functools.cache
def _modules():
    """The reference's torch.nn.Module classes, defined once torch is imported."""
    torch = import_torch()
    nn, functional = torch.nn, torch.nn.functional

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim):
            super().__init__()
            self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)

    class Attention(nn.Module):
        def __init__(self, dim, num_heads, qkv_bias):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            batch, tokens, dim = x.shape
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            x = functional.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d) v
            return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(functional.gelu(self.fc1(x)))  # exact erf GELU

    class Block(nn.Module):
        def __init__(self, dim, num_heads, mlp_ratio, qkv_bias):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads,
                                                                           qkv_bias)
            self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ReferenceViT(nn.Module):
        """timm's VisionTransformer (class-token pooling), minivit's constructor arguments."""

        def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                     embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True):
            super().__init__()
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(
                torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
            self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
                                          for _ in range(depth)])
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        def forward_features(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.norm(self.blocks(x))

        def forward(self, x):
            return self.head(self.forward_features(x)[:, 0])

    return types.SimpleNamespace(ReferenceViT=ReferenceViT, Block=Block, PatchEmbed=PatchEmbed)
