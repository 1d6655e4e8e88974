"""Published (model, tag) weights: where they live, what they need, fetching them, listing them."""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple, Union

from .download import (DEFAULT_URL_CACHE, DownloadError, IntegrityError, download_pretrained, fetch_hub_file,
                       fetch_url)
from .tags import _TAGS, HubFile, PretrainedTag, UrlFile

__all__ = ["DEFAULT_URL_CACHE", "DownloadError", "HubFile", "add_pretrained_tag", "IntegrityError", "PretrainedTag", "UrlFile",
           "download_pretrained", "fetch_hub_file", "fetch_url", "get_pretrained_cfg", "is_pretrained_tag",
           "list_pretrained", "list_pretrained_tags_by_model", "model_rows", "pretrained_rows"]


def _registry() -> Dict[str, Dict[str, PretrainedTag]]:
    """model -> tag -> entry; QuickGELU tags are also listed under the ``-quickgelu`` alias, as OpenCLIP does."""
    from ..models.registry import list_models

    names = set(list_models())
    out: Dict[str, Dict[str, PretrainedTag]] = {}
    for entry in _TAGS:
        out.setdefault(entry.model, {})[entry.tag] = entry
    for entry in _TAGS:
        alias = entry.model + "-quickgelu"
        if entry.quick_gelu and alias in names:
            out.setdefault(alias, {})[entry.tag] = dataclasses.replace(entry, model=alias)
    return out


def add_pretrained_tag(entry: PretrainedTag) -> None:
    """Register weights of your own (a private Hub repo, a mirror URL) under a tag of a known model."""
    from ..models.registry import list_models

    if entry.model not in list_models():
        raise ValueError(f"{entry.model!r} is not a registered model (clipforge.list_models()); add its config first")
    if entry.hub is None and entry.url is None:
        raise ValueError(f"{entry.model}:{entry.tag}: give a Hub file or a URL")
    if _clean_tag(entry.tag) != entry.tag:
        raise ValueError(f"tag {entry.tag!r}: tags are lower case with underscores ({_clean_tag(entry.tag)!r})")
    if entry.tag in _registry().get(entry.model, {}):
        raise ValueError(f"{entry.model}:{entry.tag} is already registered")
    _TAGS.append(entry)


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")


def list_pretrained(as_str: bool = False) -> List[Union[Tuple[str, str], str]]:
    return [f"{m}:{t}" if as_str else (m, t) for m, tags in _registry().items() for t in tags]


def list_pretrained_tags_by_model(model: str) -> List[str]:
    return list(_registry().get(model, {}))


def is_pretrained_tag(model: str, tag: str) -> bool:
    return _clean_tag(tag) in _registry().get(model, {})


def get_pretrained_cfg(model: str, tag: str) -> PretrainedTag:
    tags = _registry().get(model, {})
    if _clean_tag(tag) not in tags:
        known = ", ".join(tags) if tags else "none (see clipforge.pretrained.list_pretrained())"
        raise ValueError(f"unknown pretrained tag {tag!r} for model {model!r}; its tags: {known}")
    return tags[_clean_tag(tag)]


def pretrained_rows(model: Optional[str] = None) -> List[Tuple[str, str, str, str]]:
    """(model, tag, QuickGELU, sources) for each known tag, optionally of one model.

    An unknown ``model`` raises ValueError with the closest registered names (a typo must not
    look like a model without tags).
    """
    reg = _registry()
    if model and model not in reg:
        from ..models.registry import get_model_config

        get_model_config(model)  # raises for an unknown name, suggesting close ones
    models: Iterable[str] = [model] if model else reg
    return [(m, t.tag, "quick_gelu" if t.quick_gelu else "", " ".join(t.sources))
            for m in models for t in reg.get(m, {}).values()]


def model_rows() -> List[Tuple[str, int]]:
    """(architecture, number of pretrained tags) for each registered architecture."""
    from ..models.registry import list_models

    reg = _registry()
    return [(m, len(reg.get(m, {}))) for m in list_models()]
