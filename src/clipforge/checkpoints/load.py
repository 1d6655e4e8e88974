"""Loading OpenCLIP / OpenAI state dicts into clipforge models, with errors that name the keys.

``build_with_weights`` is the one strict builder every format's reader ends in.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, Mapping

import torch
from torch import nn

from ..config import CLIPConfig
from ..models import build_model
from ..models.clip import text_keys_from_root, text_keys_to_root
from ..models.pos_embed import resample_1d_pos_embed, resample_grid_pos_embed
from .io import CheckpointError, read_checkpoint

# Where training frameworks nest the weights inside a checkpoint dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Scalars OpenAI's TorchScript archives keep next to the weights.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
# Buffers that other implementations persist but clipforge derives (the causal mask).
_DERIVED_KEYS = ("attn_mask", "text.attn_mask")


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Reduce a loaded checkpoint to a flat {key: tensor} dict in OpenCLIP naming."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"no tensors found in checkpoint; top-level keys: {sorted(obj)[:10]}")
        obj = inner
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor) or key in OPENAI_META_KEYS or key in _DERIVED_KEYS:
            continue
        for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = value
    return state_dict


def adapt_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fit a foreign state dict to ``model``: text-key layout, dtypes, resized positional embeddings."""
    target = model.state_dict()
    sd = dict(state_dict)
    custom_text = getattr(getattr(model, "cfg", None), "custom_text", False)
    if custom_text and "text_projection" in sd:  # OpenAI layout into a text.-prefixed model
        sd = text_keys_from_root(sd)
    elif not custom_text:
        sd = text_keys_to_root(sd)

    pos_key = "visual.positional_embedding"
    grid = getattr(getattr(model, "visual", None), "grid_size", None)
    if pos_key in sd and pos_key in target and sd[pos_key].shape != target[pos_key].shape and grid:
        sd[pos_key] = resample_grid_pos_embed(sd[pos_key], grid)
    text_pos = "text.positional_embedding" if custom_text else "positional_embedding"
    if text_pos in sd and text_pos in target and sd[text_pos].shape[0] != target[text_pos].shape[0]:
        sd[text_pos] = resample_1d_pos_embed(sd[text_pos], target[text_pos].shape[0])

    for key, value in sd.items():
        if key in target and value.is_floating_point() and value.dtype != target[key].dtype:
            sd[key] = value.to(target[key].dtype)  # OpenAI files store most weights in fp16
    return sd


def describe_mismatch(model_keys: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], limit: int = 5) -> str:
    missing = [k for k in model_keys if k not in sd]
    unexpected = [k for k in sd if k not in model_keys]
    misshaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_keys[k].shape)}"
                 for k in model_keys if k in sd and sd[k].shape != model_keys[k].shape]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_state_dict_into(model: nn.Module, checkpoint: Any, strict: bool = True, source: str = "checkpoint") -> nn.Module:
    """Load a path, a loaded object or a state dict into ``model``; raises naming the first bad keys."""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        source = str(checkpoint)
        checkpoint = read_checkpoint(checkpoint)
    sd = adapt_state_dict(unwrap_state_dict(checkpoint), model)
    target = model.state_dict()
    problems = describe_mismatch(target, sd)
    shape_problem = any(k in sd and sd[k].shape != v.shape for k, v in target.items())
    if problems and (strict or shape_problem):
        raise CheckpointError(f"{source} does not fit the model: {problems}")
    model.load_state_dict(sd, strict=strict)
    return model


def without_tower_downloads(cfg: CLIPConfig) -> CLIPConfig:
    """``cfg`` with a Hugging Face text tower built from its config alone: the checkpoint holds its
    weights (OpenCLIP's factory does the same whenever a checkpoint is loaded)."""
    if cfg.text_cfg.kind != "hf" or not cfg.text_cfg.hf_model_pretrained:
        return cfg
    return dataclasses.replace(cfg, text_cfg=dataclasses.replace(cfg.text_cfg, hf_model_pretrained=False))


def build_with_weights(cfg: CLIPConfig, checkpoint: Any, source: str):
    """``build_model(cfg)`` (a CLIP or CoCa) holding ``checkpoint``'s weights (strictly), in eval mode.

    The model is built on the meta device and the weights assigned, skipping a random init that
    costs more than reading the file for large models; towers with state outside the state dict
    (left on meta) are rebuilt normally.
    """
    cfg = without_tower_downloads(cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    sd = adapt_state_dict(unwrap_state_dict(checkpoint), model)
    problems = describe_mismatch(model.state_dict(), sd)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: {problems}")
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = load_state_dict_into(build_model(cfg), sd, strict=True, source=source)
    return model.eval()
