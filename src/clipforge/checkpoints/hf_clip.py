"""Hugging Face ``transformers`` CLIPModel directories, read and written with exact weights.

transformers 4.x and 5.x ``CLIPModel`` files share weight names; files from transformers < 4.31 also
carry ``position_ids`` buffers, and old configs pool text at the argmax id (``eos_token_id == 2``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..config import OPENAI_MEAN, OPENAI_STD, CLIPConfig, PreprocessConfig, TextConfig, VisionConfig, as_tuple2
from .io import CheckpointError, PathLike, atomic_write, read_checkpoint, save_safetensors
from .load import unwrap_state_dict

# One transformer block: HF name -> (OpenCLIP name, op). Ops: "=" copy; "T" transpose (HF Linear
# [out, in] vs OpenCLIP parameter [in, out]); "q"/"k"/"v" the thirds (dim 0) of the fused in_proj.
_BLOCK = {
    "self_attn.q_proj.weight": ("attn.in_proj_weight", "q"), "self_attn.q_proj.bias": ("attn.in_proj_bias", "q"),
    "self_attn.k_proj.weight": ("attn.in_proj_weight", "k"), "self_attn.k_proj.bias": ("attn.in_proj_bias", "k"),
    "self_attn.v_proj.weight": ("attn.in_proj_weight", "v"), "self_attn.v_proj.bias": ("attn.in_proj_bias", "v"),
    "self_attn.out_proj.weight": ("attn.out_proj.weight", "="), "self_attn.out_proj.bias": ("attn.out_proj.bias", "="),
    "layer_norm1.weight": ("ln_1.weight", "="), "layer_norm1.bias": ("ln_1.bias", "="),
    "layer_norm2.weight": ("ln_2.weight", "="), "layer_norm2.bias": ("ln_2.bias", "="),
    "mlp.fc1.weight": ("mlp.c_fc.weight", "="), "mlp.fc1.bias": ("mlp.c_fc.bias", "="),
    "mlp.fc2.weight": ("mlp.c_proj.weight", "="), "mlp.fc2.bias": ("mlp.c_proj.bias", "="),
}
# transformers CLIPModel key template -> (OpenCLIP key template, op); "{}" is a block index.
HF_TO_OPENCLIP: Dict[str, Tuple[str, str]] = {
    "logit_scale": ("logit_scale", "="),
    "text_projection.weight": ("text_projection", "T"), "visual_projection.weight": ("visual.proj", "T"),
    "text_model.embeddings.token_embedding.weight": ("token_embedding.weight", "="),
    "text_model.embeddings.position_embedding.weight": ("positional_embedding", "="),
    "text_model.final_layer_norm.weight": ("ln_final.weight", "="),
    "text_model.final_layer_norm.bias": ("ln_final.bias", "="),
    "vision_model.embeddings.class_embedding": ("visual.class_embedding", "="),
    "vision_model.embeddings.patch_embedding.weight": ("visual.conv1.weight", "="),
    "vision_model.embeddings.position_embedding.weight": ("visual.positional_embedding", "="),
    # "layrnorm" (sic) is how transformers spells it in its files.
    "vision_model.pre_layrnorm.weight": ("visual.ln_pre.weight", "="),
    "vision_model.pre_layrnorm.bias": ("visual.ln_pre.bias", "="),
    "vision_model.post_layernorm.weight": ("visual.ln_post.weight", "="),
    "vision_model.post_layernorm.bias": ("visual.ln_post.bias", "="),
    **{f"text_model.encoder.layers.{{}}.{h}": (f"transformer.resblocks.{{}}.{o}", op) for h, (o, op) in _BLOCK.items()},
    **{f"vision_model.encoder.layers.{{}}.{h}": (f"visual.transformer.resblocks.{{}}.{o}", op)
       for h, (o, op) in _BLOCK.items()},
}
# Generated inverse: OpenCLIP template -> [(HF template, op)], q/k/v in fused order.
OPENCLIP_TO_HF: Dict[str, List[Tuple[str, str]]] = {}
for _hf, (_oc, _op) in HF_TO_OPENCLIP.items():
    OPENCLIP_TO_HF.setdefault(_oc, []).append((_hf, _op))
# Buffers that transformers < 4.31 saved; they are arange() and rebuilt from shapes.
HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_FUSED = ("q", "k", "v")
_INDEX = re.compile(r"\.(\d+)\.")

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for keys a config.json leaves out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# hidden_act -> (quick_gelu, act_kwargs); each is computed by the same torch op on both sides.
_ACTIVATIONS = {"quick_gelu": (True, None), "gelu": (False, None),
                "gelu_pytorch_tanh": (False, {"approximate": "tanh"})}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes used by CLIPImageProcessor
_LEGACY_EOS = 2  # transformers pools at the argmax token id when text eos_token_id == 2
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _split_index(key: str) -> Tuple[str, Optional[int]]:
    """("a.3.b" -> ("a.{}.b", 3)); keys without a block index come back unchanged with None."""
    m = _INDEX.search(key)
    return (key, None) if m is None else (key[: m.start()] + ".{}." + key[m.end():], int(m.group(1)))


def _unexpected(source: str, what: str, keys: List[str]) -> CheckpointError:
    return CheckpointError(f"{source}: {len(keys)} unexpected {what} key(s): {', '.join(keys[:8])}"
                           + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""))


def hf_to_openclip(state_dict: Dict[str, torch.Tensor], source: str = "state dict") -> Dict[str, torch.Tensor]:
    """transformers CLIPModel weights -> OpenCLIP (OpenAI-layout) weights; errors on unknown keys."""
    out: Dict[str, torch.Tensor] = {}
    fused: Dict[str, Dict[str, torch.Tensor]] = {}
    unexpected = [k for k in state_dict if k not in HF_IGNORED and _split_index(k)[0] not in HF_TO_OPENCLIP]
    if unexpected:
        raise _unexpected(source, "transformers CLIPModel", unexpected)
    for key, tensor in state_dict.items():
        template, index = _split_index(key)
        if key in HF_IGNORED:
            continue
        oc_template, op = HF_TO_OPENCLIP[template]
        oc_key = oc_template.format(index)
        if op in _FUSED:
            fused.setdefault(oc_key, {})[op] = tensor
        else:
            out[oc_key] = tensor.t().contiguous() if op == "T" else tensor
    for oc_key, parts in fused.items():
        missing = [p for p in _FUSED if p not in parts]
        if missing:
            raise CheckpointError(f"{source}: {oc_key} lacks its {'/'.join(missing)} projection(s)")
        out[oc_key] = torch.cat([parts[p] for p in _FUSED], dim=0)  # 3 x [D, ...] -> [3D, ...]
    return out


def openclip_to_hf(state_dict: Dict[str, torch.Tensor], source: str = "model") -> Dict[str, torch.Tensor]:
    """OpenCLIP (OpenAI-layout) weights -> transformers CLIPModel weights; errors on unknown keys."""
    out: Dict[str, torch.Tensor] = {}
    unexpected = [k for k in state_dict if _split_index(k)[0] not in OPENCLIP_TO_HF]
    if unexpected:
        raise _unexpected(source, "CLIP (not representable in transformers CLIPModel)", unexpected)
    for key, tensor in state_dict.items():
        template, index = _split_index(key)
        targets = OPENCLIP_TO_HF[template]
        thirds = tensor.chunk(3, dim=0) if targets[0][1] in _FUSED else None  # [3D, ...] -> 3 x [D, ...]
        for hf_template, op in targets:
            value = thirds[_FUSED.index(op)] if op in _FUSED else (tensor.t() if op == "T" else tensor)
            out[hf_template.format(index)] = value.contiguous()
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


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
        raise CheckpointError("model cannot be written as a transformers CLIPModel: it has "
                              + "; ".join(_unsupported(cfg)))
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
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"
    except (ValueError, AttributeError):  # not JSON / not an object
        return False


def _read_hf_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: {"weight_map": {key: shard file}}
        sd: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(read_checkpoint(path / shard))
        return sd, str(index)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return unwrap_state_dict(read_checkpoint(path / name)), str(path / name)
    files = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"{path}: no transformers weights ({' or '.join(WEIGHT_FILES)}); files: {files}")


def read_hf_preprocess(path: PathLike, image_size: int) -> PreprocessConfig:
    """preprocessor_config.json (CLIPImageProcessor) as a PreprocessConfig; defaults when absent."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return PreprocessConfig(image_size=image_size)
    p = json.loads(file.read_text())
    size, crop = p.get("size") or {}, p.get("crop_size") or {}
    squash = "shortest_edge" not in size and not p.get("do_center_crop", True)
    box = size if squash else crop
    h, w = box.get("height", image_size), box.get("width", image_size)
    return PreprocessConfig(image_size=h if h == w else (h, w), resize_mode="squash" if squash else "shortest",
                            interpolation=_RESAMPLE.get(p.get("resample", 3), "bicubic"),
                            mean=tuple(p.get("image_mean", OPENAI_MEAN)), std=tuple(p.get("image_std", OPENAI_STD)))


