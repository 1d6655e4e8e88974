"""timm image towers and Hugging Face text towers: OpenCLIP-written checkpoints load with equal outputs."""

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

import clipforge  # noqa: E402
from parity_utils import openclip_pair, register  # noqa: E402

TINY_TEXT = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def _register_tiny_vit():
    """A 2-block, 64-wide ViT at 32px, registered in timm so both libraries build it by name."""
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if timm.is_model("cf_test_vit_tiny"):
        return

    @register_model
    def cf_test_vit_tiny(pretrained=False, **kwargs):
        args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
        # timm's builder, with an existing variant's (unused) pretrained metadata.
        return _create_vision_transformer("vit_tiny_patch16_224", pretrained=False, **dict(args, **kwargs))


TIMM_CASES = {
    # convnext_base.json's head: timm's default pool, a linear projection on the pooled features.
    "cf-test-convnext-linear": dict(timm_model_name="convnext_atto", timm_pool="", timm_proj="linear"),
    "cf-test-convnext-mlp": dict(timm_model_name="convnext_atto", timm_pool="avg", timm_proj="mlp",
                                 timm_proj_bias=True),
    "cf-test-vit-token": dict(timm_model_name="cf_test_vit_tiny", timm_pool="token", timm_proj="linear"),
    "cf-test-vit-map": dict(timm_model_name="cf_test_vit_tiny", timm_pool="map", timm_proj="none"),
    "cf-test-vit-avg-classifier": dict(timm_model_name="cf_test_vit_tiny", timm_pool="avg", timm_proj=""),
}


@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_timm_tower_matches_open_clip(tmp_path, name):
    _register_tiny_vit()
    vision = dict(image_size=32, timm_model_pretrained=False, **TIMM_CASES[name])
    embed_dim = 64 if vision["timm_proj"] == "none" else 48
    ref, ours = openclip_pair(tmp_path, name, {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": TINY_TEXT})
    image = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 60, (2, 16))
    with torch.no_grad():
        ref_img, our_img = ref.encode_image(image), ours.encode_image(image)
        assert our_img.shape == (2, embed_dim)
        torch.testing.assert_close(our_img, ref_img, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(text), ref.encode_text(text), rtol=0, atol=1e-5)


def test_timm_tower_surface(tmp_path):
    _register_tiny_vit()
    vision = dict(image_size=32, timm_model_name="convnext_atto", timm_pool="", timm_proj="linear")
    register(tmp_path, "cf-test-convnext-surface", {"embed_dim": 48, "vision_cfg": vision, "text_cfg": TINY_TEXT})
    model = clipforge.create_model("cf-test-convnext-surface")
    tower = model.visual
    feats = tower.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, tower.trunk.num_features, 2, 2)  # stride-32 map of a 64px image

    tower.lock(unlocked_groups=1)
    trunk_grads = {n: p.requires_grad for n, p in tower.trunk.named_parameters()}
    assert not trunk_grads["stem.0.weight"] and trunk_grads["head.norm.weight"]
    assert all(p.requires_grad for p in tower.head.parameters())
    tower.lock()
    assert not any(p.requires_grad for p in tower.trunk.parameters())

    tower.set_grad_checkpointing(True)
    assert tower.trunk.stages[0].grad_checkpointing

    vit = clipforge.create_model(register(tmp_path, "cf-test-vit-nwd", {
        "embed_dim": 48, "vision_cfg": dict(image_size=32, timm_model_name="cf_test_vit_tiny", timm_pool="token"),
        "text_cfg": TINY_TEXT}))
    assert {"visual.trunk.pos_embed", "visual.trunk.cls_token"} <= vit.no_weight_decay()
    assert all(n.startswith("visual.") or n in ("logit_scale", "logit_bias") or n.startswith("text.")
               for n in vit.no_weight_decay())
    params = dict(vit.named_parameters())
    assert {n for n in vit.no_weight_decay() if n.startswith("visual.")} <= set(params)


def test_timm_tower_rejects_unknown_pool():
    from clipforge.config import VisionConfig
    from clipforge.models.timm_tower import TimmTower

    with pytest.raises(ValueError, match="timm_pool"):
        TimmTower(VisionConfig(timm_model_name="convnext_atto", timm_pool="cls"), 32)


# ---- Hugging Face text towers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A 2-layer RoBERTa config saved locally: both libraries read it by directory path."""
    path = tmp_path_factory.mktemp("tiny-roberta")
    transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
                               ).save_pretrained(path)
    return str(path)


def _hf_cfg(model_dir, pooler, proj, embed_dim=24):
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"hf_model_name": model_dir, "hf_model_pretrained": False, "hf_pooler_type": pooler,
                     "hf_proj_type": proj, "context_length": 12},
        "custom_text": True,
    }


