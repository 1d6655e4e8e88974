"""Hugging Face ``SiglipModel`` folders <-> clipforge SigLIP models (OpenCLIP's timm-based key layout).

The image tower becomes a timm SigLIP ViT (``attn_pool`` "map" head, no class token) and the text
tower clipforge's bidirectional ``TextTransformer`` pooling the last token; both are sized from the
HF ``config.json``. Weights move through one table of key templates used in both directions.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..config import CLIPConfig, TextConfig, VisionConfig
from ..models.clip import CLIP
from .io import CheckpointError, read_checkpoint
from .load import describe_mismatch

# Any registered timm ViT works as the base: every architecture argument is overridden below.
TIMM_SIGLIP_BASE = "vit_base_patch16_siglip_224"
# HF activation name -> (timm act_layer name, clipforge nn.GELU kwargs)
ACTIVATIONS = {"gelu_pytorch_tanh": ("gelu_tanh", {"approximate": "tanh"}), "gelu": ("gelu", None)}
TIMM_LN_EPS = 1e-6  # timm's ViT builds its LayerNorms with this eps

V_HF, V_CF = "vision_model.", "visual.trunk."
T_HF, T_CF = "text_model.", "text."
_BLOCK_HF = "encoder.layers.{}."

# (HF keys, clipforge keys): the concatenation along dim 0 of the left side equals that of the right
# side (reshaped). "{}" is the block index. Every key on both sides must be covered exactly once.
PER_BLOCK: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = []
for _hf, _cf, _tower_hf, _tower_cf in (
    ("layer_norm1.{p}", "norm1.{p}", V_HF, V_CF + "blocks.{}."),
    ("layer_norm2.{p}", "norm2.{p}", V_HF, V_CF + "blocks.{}."),
    ("self_attn.out_proj.{p}", "attn.proj.{p}", V_HF, V_CF + "blocks.{}."),
    ("mlp.fc1.{p}", "mlp.fc1.{p}", V_HF, V_CF + "blocks.{}."),
    ("mlp.fc2.{p}", "mlp.fc2.{p}", V_HF, V_CF + "blocks.{}."),
    ("layer_norm1.{p}", "ln_1.{p}", T_HF, T_CF + "transformer.resblocks.{}."),
    ("layer_norm2.{p}", "ln_2.{p}", T_HF, T_CF + "transformer.resblocks.{}."),
    ("self_attn.out_proj.{p}", "attn.out_proj.{p}", T_HF, T_CF + "transformer.resblocks.{}."),
    ("mlp.fc1.{p}", "mlp.c_fc.{p}", T_HF, T_CF + "transformer.resblocks.{}."),
    ("mlp.fc2.{p}", "mlp.c_proj.{p}", T_HF, T_CF + "transformer.resblocks.{}."),
):
    for _p in ("weight", "bias"):
        PER_BLOCK.append(((_tower_hf + _BLOCK_HF + _hf.format(p=_p),), (_tower_cf + _cf.format(p=_p),)))
for _p in ("weight", "bias"):
    _qkv = tuple(f"{V_HF}{_BLOCK_HF}self_attn.{n}_proj.{_p}" for n in "qkv")
    PER_BLOCK.append((_qkv, (f"{V_CF}blocks.{{}}.attn.qkv.{_p}",)))
    _qkv = tuple(f"{T_HF}{_BLOCK_HF}self_attn.{n}_proj.{_p}" for n in "qkv")
    _in_proj = "in_proj_weight" if _p == "weight" else "in_proj_bias"
    PER_BLOCK.append((_qkv, (f"{T_CF}transformer.resblocks.{{}}.attn.{_in_proj}",)))

GLOBAL: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = [
    ((V_HF + "embeddings.patch_embedding.weight",), (V_CF + "patch_embed.proj.weight",)),
    ((V_HF + "embeddings.patch_embedding.bias",), (V_CF + "patch_embed.proj.bias",)),
    ((V_HF + "embeddings.position_embedding.weight",), (V_CF + "pos_embed",)),  # [N, D] vs [1, N, D]
    ((V_HF + "post_layernorm.weight",), (V_CF + "norm.weight",)),
    ((V_HF + "post_layernorm.bias",), (V_CF + "norm.bias",)),
    ((V_HF + "head.probe",), (V_CF + "attn_pool.latent",)),
    # nn.MultiheadAttention's fused [q; k; v] projection vs timm's separate q and fused [k; v].
    ((V_HF + "head.attention.in_proj_weight",), (V_CF + "attn_pool.q.weight", V_CF + "attn_pool.kv.weight")),
    ((V_HF + "head.attention.in_proj_bias",), (V_CF + "attn_pool.q.bias", V_CF + "attn_pool.kv.bias")),
    ((V_HF + "head.attention.out_proj.weight",), (V_CF + "attn_pool.proj.weight",)),
    ((V_HF + "head.attention.out_proj.bias",), (V_CF + "attn_pool.proj.bias",)),
    ((V_HF + "head.layernorm.weight",), (V_CF + "attn_pool.norm.weight",)),
    ((V_HF + "head.layernorm.bias",), (V_CF + "attn_pool.norm.bias",)),
    ((V_HF + "head.mlp.fc1.weight",), (V_CF + "attn_pool.mlp.fc1.weight",)),
    ((V_HF + "head.mlp.fc1.bias",), (V_CF + "attn_pool.mlp.fc1.bias",)),
    ((V_HF + "head.mlp.fc2.weight",), (V_CF + "attn_pool.mlp.fc2.weight",)),
    ((V_HF + "head.mlp.fc2.bias",), (V_CF + "attn_pool.mlp.fc2.bias",)),
    ((T_HF + "embeddings.token_embedding.weight",), (T_CF + "token_embedding.weight",)),
    ((T_HF + "embeddings.position_embedding.weight",), (T_CF + "positional_embedding",)),
    ((T_HF + "final_layer_norm.weight",), (T_CF + "ln_final.weight",)),
    ((T_HF + "final_layer_norm.bias",), (T_CF + "ln_final.bias",)),
    ((T_HF + "head.weight",), (T_CF + "text_projection.weight",)),
    ((T_HF + "head.bias",), (T_CF + "text_projection.bias",)),
    (("logit_scale",), ("logit_scale",)),  # [1] in HF, a scalar in OpenCLIP's SigLIP
    (("logit_bias",), ("logit_bias",)),
]


def key_groups(vision_layers: int, text_layers: int) -> List[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """The table with block templates expanded for the given depths."""
    groups = list(GLOBAL)
    for hf, cf in PER_BLOCK:
        depth = vision_layers if hf[0].startswith(V_HF) else text_layers
        groups += [(tuple(k.format(i) for k in hf), tuple(k.format(i) for k in cf)) for i in range(depth)]
    return groups


def convert(src: Dict[str, torch.Tensor], groups, target: Dict[str, torch.Tensor], reverse: bool = False,
            source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Map ``src`` onto the keys and shapes of ``target`` through ``groups`` (HF -> clipforge, or back)."""
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for hf_keys, cf_keys in groups:
        from_keys, to_keys = (cf_keys, hf_keys) if reverse else (hf_keys, cf_keys)
        missing = [k for k in from_keys if k not in src]
        if missing:
            raise CheckpointError(f"{source}: missing {missing[0]} (needed for {to_keys[0]})")
        used.update(from_keys)
        flat = torch.cat([_unbatch(src[k]) for k in from_keys])  # concatenated along dim 0
        sizes = [_unbatch(target[k]).shape[0] for k in to_keys]
        parts = flat.split(sizes) if sum(sizes) == flat.shape[0] else None
        if parts is None or any(p.numel() != target[k].numel() for p, k in zip(parts, to_keys)):
            shapes = [tuple(src[k].shape) for k in from_keys]
            raise CheckpointError(f"{source}: {list(from_keys)} with shapes {shapes} do not fit "
                                  f"{[(k, tuple(target[k].shape)) for k in to_keys]}")
        for key, part in zip(to_keys, parts):
            out[key] = part.reshape(target[key].shape).to(target[key].dtype).clone()
    unexpected = sorted(set(src) - used)
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} keys have no SigLIP mapping: {unexpected[:5]}")
    return out


