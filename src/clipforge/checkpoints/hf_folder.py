"""What every transformers model folder shares: config.json, weight files, preprocessor_config.json.

Used by each transformers format (``hf_clip``, ``hf_siglip``), so the weight files are found in one
order, transformers' own: ``model.safetensors``, its sharded index, ``pytorch_model.bin``, its index.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..config import PreprocessConfig
from .io import CheckpointError, PathLike, read_checkpoint, write_text
from .load import unwrap_state_dict

# transformers' order of preference (modeling_utils, use_safetensors unset); ".index.json" files are
# sharded checkpoints: {"weight_map": {key: shard file}}.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes used by transformers' image processors
PREPROCESSOR_FILE = "preprocessor_config.json"


def model_type(path: PathLike) -> Optional[str]:
    """``model_type`` of the folder's config.json; None when there is no readable one."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (ValueError, AttributeError):  # not JSON / not an object
        return None


def read_config(path: PathLike, what: str) -> dict:
    """The folder's config.json; raises naming the folder's files when it is missing."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        files = sorted(p.name for p in path.iterdir()) if path.is_dir() else "not a directory"
        raise CheckpointError(f"{config}: missing; {path} is not a {what} directory (files: {files})")
    return json.loads(config.read_text())


def read_hf_weights(path: PathLike) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, the file it came from) of a transformers folder, in transformers' file precedence."""
    path = Path(path)
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            sd: Dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(file.read_text())["weight_map"].values())):
                sd.update(unwrap_state_dict(read_checkpoint(path / shard)))
            return sd, str(file)
        return unwrap_state_dict(read_checkpoint(file)), str(file)
    files = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"{path}: no transformers weights ({', '.join(WEIGHT_FILES)}); files: {files}")


def read_image_processor(path: PathLike, default: PreprocessConfig) -> PreprocessConfig:
    """preprocessor_config.json (a transformers image processor) as a PreprocessConfig; ``default`` when absent.

    Fields the file leaves out come from ``default`` (which also says whether a missing
    ``do_center_crop`` means a crop: CLIP's processor crops, SigLIP's squashes).
    """
    file = Path(path) / PREPROCESSOR_FILE
    if not file.is_file():
        return default
    p = json.loads(file.read_text())
    size, crop = p.get("size") or {}, p.get("crop_size") or {}
    squash = "shortest_edge" not in size and not p.get("do_center_crop", default.resize_mode != "squash")
    box = size if squash else crop
    fallback = default.image_size if isinstance(default.image_size, int) else default.image_size[0]
    h, w = box.get("height", fallback), box.get("width", fallback)
    return PreprocessConfig(image_size=h if h == w else (h, w), resize_mode="squash" if squash else "shortest",
                            interpolation=RESAMPLE.get(p.get("resample", 3), "bicubic"),
                            mean=tuple(p.get("image_mean", default.mean)), std=tuple(p.get("image_std", default.std)))


def image_processor_config(pp: PreprocessConfig, image_processor_type: str, processor_class: str,
                           can_crop: bool) -> dict:
    """``pp`` as a transformers image processor config; raises naming what the processor cannot express.

    ``can_crop``: the processor resizes the shortest side and centre-crops (CLIP's) besides squashing
    to a fixed size; without it (SigLIP's) only ``resize_mode='squash'`` is expressible.
    """
    h, w = (pp.image_size, pp.image_size) if isinstance(pp.image_size, int) else pp.image_size
    resample = {name: code for code, name in RESAMPLE.items()}
    modes = ("shortest", "squash") if can_crop else ("squash",)
    if pp.resize_mode not in modes or pp.interpolation not in resample:
        raise CheckpointError(f"{image_processor_type} cannot express resize_mode={pp.resize_mode!r}, "
                              f"interpolation={pp.interpolation!r} (it knows resize modes {list(modes)}, "
                              f"interpolations {sorted(resample)})")
    squash = pp.resize_mode == "squash"
    out = {"image_processor_type": image_processor_type, "processor_class": processor_class, "do_resize": True,
           "size": {"height": h, "width": w} if squash else {"shortest_edge": min(h, w)},
           "resample": resample[pp.interpolation]}
    if can_crop:
        out.update(do_center_crop=not squash, crop_size={"height": h, "width": w})
    out.update(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(pp.mean),
               image_std=list(pp.std), do_convert_rgb=True)
    return out


def write_json(file: Path, obj) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return write_text(file, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# A folder holding one of these is a model folder a save may replace as a whole (see ``atomic_directory``).
MODEL_FOLDER_MARKERS = ("config.json", "open_clip_config.json")


def is_model_folder(path: PathLike) -> bool:
    """Whether ``path`` is a model folder (transformers' or OpenCLIP's), which a new save may replace."""
    return any((Path(path) / name).is_file() for name in MODEL_FOLDER_MARKERS)


def has_tokenizer(path: PathLike) -> bool:
    """Whether the folder holds transformers tokenizer files."""
    return any((Path(path) / n).is_file() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def tokenizer_folder(name: Optional[str]) -> Optional[Path]:
    """``hf_tokenizer_name`` when it is a local folder with tokenizer files (those can be copied)."""
    return Path(name) if name and Path(name).is_dir() and has_tokenizer(name) else None

