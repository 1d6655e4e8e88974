"""OpenCLIP's Hugging Face Hub layout: ``open_clip_config.json`` next to the weights.

This is what ``open_clip.push_to_hf_hub`` uploads and what ``open_clip.create_model_and_transforms(
"local-dir:PATH")`` / ``"hf-hub:ORG/REPO"`` read: the config carries the full architecture
(``model_cfg``, OpenCLIP's model JSON) and the preprocessing (``preprocess_cfg``), so the
weights need no model name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

from ..atomic import atomic_directory
from ..config import CLIPConfig, PreprocessConfig
from ..tokenizer.hf_files import copy_hf_tokenizer, write_hf_tokenizer
from .hf_folder import is_model_folder, tokenizer_folder
from .io import CheckpointError, PathLike, read_checkpoint, save_safetensors, save_torch, write_text
from .load import build_with_weights

DESCRIPTION = "an OpenCLIP hub directory (open_clip_config.json)"
IS_DIRECTORY = True

CONFIG_NAME = "open_clip_config.json"
SAFETENSORS_NAME = "open_clip_model.safetensors"
TORCH_NAME = "open_clip_pytorch_model.bin"
# The weight files OpenCLIP itself looks for first, in its order of preference.
WEIGHT_NAMES = (SAFETENSORS_NAME, "open_clip_pytorch_model.safetensors", TORCH_NAME, "open_clip_pytorch_model.pth")
_VISION_CORE = ("image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size")
_TEXT_CORE = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")
_MULTIMODAL_CORE = ("context_length", "vocab_size", "width", "heads", "layers")
_PREPROCESS_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}


def is_openclip_dir(path: PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_openclip_config(path: PathLike) -> Tuple[CLIPConfig, PreprocessConfig]:
    """(architecture, preprocessing) from a directory's open_clip_config.json."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {path} is not an OpenCLIP hub directory")
    try:
        hub = json.loads(file.read_text())
        cfg = CLIPConfig.from_dict(hub["model_cfg"])
    except KeyError:
        raise CheckpointError(f"{file}: no 'model_cfg' entry (keys: {sorted(hub)})") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: invalid OpenCLIP config: {e}") from e
    # As OpenCLIP does: unknown preprocess keys and nulls are ignored; size defaults to the model's.
    given = {k: v for k, v in (hub.get("preprocess_cfg") or {}).items() if k in _PREPROCESS_KEYS and v is not None}
    preprocess = PreprocessConfig.from_dict({"size": cfg.vision_cfg.image_size, **given})
    return cfg, preprocess


def find_weights(path: PathLike) -> Path:
    path = Path(path)
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no OpenCLIP weights (looked for {', '.join(WEIGHT_NAMES)}); "
                          f"files: {sorted(p.name for p in path.iterdir())}")


def _explicit_model_cfg(cfg: CLIPConfig) -> dict:
    """OpenCLIP model JSON with the core sizes spelled out, as OpenCLIP's own configs do.

    ``to_dict`` omits defaults; writing them keeps the file exact even if a reader's defaults differ.
    """
    d = cfg.to_dict()
    towers = [("vision_cfg", _VISION_CORE), ("text_cfg", _TEXT_CORE)]
    if cfg.multimodal_cfg is not None:  # CoCa's decoder
        towers.append(("multimodal_cfg", _MULTIMODAL_CORE))
    for tower, names in towers:
        obj = getattr(cfg, tower)
        for name in names:
            value = getattr(obj, name)
            d[tower].setdefault(name, list(value) if isinstance(value, tuple) else value)
    return d


def load_openclip_dir(path: PathLike):
    """(CLIP in eval mode, PreprocessConfig) from an OpenCLIP hub-layout directory."""
    cfg, preprocess = read_openclip_config(path)
    weights = find_weights(path)
    return build_with_weights(cfg, read_checkpoint(weights), str(weights)), preprocess


def save_openclip_dir(model, path: PathLike, preprocess_cfg: Optional[PreprocessConfig] = None,
                      safetensors: bool = True, torch_bin: bool = False, tokenizer: bool = True) -> List[Path]:
    """Write ``model`` so ``open_clip.create_model_and_transforms("local-dir:" + path)`` loads it.

    ``preprocess_cfg`` defaults to CLIP's (OpenAI mean/std, bicubic) at the model's image size.
    ``tokenizer`` adds the tokenizer files, as ``open_clip.push_to_hf_hub`` uploads them: CLIP's BPE
    as transformers files, or a Hugging Face tokenizer read from a local folder (e.g. that of a
    converted transformers SigLIP); a tokenizer named on the Hub is left to the Hub.
    """
    path = Path(path)
    if not (safetensors or torch_bin):
        raise ValueError("choose at least one weight format (safetensors and/or torch_bin)")
    pp = preprocess_cfg or PreprocessConfig(image_size=model.cfg.vision_cfg.image_size)
    hub = {"model_cfg": _explicit_model_cfg(model.cfg), "preprocess_cfg": pp.to_dict()}
    text = json.dumps(hub, indent=2) + "\n"
    sd = model.state_dict()
    written = []
    hf_tokenizer = model.cfg.text_cfg.hf_tokenizer_name
    # Built in a temporary sibling and swapped in whole (clipforge.atomic): a reader sees the old folder
    # or the new one, never a mix. A tokenizer read from ``path`` itself is copied from the old folder.
    with atomic_directory(path, replaceable=is_model_folder) as tmp:
        if tokenizer and not hf_tokenizer:
            written += write_hf_tokenizer(tmp, model.cfg.text_cfg.context_length)
        elif tokenizer and tokenizer_folder(hf_tokenizer):
            written += copy_hf_tokenizer(hf_tokenizer, tmp)
        if safetensors:
            save_safetensors(sd, tmp / SAFETENSORS_NAME)
            written.append(tmp / SAFETENSORS_NAME)
        if torch_bin:
            save_torch({k: v.detach().cpu() for k, v in sd.items()}, tmp / TORCH_NAME)
            written.append(tmp / TORCH_NAME)
        write_text(tmp / CONFIG_NAME, text)
    return [path / CONFIG_NAME, *(path / f.name for f in written)]


# The format interface (see formats.py).
detect = is_openclip_dir
save = save_openclip_dir


def load(path: PathLike, model_name: Optional[str] = None):
    """(CLIP in eval mode, PreprocessConfig); the directory's own config gives the architecture."""
    return load_openclip_dir(path)

