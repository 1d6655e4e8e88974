"""The public entry points: build a model (optionally with weights), its transforms and tokenizer."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .checkpoints import infer_config, load_state_dict_into, read_checkpoint, unwrap_state_dict
from .config import CLIPConfig, PreprocessConfig
from .models.clip import CLIP
from .models.registry import get_model_config

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _resolve_config(model_name: Union[str, CLIPConfig, None], checkpoint_sd: Optional[dict]) -> CLIPConfig:
    if isinstance(model_name, CLIPConfig):
        return dataclasses.replace(model_name)
    if model_name is None:
        if checkpoint_sd is None:
            raise ValueError("give a model name (see clipforge.list_models()) or a checkpoint to infer it from")
        return infer_config(checkpoint_sd)
    return get_model_config(model_name)


def create_model(
    model_name: Union[str, CLIPConfig, None],
    pretrained: Optional[Union[str, Path]] = None,
    precision: str = "fp32",
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> CLIP:
    """Build the architecture ``model_name`` and load ``pretrained`` weights (a file path) into it.

    With ``model_name=None`` the architecture is inferred from an OpenAI/OpenCLIP checkpoint's shapes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    state_dict = None
    if pretrained is not None:
        state_dict = unwrap_state_dict(read_checkpoint(pretrained))
    cfg = _resolve_config(model_name, state_dict)
    model = CLIP(cfg)
    if state_dict is not None:
        load_state_dict_into(model, state_dict, strict=strict, source=str(pretrained))
    model.to(device=device, dtype=PRECISIONS[precision])
    if pretrained is not None:
        model.eval()
    return model


def preprocess_config(model: CLIP) -> PreprocessConfig:
    return PreprocessConfig(image_size=model.cfg.vision_cfg.image_size)


def create_model_and_transforms(
    model_name: Union[str, CLIPConfig, None],
    pretrained: Optional[Union[str, Path]] = None,
    precision: str = "fp32",
    device: Union[str, torch.device] = "cpu",
    preprocess: Optional[PreprocessConfig] = None,
    strict: bool = True,
):
    """(model, train transform, eval transform), as ``open_clip.create_model_and_transforms``."""
    from .transforms import image_transform

    model = create_model(model_name, pretrained, precision=precision, device=device, strict=strict)
    pp = preprocess or preprocess_config(model)
    return model, image_transform(pp, is_train=True), image_transform(pp, is_train=False)


def get_tokenizer(model_name: Union[str, CLIPConfig, None] = None, context_length: Optional[int] = None):
    """The tokenizer a model was trained with: CLIP BPE, or a Hugging Face tokenizer by name."""
    from .tokenizer import CLIPTokenizer, HFTokenizer

    cfg = _resolve_config(model_name, None) if model_name is not None else CLIPConfig()
    text = cfg.text_cfg
    length = context_length or text.context_length
    if text.hf_tokenizer_name:
        return HFTokenizer(text.hf_tokenizer_name, context_length=length, tokenizer_mode=text.tokenizer_mode,
                           **(text.tokenizer_kwargs or {}))
    return CLIPTokenizer(context_length=length)


def load_model_config_and_state(path: Union[str, Path]) -> Tuple[CLIPConfig, dict]:
    """Read a checkpoint and infer its architecture (for tools that convert files without a name)."""
    sd = unwrap_state_dict(read_checkpoint(path))
    return infer_config(sd), sd
