"""Torch-free configuration dataclasses for CLIP models and their preprocessing.

Field names follow OpenCLIP's model JSON (`vision_cfg`, `text_cfg`, `embed_dim`, ...) so that an
``open_clip_config.json`` or an OpenCLIP model config file maps onto these classes without renaming.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple, Union

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


VISION_KINDS = ("vit", "resnet", "timm")
TEXT_KINDS = ("transformer", "hf")


@dataclass
class VisionConfig:
    # Which image tower to build: "vit", "resnet" (ModifiedResNet; `layers` is 4 block counts) or
    # "timm" (`timm_model_name`). OpenCLIP's JSON has no such key: None infers it once from those
    # fields, and `to_dict` leaves it out again, so files stay OpenCLIP-compatible.
    kind: Optional[str] = None
    layers: Union[int, Tuple[int, int, int, int]] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224

    ls_init_value: Optional[float] = None  # layer scale; None disables it
    patch_dropout: float = 0.0  # fraction of patch tokens dropped while training (FLIP)
    attentional_pool: bool = False  # CoCa-style attentional pooler after the trunk
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    no_ln_pre: bool = False
    pos_embed_type: str = "learnable"
    final_ln_after_pool: bool = False  # apply ln_post to the pooled token instead of all tokens
    pool_type: str = "tok"  # "tok" (class token), "avg" (mean of patch tokens), "none"
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None

    # Image towers from other libraries (timm), selected by an explicit name.
    timm_model_name: Optional[str] = None
    timm_model_pretrained: bool = False
    timm_pool: str = "avg"
    timm_proj: Optional[str] = "linear"  # "linear", "mlp", "none", or ""/None: timm's own classifier
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: Optional[float] = None
    timm_model_kwargs: Optional[dict] = None  # extra keyword arguments of timm.create_model (architecture overrides)

    def __post_init__(self) -> None:
        inferred = "timm" if self.timm_model_name else "resnet" if isinstance(self.layers, (tuple, list)) else "vit"
        _check_kind("vision_cfg", self.kind, inferred, VISION_KINDS)
        self.kind = self.kind or inferred

    @property
    def is_resnet(self) -> bool:
        return self.kind == "resnet"

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    # Which text tower to build: "transformer" (CLIP's) or "hf" (a transformers model, `hf_model_name`);
    # inferred when None and left out of `to_dict`, as VisionConfig.kind.
    kind: Optional[str] = None
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    embed_cls: bool = False
    pad_id: int = 0
    no_causal_mask: bool = False  # SigLIP-style bidirectional text tower
    final_ln_after_pool: bool = False
    # "argmax": token with the largest id (EOT in CLIP's vocabulary); "first", "last", "eos", "none".
    pool_type: str = "argmax"
    eos_id: int = 2  # only read by pool_type "eos"; OpenCLIP's default
    tokenizer_mode: Optional[str] = None
    proj_bias: bool = False
    proj_type: str = "linear"  # "linear" or "none"
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None

    # Tokenizer and text towers from Hugging Face, selected by explicit names.
    hf_tokenizer_name: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    hf_model_name: Optional[str] = None
    hf_model_pretrained: bool = True
    hf_proj_type: str = "mlp"
    hf_pooler_type: str = "mean_pooler"

    def __post_init__(self) -> None:
        inferred = "hf" if self.hf_model_name else "transformer"
        _check_kind("text_cfg", self.kind, inferred, TEXT_KINDS)
        self.kind = self.kind or inferred

    @property
    def causal(self) -> bool:
        return not self.no_causal_mask


@dataclass
class MultimodalConfig:
    """CoCa's caption decoder (OpenCLIP's ``multimodal_cfg``): causal self-attention over the text
    tower's tokens, cross-attention to the image tower's tokens, a head onto the text vocabulary.

    Defaults are OpenCLIP's ``MultimodalCfg``. Its decoder reads only ``context_length``, ``width``,
    ``heads``, ``layers`` and ``ls_init_value`` (the vocabulary is the text tower's, the MLP ratio
    is always 4); the other keys are kept so its JSON files round-trip unchanged.
    """
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    dim_head: int = 64
    n_queries: int = 256
    attn_pooler_heads: int = 8

    def __post_init__(self) -> None:
        if self.mlp_ratio != 4.0:
            raise ValueError(f"multimodal_cfg.mlp_ratio is {self.mlp_ratio}, but OpenCLIP's CoCa decoder always "
                             f"uses 4; a checkpoint with another ratio could not be exchanged with OpenCLIP")


# What ``CLIPConfig.model_kind`` can be: the model class ``clipforge.create_model`` builds.
MODEL_KINDS = ("clip", "coca")


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    # CoCa's caption decoder; its presence makes the model a CoCa (``model_kind == "coca"``).
    multimodal_cfg: Optional[MultimodalConfig] = None
    quick_gelu: bool = False  # OpenAI's original weights were trained with QuickGELU
    # Initial logit bias (SigLIP uses -10); None means the model has no bias parameter.
    init_logit_bias: Optional[float] = None
    init_logit_scale: Optional[float] = None  # log-space; None means ln(1/0.07)
    # Keys of the text tower live at the root of the state dict (OpenAI layout) unless the text tower
    # is "custom" (HF text towers, SigLIP), where OpenCLIP stores it under "text.".
    custom_text: bool = False
    nonscalar_logit_scale: bool = False
    cast_dtype: Optional[str] = None
    # Derived once from the fields above (never read from or written to JSON): "clip" or "coca".
    model_kind: str = field(init=False, default="clip")

    def __post_init__(self) -> None:
        self.model_kind = "coca" if self.multimodal_cfg is not None else "clip"
        # As OpenCLIP's factory: a Hugging Face text tower always lives under "text." (its JSON may omit the key).
        self.custom_text = self.custom_text or self.text_cfg.kind == "hf"

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        d = dict(d)
        vision = d.pop("vision_cfg", {}) or {}
        text = d.pop("text_cfg", {}) or {}
        multimodal = d.pop("multimodal_cfg", None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLIP config keys: {sorted(unknown)}")
        return cls(
            vision_cfg=_dataclass_from_dict(VisionConfig, vision, "vision_cfg"),
            text_cfg=_dataclass_from_dict(TextConfig, text, "text_cfg"),
            multimodal_cfg=(_dataclass_from_dict(MultimodalConfig, multimodal, "multimodal_cfg")
                            if multimodal is not None else None),
            **d,
        )

    def with_overrides(self, overrides: Optional[dict]) -> "CLIPConfig":
        """A copy with a nested dict of fields replaced, e.g. ``{"vision_cfg": {"patch_dropout": 0.5}}``.

        One general way to adjust an architecture before it is built (timm's ``create_model(**kwargs)``),
        instead of one ``force_*`` argument per field; unknown keys fail as in ``from_dict``.
        """
        if not overrides:
            return dataclasses.replace(self)
        d = self.to_dict()
        for key, value in overrides.items():
            if key in ("vision_cfg", "text_cfg", "multimodal_cfg") and isinstance(value, dict):
                d[key] = {**(d.get(key) or {}), **value}
            else:
                d[key] = value
        return CLIPConfig.from_dict(d)

    def to_dict(self) -> dict:
        """Config as OpenCLIP's model JSON (omitting fields equal to their defaults)."""
        out: dict[str, Any] = {"embed_dim": self.embed_dim}
        if self.quick_gelu:
            out["quick_gelu"] = True
        for name in ("init_logit_bias", "init_logit_scale", "cast_dtype"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("custom_text", "nonscalar_logit_scale"):
            if getattr(self, name):
                out[name] = True
        out["vision_cfg"] = _non_default_fields(self.vision_cfg)
        out["text_cfg"] = _non_default_fields(self.text_cfg)
        if self.multimodal_cfg is not None:
            out["multimodal_cfg"] = _non_default_fields(self.multimodal_cfg)
        return out


@dataclass
class PreprocessConfig:
    image_size: Union[int, Tuple[int, int]] = 224
    mode: str = "RGB"
    mean: Tuple[float, ...] = OPENAI_MEAN
    std: Tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # "shortest", "longest" or "squash"
    fill_color: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        d = dict(d)
        if "size" in d and "image_size" not in d:
            d["image_size"] = d.pop("size")
        return _dataclass_from_dict(cls, d, "preprocess_cfg")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = d.pop("image_size")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def _check_kind(where: str, kind: Optional[str], inferred: str, known: Sequence[str]) -> None:
    """An explicit kind must be known and agree with the fields that OpenCLIP's JSON selects towers by."""
    if kind is None:
        return
    if kind not in known:
        raise ValueError(f"{where}.kind {kind!r} is not one of {list(known)}")
    if kind != inferred:
        raise ValueError(f"{where}.kind is {kind!r} but its fields describe a {inferred!r} tower "
                         f"(timm_model_name / hf_model_name / a 4-tuple of layers select the tower in OpenCLIP's JSON)")


def _dataclass_from_dict(cls, d: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown keys in {where}: {unknown}; known keys are {sorted(known)}")
    d = {k: (tuple(v) if isinstance(v, list) and k in ("layers", "mean", "std", "image_size") else v)
         for k, v in d.items()}
    return cls(**d)


def _non_default_fields(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        if f.name == "kind":  # derivable from the other fields; OpenCLIP's JSON has no such key
            continue
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def as_tuple2(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))