def _padded_ids():
    ids = torch.randint(3, 100, (3, 12))
    ids[:, 0] = 0  # <s>
    ids[0, 5:] = 1  # padding after 5 tokens
    ids[1, 9:] = 1
    return ids


@pytest.mark.parametrize("pooler,proj", [("mean_pooler", "mlp"), ("mean_pooler", "linear"),
                                         ("cls_pooler", "linear"), ("cls_last_hidden_state_pooler", "mlp")])
def test_hf_text_tower_matches_open_clip(tmp_path, tiny_roberta, pooler, proj):
    name = f"cf-test-roberta-{pooler}-{proj}"
    ref, ours = openclip_pair(tmp_path, name, _hf_cfg(tiny_roberta, pooler, proj))
    assert any(k.startswith("text.transformer.encoder.layer.1.") for k in ours.state_dict())
    assert ("text.transformer.pooler.dense.weight" in ours.state_dict()) == (pooler == "cls_pooler")
    ids = _padded_ids()
    with torch.no_grad():
        expected = ref.encode_text(ids)
        torch.testing.assert_close(ours.encode_text(ids), expected, rtol=0, atol=1e-5)
    # Padding must be masked: changing what sits in padded positions leaves the features unchanged.
    if pooler == "mean_pooler":
        other = ids.clone()
        other[0, 5:] = 1
        other[0, 6] = 1
        with torch.no_grad():
            torch.testing.assert_close(ours.encode_text(other), expected, rtol=0, atol=1e-5)


def test_hf_max_pooler_ignores_padding(tmp_path, tiny_roberta):
    # OpenCLIP's max pooler cannot run (masked_fill with an integer mask); check against the definition.
    register(tmp_path, "cf-test-roberta-max", _hf_cfg(tiny_roberta, "max_pooler", "linear"))
    model = clipforge.create_model("cf-test-roberta-max").eval()
    tower = model.text
    ids = _padded_ids()
    with torch.no_grad():
        mask = ids != 1
        hidden = tower.transformer(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        expected = torch.stack([h[m].max(dim=0).values for h, m in zip(hidden, mask)]) @ tower.proj.weight.T
        torch.testing.assert_close(model.encode_text(ids), expected, rtol=0, atol=1e-5)


def test_hf_text_tower_lock_and_checkpointing(tmp_path, tiny_roberta):
    register(tmp_path, "cf-test-roberta-lock", _hf_cfg(tiny_roberta, "mean_pooler", "mlp"))
    model = clipforge.create_model("cf-test-roberta-lock")
    model.lock_text_tower(unlocked_layers=1)
    grads = {n: p.requires_grad for n, p in model.text.named_parameters()}
    assert not grads["transformer.embeddings.word_embeddings.weight"]
    assert not grads["transformer.encoder.layer.0.attention.self.query.weight"]
    assert grads["transformer.encoder.layer.1.attention.self.query.weight"]
    assert grads["proj.0.weight"]
    model.lock_text_tower(0)
    assert not any(p.requires_grad for p in model.text.transformer.parameters())
    model.set_grad_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.text.transformer.modules())
    model.set_grad_checkpointing(False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.text.transformer.modules())


def test_non_strict_checkpoint_load_fetches_no_hf_weights(tmp_path, tiny_roberta):
    """With a checkpoint, the HF text tower is not fetched from the hub first, strict or not (the
    directory holds only a config, so a fetch would fail), and the checkpoint's weights are used."""
    cfg = _hf_cfg(tiny_roberta, "mean_pooler", "linear")
    cfg["text_cfg"]["hf_model_pretrained"] = True
    register(tmp_path, "cf-test-roberta-pretrained", cfg)
    torch.manual_seed(0)
    no_fetch = {**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_pretrained": False}}
    register(tmp_path, "cf-test-roberta-scratch", no_fetch)
    source = clipforge.create_model("cf-test-roberta-scratch").eval()
    path = tmp_path / "ckpt.pt"
    torch.save(source.state_dict(), path)
    ids = _padded_ids()
    for strict in (True, False):
        loaded = clipforge.create_model("cf-test-roberta-pretrained", pretrained=str(path), strict=strict)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode_text(ids), source.encode_text(ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["convnext_base", "convnext_large_d"])
def test_builtin_convnext_configs_match_open_clip_keys(name):
    """Full-size timm towers (linear and mlp heads), built on the meta device: same keys and shapes."""
    with torch.device("meta"):
        ref = open_clip.create_model(name, device="meta").state_dict()
        ours = clipforge.models.CLIP(clipforge.get_model_config(name)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
