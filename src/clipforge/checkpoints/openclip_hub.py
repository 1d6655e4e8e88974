"""OpenCLIP's Hugging Face Hub layout: ``open_clip_config.json`` next to the weights.

This is what ``open_clip.push_to_hf_hub`` uploads and what ``open_clip.create_model_and_transforms(
"local-dir:PATH")`` / ``"hf-hub:ORG/REPO"`` read: the config carries the full architecture
(``model_cfg``, OpenCLIP's model JSON) and the preprocessing (``preprocess_cfg``), so the
weights need no model name.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from ..config import CLIPConfig, PreprocessConfig
from .io import CheckpointError, PathLike, atomic_write, read_checkpoint, save_safetensors, save_torch
from .load import adapt_state_dict, describe_mismatch, load_state_dict_into, unwrap_state_dict

CONFIG_NAME = "open_clip_config.json"
SAFETENSORS_NAME = "open_clip_model.safetensors"
TORCH_NAME = "open_clip_pytorch_model.bin"
# The weight files OpenCLIP itself looks for first, in its order of preference.
WEIGHT_NAMES = (SAFETENSORS_NAME, "open_clip_pytorch_model.safetensors", TORCH_NAME, "open_clip_pytorch_model.pth")
_VISION_CORE = ("image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size")
_TEXT_CORE = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names for CLIP's special tokens
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
    for tower, names in (("vision_cfg", _VISION_CORE), ("text_cfg", _TEXT_CORE)):
        obj = getattr(cfg, tower)
        for name in names:
            value = getattr(obj, name)
            d[tower].setdefault(name, list(value) if isinstance(value, tuple) else value)
    return d


def build_with_weights(cfg: CLIPConfig, checkpoint: Any, source: str):
    """``CLIP(cfg)`` holding ``checkpoint``'s weights (strictly), in eval mode.

    The model is built on the meta device and the weights assigned, skipping a random init that
    costs more than reading the file for large models; towers with state outside the state dict
    (left on meta) are rebuilt normally.
    """
    from ..models.clip import CLIP

    with torch.device("meta"):
        model = CLIP(cfg)
    sd = adapt_state_dict(unwrap_state_dict(checkpoint), model)
    problems = describe_mismatch(model.state_dict(), sd)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: {problems}")
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = load_state_dict_into(CLIP(cfg), sd, strict=True, source=source)
    return model.eval()


def load_openclip_dir(path: PathLike):
    """(CLIP in eval mode, PreprocessConfig) from an OpenCLIP hub-layout directory."""
    cfg, preprocess = read_openclip_config(path)
    weights = find_weights(path)
    return build_with_weights(cfg, read_checkpoint(weights), str(weights)), preprocess


def save_openclip_dir(model, path: PathLike, preprocess_cfg: Optional[PreprocessConfig] = None,
                      safetensors: bool = True, torch_bin: bool = False, tokenizer: bool = True) -> List[Path]:
    """Write ``model`` so ``open_clip.create_model_and_transforms("local-dir:" + path)`` loads it.

    ``preprocess_cfg`` defaults to CLIP's (OpenAI mean/std, bicubic) at the model's image size.
    ``tokenizer`` adds CLIP's BPE as transformers tokenizer files, as ``open_clip.push_to_hf_hub``
    uploads them (models with a Hugging Face tokenizer are skipped: its files are not ours to write).
    """
    path = Path(path)
    if not (safetensors or torch_bin):
        raise ValueError("choose at least one weight format (safetensors and/or torch_bin)")
    pp = preprocess_cfg or PreprocessConfig(image_size=model.cfg.vision_cfg.image_size)
    hub = {"model_cfg": _explicit_model_cfg(model.cfg), "preprocess_cfg": pp.to_dict()}
    text = json.dumps(hub, indent=2) + "\n"
    sd = model.state_dict()
    written = []
    if tokenizer and not model.cfg.text_cfg.hf_tokenizer_name:
        written += write_hf_tokenizer(path, model.cfg.text_cfg.context_length)
    if safetensors:
        save_safetensors(sd, path / SAFETENSORS_NAME)
        written.append(path / SAFETENSORS_NAME)
    if torch_bin:
        save_torch({k: v.detach().cpu() for k, v in sd.items()}, path / TORCH_NAME)
        written.append(path / TORCH_NAME)
    # The config goes last: a directory is only recognised once its weights are complete.
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return [path / CONFIG_NAME, *written]


def write_hf_tokenizer(path: PathLike, context_length: int = 77) -> List[Path]:
    """CLIP's BPE as transformers ``CLIPTokenizer`` files (vocab.json, merges.txt, configs).

    Generated from clipforge's own vocabulary file, so no download is needed; ids match OpenCLIP's.
    """
    from ..tokenizer.bpe import byte_to_unicode, read_merges

    path = Path(path)
    merges = read_merges()
    symbols = list(byte_to_unicode().values())
    # CLIP's id order: 256 byte symbols, the same with "</w>", one token per merge, then SOT and EOT.
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [_SOT, _EOT]
    specials = dict(bos_token=_SOT, eos_token=_EOT, unk_token=_EOT, pad_token=_EOT)
    files = {"vocab.json": json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
             "tokenizer_config.json": json.dumps(dict(tokenizer_class="CLIPTokenizer",
                                                      model_max_length=context_length, **specials), indent=2),
             "special_tokens_map.json": json.dumps(specials, indent=2)}
    for name, text in files.items():
        atomic_write(path / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    return [path / name for name in files]
