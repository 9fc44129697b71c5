"""The named models (ViT, DeiT, BEiT) and create_model, which takes timm's keyword arguments."""

from pathlib import Path

from minivit.checkpoint import find_checkpoint, read_checkpoint
from minivit.errors import MinivitError, WeightsError
from minivit.models.beit import BEIT_CONFIGS
from minivit.models.deit import DEIT_CONFIGS
from minivit.models.pretrained import load_pretrained
from minivit.models.vit import VisionTransformer


def _imagenet(patch_size, embed_dim, depth, num_heads):
    return dict(img_size=224, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads)


# The ImageNet ones are timm's; the small-data ones fit the embedded 8x8 digits, 28x28
# MNIST/Fashion-MNIST and 32x32 CIFAR.
VIT_CONFIGS = {
    "vit_tiny_patch16_224": _imagenet(16, 192, 12, 3),
    "vit_small_patch16_224": _imagenet(16, 384, 12, 6),
    "vit_base_patch16_224": _imagenet(16, 768, 12, 12),
    "vit_base_patch32_224": _imagenet(32, 768, 12, 12),
    "vit_large_patch16_224": _imagenet(16, 1024, 24, 16),
    "vit_huge_patch14_224": _imagenet(14, 1280, 32, 16),
    "vit_digits": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64,
                       depth=4, num_heads=4),
    "vit_mnist": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                      depth=6, num_heads=3),
    "vit_cifar": dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192,
                      depth=6, num_heads=3),
}

# name -> VisionTransformer arguments
MODEL_CONFIGS = {**VIT_CONFIGS, **DEIT_CONFIGS, **BEIT_CONFIGS}


def default_config():
    """VisionTransformer's arguments with their defaults."""
    defaults = VisionTransformer.__init__.__defaults__
    names = VisionTransformer.__init__.__code__.co_varnames[1:1 + len(defaults)]
    return dict(zip(names, defaults))


def model_config(name, **overrides):
    """The full VisionTransformer arguments of a named model, with overrides applied."""
    if name not in MODEL_CONFIGS:
        raise MinivitError(f"unknown model {name!r}; known models: {', '.join(MODEL_CONFIGS)}")
    config = default_config()
    config.update(MODEL_CONFIGS[name])
    unknown = set(overrides) - set(config)
    if unknown:
        raise MinivitError(f"unknown model options {sorted(unknown)}; known: {sorted(config)}")
    config.update(overrides)
    return config


def create_model(name, pretrained=None, **overrides):
    """A freshly initialised named model, e.g. create_model("deit_tiny_distilled_patch16_224",
    num_classes=10), with timm's keyword arguments (img_size, patch_size, embed_dim, depth,
    num_heads, global_pool, init_values, ...): the same call builds the same model as in timm.
    Seed with minivit.manual_seed for reproducible weights. pretrained=PATH (or a state dict)
    loads timm/minivit weights with minivit.models.load_pretrained (pos_embed resampled to
    img_size, head kept fresh when num_classes differs, with a warning); False or None: none."""
    model = VisionTransformer(**model_config(name, **overrides))
    if pretrained is not None and pretrained is not False:
        load_pretrained(model, pretrained)
    return model


def model_from_checkpoint(path):
    """(model, info): a VisionTransformer rebuilt from a checkpoint's configuration (every
    option of the family), weights loaded, in eval mode, on the current backend."""
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path)
    model_state, _, info = read_checkpoint(path)
    if "method" in info:  # minivit pretrain's: an encoder (and decoder or heads), no classifier
        raise WeightsError(f"{path} is a {info['method']} pretraining checkpoint, not a "
                           f"classifier: `minivit probe {path.parent}` measures its encoder, "
                           f"`minivit train --init {path.parent}` fine-tunes it")
    model = VisionTransformer(**info["model_config"])
    model.load_state_dict(model_state)
    return model.eval(), info
