"""The OpenCLIP families beyond CLIP/SigLIP/CoCa, on tiny seeded weights: same outputs as OpenCLIP's models.

Each case is a small config built from the same keys as the full-size family (tests/test_model_sweep.py
checks that the full-size configs have OpenCLIP's parameter names and shapes); here both libraries run
the same OpenCLIP-initialised, perturbed weights and must agree to 1e-5.
"""
import json

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

import clipforge  # noqa: E402
from parity_utils import openclip_pair, register  # noqa: E402

TINY_VIT = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
TINY_TEXT = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2}


def _register_tiny_timm_models():
    """Tiny members of timm's EVA-02 and PE families (2 blocks, 32px), registered so both libraries
    build them by name, as the full-size configs name theirs."""
    from timm.models import register_model

    if timm.is_model("cf_test_pe_tiny"):
        return

    @register_model
    def cf_test_pe_tiny(pretrained=False, **kwargs):
        # vit_pe_core_*: rope attention, pre-transformer norm, attention-pool ('map') head.
        args = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, depth=2, ref_feat_shape=(4, 4),
                    attn_pool_num_heads=2)
        return timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, **dict(args, **kwargs))

    @register_model
    def cf_test_eva02_tiny(pretrained=False, **kwargs):
        # eva02_*_clip: swiglu MLP, rope, inner attention scale norm; class-token head.
        args = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, depth=2, ref_feat_shape=(4, 4))
        return timm.create_model("eva02_base_patch16_clip_224", pretrained=False, **dict(args, **kwargs))


def _assert_same(ref, ours, image=None, text=None):
    with torch.no_grad():
        if image is not None:
            torch.testing.assert_close(ours.encode_image(image), ref.encode_image(image), rtol=0, atol=1e-5)
        if text is not None:
            torch.testing.assert_close(ours.encode_text(text), ref.encode_text(text), rtol=0, atol=1e-5)


def _clip_text(batch=3, length=16, eot=63):
    """CLIP-style ids: tokens, an EOT (the largest id) and zero padding of varied lengths."""
    torch.manual_seed(1)
    ids = torch.randint(1, eot, (batch, length))
    for row, end in enumerate((5, 11, length - 1)[:batch]):
        ids[row, end] = eot
        ids[row, end + 1:] = 0
    return ids


def test_clipa_style_tower_matches_open_clip(tmp_path):
    """ViT-*-CLIPA: no ln_pre, mean of patch tokens with ln_post after pooling; bidirectional text
    tower pooled at the last position (BERT-vocabulary ids, [SEP] stripped)."""
    vision = dict(TINY_VIT, no_ln_pre=True, pool_type="avg", final_ln_after_pool=True)
    text = dict(TINY_TEXT, pool_type="last", no_causal_mask=True)
    ref, ours = openclip_pair(tmp_path, "cf-test-clipa", {"embed_dim": 48, "vision_cfg": vision, "text_cfg": text})
    assert ours.visual.ln_pre.__class__ is torch.nn.Identity
    image = torch.randn(2, 3, 32, 32)
    _assert_same(ref, ours, image, _clip_text())
    # ln_post on the pooled token, not on every token: the features differ from pooling normalised tokens.
    with torch.no_grad():
        tokens = ours.visual.forward_features(image)
        pooled_after = ours.visual.ln_post(tokens[:, 1:].mean(dim=1)) @ ours.visual.proj
        pooled_before = ours.visual.ln_post(tokens)[:, 1:].mean(dim=1) @ ours.visual.proj
        torch.testing.assert_close(ours.encode_image(image), pooled_after, rtol=0, atol=1e-5)
        assert not torch.allclose(pooled_after, pooled_before, atol=1e-3)


def test_worldwide_style_eos_pool_matches_open_clip(tmp_path):
    """ViT-*-worldwide (MetaCLIP 2): the text feature is taken at the first EOS id (2), not the argmax."""
    text = dict(TINY_TEXT, pool_type="eos", eos_id=2)
    ref, ours = openclip_pair(tmp_path, "cf-test-worldwide", {"embed_dim": 48, "quick_gelu": True, "vision_cfg": TINY_VIT,
                                                      "text_cfg": text})
    ids = torch.randint(3, 64, (3, 16))
    for row, end in enumerate((4, 9, 15)):
        ids[row, end] = 2
        ids[row, end + 1:] = 1
    _assert_same(ref, ours, torch.randn(2, 3, 32, 32), ids)


@pytest.mark.parametrize("family,timm_name,pool", [("pe", "cf_test_pe_tiny", "map"),
                                                   ("eva02", "cf_test_eva02_tiny", "token")])
