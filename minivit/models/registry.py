"""The named models of every architecture, and building a model from a name, a configuration
or a checkpoint: the Vision Transformer family (minivit.models.vit; ViT, DeiT and DeiT-III in
deit.py, BEiT in beit.py) and the Swin Transformer (minivit.models.swin). create_model takes
timm's keyword arguments."""


from minivit.checkpoint import checkpoint_path, read_checkpoint_parts
from minivit.ema import EMA_PREFIX
from minivit.errors import MinivitError, PretrainingCheckpointError, WeightsError
from minivit.models import swin
from minivit.models.beit import BEIT_CONFIGS
from minivit.models.deit import DEIT_CONFIGS
from minivit.models.pretrained import load_pretrained
from minivit.models.swin import SwinTransformer
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

# architecture class -> its named configurations
ARCHITECTURES = {VisionTransformer: {**VIT_CONFIGS, **DEIT_CONFIGS, **BEIT_CONFIGS},
                 SwinTransformer: swin.MODEL_CONFIGS}
MODEL_CONFIGS = {name: args for configs in ARCHITECTURES.values() for name, args in configs.items()}


def model_class(name_or_config):
    """The architecture of a model name, or of a configuration (a Swin one has `depths`)."""
    if isinstance(name_or_config, str):
        for cls, configs in ARCHITECTURES.items():
            if name_or_config in configs:
                return cls
        raise MinivitError(f"unknown model {name_or_config!r}; known models: "
                           f"{', '.join(MODEL_CONFIGS)}")
    return SwinTransformer if "depths" in name_or_config else VisionTransformer


def model_config(name, **overrides):
    """The full constructor arguments of a named model, with overrides applied."""
    cls = model_class(name)
    defaults = cls.__init__.__defaults__
    names = cls.__init__.__code__.co_varnames[1:1 + len(defaults)]
    config = dict(zip(names, defaults))
    config.update(MODEL_CONFIGS[name])
    unknown = set(overrides) - set(config)
    if unknown:
        raise MinivitError(f"unknown model options {sorted(unknown)} for {name}; known: "
                           f"{sorted(config)}")
    config.update(overrides)
    return config


def model_from_config(config):
    """A freshly initialised model of a configuration (a model's .config, a checkpoint's)."""
    return model_class(config)(**config)


def create_model(name, pretrained=None, **overrides):
    """A freshly initialised named model, e.g. create_model("vit_base_patch16_224",
    num_classes=10) or create_model("swin_tiny_patch4_window7_224", img_size=448). Seed with
    minivit.manual_seed for reproducible weights. pretrained=PATH (or a state dict) loads
    timm/minivit weights with minivit.models.load_pretrained (a ViT's pos_embed resampled to
    img_size, the head kept fresh when num_classes differs, with a warning)."""
    model = model_from_config(model_config(name, **overrides))
    if pretrained is not None and pretrained is not False:
        load_pretrained(model, pretrained)
    return model


def model_from_checkpoint(path, ema=False):
    """(model, info): the model (ViT or Swin) rebuilt from a checkpoint's configuration,
    weights loaded (with ema=True, the moving average of the weights), in eval mode, on the
    current backend."""
    path = checkpoint_path(path)
    model_state, _, ema_arrays, info = read_checkpoint_parts(path)
    if "method" in info:  # minivit pretrain's: an encoder (and decoder or heads), no classifier
        raise PretrainingCheckpointError(
            f"{path} is a {info['method']} pretraining checkpoint, not a classifier: `minivit "
            f"probe {path.parent}` measures its encoder, `minivit train --init {path.parent}` "
            f"fine-tunes it")
    if ema:
        if not ema_arrays:
            raise WeightsError(f"{path} holds no averaged weights (ema.*): its run was trained "
                               f"without --ema; leave out --ema to use its weights")
        model_state = {k[len(EMA_PREFIX):]: v for k, v in ema_arrays.items()}
    model = model_from_config(info["model_config"])
    model.load_state_dict(model_state)
    return model.eval(), info
