"""The two-tower CLIP wrapper: it owns the towers and the logit scale/bias; losses live elsewhere."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig
from .modified_resnet import ModifiedResNet
from .text_transformer import TextTransformer
from .vision_transformer import VisionTransformer

TEXT_PREFIX = "text."


def _vit(cfg: CLIPConfig) -> nn.Module:
    return VisionTransformer(cfg.vision_cfg, cfg.embed_dim, cfg.quick_gelu)


def _resnet(cfg: CLIPConfig) -> nn.Module:
    return ModifiedResNet(cfg.vision_cfg, cfg.embed_dim, cfg.quick_gelu)


def _timm(cfg: CLIPConfig) -> nn.Module:
    from .timm_tower import TimmTower  # timm is optional: imported only when such a tower is built
    return TimmTower(cfg.vision_cfg, cfg.embed_dim)


def _transformer(cfg: CLIPConfig) -> nn.Module:
    return TextTransformer(cfg.text_cfg, cfg.embed_dim, cfg.quick_gelu)


def _hf(cfg: CLIPConfig) -> nn.Module:
    from .hf_text_tower import HFTextTower  # transformers is optional
    return HFTextTower(cfg.text_cfg, cfg.embed_dim)


# Tower kind (``VisionConfig.kind`` / ``TextConfig.kind``) -> builder of that tower from the whole config.
# A new tower family is one module plus one line here (and its kind in config.VISION_KINDS / TEXT_KINDS).
VISION_TOWERS: Dict[str, Callable[[CLIPConfig], nn.Module]] = {"vit": _vit, "resnet": _resnet, "timm": _timm}
TEXT_TOWERS: Dict[str, Callable[[CLIPConfig], nn.Module]] = {"transformer": _transformer, "hf": _hf}


def build_vision_tower(cfg: CLIPConfig) -> nn.Module:
    return VISION_TOWERS[cfg.vision_cfg.kind](cfg)


def build_text_tower(cfg: CLIPConfig) -> nn.Module:
    return TEXT_TOWERS[cfg.text_cfg.kind](cfg)


class TowerMethods:
    """What every model with ``visual`` and ``text`` towers offers the trainer (CLIP, CoCa, ...)."""

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

    def forward_intermediates(
            self,
            image: Optional[torch.Tensor] = None,
            text: Optional[torch.Tensor] = None,
            image_indices: Optional[Union[int, Sequence[int]]] = None,
            text_indices: Optional[Union[int, Sequence[int]]] = None,
            stop_early: bool = False,
            normalize: bool = True,
            normalize_intermediates: bool = False,
            intermediates_only: bool = False,
            image_output_fmt: str = "NCHW",
            image_output_extra_tokens: bool = False,
            text_output_fmt: str = "NLC",
            text_output_extra_tokens: bool = False,
            output_logits: bool = False,
            output_logit_scale_bias: bool = False,
    ) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
        """Per-block features of either or both towers, as OpenCLIP's ``CLIP.forward_intermediates``.

        Keys, in order: the image tower's (``image_intermediates``, ``image_intermediates_prefix``,
        ``image_features``), the text tower's (``text_intermediates_suffix``, ``text_intermediates``,
        ``text_features``), then ``image_logits``/``text_logits`` (``output_logits``, needs both
        inputs) and ``logit_scale``/``logit_bias`` (``output_logit_scale_bias``). ``normalize``
        L2-normalises the final features; ``intermediates_only`` turns off both it and the logits.
        Per tower, see its ``forward_intermediates``.

        As OpenCLIP: an OpenAI-layout text tower (``custom_text=False``) always runs all its blocks
        (``stop_early`` applies to the image tower only) and ignores the text format/extra-token
        options. Unlike OpenCLIP's CoCa, which does not implement them, a CoCa returns the
        contrastive logits here too.
        """
        output: Dict[str, Union[torch.Tensor, List[torch.Tensor]]] = {}
        if intermediates_only:
            normalize = output_logits = False
        if output_logits and (image is None or text is None):
            raise ValueError("output_logits needs both image and text inputs")
        if image is not None:
            image_output = self.visual.forward_intermediates(
                image, indices=image_indices, stop_early=stop_early, normalize_intermediates=normalize_intermediates,
                intermediates_only=intermediates_only, output_fmt=image_output_fmt,
                output_extra_tokens=image_output_extra_tokens)
            if normalize and "image_features" in image_output:
                image_output["image_features"] = F.normalize(image_output["image_features"], dim=-1)
            output.update(image_output)
        if text is not None:
            if not hasattr(self.text, "forward_intermediates"):
                raise ValueError(f"the {type(self.text).__name__} text tower has no forward_intermediates "
                                 f"(OpenCLIP has none for it either); pass only image")
            openai_layout = not self.cfg.custom_text
            text_output = self.text.forward_intermediates(
                text, indices=text_indices, stop_early=stop_early and not openai_layout,
                normalize_intermediates=normalize_intermediates, intermediates_only=intermediates_only,
                output_fmt="NLC" if openai_layout else text_output_fmt,
                output_extra_tokens=text_output_extra_tokens and not openai_layout)
            if normalize and "text_features" in text_output:
                text_output["text_features"] = F.normalize(text_output["text_features"], dim=-1)
            output.update(text_output)
        logit_scale = self.logit_scale.exp() if output_logits or output_logit_scale_bias else None
        if output_logits:
            image_logits = logit_scale * output["image_features"] @ output["text_features"].T
            if self.logit_bias is not None:
                image_logits = image_logits + self.logit_bias
            output["image_logits"] = image_logits
            output["text_logits"] = image_logits.T
        if output_logit_scale_bias:
            output["logit_scale"] = logit_scale
            if self.logit_bias is not None:
                output["logit_bias"] = self.logit_bias
        return output


class CLIP(TowerMethods, nn.Module):
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



# OpenAI's layout keeps the text tower at the root of the state dict; clipforge's modules keep it under
# "text.". These two functions are the one place that maps between the layouts (hooks and converters).
_NON_TEXT = ("visual.", "logit_scale", "logit_bias")


def text_keys_to_root(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """``{prefix}text.X`` -> ``{prefix}X`` (OpenAI layout); other keys unchanged. Order is kept."""
    inner = prefix + TEXT_PREFIX
    return {(prefix + k[len(inner):] if k.startswith(inner) else k): v for k, v in state_dict.items()}


def text_keys_from_root(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Root-level text keys under ``prefix`` (OpenAI layout) -> ``{prefix}text.X``; keys outside ``prefix``,
    the image tower, the logit scale/bias and keys already under ``text.`` are unchanged."""
    owned = tuple(prefix + n for n in (*_NON_TEXT, TEXT_PREFIX))
    return {(prefix + TEXT_PREFIX + k[len(prefix):] if k.startswith(prefix) and not k.startswith(owned) else k): v
            for k, v in state_dict.items()}


def _replace_in_place(state_dict: dict, new: dict) -> None:
    state_dict.clear()
    state_dict.update(new)


def _text_keys_to_root(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    _replace_in_place(state_dict, text_keys_to_root(state_dict, prefix))


def _text_keys_from_root(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    _replace_in_place(state_dict, text_keys_from_root(state_dict, prefix))
