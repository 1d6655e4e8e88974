"""The ``open_clip`` format: one OpenCLIP state-dict file (``model.pt``, ``epoch_N.pt``, ``.safetensors``).

Whatever OpenCLIP's ``torch.save(model.state_dict())`` or its trainer writes: wrapped training
checkpoints (``state_dict``, ``module.``), ``text.``-prefixed towers, logit bias. The file carries no
architecture: a model name picks it, or it is inferred from shapes when they are OpenAI's.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..config import PreprocessConfig
from .io import PathLike, save_safetensors, save_torch
from .openai import file_layout, load_state_dict_file

DESCRIPTION = "an OpenCLIP state dict or training checkpoint file"
IS_DIRECTORY = False


def detect(path: PathLike) -> bool:
    return Path(path).is_file() and file_layout(path) == "open_clip"


def load(path: PathLike, model_name: Optional[str] = None):
    """(CLIP in eval mode, PreprocessConfig) from an OpenCLIP state-dict file."""
    return load_state_dict_file(path, model_name, "open_clip")


def save(model, path: PathLike, preprocess_cfg: Optional[PreprocessConfig] = None) -> List[Path]:
    """``model.state_dict()`` as OpenCLIP keeps it, atomically: safetensors for a ``.safetensors`` path,
    else a torch file. Load it with ``open_clip.create_model(name, pretrained=path)``; the preprocessing
    is not recorded."""
    path = Path(path)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_safetensors(sd, path)
    else:
        save_torch(sd, path)
    return [path]
