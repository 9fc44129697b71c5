"""Vision Transformer models: named configurations, timm weights, trained runs."""

from minivit.models.pos_embed import resample_abs_pos_embed
from minivit.models.pretrained import (PretrainedWarning, checkpoint_num_classes, load_pretrained,
                                       read_state_dict, save_torch_weights)
from minivit.models.timm_keys import check_state_dict
from minivit.models.vit import (MODEL_CONFIGS, VisionTransformer, create_model, model_config,
                                model_from_checkpoint)

__all__ = ["MODEL_CONFIGS", "PretrainedWarning", "VisionTransformer", "check_state_dict",
           "checkpoint_num_classes", "create_model", "load_pretrained", "model_config",
           "model_from_checkpoint", "read_state_dict", "resample_abs_pos_embed",
           "save_torch_weights"]
