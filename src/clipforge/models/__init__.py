"""CLIP towers, the two-tower wrapper, CoCa, and the table that builds a model from its config."""
from typing import Callable, Dict

from torch import nn

from ..config import CLIPConfig
from .clip import CLIP
from .coca import CoCa
from .modified_resnet import ModifiedResNet
from .registry import add_model_config, get_model_config, list_models
from .text_transformer import TextTransformer
from .vision_transformer import VisionTransformer

# ``CLIPConfig.model_kind`` -> the model class built from that config. A new family is one line here.
MODEL_CLASSES: Dict[str, Callable[[CLIPConfig], nn.Module]] = {"clip": CLIP, "coca": CoCa}


def build_model(cfg: CLIPConfig) -> nn.Module:
    """The (randomly initialised) model ``cfg`` describes: a CLIP, or a CoCa when it has a decoder."""
    return MODEL_CLASSES[cfg.model_kind](cfg)


__all__ = ["CLIP", "CoCa", "MODEL_CLASSES", "ModifiedResNet", "TextTransformer", "VisionTransformer",
           "add_model_config", "build_model", "get_model_config", "list_models"]