def load_hf_clip(path: PathLike):
    """A transformers CLIPModel directory as a clipforge CLIP (fp32, eval mode)."""
    from .openclip_hub import build_with_weights

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        files = sorted(p.name for p in path.iterdir()) if path.is_dir() else "not a directory"
        raise CheckpointError(f"{config}: missing; {path} is not a transformers CLIP directory (files: {files})")
    cfg = config_from_hf(json.loads(config.read_text()), source=str(config))
    sd, source = _read_hf_weights(path)
    return build_with_weights(cfg, hf_to_openclip(sd, source), source)


def save_hf_clip(model, path: PathLike, tokenizer: bool = True,
                 preprocess_cfg: Optional[PreprocessConfig] = None) -> List[Path]:
    """Write ``model`` so ``transformers.CLIPModel/CLIPProcessor.from_pretrained(path)`` load it."""
    path = Path(path)
    sd = model.state_dict()
    if model.cfg.custom_text:  # keys under "text." -> OpenAI root layout
        sd = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    hf_cfg = config_to_hf(model.cfg, float(model.logit_scale.detach().reshape(-1)[0]), model.logit_scale.dtype)
    hf_sd = openclip_to_hf(sd, source=type(model).__name__)
    save_safetensors(hf_sd, path / "model.safetensors", metadata={"format": "pt"})
    pp = preprocess_cfg or PreprocessConfig(image_size=model.cfg.vision_cfg.image_size)
    written = [_write_json(path / "config.json", hf_cfg), path / "model.safetensors",
               _write_json(path / "preprocessor_config.json", _image_processor_config(pp))]
    if tokenizer:
        from .openclip_hub import write_hf_tokenizer
        written += write_hf_tokenizer(path, model.cfg.text_cfg.context_length)
    return written


def _image_processor_config(pp: PreprocessConfig) -> dict:
    h, w = (pp.image_size, pp.image_size) if isinstance(pp.image_size, int) else pp.image_size
    resample = {name: code for code, name in _RESAMPLE.items()}
    if pp.resize_mode not in ("shortest", "squash") or pp.interpolation not in resample:
        raise CheckpointError(f"CLIPImageProcessor cannot express resize_mode={pp.resize_mode!r}, "
                              f"interpolation={pp.interpolation!r}")
    squash = pp.resize_mode == "squash"
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor", "do_resize": True,
            "size": {"height": h, "width": w} if squash else {"shortest_edge": min(h, w)},
            "resample": resample[pp.interpolation], "do_center_crop": not squash,
            "crop_size": {"height": h, "width": w}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pp.mean), "image_std": list(pp.std), "do_convert_rgb": True}


def _write_json(file: Path, obj) -> Path:
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return file
