"""Every registered architecture builds, and matches OpenCLIP's state-dict names and shapes where OpenCLIP has it.

Models are built on the meta device (no memory, no compute), so the sweep covers the full-size
configs. Hugging Face text towers need their transformers config, which would come from the Hub:
the test hands both libraries the same locally made config instead.
"""
import dataclasses

import open_clip
import pytest
import torch
import transformers

import clipforge
from clipforge.config import TEXT_KINDS, VISION_KINDS, CLIPConfig
from clipforge.models import MODEL_CLASSES, build_model
from clipforge.models.clip import TEXT_TOWERS, VISION_TOWERS

# The Hub configs of the text towers OpenCLIP's registry names (sizes from their config.json).
_HF_CONFIGS = {
    "roberta-base": lambda: transformers.RobertaConfig(),
    "xlm-roberta-base": lambda: transformers.XLMRobertaConfig(
        vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1),
    "xlm-roberta-large": lambda: transformers.XLMRobertaConfig(
        vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, hidden_size=1024,
        num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # T5 encoders (mT5): OpenCLIP keeps the encoder of the encoder-decoder model.
    "google/mt5-base": lambda: transformers.MT5Config(
        vocab_size=250112, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0),
    "google/mt5-xl": lambda: transformers.MT5Config(
        vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0),
    # M2M100 encoders (NLLB-200 distilled).
    "facebook/nllb-200-distilled-600M": lambda: transformers.M2M100Config(
        vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
        scale_embedding=True, activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2),
    "facebook/nllb-200-distilled-1.3B": lambda: transformers.M2M100Config(
        vocab_size=256206, d_model=1024, encoder_layers=24, decoder_layers=24, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=8192, decoder_ffn_dim=8192, max_position_embeddings=1024,
        scale_embedding=True, activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2),
}


@pytest.fixture()
def offline_hf_configs(monkeypatch):
    def from_pretrained(name, *args, **kwargs):
        if name not in _HF_CONFIGS:
            raise AssertionError(f"the sweep has no local config for {name!r}; add it to _HF_CONFIGS")
        config = _HF_CONFIGS[name]()
        return (config, {}) if kwargs.get("return_unused_kwargs") else config

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _open_clip_model(name: str) -> torch.nn.Module:
    """OpenCLIP's model for ``name`` as its factory builds it (without weights or device moves)."""
    cfg = open_clip.get_model_config(name)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cfg["text_cfg"]["hf_model_pretrained"] = False  # architecture only: no weight download
    if "multimodal_cfg" in cfg:  # as open_clip's factory decides
        return open_clip.CoCa(**cfg)
    cls = open_clip.model.CustomTextCLIP if custom else open_clip.model.CLIP
    return cls(**cfg)


@pytest.mark.parametrize("name", clipforge.list_models())
def test_every_architecture_builds_and_matches_open_clip(name, offline_hf_configs):
    cfg = clipforge.get_model_config(name)
    assert cfg.vision_cfg.kind in VISION_KINDS and cfg.text_cfg.kind in TEXT_KINDS
    cfg.text_cfg.hf_model_pretrained = False  # architecture only: no weight download
    with torch.device("meta"):
        ours = build_model(cfg)
    assert isinstance(ours, MODEL_CLASSES[cfg.model_kind])
    reference = name
    if reference not in open_clip.list_models() and name.endswith("-quickgelu"):
        reference = name[: -len("-quickgelu")]  # our alias; the activation does not change any shape
    if reference not in open_clip.list_models():
        pytest.skip(f"{name} is not an OpenCLIP architecture")
    with torch.device("meta"):
        ref = _open_clip_model(reference)
    ref_shapes = {k: v for k, v in _shapes(ref).items() if k != "attn_mask"}  # a derived buffer we rebuild
    # the model class follows from the config in both libraries (multimodal_cfg makes a CoCa)
    assert (cfg.model_kind == "coca") == isinstance(ref, open_clip.CoCa)
    assert _shapes(ours) == ref_shapes


@pytest.mark.parametrize("name", clipforge.list_models())
def test_every_config_round_trips_through_open_clip_json(name):
    """``to_dict`` is OpenCLIP's model JSON: no clipforge-only keys, and it reads back to the same config."""
    cfg = clipforge.get_model_config(name)
    d = cfg.to_dict()
    assert "kind" not in d["vision_cfg"] and "kind" not in d["text_cfg"]
    assert CLIPConfig.from_dict(d) == cfg


def test_tower_kinds_are_explicit_and_checked():
    vit = clipforge.get_model_config("ViT-B-32")
    assert (vit.vision_cfg.kind, vit.text_cfg.kind) == ("vit", "transformer")
    assert clipforge.get_model_config("RN50").vision_cfg.kind == "resnet"
    assert clipforge.get_model_config("convnext_base").vision_cfg.kind == "timm"
    assert clipforge.get_model_config("roberta-ViT-B-32").text_cfg.kind == "hf"
    d = vit.to_dict()
    d["vision_cfg"]["kind"] = "resnet"  # contradicts the int `layers`
    with pytest.raises(ValueError, match=r"vision_cfg.kind is 'resnet'"):
        CLIPConfig.from_dict(d)
    d["vision_cfg"]["kind"] = "vitt"
    with pytest.raises(ValueError, match=r"not one of"):
        CLIPConfig.from_dict(d)
    explicit = dataclasses.replace(vit.vision_cfg, kind="vit")
    assert explicit == vit.vision_cfg


def test_tower_table_covers_every_kind():
    assert set(VISION_TOWERS) == set(VISION_KINDS)
    assert set(TEXT_TOWERS) == set(TEXT_KINDS)
