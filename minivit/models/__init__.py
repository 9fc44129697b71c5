"""The models minivit builds (the Vision Transformer and the Swin Transformer): named
configurations, timm weights, trained runs."""

from minivit.models.pos_embed import resample_abs_pos_embed
from minivit.models.pretrained import (PretrainedWarning, checkpoint_num_classes, load_pretrained,
                                       read_state_dict, save_torch_weights)
from minivit.models.registry import (ARCHITECTURES, MODEL_CONFIGS, create_model, model_class,
                                     model_config, model_from_checkpoint, model_from_config)
from minivit.models.swin import SwinTransformer
from minivit.models.timm_keys import check_state_dict
from minivit.models.vit import VisionTransformer

__all__ = ["ARCHITECTURES", "MODEL_CONFIGS", "PretrainedWarning", "SwinTransformer",
           "VisionTransformer", "check_state_dict", "checkpoint_num_classes", "create_model",
           "load_pretrained", "model_class", "model_config", "model_from_checkpoint",
           "model_from_config", "read_state_dict", "resample_abs_pos_embed", "save_torch_weights"]
