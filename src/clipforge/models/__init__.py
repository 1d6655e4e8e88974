"""CLIP towers and the two-tower wrapper."""
from .clip import CLIP
from .modified_resnet import ModifiedResNet
from .registry import add_model_config, get_model_config, list_models
from .text_transformer import TextTransformer
from .vision_transformer import VisionTransformer

__all__ = ["CLIP", "ModifiedResNet", "TextTransformer", "VisionTransformer",
           "add_model_config", "get_model_config", "list_models"]
