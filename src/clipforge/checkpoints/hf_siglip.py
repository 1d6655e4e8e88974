"""The ``hf_siglip`` format: transformers ``SiglipModel`` folders <-> clipforge SigLIP models.

The image tower becomes a timm SigLIP ViT (``attn_pool`` "map" head, no class token) laid out as
OpenCLIP's ``TimmModel``, the text tower clipforge's bidirectional ``TextTransformer`` pooling the last
token; both are sized from the folder's ``config.json``. Weights move through one key table
(``HF_TO_CLIPFORGE``) whose inverse writes them back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import torch

from ..config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from ..models.clip import CLIP, TEXT_PREFIX
from ..tokenizer.hf_files import copy_hf_tokenizer
from .hf_clip import BLOCK
from ..atomic import atomic_directory
from .hf_folder import (has_tokenizer, image_processor_config, is_model_folder, model_type, read_config,
                        read_hf_weights, read_image_processor, tokenizer_folder, write_json)
from .io import CheckpointError, PathLike, save_safetensors, write_text
from .keymap import KeyMap, prefixed
from .load import build_with_weights

DESCRIPTION = "a transformers SiglipModel directory (config.json with model_type 'siglip')"
IS_DIRECTORY = True

# Any registered timm ViT works as the base: every architecture argument is overridden below.
TIMM_SIGLIP_BASE = "vit_base_patch16_siglip_224"
# HF activation name -> (timm act_layer name, clipforge nn.GELU kwargs)
ACTIVATIONS = {"gelu_pytorch_tanh": ("gelu_tanh", {"approximate": "tanh"}), "gelu": ("gelu", None)}
TIMM_LN_EPS = 1e-6  # timm's ViT builds its LayerNorms with this eps
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)

# One image block: transformers' SiglipEncoderLayer -> timm's ViT Block (fused [q; k; v] as attn.qkv).
VISION_BLOCK = [
    (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "attn.qkv.weight"),
    (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "attn.qkv.bias"),
    ("self_attn.out_proj.weight", "attn.proj.weight"), ("self_attn.out_proj.bias", "attn.proj.bias"),
    ("layer_norm1.weight", "norm1.weight"), ("layer_norm1.bias", "norm1.bias"),
    ("layer_norm2.weight", "norm2.weight"), ("layer_norm2.bias", "norm2.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"), ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"), ("mlp.fc2.bias", "mlp.fc2.bias"),
]
_V, _T = "visual.trunk.", TEXT_PREFIX
# transformers SiglipModel -> clipforge (OpenCLIP's SigLIP layout: timm trunk, "text."-prefixed text tower).
HF_TO_CLIPFORGE = KeyMap("SigLIP", src_name="transformers", dst_name="clipforge", rules=[
    ("vision_model.embeddings.patch_embedding.weight", _V + "patch_embed.proj.weight"),
    ("vision_model.embeddings.patch_embedding.bias", _V + "patch_embed.proj.bias"),
    ("vision_model.embeddings.position_embedding.weight", _V + "pos_embed", "unsqueeze0"),  # [N, D] -> [1, N, D]
    ("vision_model.post_layernorm.weight", _V + "norm.weight"), ("vision_model.post_layernorm.bias", _V + "norm.bias"),
    ("vision_model.head.probe", _V + "attn_pool.latent"),
    # nn.MultiheadAttention's fused [q; k; v] projection vs timm's separate q and fused [k; v].
    ("vision_model.head.attention.in_proj_weight", (_V + "attn_pool.q.weight", _V + "attn_pool.kv.weight"),
     "copy", (1, 2)),
    ("vision_model.head.attention.in_proj_bias", (_V + "attn_pool.q.bias", _V + "attn_pool.kv.bias"), "copy", (1, 2)),
    ("vision_model.head.attention.out_proj.weight", _V + "attn_pool.proj.weight"),
    ("vision_model.head.attention.out_proj.bias", _V + "attn_pool.proj.bias"),
    ("vision_model.head.layernorm.weight", _V + "attn_pool.norm.weight"),
    ("vision_model.head.layernorm.bias", _V + "attn_pool.norm.bias"),
    ("vision_model.head.mlp.fc1.weight", _V + "attn_pool.mlp.fc1.weight"),
    ("vision_model.head.mlp.fc1.bias", _V + "attn_pool.mlp.fc1.bias"),
    ("vision_model.head.mlp.fc2.weight", _V + "attn_pool.mlp.fc2.weight"),
    ("vision_model.head.mlp.fc2.bias", _V + "attn_pool.mlp.fc2.bias"),
    ("text_model.embeddings.token_embedding.weight", _T + "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", _T + "positional_embedding"),
    ("text_model.final_layer_norm.weight", _T + "ln_final.weight"),
    ("text_model.final_layer_norm.bias", _T + "ln_final.bias"),
    ("text_model.head.weight", _T + "text_projection.weight"), ("text_model.head.bias", _T + "text_projection.bias"),
    ("logit_scale", "logit_scale", "squeeze0"), ("logit_bias", "logit_bias", "squeeze0"),  # [1] -> [], as OpenCLIP
    # arange() buffers some transformers versions save; rebuilt from shapes.
    ("text_model.embeddings.position_ids", None), ("vision_model.embeddings.position_ids", None),
    *prefixed("vision_model.encoder.layers.{}.", _V + "blocks.{}.", VISION_BLOCK),
    *prefixed("text_model.encoder.layers.{}.", _T + "transformer.resblocks.{}.", BLOCK),
])
CLIPFORGE_TO_HF = HF_TO_CLIPFORGE.inverse()


# ---- configs --------------------------------------------------------------------------------------


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
    vision = VisionConfig(
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
        raise CheckpointError("not a SigLIP model: " + "; ".join(problems)
                              + " (CLIP models are written as transformers CLIPModel: the hf format)")
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


def is_hf_siglip_dir(path: PathLike) -> bool:
    return model_type(path) == "siglip"


def default_preprocess(image_size: int) -> PreprocessConfig:
    """SiglipImageProcessor's defaults: squash to a square, mean/std 0.5, bicubic."""
    return PreprocessConfig(image_size=image_size, resize_mode="squash", interpolation="bicubic",
                            mean=SIGLIP_MEAN_STD, std=SIGLIP_MEAN_STD)


