"""The whole small models of the op catalogue: a ViT, a Swin, and the ViT family's options
(DeiT, DeiT III, BEiT, 2-D position embedding with average pooling, sin-cos without a class
token), each checked as logits w.r.t. the images and every parameter along random
directions. minivit.inspect.opchecks imports this module after its ops, so these checks come
last in OP_CHECKS."""

from functools import lru_cache

from minivit.inspect.opcheck_base import model_inputs, model_logits, model_slots, register

VIT_CONFIG = dict(depth=2, embed_dim=16, num_heads=2, drop_path_rate=0.0, drop_rate=0.0)
SWIN_CONFIG = dict(embed_dim=8, depths=(2, 1), num_heads=(2, 2), drop_path_rate=0.0)


@lru_cache(maxsize=None)
def _vit():
    """A small ViT in eval mode (no dropout) and its parameter slots (see model_slots)."""
    from minivit.models import create_model

    return model_slots(create_model("vit_digits", **VIT_CONFIG).eval())


@register("vit", "whole ViT (depth 2, dim 16, 2 heads, 8x8 images): logits w.r.t. images and "
          "every parameter, along random directions", full_check_limit=0, directions=4,
          whole_model=lambda rng: model_inputs(rng, _vit()[1]))
def _vit_logits(images, *parameters):
    return model_logits(_vit(), images, parameters)


@lru_cache(maxsize=None)
def _swin():
    """A small Swin in eval mode: an 8x8 map in four 4x4 windows (the second block shifted,
    with its mask), patch merging, then a 4x4 map in one window."""
    from minivit.models import create_model

    return model_slots(create_model("swin_digits", **SWIN_CONFIG).eval())


@register("swin", "whole Swin (8x8 map, 4x4 windows, shifted, patch merging, dim 8): logits "
          "w.r.t. images and every parameter, along random directions", full_check_limit=0,
          directions=4, whole_model=lambda rng: model_inputs(rng, _swin()[1]))
def _swin_logits(images, *parameters):
    return model_logits(_swin(), images, parameters)


# the ViT family's options, each in at least one small model: check name -> (model, options)
FAMILY_MODELS = {
    "deit": ("deit_digits", {}),  # distillation token and head, heads averaged
    "deit3": ("deit3_digits", {}),  # layer scale ls1/ls2, position embedding on patches only
    "beit": ("beit_digits", {}),  # relative position bias, q/v biases, gamma_1/2, mean pooling
    "vit_2d_avg": ("vit_digits", dict(pos_embed="2d", global_pool="avg", fc_norm=True)),
    "vit_sincos_no_class_token": ("vit_digits", dict(pos_embed="sincos", class_token=False,
                                                     global_pool="avg")),
}


@lru_cache(maxsize=None)
def _family_model(check):
    from minivit.models import create_model

    name, options = FAMILY_MODELS[check]
    return model_slots(create_model(name, **dict(VIT_CONFIG, **options)).eval())


def _register_family_model(check):
    name, options = FAMILY_MODELS[check]
    described = ", ".join([name] + [f"{k}={v!r}" for k, v in options.items()])
    register(check, f"whole {described} (depth 2, dim 16, 2 heads, 8x8 images): logits "
             "w.r.t. images and every parameter, along random directions",
             full_check_limit=0, directions=4,
             whole_model=lambda rng: model_inputs(rng, _family_model(check)[1]))(
        lambda images, *parameters: model_logits(_family_model(check), images, parameters))


for _check in FAMILY_MODELS:
    _register_family_model(_check)
