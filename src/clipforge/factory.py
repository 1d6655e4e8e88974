"""The public entry points: build a model (optionally with weights), its transforms and tokenizer.

Model names may be registered architectures (``clipforge.list_models()``), ``hf-hub:ORG/REPO`` or
``local-dir:PATH`` (OpenCLIP's hub layout, which carries its own config and preprocessing);
``pretrained`` is a tag (``clipforge.pretrained.list_pretrained()``) or a checkpoint file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .checkpoints import infer_config, load_state_dict_into, read_checkpoint, unwrap_state_dict
from .config import CLIPConfig, PreprocessConfig
from .models import build_model
from .models.clip import CLIP
from .models.registry import get_model_config
from .precision import PRECISIONS, check_precision

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
ModelName = Union[str, CLIPConfig, None]


class UnknownPretrainedError(FileNotFoundError, ValueError):
    """``pretrained`` is neither a tag of the model nor an existing file (a missing path or a typo)."""

PathLike = Union[str, Path]


def parse_model_name(name: ModelName) -> Tuple[Optional[str], ModelName]:
    """("hf-hub" | "local-dir" | None, the rest)."""
    if isinstance(name, str):
        for schema in (HF_HUB_PREFIX, LOCAL_DIR_PREFIX):
            if name.startswith(schema):
                rest = name[len(schema):]
                if not rest:
                    raise ValueError(f"{name!r}: nothing after {schema!r}")
                return schema[:-1], rest
    return None, name


def _resolve_config(model_name: ModelName, checkpoint_sd: Optional[dict]) -> CLIPConfig:
    if isinstance(model_name, CLIPConfig):
        return dataclasses.replace(model_name)
    if model_name is None:
        if checkpoint_sd is None:
            raise ValueError("give a model name (see clipforge.list_models()) or a checkpoint to infer it from")
        return infer_config(checkpoint_sd)
    return get_model_config(model_name)


def _hub_dir_files(repo_id: str, cache_dir: Optional[PathLike]) -> Tuple[Path, Path]:
    """(open_clip_config.json, weights) of a Hub repo in OpenCLIP's layout."""
    from .checkpoints.openclip_hub import CONFIG_NAME, WEIGHT_NAMES
    from .pretrained import fetch_hub_file

    return fetch_hub_file(repo_id, (CONFIG_NAME,), cache_dir=cache_dir), fetch_hub_file(
        repo_id, WEIGHT_NAMES, cache_dir=cache_dir)


def _from_hub_layout(schema: str, where: str, cache_dir: Optional[PathLike],
                     overrides: Optional[dict]) -> Tuple[CLIP, PreprocessConfig]:
    from .checkpoints.load import build_with_weights, without_tower_downloads
    from .checkpoints.openclip_hub import find_weights, read_openclip_config

    if schema == "local-dir":
        if not Path(where).is_dir():
            raise FileNotFoundError(f"local-dir:{where}: no such directory")
        cfg, pp = read_openclip_config(where)
        weights = find_weights(where)
    else:
        config_file, weights = _hub_dir_files(where, cache_dir)
        cfg, pp = read_openclip_config(config_file.parent)
    return build_with_weights(cfg.with_overrides(overrides), read_checkpoint(weights), str(weights)), pp


def _build(model_name: ModelName, pretrained: Optional[PathLike], strict: bool, cache_dir: Optional[PathLike],
           overrides: Optional[dict] = None) -> Tuple[CLIP, Optional[PreprocessConfig]]:
    """(model, preprocessing the weights need, or None for the architecture's default)."""
    from .checkpoints.load import build_with_weights, without_tower_downloads
    from .pretrained import download_pretrained, get_pretrained_cfg, is_pretrained_tag

    schema, where = parse_model_name(model_name)
    if schema is not None:
        if pretrained:
            raise ValueError(f"{model_name!r} carries its own weights; leave pretrained unset (got {pretrained!r})")
        return _from_hub_layout(schema, where, cache_dir, overrides)
    if pretrained is None:
        return build_model(_resolve_config(model_name, None).with_overrides(overrides)), None
    preprocess = None
    if isinstance(model_name, str) and isinstance(pretrained, str) and is_pretrained_tag(model_name, pretrained):
        tag = get_pretrained_cfg(model_name, pretrained)
        cfg = get_model_config(model_name)
        cfg.quick_gelu = cfg.quick_gelu or tag.quick_gelu
        path = download_pretrained(tag, cache_dir=cache_dir)
        preprocess = tag.preprocess(cfg.vision_cfg.image_size)
    elif Path(pretrained).is_file():
        path, cfg = Path(pretrained), None
    else:
        tags = ""
        if isinstance(model_name, str):
            from .pretrained import list_pretrained_tags_by_model
            tags = f"; tags of {model_name!r}: {', '.join(list_pretrained_tags_by_model(model_name)) or 'none'}"
        raise UnknownPretrainedError(f"pretrained={str(pretrained)!r} is neither a known tag nor an existing file{tags}")
    raw = read_checkpoint(path)
    state_dict = unwrap_state_dict(raw)
    if cfg is None and model_name is None:  # the file must say its activation (checkpoints.openai.infer_config)
        from .checkpoints.openai import infer_file_config
        cfg = infer_file_config(path, raw)
    cfg = (cfg or _resolve_config(model_name, state_dict)).with_overrides(overrides)
    if strict:
        return build_with_weights(cfg, state_dict, str(path)), preprocess
    # the checkpoint holds the towers' weights: no hub download for them (OpenCLIP: pretrained_hf and not pretrained)
    return load_state_dict_into(build_model(without_tower_downloads(cfg)), state_dict, strict=False,
                                source=str(path)).eval(), preprocess


