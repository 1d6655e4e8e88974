"""Model parity with OpenCLIP: same state-dict keys, same features for the same weights."""
import math

import open_clip
import pytest
import torch

import clipforge
from clipforge.models.pos_embed import resample_grid_pos_embed
from conftest import CAPTIONS

PARITY_MODELS = ["RN50", "ViT-B-32", "ViT-B-16", "ViT-B-32-quickgelu"]


def _reference(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    # Randomise LayerNorm and BatchNorm affine/statistics too, so every parameter matters.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def preprocessed(photos):
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    return torch.stack([preprocess(p) for p in photos])


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_features_match_openclip(name, preprocessed):
    ref = _reference(name)
    model = clipforge.create_model(name).eval()
    assert set(model.state_dict()) == set(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    tokens = open_clip.tokenize(CAPTIONS)
    with torch.inference_mode():
        img_diff = (model.encode_image(preprocessed) - ref.encode_image(preprocessed)).abs().max().item()
        txt_diff = (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item()
        out = model(preprocessed, tokens)
    assert img_diff <= 1e-5, img_diff
    assert txt_diff <= 1e-5, txt_diff
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(len(preprocessed)), atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_text_trimming_is_exact():
    """Trimming padding after the longest EOT must not change any text feature."""
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-S-32").eval()
    tokens = open_clip.tokenize(["a", "a much longer caption about a dog running on the beach at sunset"])
    with torch.inference_mode():
        trimmed = model.encode_text(tokens)
        # Untrimmed reference: run the full 77 positions through the tower by hand.
        x = model.text.forward_features(tokens)
        pooled = x[torch.arange(2), tokens.argmax(-1)] @ model.text.text_projection
    assert torch.allclose(trimmed, pooled, atol=1e-6)


def _full_trunk_features(model, images, tokens):
    """Image and text features from every position of the last block, pooled afterwards."""
    vision, text = model.visual, model.text
    pooled, _ = vision.pool(vision.forward_features(images))
    trimmed = text._trim(tokens)
    return vision.project(pooled), text.project(text.pool(text.forward_features(trimmed), trimmed))


@pytest.mark.parametrize("text_cfg", [{}, {"no_causal_mask": True}, {"pool_type": "first"}, {"pool_type": "eos", "eos_id": 49407}])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_block_runs_for_the_pooled_token_only(text_cfg, checkpointing):
    """encode_image / encode_text run the last block for the class / pooled token alone, with the
    features and every gradient of the full block (captions of different lengths, so the causal
    mask of the kept token matters)."""
    from clipforge.config import CLIPConfig
    from clipforge.models import build_model
    from train_utils import TINY_MODEL

    cfg = {**TINY_MODEL, "text_cfg": {**TINY_MODEL["text_cfg"], **text_cfg}}
    torch.manual_seed(0)
    model = build_model(CLIPConfig.from_dict(cfg)).train().double()  # float64: the paths differ only in rounding
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    tokens = open_clip.tokenize(["a", "a dog on the beach", "two men ride red bikes up a hill", "cat"],
                                context_length=16)
    seen, first = [], []
    hooks = [tower.transformer.resblocks[-1].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
             for tower in (model.visual, model.text)]
    hooks.append(model.text.transformer.resblocks[0].mlp.register_forward_hook(lambda m, i, o: first.append(i[0].shape)))
    features = torch.cat([model.encode_image(images), model.encode_text(tokens)])
    for hook in hooks:
        hook.remove()
    assert seen == [1, 1], seen  # the last block's MLP saw one position per row in each tower
    lengths = model.text.pooled_lengths(tokens)
    if text_cfg.get("no_causal_mask") or text_cfg.get("pool_type") == "first":  # all rows as long as the longest
        assert first[0][:-1] == (len(tokens), int(lengths.max())), first
    else:  # causal: the blocks ran on each caption's own tokens, packed
        assert first[0][:-1] == (int(lengths.sum()),) and lengths.sum() < 0.6 * lengths.max() * len(tokens), first
    grads = torch.autograd.grad(features.square().sum(), list(model.parameters()), allow_unused=True)
    reference = torch.cat(_full_trunk_features(model, images, tokens))
    ref_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)  # LayerNorm runs in fp32
    for (name, _), grad, ref in zip(model.named_parameters(), grads, ref_grads):
        assert (grad is None) == (ref is None), name
        if grad is not None:
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_packed_causal_stack_equals_the_padded_one():
    """``Transformer(lengths=)`` on packed tokens: each row's first ``lengths`` outputs and every
    gradient equal the padded stack's; the positions after a row's end come out as zeros."""
    from clipforge.models.layers import Transformer

    torch.manual_seed(0)
    stack = Transformer(width=32, layers=3, heads=4).double()
    x = torch.randn(5, 9, 32, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    valid = (torch.arange(9) < lengths[:, None])[..., None]  # [B, L, 1]
    packed = stack(x, is_causal=True, lengths=lengths)
    assert packed[~valid.expand_as(packed)].abs().max() == 0
    padded = stack(x, is_causal=True) * valid
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-6)  # LayerNorm runs in fp32
    weights = torch.randn_like(x)
    grads = torch.autograd.grad((packed * weights).sum(), list(stack.parameters()))
    ref_grads = torch.autograd.grad((padded * weights).sum(), list(stack.parameters()))
    for (name, _), grad, ref in zip(stack.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    kept = stack(x, is_causal=True, lengths=lengths, keep=lengths - 1)  # with the last block run for one token
    torch.testing.assert_close(kept[:, 0], padded[torch.arange(5), lengths - 1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="causal"):
        stack(x, lengths=lengths)  # without the causal mask a row's padding would be seen


def test_state_dict_layout_and_init():
    model = clipforge.create_model("ViT-B-32")
    keys = model.state_dict().keys()
    for key in ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                "token_embedding.weight", "text_projection", "logit_scale", "ln_final.weight"):
        assert key in keys
    assert not any(k.startswith("text.") for k in keys)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match="ViT-B-32"):
        clipforge.create_model("ViT-B-23")


def test_registry_names_and_quickgelu_alias():
    names = clipforge.list_models()
    for n in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14",
              "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "ViT-S-32", "ViT-S-16", "ViT-M-32",
              "ViT-M-16", "ViT-B-32-quickgelu", "RN50-quickgelu", "ViT-H-14-quickgelu"):
        assert n in names, n
    assert clipforge.get_model_config("ViT-L-14-quickgelu").quick_gelu
    assert not clipforge.get_model_config("ViT-L-14").quick_gelu


@pytest.mark.parametrize("name", ["ViT-L-14-336", "RN50x4", "ViT-H-14", "ViT-bigG-14"])
def test_large_configs_build_same_shapes_as_openclip(name):
    """Big architectures: compare parameter shapes on the meta device (no memory, no compute)."""
    cfg = clipforge.get_model_config(name)
    with torch.device("meta"):
        ours = clipforge.CLIP(cfg)
    ref_cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        ref = open_clip.model.CLIP(**ref_cfg)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


def test_add_model_config(tmp_path):
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    import json
    (tmp_path / "tiny-test.json").write_text(json.dumps(cfg))
    assert clipforge.add_model_config(tmp_path / "tiny-test.json") == ["tiny-test"]
    model = clipforge.create_model("tiny-test")
    assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "vision_cfg": {"layerz": 2}}))
    with pytest.raises(ValueError, match="layerz"):
        clipforge.add_model_config(tmp_path / "bad.json")