def load_hf_siglip(folder: PathLike) -> CLIP:
    """A clipforge CLIP (eval mode) from a transformers ``SiglipModel.save_pretrained`` folder.

    When the folder holds a tokenizer, the model's ``hf_tokenizer_name`` points at the folder.
    """
    folder = Path(folder)
    hf_config = read_config(folder, "transformers SigLIP")
    cfg = clip_config_from_hf(hf_config, tokenizer_dir=str(folder) if has_tokenizer(folder) else None)
    with torch.device("meta"):
        expected = CLIP(cfg).state_dict()
    sd, source = read_hf_weights(folder)
    return build_with_weights(cfg, HF_TO_CLIPFORGE.apply(sd, expected, source=source), source)


def save_hf_siglip(model: CLIP, folder: PathLike, tokenizer=None,
                   preprocess_cfg: Optional[PreprocessConfig] = None) -> List[Path]:
    """Write ``model`` as a transformers SiglipModel folder; returns the files written.

    config.json, model.safetensors and preprocessor_config.json (``preprocess_cfg``, default SigLIP's),
    plus the tokenizer: ``tokenizer`` (a transformers tokenizer, or clipforge's HFTokenizer) when
    given, else the model's own when ``hf_tokenizer_name`` is a local folder.
    """
    import transformers

    folder = Path(folder)
    hf_config = hf_config_from_clip(model)
    hf_config.architectures = ["SiglipModel"]
    with torch.device("meta"):
        expected = transformers.SiglipModel(hf_config).state_dict()
    sd = CLIPFORGE_TO_HF.apply(model.state_dict(), expected, source="clipforge model")
    pp = preprocess_cfg or default_preprocess(model.cfg.vision_cfg.image_size)
    processor = image_processor_config(pp, "SiglipImageProcessor", "SiglipProcessor", can_crop=False)
    source = tokenizer_folder(model.cfg.text_cfg.hf_tokenizer_name)
    # Built in a temporary sibling and swapped in whole: the old folder or the new one, never a mix. A
    # tokenizer read from ``folder`` itself is copied from the old folder before the swap.
    with atomic_directory(folder, replaceable=is_model_folder) as tmp:
        save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        written = [tmp / "model.safetensors", write_json(tmp / "preprocessor_config.json", processor)]
        if tokenizer is not None:
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
            written += [Path(f) for f in tokenizer.save_pretrained(tmp) if Path(f).is_file()]
        elif source is not None:
            written += copy_hf_tokenizer(source, tmp)
        written.insert(0, write_text(tmp / "config.json", hf_config.to_json_string()))
    return [folder / f.name for f in written]


# ---- the format (formats.py) ----------------------------------------------------------------------
detect = is_hf_siglip_dir


def load(path: PathLike, model_name: Optional[str] = None):
    """(CLIP in eval mode, PreprocessConfig from preprocessor_config.json); config.json gives the architecture."""
    model = load_hf_siglip(path)
    return model, read_image_processor(path, default_preprocess(model.cfg.vision_cfg.image_size))


def save(model, path: PathLike, preprocess_cfg: Optional[PreprocessConfig] = None) -> List[Path]:
    return save_hf_siglip(model, path, preprocess_cfg=preprocess_cfg)
