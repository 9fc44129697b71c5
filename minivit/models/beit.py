"""BEiT (Bao et al. 2021) as a named configuration of VisionTransformer: timm's ``Beit``.

No absolute position embedding; every block has its own relative position bias table (BEiT's
layout: (2H−1)(2W−1) patch offsets + 3 entries for the class token), q and v biases without a
k bias (``attn.q_bias``, ``attn.v_bias``), layer scale ``gamma_1``/``gamma_2``; the patch
tokens are mean-pooled and normed (``fc_norm``) before the head."""

_BEIT = dict(pos_embed="none", rel_pos_bias=True, beit=True, global_pool="avg")

BEIT_CONFIGS = {
    "beit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                  num_heads=12, init_values=0.1, **_BEIT),
    "beit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24,
                                   num_heads=16, init_values=1e-5, **_BEIT),
    "beit_digits": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64,
                        depth=4, num_heads=4, init_values=0.1, **_BEIT),
}
