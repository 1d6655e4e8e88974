"""Named model architectures: one JSON file per architecture, ``-quickgelu`` names as aliases."""
from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Dict, List, Union

from ..config import CLIPConfig

QUICKGELU_SUFFIX = "-quickgelu"
_CONFIGS: Dict[str, dict] = {}


def _load_builtin() -> None:
    for entry in resources.files("clipforge.models").joinpath("configs").iterdir():
        if entry.name.endswith(".json"):
            _CONFIGS[entry.name[:-5]] = json.loads(entry.read_text())


def _registry() -> Dict[str, dict]:
    if not _CONFIGS:
        _load_builtin()
    return _CONFIGS


def add_model_config(path: Union[str, Path]) -> List[str]:
    """Register the model JSON file at ``path`` (or every ``*.json`` in a folder); returns the names."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    added = []
    for file in files:
        try:
            cfg = json.loads(file.read_text())
            CLIPConfig.from_dict(cfg)  # validate before registering
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: not a valid model config: {e}") from e
        _registry()[file.stem] = cfg
        added.append(file.stem)
    return added


def list_models(include_aliases: bool = True) -> List[str]:
    names = sorted(_registry())
    if include_aliases:
        names += [n + QUICKGELU_SUFFIX for n in names if not _registry()[n].get("quick_gelu")
                  and not _registry()[n]["vision_cfg"].get("timm_model_name")]
    return sorted(names)


def get_model_config(name: str) -> CLIPConfig:
    """The architecture registered as ``name``; ``NAME-quickgelu`` is NAME with QuickGELU activations."""
    registry = _registry()
    base, quick = name, False
    if name not in registry and name.endswith(QUICKGELU_SUFFIX):
        base, quick = name[: -len(QUICKGELU_SUFFIX)], True
    if base not in registry:
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See clipforge.list_models() for all names.")
    cfg = CLIPConfig.from_dict(registry[base])
    if quick:
        cfg.quick_gelu = True
    return cfg
