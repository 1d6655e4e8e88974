"""The ``openai`` format: OpenAI CLIP's single-file checkpoints, readable without a model name.

A TorchScript archive (OpenAI's releases) or a plain state dict in OpenAI's key layout (text tower at
the root of the state dict). Without a model name the architecture is inferred from tensor shapes,
but the activation cannot be: OpenAI's weights use QuickGELU, OpenCLIP's own ViT-B-32 (same shapes)
GELU, and the wrong one changes every feature. So it is taken only from what the file says
(:func:`file_activation`: a TorchScript archive or OpenAI's metadata scalars mean OpenAI's QuickGELU;
a file whose sha256 is a published tag's takes that tag's), and otherwise loading refuses and asks
for the model name (``ViT-B-32`` vs ``ViT-B-32-quickgelu``). Files in OpenCLIP's wider layout
(training checkpoints, ``text.``-prefixed towers) are the ``open_clip`` format; both share the reader here.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from ..models.clip import TEXT_PREFIX, text_keys_to_root
from .io import CheckpointError, PathLike, is_torchscript_archive, read_checkpoint, save_torch
from .load import OPENAI_META_KEYS, build_with_weights, unwrap_state_dict

DESCRIPTION = "an OpenAI-layout state dict or TorchScript file (text tower at the root)"
IS_DIRECTORY = False
_HF_PREFIXES = ("text_model.", "vision_model.")


def _count_blocks(state_dict: Dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def infer_architecture(state_dict: Dict[str, torch.Tensor]) -> CLIPConfig:
    """The CLIP architecture of an OpenAI-layout state dict, from its shapes; ``quick_gelu`` is left False
    (shapes do not tell it: see :func:`infer_config`)."""
    sd = state_dict
    try:
        if "visual.proj" in sd:
            width, _, patch, _ = sd["visual.conv1.weight"].shape
            grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
            vision = VisionConfig(layers=_count_blocks(sd, "visual.transformer.resblocks."), width=width,
                                  patch_size=patch, image_size=patch * grid)
        else:
            layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
            grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
            vision = VisionConfig(layers=layers, width=sd["visual.layer1.0.conv1.weight"].shape[0],
                                  image_size=grid * 32)
        text_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], width=text_width,
                          heads=text_width // 64, layers=_count_blocks(sd, "transformer.resblocks."))
        embed_dim = sd["text_projection"].shape[1]
    except KeyError as e:
        raise ValueError(f"cannot infer a CLIP architecture: the state dict has no key {e.args[0]!r} "
                         f"(is this an OpenAI/OpenCLIP CLIP checkpoint?)") from None
    return CLIPConfig(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=False)


def matching_model_names(cfg: CLIPConfig) -> List[str]:
    """Registered architectures equal to ``cfg`` but for the activation, each with its ``-quickgelu`` twin."""
    from ..models.registry import QUICKGELU_SUFFIX, get_model_config, list_models

    def shape(c: CLIPConfig) -> dict:
        d = c.to_dict()
        d.pop("quick_gelu", None)
        return d

    target, names = shape(cfg), []
    for name in list_models(include_aliases=False):
        try:
            candidate = get_model_config(name)
        except ValueError:
            continue
        if shape(candidate) == target:
            names.append(name)
            if not candidate.quick_gelu:
                names.append(name + QUICKGELU_SUFFIX)
    return names


def infer_config(state_dict: Dict[str, torch.Tensor], quick_gelu: Optional[bool] = None,
                 source: str = "the state dict") -> CLIPConfig:
    """Rebuild the CLIP architecture from an OpenAI-layout state dict, with the activation ``quick_gelu``.

    ``quick_gelu=None`` (the file does not say: see :func:`file_activation`) raises a
    :class:`CheckpointError` naming the registered models of these shapes to choose from: GELU and
    QuickGELU weights have the same tensors, and a guess would silently change every output.
    """
    cfg = infer_architecture(state_dict)
    if quick_gelu is None:
        names = matching_model_names(cfg)
        if len(names) >= 2:
            choice = (f"e.g. {names[0]!r} (GELU, as OpenCLIP trains) or {names[1]!r} (QuickGELU, as OpenAI's "
                      f"weights)" + (f"; also {', '.join(names[2:])}" if names[2:] else ""))
        else:
            choice = "e.g. 'ViT-B-32' (GELU, as OpenCLIP trains) or 'ViT-B-32-quickgelu' (QuickGELU, as OpenAI's weights)"
        raise CheckpointError(
            f"{source}: the file does not say whether its weights use GELU or QuickGELU (the tensors are the same "
            f"shape either way, but the features differ), so clipforge will not guess: give the model name, "
            f"{choice} (`clipforge convert ... --model-name NAME`, `create_model(NAME, pretrained=PATH)`)")
    cfg.quick_gelu = quick_gelu
    return cfg


def file_activation(path: PathLike, raw: object = None) -> Optional[bool]:
    """Whether the weights in ``path`` use QuickGELU, where the file itself says it; else None.

    OpenAI's TorchScript releases, and state dicts taken from them (which keep OpenAI's
    ``input_resolution``/``context_length``/``vocab_size`` scalars), are QuickGELU. A file whose
    sha256 is a published tag's digest (``clipforge.pretrained``) takes that tag's activation.
    ``raw`` is the file's content as :func:`read_checkpoint` returned it, when already read.
    """
    path = Path(path)
    if is_torchscript_archive(path):
        return True
    raw = read_checkpoint(path, mmap=True) if raw is None else raw
    if isinstance(raw, dict) and any(k in raw for k in OPENAI_META_KEYS):
        return True
    from ..pretrained.tags import _TAGS

    digests = {t.url.sha256: t.quick_gelu for t in _TAGS if t.url is not None and t.url.sha256}
    if not digests:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    actual = h.hexdigest()
    return next((quick for digest, quick in digests.items() if actual.startswith(digest)), None)


def infer_file_config(path: PathLike, raw: object = None) -> CLIPConfig:
    """The architecture of the OpenAI-layout checkpoint file ``path``, with the activation the file states.

    Raises :class:`CheckpointError` asking for the model name when the file does not state it.
    """
    raw = read_checkpoint(path) if raw is None else raw
    return infer_config(unwrap_state_dict(raw), file_activation(path, raw), source=str(path))


# ---- single-file checkpoints (shared with the open_clip format) ------------------------------------


def file_layout(path: PathLike) -> str:
    """``"openai"`` or ``"open_clip"`` for a checkpoint file (its tensors mapped, not read, where possible).

    OpenAI's layout: TorchScript, or a flat state dict with the text tower at the root. Anything else
    holding CLIP weights (wrapped training checkpoints, ``text.`` towers, ...) is OpenCLIP's.
    """
    path = Path(path)
    if is_torchscript_archive(path):
        return "openai"
    raw = read_checkpoint(path, mmap=True)  # refuses files that are not checkpoints, saying what they are
    sd = unwrap_state_dict(raw)
    if any(k.startswith(_HF_PREFIXES) for k in sd):
        raise CheckpointError(f"{path}: holds transformers CLIPModel weights; pass the directory with its "
                              f"config.json instead of the weight file")
    flat = isinstance(raw, dict) and len(raw) == len(sd) and all(k in sd for k in raw)
    openai_layout = "text_projection" in sd and not any(k.startswith(TEXT_PREFIX) for k in sd)
    return "openai" if flat and openai_layout else "open_clip"


def load_state_dict_file(path: PathLike, model_name: Optional[str], fmt: str) -> Tuple[object, PreprocessConfig]:
    """(CLIP in eval mode, default preprocessing) from a state-dict file of format ``fmt``.

    ``model_name`` gives the architecture, else the shapes and :func:`file_activation` do (OpenAI's layout only).
    """
    path = Path(path)
    raw = read_checkpoint(path)
    sd = unwrap_state_dict(raw)
    if model_name is not None:
        from ..models.registry import get_model_config
        cfg = get_model_config(model_name)
    else:
        try:
            infer_architecture(sd)
        except ValueError as e:
            raise CheckpointError(f"{path}: an {fmt} checkpoint whose architecture cannot be inferred ({e}); "
                                  f"pass a model name (see clipforge.list_models())") from None
        cfg = infer_file_config(path, raw)
    return build_with_weights(cfg, sd, str(path)), PreprocessConfig(image_size=cfg.vision_cfg.image_size)


# ---- the format ------------------------------------------------------------------------------------


def detect(path: PathLike) -> bool:
    return Path(path).is_file() and file_layout(path) == "openai"


def load(path: PathLike, model_name: Optional[str] = None):
    """(CLIP in eval mode, PreprocessConfig) from an OpenAI-layout file."""
    return load_state_dict_file(path, model_name, "openai")


def openai_state_dict(model) -> Dict[str, torch.Tensor]:
    """The model's weights in OpenAI's layout: text tower at the root, no ``text.`` prefix."""
    if model.cfg.text_cfg.kind != "transformer" or model.cfg.vision_cfg.kind == "timm":
        raise CheckpointError("OpenAI's layout has no place for timm / Hugging Face towers; convert to open_clip")
    return {k: v.detach().cpu() for k, v in text_keys_to_root(model.state_dict()).items()}


def save(model, path: PathLike, preprocess_cfg: Optional[PreprocessConfig] = None) -> List[Path]:
    """One torch state-dict file in OpenAI's layout, written atomically (the preprocessing is not recorded)."""
    save_torch(openai_state_dict(model), path)
    return [Path(path)]


def notes(model) -> List[str]:
    """What a reader of the written file must know."""
    if model.cfg.quick_gelu:
        return []
    return ["OpenAI-layout files do not record the activation and this model uses GELU: load it with its "
            "model name (without one, loading refuses rather than guess)"]