def test_timm_families_with_null_proj_match_open_clip(tmp_path, family, timm_name, pool):
    """PE-Core / EVA / MobileCLIP configs: ``timm_proj: null`` makes timm's own classifier the projection."""
    _register_tiny_timm_models()
    vision = {"image_size": 32, "timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": pool,
              "timm_proj": None}
    cfg = {"embed_dim": 48, "vision_cfg": vision, "text_cfg": dict(TINY_TEXT, no_causal_mask=family == "eva02"),
           "custom_text": True}
    ref, ours = openclip_pair(tmp_path, f"cf-test-{family}", cfg)
    assert "visual.trunk.head.weight" in ours.state_dict() and not list(ours.visual.head.children())
    _assert_same(ref, ours, torch.randn(2, 3, 32, 32), _clip_text())


# ---- Hugging Face encoder-decoder text towers (the encoder is kept) ------------------------------


@pytest.fixture(scope="module")
def tiny_hf_dirs(tmp_path_factory):
    """Tiny mT5 and NLLB (M2M100) configs saved locally; both libraries read them by directory path."""
    root = tmp_path_factory.mktemp("tiny-hf")
    transformers.MT5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=1,
                           num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                           eos_token_id=1, decoder_start_token_id=0).save_pretrained(root / "mt5")
    transformers.M2M100Config(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                              decoder_ffn_dim=48, max_position_embeddings=40, scale_embedding=True,
                              activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
                              decoder_start_token_id=2).save_pretrained(root / "nllb")
    return {"mt5": str(root / "mt5"), "nllb": str(root / "nllb")}


def _hf_text_ids(pad_id):
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (3, 12))
    ids[0, 5:] = pad_id
    ids[1, 9:] = pad_id
    return ids


@pytest.mark.parametrize("kind,pooler,proj", [("mt5", "mean_pooler", "mlp"), ("nllb", "cls_pooler", "linear")])
def test_encoder_decoder_text_towers_match_open_clip(tmp_path, tiny_hf_dirs, kind, pooler, proj):
    """mt5-*-ViT-* (T5 encoder, mean pooling) and nllb-clip-* (M2M100 encoder, first token): the
    configs omit ``custom_text``; the text tower is stored under ``text.`` as OpenCLIP's factory does."""
    cfg = {"embed_dim": 24, "vision_cfg": TINY_VIT,
           "text_cfg": {"hf_model_name": tiny_hf_dirs[kind], "hf_tokenizer_name": tiny_hf_dirs[kind],
                        "hf_pooler_type": pooler, "hf_proj_type": proj}}
    ref, ours = openclip_pair(tmp_path, f"cf-test-{kind}", cfg)
    assert ours.cfg.custom_text and isinstance(ref, open_clip.CustomTextCLIP)
    layers = "block" if kind == "mt5" else "layers"
    assert any(k.startswith(f"text.transformer.{layers}.1.") for k in ours.state_dict())
    assert not any(".decoder." in k or k.startswith("text.transformer.decoder") for k in ours.state_dict())
    pad = 0 if kind == "mt5" else 1
    ids = _hf_text_ids(pad)
    _assert_same(ref, ours, text=ids)
    # Padding is masked: what sits in padded positions does not change the features.
    other = ids.clone()
    other[0, 6:] = pad
    other[0, 5] = pad
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(other), ours.encode_text(ids), rtol=0, atol=1e-5)


class _NoTokenizer:
    """save_for_hf writes a tokenizer next to the weights; these tests compare the models only."""

    def save_pretrained(self, directory):
        pass


@pytest.mark.parametrize("kind", ["nllb", "pe"])
def test_open_clip_hub_dirs_of_new_families_load(tmp_path, tiny_hf_dirs, kind):
    """OpenCLIP hub-layout folders (``open_clip_config.json`` as OpenCLIP's ``save_for_hf`` writes it,
    without ``custom_text`` / with ``timm_proj: null``) load through clipforge's ``local-dir:`` reader."""
    from open_clip.push_to_hf_hub import save_for_hf

    _register_tiny_timm_models()
    if kind == "nllb":
        cfg = {"embed_dim": 24, "vision_cfg": TINY_VIT,
               "text_cfg": {"hf_model_name": tiny_hf_dirs["nllb"], "hf_tokenizer_name": tiny_hf_dirs["nllb"],
                            "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}}
        text = _hf_text_ids(1)
    else:
        cfg = {"embed_dim": 48, "custom_text": True, "text_cfg": TINY_TEXT,
               "vision_cfg": {"image_size": 32, "timm_model_name": "cf_test_pe_tiny", "timm_pool": "map",
                              "timm_proj": None}}
        text = _clip_text()
    ref, _ = openclip_pair(tmp_path, f"cf-test-hubdir-{kind}", cfg)
    folder = tmp_path / "hub"
    save_for_hf(ref, _NoTokenizer(), cfg, str(folder), safe_serialization=True)
    assert "custom_text" not in json.loads((folder / "open_clip_config.json").read_text())["model_cfg"] or kind == "pe"
    ours = clipforge.create_model("local-dir:" + str(folder))
    _assert_same(ref, ours, torch.randn(2, 3, 32, 32), text)