def test_pos_embed_resampling_matches_openclip():
    torch.manual_seed(0)
    pe = torch.randn(1 + 7 * 7, 16)
    ours = resample_grid_pos_embed(pe, (10, 10))
    sd = {"visual.positional_embedding": pe.clone()}

    class _Visual:
        grid_size = (10, 10)

    class _Model:
        visual = _Visual()

    open_clip.model.resize_pos_embed(sd, _Model())
    assert torch.allclose(ours, sd["visual.positional_embedding"], atol=1e-6)


def test_patch_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = clipforge.get_model_config("ViT-S-32")
    cfg.vision_cfg.patch_dropout = 0.5
    model = clipforge.CLIP(cfg)
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    a, b = model.encode_image(x), model.encode_image(x)
    assert torch.equal(a, b)
    model.train()
    tokens = model.visual.patch_dropout(torch.randn(2, 50, 8))
    assert tokens.shape == (2, 25, 8)


def test_lock_image_tower_leaves_last_groups_trainable():
    model = clipforge.create_model("ViT-S-32")
    model.lock_image_tower(unlocked_groups=2)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert "proj" in trainable and "ln_post.weight" in trainable
    assert "transformer.resblocks.11.attn.in_proj_weight" in trainable
    assert "conv1.weight" not in trainable and "transformer.resblocks.0.mlp.c_fc.weight" not in trainable
    model.lock_text_tower(unlocked_layers=0)
    assert not any(p.requires_grad for p in model.text.parameters())
