"""Vision Transformer models (ViT, DeiT, BEiT as options of one family) and their names."""

from minivit.models.registry import MODEL_CONFIGS, create_model, default_config, model_config
from minivit.models.vit import VisionTransformer

__all__ = ["MODEL_CONFIGS", "VisionTransformer", "create_model", "default_config",
           "model_config"]