def create_model(
    model_name: ModelName,
    pretrained: Optional[PathLike] = None,
    precision: str = "fp32",
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
    cache_dir: Optional[PathLike] = None,
    cfg_overrides: Optional[dict] = None,
) -> CLIP:
    """Build the architecture ``model_name`` with ``pretrained`` weights: a tag or a file path.

    A tag also sets what its weights were trained with (QuickGELU, image normalisation in
    ``model.preprocess_cfg``). With ``model_name=None`` the architecture is inferred from an
    OpenAI/OpenCLIP checkpoint's shapes. Downloads go to ``cache_dir`` (else the usual caches).
    ``cfg_overrides`` replaces architecture fields before the model is built (``CLIPConfig.with_overrides``),
    e.g. ``{"vision_cfg": {"patch_dropout": 0.5}}`` to fine-tune a tag with FLIP-style token dropout.
    """
    check_precision(precision)
    model, preprocess = _build(model_name, pretrained, strict, cache_dir, cfg_overrides)
    model.to(device=device, dtype=PRECISIONS[precision])
    model.preprocess_cfg = preprocess or PreprocessConfig(image_size=model.cfg.vision_cfg.image_size)
    return model


def preprocess_config(model: CLIP) -> PreprocessConfig:
    """The preprocessing ``model``'s weights expect (set by ``create_model``), else CLIP's default."""
    return getattr(model, "preprocess_cfg", None) or PreprocessConfig(image_size=model.cfg.vision_cfg.image_size)


def create_model_and_transforms(
    model_name: ModelName,
    pretrained: Optional[PathLike] = None,
    precision: str = "fp32",
    device: Union[str, torch.device] = "cpu",
    preprocess: Optional[PreprocessConfig] = None,
    strict: bool = True,
    cache_dir: Optional[PathLike] = None,
    cfg_overrides: Optional[dict] = None,
):
    """(model, train transform, eval transform), as ``open_clip.create_model_and_transforms``.

    ``preprocess`` overrides the preprocessing that comes with the tag or hub directory.
    """
    from .transforms import image_transform

    model = create_model(model_name, pretrained, precision=precision, device=device, strict=strict,
                         cache_dir=cache_dir, cfg_overrides=cfg_overrides)
    pp = preprocess or preprocess_config(model)
    return model, image_transform(pp, is_train=True), image_transform(pp, is_train=False)


def get_tokenizer(model_name: ModelName = None, context_length: Optional[int] = None,
                  cache_dir: Optional[PathLike] = None):
    """The tokenizer a model was trained with: CLIP BPE, or a Hugging Face tokenizer by name.

    For ``hf-hub:``/``local-dir:`` names the config comes from the repo; a local directory with a
    Hugging Face tokenizer is read from that directory, as OpenCLIP does.
    """
    from .checkpoints.openclip_hub import CONFIG_NAME, read_openclip_config
    from .tokenizer import CLIPTokenizer, HFTokenizer

    schema, where = parse_model_name(model_name)
    source = None
    if schema == "local-dir":
        cfg, _ = read_openclip_config(where)
        source = where
    elif schema == "hf-hub":
        from .pretrained import fetch_hub_file
        cfg, _ = read_openclip_config(fetch_hub_file(where, (CONFIG_NAME,), cache_dir=cache_dir).parent)
    else:
        cfg = _resolve_config(model_name, None) if model_name is not None else CLIPConfig()
    text = cfg.text_cfg
    length = context_length or text.context_length
    if text.hf_tokenizer_name:
        return HFTokenizer(source or text.hf_tokenizer_name, context_length=length, tokenizer_mode=text.tokenizer_mode,
                           cache_dir=None if cache_dir is None else str(cache_dir), **(text.tokenizer_kwargs or {}))
    return CLIPTokenizer(context_length=length)


def load_model_config_and_state(path: PathLike) -> Tuple[CLIPConfig, dict]:
    """Read a checkpoint and infer its architecture (for tools that convert files without a name)."""
    from .checkpoints.openai import infer_file_config

    raw = read_checkpoint(path)
    return infer_file_config(path, raw), unwrap_state_dict(raw)
