"""Vision Transformer models and their named configurations."""

from minivit.models.vit import MODEL_CONFIGS, VisionTransformer, create_model, model_config

__all__ = ["MODEL_CONFIGS", "VisionTransformer", "create_model", "model_config"]
