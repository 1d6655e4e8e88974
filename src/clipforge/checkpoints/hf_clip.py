"""The ``hf`` format: transformers ``CLIPModel`` directories, read and written with exact weights.

transformers 4.x and 5.x ``CLIPModel`` files share weight names; files from transformers < 4.31 also
carry ``position_ids`` buffers, and old configs pool text at the argmax id (``eos_token_id == 2``).
SigLIP models (a logit bias, a timm image tower) are the ``hf_siglip`` format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..config import OPENAI_MEAN, OPENAI_STD, CLIPConfig, PreprocessConfig, TextConfig, VisionConfig, as_tuple2
from ..models.clip import text_keys_to_root
from ..tokenizer.hf_files import write_hf_tokenizer
from ..atomic import atomic_directory
from .hf_folder import (image_processor_config, is_model_folder, model_type, read_config, read_hf_weights,
                        read_image_processor, write_json)
from .io import CheckpointError, PathLike, save_safetensors
from .keymap import KeyMap, prefixed
from .load import build_with_weights

DESCRIPTION = "a transformers CLIPModel directory (config.json with model_type 'clip')"
IS_DIRECTORY = True

# One transformer block: transformers' CLIPEncoderLayer -> OpenCLIP's ResidualAttentionBlock (SigLIP's
# text tower uses it too). transformers keeps q, k and v as three Linear layers; OpenCLIP's
# nn.MultiheadAttention one fused in_proj, [q; k; v] along dim 0.
BLOCK = [
    (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "attn.in_proj_weight"),
    (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "attn.in_proj_bias"),
    ("self_attn.out_proj.weight", "attn.out_proj.weight"), ("self_attn.out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm1.weight", "ln_1.weight"), ("layer_norm1.bias", "ln_1.bias"),
    ("layer_norm2.weight", "ln_2.weight"), ("layer_norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"), ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"), ("mlp.fc2.bias", "mlp.c_proj.bias"),
]
# transformers CLIPModel -> OpenCLIP (OpenAI layout: text tower at the root); "{}" is a block index,
# "T" a transpose (transformers' Linear [out, in] vs OpenCLIP's projection parameter [in, out]).
HF_TO_OPENCLIP = KeyMap("CLIPModel", src_name="transformers", dst_name="OpenCLIP", rules=[
    ("logit_scale", "logit_scale"),
    ("text_projection.weight", "text_projection", "T"), ("visual_projection.weight", "visual.proj", "T"),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    # "layrnorm" (sic) is how transformers spells it in its files.
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight"),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
    # Buffers that transformers < 4.31 saved; they are arange() and rebuilt from shapes.
    ("text_model.embeddings.position_ids", None), ("vision_model.embeddings.position_ids", None),
    *prefixed("text_model.encoder.layers.{}.", "transformer.resblocks.{}.", BLOCK),
    *prefixed("vision_model.encoder.layers.{}.", "visual.transformer.resblocks.{}.", BLOCK),
])
OPENCLIP_TO_HF = HF_TO_OPENCLIP.inverse()  # generated: the writer cannot disagree with the reader

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for keys a config.json leaves out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# hidden_act -> (quick_gelu, act_kwargs); each is computed by the same torch op on both sides.
_ACTIVATIONS = {"quick_gelu": (True, None), "gelu": (False, None),
                "gelu_pytorch_tanh": (False, {"approximate": "tanh"})}
_LEGACY_EOS = 2  # transformers pools at the argmax token id when text eos_token_id == 2


def hf_to_openclip(state_dict: Dict[str, torch.Tensor], source: str = "state dict") -> Dict[str, torch.Tensor]:
    """transformers CLIPModel weights -> OpenCLIP (OpenAI-layout) weights; errors on unknown keys."""
    return HF_TO_OPENCLIP.apply(state_dict, source=source)


def openclip_to_hf(state_dict: Dict[str, torch.Tensor], source: str = "model") -> Dict[str, torch.Tensor]:
    """OpenCLIP (OpenAI-layout) weights -> transformers CLIPModel weights; errors on unknown keys."""
    sd = dict(state_dict)
    if "logit_scale" in sd:  # transformers' is a scalar; OpenCLIP's may be [1] (nonscalar_logit_scale)
        sd["logit_scale"] = sd["logit_scale"].reshape(())
    return OPENCLIP_TO_HF.apply(sd, source=source)


# ----------------------------------------------------------------------------- configs
def _tower(sub: dict, where: str) -> Tuple[bool, dict]:
    """(quick_gelu, VisionConfig/TextConfig kwargs shared by both towers) for one HF sub-config."""
    if sub["hidden_act"] not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {sub['hidden_act']!r} is not supported ({sorted(_ACTIVATIONS)})")
    quick, act_kwargs = _ACTIVATIONS[sub["hidden_act"]]
    width, hidden = sub["hidden_size"], sub["intermediate_size"]
    if int(width * (hidden / width)) != hidden or width % sub["num_attention_heads"]:
        raise CheckpointError(f"{where}: hidden_size {width} with intermediate_size {hidden} and "
                              f"{sub['num_attention_heads']} heads has no OpenCLIP equivalent")
    eps = sub["layer_norm_eps"]  # OpenCLIP's LayerNorm default is 1e-5
    return quick, dict(width=width, layers=sub["num_hidden_layers"], mlp_ratio=hidden / width,
                       act_kwargs=act_kwargs, norm_kwargs=None if eps == 1e-5 else {"eps": eps})


def config_from_hf(hf: dict, source: str = "config.json") -> CLIPConfig:
    """A transformers CLIPConfig dict (config.json) as the equivalent clipforge CLIPConfig."""
    if hf.get("model_type", "clip") != "clip":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not a transformers CLIPModel")
    t = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
    v = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
    quick_t, text_kw = _tower(t, source + " text_config")
    quick_v, vision_kw = _tower(v, source + " vision_config")
    if quick_t != quick_v:
        raise CheckpointError(f"{source}: text and vision towers use different activations "
                              f"({t['hidden_act']} vs {v['hidden_act']}); clipforge has one QuickGELU setting")
    eos = t["eos_token_id"]
    if v["num_channels"] != 3 or not isinstance(eos, int):
        raise CheckpointError(f"{source}: num_channels {v['num_channels']} / eos_token_id {eos!r} unsupported")
    pool = dict(pool_type="argmax") if eos == _LEGACY_EOS else dict(pool_type="eos", eos_id=eos)
    size, patch = (x if isinstance(x, int) else x[0] for x in (v["image_size"], v["patch_size"]))
    vision = VisionConfig(head_width=v["hidden_size"] // v["num_attention_heads"], patch_size=patch,
                          image_size=size, **vision_kw)
    text = TextConfig(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                      heads=t["num_attention_heads"], **text_kw, **pool)
    return CLIPConfig(embed_dim=hf.get("projection_dim", 512), vision_cfg=vision, text_cfg=text, quick_gelu=quick_t,
                      init_logit_scale=hf.get("logit_scale_init_value", 2.6592))


def _unsupported(cfg: CLIPConfig) -> List[str]:
    """What a transformers CLIPModel cannot express about ``cfg`` (empty when convertible)."""
    v, t = cfg.vision_cfg, cfg.text_cfg
    size, patch = as_tuple2(v.image_size), as_tuple2(v.patch_size)
    checks = {"a non-ViT image tower": v.is_resnet or bool(v.timm_model_name),
              "a Hugging Face text tower": bool(t.hf_model_name),
              "layer scale": v.ls_init_value is not None or t.ls_init_value is not None,
              "attentional pooling": bool(v.attentional_pool), "no ln_pre": v.no_ln_pre,
              f"vision pool_type {v.pool_type!r}": v.pool_type != "tok", "non-causal text": t.no_causal_mask,
              "a text projection bias / no projection": t.proj_bias or t.proj_type != "linear",
              f"text pool_type {t.pool_type!r}": t.pool_type not in ("argmax", "eos"),
              "eos pooling at id 2 (read as argmax)": t.pool_type == "eos" and t.eos_id == _LEGACY_EOS,
              "a logit bias": cfg.init_logit_bias is not None, "an embedded CLS token": t.embed_cls,
              "non-square images/patches": size[0] != size[1] or patch[0] != patch[1]}
    for name, c in (("vision", v), ("text", t)):
        checks[f"{name} act_kwargs {c.act_kwargs}"] = _hf_activation(cfg.quick_gelu, c.act_kwargs) is None
        checks[f"{name} norm_kwargs {c.norm_kwargs}"] = bool(c.norm_kwargs) and set(c.norm_kwargs) != {"eps"}
    return [name for name, bad in checks.items() if bad]


def _hf_activation(quick_gelu: bool, act_kwargs: Optional[dict]) -> Optional[str]:
    return next((name for name, spec in _ACTIVATIONS.items() if spec == (quick_gelu, act_kwargs or None)), None)


def config_to_hf(cfg: CLIPConfig, logit_scale: float, dtype: torch.dtype = torch.float32) -> dict:
    """clipforge CLIPConfig -> transformers config.json; raises naming what HF CLIP cannot express."""
    if _unsupported(cfg):
        hint = (" (a model with a logit bias is SigLIP-style: write it in the hf_siglip format, "
                "`clipforge convert --to hf_siglip`)" if cfg.init_logit_bias is not None else "")
        raise CheckpointError("model cannot be written as a transformers CLIPModel: it has "
                              + "; ".join(_unsupported(cfg)) + hint)
    v, t = cfg.vision_cfg, cfg.text_cfg
    towers = {}
    for name, c in (("vision", v), ("text", t)):
        towers[name] = {"model_type": f"clip_{name}_model", "hidden_size": c.width,
                        "intermediate_size": int(c.width * c.mlp_ratio), "num_hidden_layers": c.layers,
                        "num_attention_heads": c.heads, "hidden_act": _hf_activation(cfg.quick_gelu, c.act_kwargs),
                        "layer_norm_eps": (c.norm_kwargs or {}).get("eps", 1e-5), "projection_dim": cfg.embed_dim}
    towers["vision"].update(num_channels=3, image_size=as_tuple2(v.image_size)[0],
                            patch_size=as_tuple2(v.patch_size)[0])
    towers["text"].update(vocab_size=t.vocab_size, max_position_embeddings=t.context_length, bos_token_id=49406,
                          pad_token_id=1, eos_token_id=_LEGACY_EOS if t.pool_type == "argmax" else t.eos_id)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": logit_scale, "initializer_factor": 1.0, "dtype": str(dtype).split(".")[-1],
            "text_config": towers["text"], "vision_config": towers["vision"]}


# ----------------------------------------------------------------------------- directories
def is_hf_clip_dir(path: PathLike) -> bool:
    return model_type(path) == "clip"


def default_preprocess(image_size: int) -> PreprocessConfig:
    """CLIPImageProcessor's defaults: shortest side, centre crop, OpenAI mean/std, bicubic."""
    return PreprocessConfig(image_size=image_size, mean=OPENAI_MEAN, std=OPENAI_STD)


