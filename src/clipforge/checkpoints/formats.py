"""The registry of checkpoint formats: a new format is one module plus one line in ``FORMATS``.

A format module offers

* ``DESCRIPTION`` (what it looks like, for error messages) and ``IS_DIRECTORY`` (a folder or one file);
* ``detect(path) -> bool``: whether ``path`` is in this format (cheap: configs and keys, not weights);
* ``load(path, model_name=None) -> (CLIP in eval mode, PreprocessConfig)``; ``model_name`` picks the
  architecture of formats that do not carry one (directories carry their own and ignore it);
* ``save(model, path, preprocess_cfg=None) -> List[Path]``: the files written;
* optionally ``notes(model) -> List[str]``: what a reader of the written files must know.

Formats are tried in registry order, so each ``detect`` only has to tell its format from the others.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Dict, List, Literal, Optional, Tuple

from ..config import PreprocessConfig
from . import hf_clip, hf_siglip, openai, openclip_file, openclip_hub
from .io import CheckpointError, PathLike

FORMATS: Dict[str, ModuleType] = {
    "openai": openai,  # OpenAI's layout (TorchScript or state dict, text tower at the root)
    "open_clip": openclip_file,  # any other OpenCLIP state dict / training checkpoint (after openai)
    "open_clip_dir": openclip_hub,  # OpenCLIP's hub layout: open_clip_config.json + weights
    "hf": hf_clip,  # transformers CLIPModel
    "hf_siglip": hf_siglip,  # transformers SiglipModel
}
FormatName = Literal[tuple(FORMATS)]  # the registry's names, for typed signatures (the CLI's --to)


def detect_format(path: PathLike) -> str:
    """The name in ``FORMATS`` of a checkpoint file or directory; raises when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    candidates = {name: fmt for name, fmt in FORMATS.items() if fmt.IS_DIRECTORY == path.is_dir()}
    for name, fmt in candidates.items():
        if fmt.detect(path):
            return name
    what = " nor ".join(fmt.DESCRIPTION for fmt in candidates.values())
    files = f"; files: {sorted(p.name for p in path.iterdir())}" if path.is_dir() else ""
    raise CheckpointError(f"{path}: neither {what}{files}")


def load_any(path: PathLike, model_name: Optional[str] = None) -> Tuple[object, PreprocessConfig]:
    """(CLIP in eval mode, PreprocessConfig) from a checkpoint in any registered format.

    ``model_name`` picks the architecture of a bare state dict; directories carry their own config.
    """
    model, preprocess, _ = load_detected(path, model_name)
    return model, preprocess


def load_detected(path: PathLike, model_name: Optional[str] = None) -> Tuple[object, PreprocessConfig, str]:
    """(model, preprocessing, format name) from a checkpoint in any registered format."""
    name = detect_format(path)
    model, preprocess = FORMATS[name].load(Path(path), model_name)
    return model, preprocess, name


def format_notes(name: str, model) -> List[str]:
    """The format's notes on ``model`` written in it (empty for formats without any)."""
    notes = getattr(FORMATS[name], "notes", None)
    return notes(model) if notes is not None else []
