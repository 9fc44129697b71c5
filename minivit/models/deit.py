"""DeiT (Touvron et al. 2021) and DeiT-III (2022): named configurations of VisionTransformer.

A distilled DeiT adds timm's ``dist_token`` and ``head_dist`` (``distilled=True``); DeiT-III
adds the position embedding to the patches only (``no_embed_class``) and layer scale
(``init_values``). Parameter counts are timm's (see tests/test_family.py)."""

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_DEIT3 = dict(no_embed_class=True, init_values=1e-6)
_DIGITS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
               num_heads=4)

DEIT_CONFIGS = {
    "deit_tiny_patch16_224": dict(img_size=224, patch_size=16, **_TINY),
    "deit_small_patch16_224": dict(img_size=224, patch_size=16, **_SMALL),
    "deit_base_patch16_224": dict(img_size=224, patch_size=16, **_BASE),
    "deit_tiny_distilled_patch16_224": dict(img_size=224, patch_size=16, distilled=True, **_TINY),
    "deit_small_distilled_patch16_224": dict(img_size=224, patch_size=16, distilled=True,
                                             **_SMALL),
    "deit_base_distilled_patch16_224": dict(img_size=224, patch_size=16, distilled=True, **_BASE),
    "deit3_small_patch16_224": dict(img_size=224, patch_size=16, **_SMALL, **_DEIT3),
    "deit3_base_patch16_224": dict(img_size=224, patch_size=16, **_BASE, **_DEIT3),
    # the embedded 8x8 digits: vit_digits' size with each family's options
    "deit_digits": dict(distilled=True, **_DIGITS),
    "deit3_digits": dict(no_embed_class=True, init_values=1e-4, **_DIGITS),
}