def load_hf_clip(path: PathLike):
    """A transformers CLIPModel directory as a clipforge CLIP (fp32, eval mode)."""
    path = Path(path)
    cfg = config_from_hf(read_config(path, "transformers CLIP"), source=str(path / "config.json"))
    sd, source = read_hf_weights(path)
    return build_with_weights(cfg, hf_to_openclip(sd, source), source)


def save_hf_clip(model, path: PathLike, tokenizer: bool = True,
                 preprocess_cfg: Optional[PreprocessConfig] = None) -> List[Path]:
    """Write ``model`` so ``transformers.CLIPModel/CLIPProcessor.from_pretrained(path)`` load it."""
    path = Path(path)
    sd = text_keys_to_root(model.state_dict())  # keys under "text." (custom_text) -> OpenAI root layout
    hf_cfg = config_to_hf(model.cfg, float(model.logit_scale.detach().reshape(-1)[0]), model.logit_scale.dtype)
    hf_sd = openclip_to_hf(sd, source=type(model).__name__)
    pp = preprocess_cfg or default_preprocess(model.cfg.vision_cfg.image_size)
    processor = image_processor_config(pp, "CLIPImageProcessor", "CLIPProcessor", can_crop=True)
    with atomic_directory(path, replaceable=is_model_folder) as tmp:  # the old folder or the new one, never a mix
        save_safetensors(hf_sd, tmp / "model.safetensors", metadata={"format": "pt"})
        names = [write_json(tmp / "config.json", hf_cfg).name, "model.safetensors",
                 write_json(tmp / "preprocessor_config.json", processor).name]
        if tokenizer:
            names += [f.name for f in write_hf_tokenizer(tmp, model.cfg.text_cfg.context_length)]
    return [path / name for name in names]


# ----------------------------------------------------------------------------- the format (formats.py)
detect = is_hf_clip_dir


def load(path: PathLike, model_name: Optional[str] = None):
    """(CLIP in eval mode, PreprocessConfig from preprocessor_config.json); config.json gives the architecture."""
    model = load_hf_clip(path)
    return model, read_image_processor(path, default_preprocess(model.cfg.vision_cfg.image_size))


def save(model, path: PathLike, preprocess_cfg: Optional[PreprocessConfig] = None) -> List[Path]:
    return save_hf_clip(model, path, preprocess_cfg=preprocess_cfg)
