"""Helpers shared by the pretrained-weights tests (tests/test_pretrained_*.py): a small ViT."""

import minivit
from minivit.models import VisionTransformer

SMALL = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=1,
             num_heads=2)


def small_model(seed=0, **overrides):
    minivit.manual_seed(seed)
    return VisionTransformer(**dict(SMALL, **overrides))

