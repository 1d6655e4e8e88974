"""The two-tower CLIP wrapper: it owns the towers and the logit scale/bias; losses live elsewhere."""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig
from .modified_resnet import ModifiedResNet
from .text_transformer import TextTransformer
from .vision_transformer import VisionTransformer

TEXT_PREFIX = "text."


def build_vision_tower(cfg: CLIPConfig) -> nn.Module:
    vision = cfg.vision_cfg
    if vision.timm_model_name:
        from .timm_tower import TimmTower
        return TimmTower(vision, cfg.embed_dim)
    if vision.is_resnet:
        return ModifiedResNet(vision, cfg.embed_dim, cfg.quick_gelu)
    return VisionTransformer(vision, cfg.embed_dim, cfg.quick_gelu)


def build_text_tower(cfg: CLIPConfig) -> nn.Module:
    text = cfg.text_cfg
    if text.hf_model_name:
        from .hf_text_tower import HFTextTower
        return HFTextTower(text, cfg.embed_dim)
    return TextTransformer(text, cfg.embed_dim, cfg.quick_gelu)


class CLIP(nn.Module):
    """Image and text towers mapped into one embedding space.

    The text tower is always ``self.text``. For OpenAI-layout models (``custom_text=False``) its
    state-dict keys are written and read at the root (``token_embedding.weight``,
    ``transformer.resblocks.0...``, ``text_projection``), as in OpenAI and OpenCLIP checkpoints.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_vision_tower(cfg)
        self.text = build_text_tower(cfg)
        shape = [1] if cfg.nonscalar_logit_scale else []
        init_scale = cfg.init_logit_scale if cfg.init_logit_scale is not None else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.full(shape, float(init_scale)))
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full(shape, float(cfg.init_logit_bias)))
        else:
            self.logit_bias = None
        if not cfg.custom_text:
            self._register_state_dict_hook(_text_keys_to_root)
            self._register_load_state_dict_pre_hook(_text_keys_from_root, with_module=True)

    @property
    def context_length(self) -> int:
        return self.cfg.text_cfg.context_length

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        if isinstance(features, tuple):
            features = features[0]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)
        if isinstance(features, tuple):
            features = features[0]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None) -> Dict[str, Optional[torch.Tensor]]:
        out: Dict[str, Optional[torch.Tensor]] = {
            "image_features": self.encode_image(image, normalize=True) if image is not None else None,
            "text_features": self.encode_text(text, normalize=True) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def get_logits(self, image: torch.Tensor, text: torch.Tensor):
        """(image→text logits [Bi, Bt], text→image logits [Bt, Bi]) with scale and bias applied."""
        out = self(image, text)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        self.visual.lock(unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        self.text.lock(unlocked_layers)

    def no_weight_decay(self) -> set:
        names = {"logit_scale", "logit_bias"}
        names |= {"visual." + n for n in self.visual.no_weight_decay()}
        names |= {"text." + n for n in self.text.no_weight_decay()}
        return names


def _text_keys_to_root(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + TEXT_PREFIX)]:
        state_dict[prefix + key[len(prefix) + len(TEXT_PREFIX):]] = state_dict.pop(key)


def _text_keys_from_root(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    owned = (prefix + "visual.", prefix + "logit_scale", prefix + "logit_bias", prefix + TEXT_PREFIX)
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(owned)]:
        state_dict[prefix + TEXT_PREFIX + key[len(prefix):]] = state_dict.pop(key)
