"""Format detection and conversion between OpenAI, OpenCLIP and Hugging Face CLIP checkpoints.

Formats:
  ``openai``         a TorchScript archive or plain state dict in OpenAI's key layout (text tower at
                     the root); the architecture is inferred from shapes, with QuickGELU as OpenAI's
                     weights use, unless a model name is given.
  ``open_clip``      any other OpenCLIP state dict or training checkpoint (wrapped, ``text.``-prefixed
                     towers, logit bias, ...); needs a model name when shapes cannot tell.
  ``open_clip_dir``  OpenCLIP's hub layout (``open_clip_config.json`` + weights).
  ``hf``             a transformers ``CLIPModel`` directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch

from ..config import CLIPConfig, PreprocessConfig
from .hf_clip import is_hf_clip_dir, load_hf_clip, read_hf_preprocess, save_hf_clip
from .io import CheckpointError, PathLike, is_torchscript_archive, read_checkpoint, save_torch
from .load import unwrap_state_dict
from .openai import infer_config
from .openclip_hub import build_with_weights, is_openclip_dir, load_openclip_dir, save_openclip_dir

FORMATS = ("hf", "open_clip_dir", "openai", "open_clip")
TARGETS = ("openai", "open_clip", "hf")
_HF_PREFIXES = ("text_model.", "vision_model.")
_TEXT_PREFIX = "text."


def _classify_file(path: Path) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(format, flat state dict) of a checkpoint file."""
    if is_torchscript_archive(path):
        return "openai", unwrap_state_dict(read_checkpoint(path))
    raw: Any = read_checkpoint(path)
    sd = unwrap_state_dict(raw)
    if any(k.startswith(_HF_PREFIXES) for k in sd):
        raise CheckpointError(f"{path}: holds transformers CLIPModel weights; pass the directory with its "
                              f"config.json instead of the weight file")
    flat = isinstance(raw, dict) and len(raw) == len(sd) and all(k in sd for k in raw)
    openai_layout = "text_projection" in sd and not any(k.startswith(_TEXT_PREFIX) for k in sd)
    return ("openai" if flat and openai_layout else "open_clip"), sd


def detect_format(path: PathLike) -> str:
    """One of ``FORMATS`` for a checkpoint file or directory; raises when it is none of them."""
    path = Path(path)
    if path.is_dir():
        if is_openclip_dir(path):
            return "open_clip_dir"
        if is_hf_clip_dir(path):
            return "hf"
        files = sorted(p.name for p in path.iterdir())
        raise CheckpointError(f"{path}: neither an OpenCLIP hub directory (open_clip_config.json) nor a "
                              f"transformers CLIP directory (config.json with model_type 'clip'); files: {files}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _classify_file(path)[0]


def _config_for(sd: Dict[str, torch.Tensor], model_name: Optional[str], fmt: str, path: Path) -> CLIPConfig:
    if model_name is not None:
        from ..models.registry import get_model_config
        return get_model_config(model_name)
    try:
        return infer_config(sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: an {fmt} checkpoint whose architecture cannot be inferred ({e}); "
                              f"pass a model name (see clipforge.list_models())") from None


def load_any(path: PathLike, model_name: Optional[str] = None):
    """(CLIP in eval mode, PreprocessConfig) from any supported checkpoint file or directory.

    ``model_name`` picks the architecture of a bare state dict; directories carry their own config.
    """
    model, preprocess, _ = _load_any(Path(path), model_name)
    return model, preprocess


def _load_any(path: Path, model_name: Optional[str]):
    if path.is_dir():
        fmt = detect_format(path)
        if fmt == "open_clip_dir":
            return (*load_openclip_dir(path), fmt)
        model = load_hf_clip(path)
        return model, read_hf_preprocess(path, model.cfg.vision_cfg.image_size), fmt
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    fmt, sd = _classify_file(path)
    cfg = _config_for(sd, model_name, fmt, path)
    return build_with_weights(cfg, sd, str(path)), PreprocessConfig(image_size=cfg.vision_cfg.image_size), fmt


def openai_state_dict(model) -> Dict[str, torch.Tensor]:
    """The model's weights in OpenAI's layout: text tower at the root, no ``text.`` prefix."""
    if getattr(model.cfg.text_cfg, "hf_model_name", None) or model.cfg.vision_cfg.timm_model_name:
        raise CheckpointError("OpenAI's layout has no place for timm / Hugging Face towers; convert to open_clip")
    sd = model.state_dict()
    return {(k[len(_TEXT_PREFIX):] if k.startswith(_TEXT_PREFIX) else k): v.detach().cpu() for k, v in sd.items()}


def convert(src: PathLike, dst: PathLike, to: str, model_name: Optional[str] = None) -> List[Path]:
    """Convert ``src`` (any of ``FORMATS``) to ``to`` at ``dst``; returns the files written.

    ``openai`` writes one state-dict file (atomically); ``open_clip`` and ``hf`` write directories.
    """
    return _convert(src, dst, to, model_name)[1]


def _convert(src: PathLike, dst: PathLike, to: str, model_name: Optional[str], verbose: bool = False):
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"refusing to convert {src} onto itself")
    if to == "openai" and dst.is_dir():
        raise ValueError(f"{dst} is a directory; the openai format is a single file (e.g. model.pt)")
    if to != "openai" and dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} is a file; the {to} format is a directory")
    model, preprocess, fmt = _load_any(src, model_name)
    if verbose:
        print(f"read {src} ({fmt})")
    if to == "openai":
        save_torch(openai_state_dict(model), dst)
        return model, [dst]
    if to == "open_clip":
        return model, save_openclip_dir(model, dst, preprocess)
    return model, save_hf_clip(model, dst, preprocess_cfg=preprocess)


def convert_main(src: str, dst: str, *, to: Literal["openai", "open_clip", "hf"],
                 model_name: Optional[str] = None) -> None:
    """Convert a CLIP checkpoint between OpenAI, OpenCLIP (file or hub directory) and Hugging Face formats.

    SRC is detected automatically; DST is a .pt file for --to openai, a directory otherwise.
    --model-name picks the architecture of a state dict whose shapes do not identify it.
    """
    model, written = _convert(src, dst, to, model_name, verbose=True)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if to == "openai" and not model.cfg.quick_gelu:
        print("note: OpenAI-layout files do not record the activation and this model uses GELU: load it "
              "with its model name (shape inference assumes OpenAI's QuickGELU)")