def _unbatch(t: torch.Tensor) -> torch.Tensor:
    """Scalars become [1]; timm's [1, N, D] position/latent tensors drop their batch axis."""
    if t.dim() == 0:
        return t.reshape(1)
    if t.dim() == 3 and t.shape[0] == 1:
        return t[0]
    return t


# ---- configs --------------------------------------------------------------------------------------


@dataclass
class TimmVisionConfig(VisionConfig):
    """VisionConfig plus keyword arguments for ``timm.create_model`` (architecture overrides).

    Used only while ``VisionConfig`` itself lacks ``timm_model_kwargs``.
    """
    timm_model_kwargs: Optional[dict] = field(default=None)


def _vision_config(**fields) -> VisionConfig:
    if "timm_model_kwargs" in {f.name for f in dataclasses.fields(VisionConfig)}:
        return VisionConfig(**fields)
    return TimmVisionConfig(**fields)


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio r with int(width * r) == hidden, as both timm and clipforge size their MLPs."""
    ratio = hidden / width
    for candidate in (ratio, math.nextafter(ratio, math.inf), ratio + 1e-6):
        if int(width * candidate) == hidden:
            return candidate
    raise CheckpointError(f"cannot express an MLP of {hidden} for width {width} as a ratio")


def _activation(name: str, where: str):
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{where}.hidden_act {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def clip_config_from_hf(hf: dict, tokenizer_dir: Optional[str] = None) -> CLIPConfig:
    """CLIPConfig for a SiglipModel ``config.json`` (as a dict)."""
    if hf.get("model_type") != "siglip":
        raise CheckpointError(f"expected a SiglipModel config (model_type 'siglip'), got {hf.get('model_type')!r}")
    import transformers

    config = transformers.SiglipConfig.from_dict(hf)
    v, t = config.vision_config, config.text_config
    if not getattr(v, "vision_use_head", True):
        raise CheckpointError("SigLIP vision towers without the attention-pool head are not supported")
    if v.layer_norm_eps != TIMM_LN_EPS:
        raise CheckpointError(f"timm's SigLIP ViT uses LayerNorm eps {TIMM_LN_EPS}, the checkpoint {v.layer_norm_eps}")
    projection = getattr(t, "projection_size", None) or t.hidden_size
    if projection != v.hidden_size:
        raise CheckpointError(f"text projection ({projection}) and image width ({v.hidden_size}) differ")
    timm_act, _ = _activation(v.hidden_act, "vision_config")
    _, text_act = _activation(t.hidden_act, "text_config")
    vision = _vision_config(
        image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size, layers=v.num_hidden_layers,
        head_width=v.hidden_size // v.num_attention_heads,
        mlp_ratio=_mlp_ratio(v.hidden_size, v.intermediate_size),
        timm_model_name=TIMM_SIGLIP_BASE, timm_pool="map", timm_proj="none",
        timm_model_kwargs=dict(
            img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
            num_heads=v.num_attention_heads, mlp_ratio=_mlp_ratio(v.hidden_size, v.intermediate_size),
            in_chans=v.num_channels, class_token=False, act_layer=timm_act),
    )
    text = TextConfig(
        context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
        heads=t.num_attention_heads, layers=t.num_hidden_layers,
        mlp_ratio=_mlp_ratio(t.hidden_size, t.intermediate_size), no_causal_mask=True, proj_bias=True,
        pool_type="last", norm_kwargs={"eps": t.layer_norm_eps}, act_kwargs=text_act,
        pad_id=t.pad_token_id if t.pad_token_id is not None else 0,
        eos_id=t.eos_token_id if isinstance(t.eos_token_id, int) else TextConfig.eos_id,
        hf_tokenizer_name=tokenizer_dir, tokenizer_kwargs={"clean": "canonicalize"} if tokenizer_dir else None,
    )
    return CLIPConfig(embed_dim=v.hidden_size, vision_cfg=vision, text_cfg=text, init_logit_bias=-10.0,
                      init_logit_scale=math.log(10.0), custom_text=True)


def hf_config_from_clip(model: CLIP):
    """A ``transformers.SiglipConfig`` describing ``model``, read from its built modules."""
    import transformers

    cfg = model.cfg
    trunk = getattr(model.visual, "trunk", None)
    text = cfg.text_cfg
    problems = []
    if trunk is None or getattr(trunk, "attn_pool", None) is None or not hasattr(trunk, "blocks"):
        problems.append("the image tower must be a timm ViT with a 'map' attention pool")
    elif trunk.cls_token is not None or trunk.num_prefix_tokens or len(model.visual.head):
        problems.append("the timm ViT must have no class/register tokens and no projection head")
    if not (text.no_causal_mask and text.pool_type == "last" and text.proj_bias and text.proj_type == "linear"):
        problems.append("the text tower must be bidirectional, pool the last token, and project with a bias")
    if model.logit_bias is None:
        problems.append("the model has no logit bias")
    if problems:
        raise CheckpointError("not a SigLIP model: " + "; ".join(problems))
    block = trunk.blocks[0]
    vision_act = {"GELUTanh": "gelu_pytorch_tanh", "GELU": "gelu"}.get(type(block.mlp.act).__name__)
    if type(block.mlp.act).__name__ == "GELU" and getattr(block.mlp.act, "approximate", "none") == "tanh":
        vision_act = "gelu_pytorch_tanh"
    text_act = "gelu_pytorch_tanh" if (text.act_kwargs or {}).get("approximate") == "tanh" else "gelu"
    if vision_act is None or model.cfg.quick_gelu:
        raise CheckpointError(f"activation {type(block.mlp.act).__name__} has no SigLIP config name")
    return transformers.SiglipConfig(
        vision_config=dict(
            hidden_size=trunk.embed_dim, intermediate_size=block.mlp.fc1.out_features,
            num_hidden_layers=len(trunk.blocks), num_attention_heads=block.attn.num_heads,
            num_channels=trunk.patch_embed.proj.in_channels, image_size=trunk.patch_embed.img_size[0],
            patch_size=trunk.patch_embed.patch_size[0], hidden_act=vision_act, layer_norm_eps=trunk.norm.eps),
        text_config=dict(
            vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=int(text.width * text.mlp_ratio),
            num_hidden_layers=text.layers, num_attention_heads=text.heads,
            max_position_embeddings=text.context_length, hidden_act=text_act,
            layer_norm_eps=(text.norm_kwargs or {}).get("eps", 1e-5), projection_size=cfg.embed_dim,
            pad_token_id=text.pad_id, eos_token_id=text.eos_id, bos_token_id=None),
    )


# ---- folders --------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_hf_weights(folder: Path) -> Dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return dict(read_checkpoint(folder / name))
    for name in _INDEX_FILES:
        if (folder / name).is_file():
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            out: Dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(read_checkpoint(folder / shard))
            return out
    raise CheckpointError(f"{folder}: no {' or '.join(_WEIGHT_FILES)} (or sharded index) found")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def load_hf_siglip(folder: Union[str, Path]) -> CLIP:
    """A clipforge CLIP (eval mode) from a transformers ``SiglipModel.save_pretrained`` folder."""
    folder = Path(folder)
    hf_config = json.loads((folder / "config.json").read_text())
    cfg = clip_config_from_hf(hf_config, tokenizer_dir=str(folder) if _has_tokenizer(folder) else None)
    model = CLIP(cfg)
    target = model.state_dict()
    groups = key_groups(cfg.vision_cfg.layers, cfg.text_cfg.layers)
    sd = convert(_read_hf_weights(folder), groups, target, source=str(folder))
    problems = describe_mismatch(target, sd)
    if problems:
        raise CheckpointError(f"{folder}: {problems}")
    model.load_state_dict(sd, strict=True)
    return model.eval()


def save_hf_siglip(model: CLIP, folder: Union[str, Path], tokenizer=None) -> Path:
    """Write ``model`` as a transformers SiglipModel folder (config.json + model.safetensors).

    ``tokenizer`` (a transformers tokenizer, or clipforge's HFTokenizer) is saved alongside when given.
    """
    import transformers

    folder = Path(folder)
    hf_config = hf_config_from_clip(model)
    hf_model = transformers.SiglipModel(hf_config)
    target = hf_model.state_dict()
    groups = key_groups(hf_config.vision_config.num_hidden_layers, hf_config.text_config.num_hidden_layers)
    sd = convert(model.state_dict(), groups, target, reverse=True, source="clipforge model")
    problems = describe_mismatch(target, sd)
    if problems:
        raise CheckpointError(f"SiglipModel does not fit: {problems}")
    hf_model.load_state_dict(sd, strict=True)
    hf_model.save_pretrained(folder)
    if tokenizer is not None:
        getattr(tokenizer, "tokenizer", tokenizer).save_pretrained(folder)
    return folder
