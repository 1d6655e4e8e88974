"""forward_intermediates against open_clip 3.3: same keys, order, shapes and values on the same weights.

Every tower kind (ViT with class-token / average / attentional pooling, ModifiedResNet, timm trunks
including a SigLIP-style one without class token, CLIP's and CoCa's text towers) is built by open_clip
from a seed, its weights perturbed so that zero-initialised biases and norms matter, and loaded into
clipforge; then every output tensor is compared over a grid of options.
"""
import itertools

import open_clip
import pytest
import torch

import clipforge
from clipforge.config import CLIPConfig
from clipforge.models.layers import feature_take_indices

TEXT = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 3}
VIT = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16}

CLIP_CASES = {
    # OpenAI layout (text at the root of the state dict), class-token pooling, layer scale.
    "vit-tok": {"embed_dim": 24, "vision_cfg": {**VIT, "ls_init_value": 0.5}, "text_cfg": TEXT},
    "vit-avg-final-ln": {"embed_dim": 24, "vision_cfg": {**VIT, "pool_type": "avg", "final_ln_after_pool": True,
                                                         "no_ln_pre": True}, "text_cfg": TEXT},
    # Attentional pool: ln_post has the pooler's width (= the tower's here, so normalize_intermediates works).
    "vit-attn-pool": {"embed_dim": 32, "vision_cfg": {**VIT, "attentional_pool": True, "attn_pooler_queries": 4,
                                                      "attn_pooler_heads": 2}, "text_cfg": TEXT},
    # Custom text tower: bidirectional, pooled at the first token, projection with a bias.
    "custom-text": {"embed_dim": 24, "custom_text": True, "init_logit_bias": -3.0, "vision_cfg": VIT,
                    "text_cfg": {**TEXT, "no_causal_mask": True, "pool_type": "first", "proj_bias": True}},
    "resnet": {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8,
                                               "head_width": 32}, "text_cfg": TEXT},
}
COCA = {"embed_dim": 32, "vision_cfg": {**VIT, "attentional_pool": True, "attn_pooler_heads": 2,
                                        "attn_pooler_queries": 5, "output_tokens": True},
        "text_cfg": {**TEXT, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def _perturbed(ref: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return ref.eval()


def _open_clip_model(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    if "multimodal_cfg" in cfg:
        return _perturbed(open_clip.CoCa(**kwargs))
    cls = open_clip.model.CustomTextCLIP if cfg.get("custom_text") else open_clip.model.CLIP
    return _perturbed(cls(**kwargs))


def _pair(cfg: dict):
    ref = _open_clip_model(cfg)
    ours = clipforge.create_model(CLIPConfig.from_dict({**cfg, "custom_text": True} if "multimodal_cfg" in cfg
                                                       else cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(cfg: dict, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    size = cfg["vision_cfg"]["image_size"]
    image = torch.randn(batch, 3, size, size, generator=g)
    text = torch.randint(1, 60, (batch, cfg["text_cfg"]["context_length"]), generator=g)
    text[0, 9], text[0, 10:] = 63, 0  # an end token (argmax) then padding
    return image, text


def assert_same_output(ref_out: dict, our_out: dict, atol: float = 1e-5) -> None:
    """Same keys in the same order; lists of the same length; every tensor of equal shape and value."""
    assert list(our_out) == list(ref_out)
    for key, ref_value in ref_out.items():
        ours = our_out[key]
        if isinstance(ref_value, list):
            assert isinstance(ours, list) and len(ours) == len(ref_value), key
            pairs = zip(ref_value, ours)
        else:
            pairs = [(ref_value, ours)]
        for a, b in pairs:
            assert a.shape == b.shape, (key, a.shape, b.shape)
            torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=key)


INDICES = [None, 1, 2, [0], [0, -1], [-2], [2, 0]]
# (output_fmt, extra tokens, normalize_intermediates): an orthogonal array covering every pair of values.
FORMAT_OPTIONS = [("NCHW", False, False), ("NCHW", True, True), ("NLC", False, True), ("NLC", True, False)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is many times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grid(indices):
    for index, stop_early, only, (fmt, extra, norm_inter) in itertools.product(
            indices, [False, True], [False, True], FORMAT_OPTIONS):
        yield index, stop_early, fmt, extra, only, norm_inter


@pytest.mark.parametrize("name", sorted(CLIP_CASES))
def test_clip_forward_intermediates_match_open_clip(name):
    cfg = CLIP_CASES[name]
    ref, ours = _pair(cfg)
    image, text = _inputs(cfg)
    resnet = name == "resnet"
    indices = [None, 1, 3, [0, 2], [-1], [4, -5]] if resnet else INDICES
    checked = 0
    with torch.no_grad():
        for index, stop_early, fmt, extra, only, norm_inter in _grid(indices):
            fmt = "NCHW" if resnet else fmt
            if resnet and not only and not stop_early and index not in (None, 1, [-1], [4, -5]):
                continue  # open_clip's ResNet then pools a truncated stage (a shape error), see modified_resnet
            kwargs = dict(image_indices=index, text_indices=index if not resnet else None, stop_early=stop_early,
                          image_output_fmt=fmt, image_output_extra_tokens=extra, text_output_extra_tokens=extra,
                          intermediates_only=only, normalize_intermediates=norm_inter,
                          output_logits=not only, output_logit_scale_bias=extra)
            assert_same_output(ref.forward_intermediates(image, text, **kwargs),
                               ours.forward_intermediates(image, text, **kwargs))
            checked += 1
        for normalize in (False, True):  # one tower at a time, L2-normalised or not
            assert_same_output(ref.forward_intermediates(image=image, normalize=normalize),
                               ours.forward_intermediates(image=image, normalize=normalize))
            assert_same_output(ref.forward_intermediates(text=text, normalize=normalize),
                               ours.forward_intermediates(text=text, normalize=normalize))
    assert checked >= 8 * len(indices)


def test_intermediates_shapes_and_final_features():
    """The last intermediate is the trunk output; image_features equal encode_image; NCHW is NLC on a grid."""
    cfg = CLIP_CASES["vit-tok"]
    _, model = _pair(cfg)
    image, text = _inputs(cfg)
    with torch.no_grad():
        out = model.forward_intermediates(image, text, image_output_extra_tokens=True, output_logits=True)
        nlc = model.forward_intermediates(image, image_output_fmt="NLC", intermediates_only=True)
        trunk = model.visual.forward_features(image)
        torch.testing.assert_close(out["image_features"], model.encode_image(image, normalize=True))
        torch.testing.assert_close(out["text_features"], model.encode_text(text, normalize=True))
        logits, _ = model.get_logits(image, text)
        torch.testing.assert_close(out["image_logits"], logits)
    assert [tuple(t.shape) for t in out["image_intermediates"]] == [(2, 32, 4, 4)] * 3
    assert [tuple(t.shape) for t in out["image_intermediates_prefix"]] == [(2, 1, 32)] * 3
    assert list(nlc) == ["image_intermediates"] and nlc["image_intermediates"][0].shape == (2, 16, 32)
    torch.testing.assert_close(nlc["image_intermediates"][-1], trunk[:, 1:])
    torch.testing.assert_close(out["image_intermediates_prefix"][-1], trunk[:, :1])
    grid = nlc["image_intermediates"][1].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(out["image_intermediates"][1], grid)


def test_coca_forward_intermediates_match_open_clip():
    ref, ours = _pair(COCA)
    image, text = _inputs(COCA)
    with torch.no_grad():
        for index, stop_early, _, extra, only, norm_inter in _grid(INDICES):
            kwargs = dict(image_indices=index, text_indices=index, stop_early=stop_early,
                          image_output_extra_tokens=extra, text_output_extra_tokens=extra,
                          intermediates_only=only, normalize_intermediates=norm_inter,
                          output_logit_scale_bias=True)
            assert_same_output(ref.forward_intermediates(image, text, **kwargs),
                               ours.forward_intermediates(image, text, **kwargs))
        # open_clip's CoCa does not implement output_logits ("FIXME"); clipforge computes CLIP's logits.
        ref_out = ref.forward_intermediates(image, text)
        out = ours.forward_intermediates(image, text, text_output_extra_tokens=True, output_logits=True)
        expected = ref.logit_scale.exp() * ref_out["image_features"] @ ref_out["text_features"].T
        torch.testing.assert_close(out["image_logits"], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["text_logits"], expected.T, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["text_features"], ours.encode_text(text, normalize=True))
    assert list(out)[:5] == ["image_intermediates", "image_features", "text_intermediates_suffix",
                             "text_intermediates", "text_features"]
    assert out["text_intermediates_suffix"][0].shape == (2, 1, 32) and out["text_intermediates"][0].shape == (2, 16, 32)


@pytest.mark.parametrize("name", ["vit-tok", "vit-avg-final-ln", "vit-attn-pool"])
def test_vision_output_tokens_match_open_clip(name):
    """output_tokens=True: the tower returns (pooled, tokens) exactly as open_clip's."""
    cfg = {**CLIP_CASES[name], "vision_cfg": {**CLIP_CASES[name]["vision_cfg"], "output_tokens": True}}
    ref, ours = _pair(cfg)
    image, _ = _inputs(cfg)
    with torch.no_grad():
        (ref_pooled, ref_tokens), (pooled, tokens) = ref.visual(image), ours.visual(image)
        torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_image(image), ref_pooled, rtol=0, atol=1e-5)
    queries = cfg["vision_cfg"].get("attn_pooler_queries")
    assert tokens.shape == ((2, queries - 1, 32) if queries else (2, 16, 32))


@pytest.mark.parametrize("prune_norm,prune_head", [(False, True), (True, False), (True, True)])
def test_prune_intermediate_layers_matches_open_clip(prune_norm, prune_head):
    cfg = CLIP_CASES["custom-text"]
    ref, ours = _pair(cfg)
    image, text = _inputs(cfg)
    for tower in ("visual", "text"):
        kept = getattr(ours, tower).prune_intermediate_layers([0, -2], prune_norm=prune_norm, prune_head=prune_head)
        assert kept == getattr(ref, tower).prune_intermediate_layers([0, -2], prune_norm=prune_norm,
                                                                     prune_head=prune_head) == [0, 1]
    assert len(ours.visual.transformer.resblocks) == len(ours.text.transformer.resblocks) == 2
    with torch.no_grad():
        for kwargs in (dict(), dict(normalize_intermediates=True), dict(intermediates_only=True)):
            for tower, x in (("visual", image), ("text", text)):
                assert_same_output(getattr(ref, tower).forward_intermediates(x, output_fmt="NLC", **kwargs),
                                   getattr(ours, tower).forward_intermediates(x, output_fmt="NLC", **kwargs))
        torch.testing.assert_close(ours.visual(image), ref.visual(image), rtol=0, atol=1e-5)
    assert ("visual.proj" in ours.state_dict()) is (not prune_head)


# --- timm image towers (incl. SigLIP-style: no class token, attention-pool "map" head) ---------------------

def _register_timm_models():
    timm = pytest.importorskip("timm")
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    variants = {
        "cf_feat_vit_reg": dict(reg_tokens=2),  # class token plus two register tokens
        "cf_feat_siglip": dict(class_token=False, global_pool="map"),  # SigLIP's layout
    }
    for name, extra in variants.items():
        if timm.is_model(name):
            continue

        def make(pretrained=False, _extra=extra, **kwargs):
            args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, **_extra)
            return _create_vision_transformer("vit_tiny_patch16_224", pretrained=False, **dict(args, **kwargs))
        make.__name__ = name
        register_model(make)


TIMM_CASES = {
    "vit-reg-token-linear": dict(timm_model_name="cf_feat_vit_reg", timm_pool="token", timm_proj="linear"),
    "siglip-map-none": dict(timm_model_name="cf_feat_siglip", timm_pool="map", timm_proj="none"),
    "convnext-avg-mlp": dict(timm_model_name="convnext_atto", timm_pool="avg", timm_proj="mlp"),
}


@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_timm_tower_forward_intermediates_match_open_clip(name):
    _register_timm_models()
    vision = dict(image_size=32, timm_model_pretrained=False, **TIMM_CASES[name])
    cfg = {"embed_dim": 32, "custom_text": True, "vision_cfg": vision, "text_cfg": TEXT}
    ref, ours = _pair(cfg)
    image, text = _inputs(cfg)
    convnext = name.startswith("convnext")
    with torch.no_grad():
        for index, stop_early, fmt, extra, only, norm_inter in _grid([None, 1, [0, -1], [-2]]):
            if convnext:  # timm's ConvNeXt has neither prefix tokens nor an NLC format
                fmt, extra = "NCHW", False
                if stop_early and not only and index == [-2]:
                    continue  # timm's head then gets a narrower stage: an error in both libraries
            kwargs = dict(image_indices=index, text_indices=index, stop_early=stop_early, image_output_fmt=fmt,
                          image_output_extra_tokens=extra, intermediates_only=only,
                          normalize_intermediates=norm_inter, output_logits=not only)
            ref_out = ref.forward_intermediates(image, text, **kwargs)
            assert_same_output(ref_out, ours.forward_intermediates(image, text, **kwargs))
    if convnext:
        with pytest.raises(ValueError, match="output_extra_tokens: timm model convnext_atto has no prefix tokens"):
            ours.forward_intermediates(image, image_output_extra_tokens=True)
        return
    out = ours.forward_intermediates(image, image_output_fmt="NLC", image_output_extra_tokens=True)
    if name.startswith("vit-reg"):
        assert out["image_intermediates_prefix"][0].shape == (2, 3, 32)  # class + 2 register tokens
    if name.startswith("siglip"):
        assert out["image_intermediates"][0].shape == (2, 16, 32)  # every token is a patch


# --- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("indices,message", [
    (0, r"last-n \(0\) is out of range \(1 to 3\)"),
    (4, r"last-n \(4\) is out of range \(1 to 3\)"),
    ([3], r"feature index 3 is out of range \(0 to 2\)"),
    ([0, -4], r"feature index -1 is out of range \(0 to 2\)"),
])
def test_bad_indices_raise_open_clip_messages(indices, message):
    """open_clip asserts (AssertionError); clipforge raises ValueError with the same words."""
    cfg = CLIP_CASES["custom-text"]
    ref, ours = _pair(cfg)
    image, text = _inputs(cfg)
    for kwargs in (dict(image=image, image_indices=indices), dict(text=text, text_indices=indices)):
        with pytest.raises(AssertionError, match=message):
            ref.forward_intermediates(**kwargs)
        with pytest.raises(ValueError, match=message):
            ours.forward_intermediates(**kwargs)


@pytest.mark.parametrize("name", ["vit-reg-token-linear", "convnext-avg-mlp"])
def test_timm_tower_bad_indices_raise_value_errors(name):
    """timm asserts on out-of-range indices; a timm tower raises the ValueError the other towers raise."""
    _register_timm_models()
    cfg = {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT,
           "vision_cfg": dict(image_size=32, timm_model_pretrained=False, **TIMM_CASES[name])}
    _, ours = _pair(cfg)
    image, _ = _inputs(cfg)
    depth = len(ours.visual.trunk.feature_info)
    with pytest.raises(ValueError, match=rf"last-n \({depth + 1}\) is out of range \(1 to {depth}\)"):
        ours.forward_intermediates(image, image_indices=depth + 1)
    with pytest.raises(ValueError, match=rf"feature index {depth} is out of range"):
        ours.forward_intermediates(image, image_indices=[depth])
    assert len(ours.forward_intermediates(image, image_indices=depth)["image_intermediates"]) == depth


def test_other_bad_arguments_are_named():
    cfg = CLIP_CASES["vit-tok"]
    _, ours = _pair(cfg)
    image, text = _inputs(cfg)
    with pytest.raises(ValueError, match="Output format must be one of NCHW or NLC, got 'NHWC'"):
        ours.forward_intermediates(image, image_output_fmt="NHWC")
    with pytest.raises(ValueError, match="output_logits needs both image and text"):
        ours.forward_intermediates(image, output_logits=True)
    with pytest.raises(ValueError, match="empty list"):
        ours.visual.forward_intermediates(image, indices=[])
    with pytest.raises(ValueError, match="indices must be ints, got 1.5"):
        ours.visual.forward_intermediates(image, indices=[1.5])
    with pytest.raises(ValueError, match="indices must be None, an int"):
        feature_take_indices(3, "all")
    with pytest.raises(ValueError, match="Output format must be NLC"):
        ours.text.forward_intermediates(text, output_fmt="NCHW")
    _, resnet = _pair(CLIP_CASES["resnet"])
    with pytest.raises(ValueError, match="Output format must be == NCHW"):
        resnet.visual.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt="NLC")
    # An attentional pool wider than the trunk: ln_post cannot normalise the trunk's tokens.
    wide = {**CLIP_CASES["vit-attn-pool"], "embed_dim": 48}
    model = clipforge.create_model(CLIPConfig.from_dict(wide)).eval()
    with pytest.raises(ValueError, match="normalize_intermediates applies ln_post.*48 channels, not the 32"):
        model.forward_intermediates(image, normalize_intermediates=True)
    # Patch dropout in training leaves fewer tokens than the grid.
    model = clipforge.create_model(CLIPConfig.from_dict(
        {**cfg, "vision_cfg": {**cfg["vision_cfg"], "patch_dropout": 0.5}})).train()
    with pytest.raises(ValueError, match="output_fmt 'NCHW' needs all 4x4 patch tokens, got 8"):
        model.visual.forward_intermediates(image)
    assert model.visual.forward_intermediates(image, output_fmt="NLC")["image_intermediates"][0].shape == (2, 8, 32)


def test_take_indices_match_open_clip():
    from open_clip.utils import feature_take_indices as ref_take

    for indices in [None, 1, 5, [0], [4, 0, -1], [-5], (1, 2), [2, 2]]:
        assert feature_take_indices(5, indices) == ref_take(5, indices)


def test_intermediates_keep_gradients_with_checkpointing():
    """Grad checkpointing changes nothing in the values and lets gradients flow through intermediates."""
    cfg = CLIP_CASES["vit-tok"]
    _, model = _pair(cfg)
    image, _ = _inputs(cfg)
    plain = model.visual.forward_intermediates(image, indices=[1])["image_intermediates"][0]
    model.set_grad_checkpointing(True)
    checkpointed = model.visual.forward_intermediates(image, indices=[1])["image_intermediates"][0]
    torch.testing.assert_close(checkpointed, plain)
    checkpointed.sum().backward()
    assert model.visual.transformer.resblocks[1].attn.in_proj_weight.grad is not None
    assert model.visual.transformer.resblocks[2].attn.in_proj_weight.grad is None


def test_hf_text_tower_has_no_intermediates_like_open_clip(tmp_path):
    """open_clip's HF text encoder has no forward_intermediates: clipforge says so; the image side works."""
    transformers = pytest.importorskip("transformers")
    transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
                               ).save_pretrained(tmp_path)
    cfg = {"embed_dim": 24, "custom_text": True, "vision_cfg": VIT,
           "text_cfg": {"hf_model_name": str(tmp_path), "hf_model_pretrained": False, "hf_proj_type": "linear",
                        "context_length": 12}}
    ours = clipforge.create_model(CLIPConfig.from_dict(cfg)).eval()
    text = torch.randint(3, 100, (2, 12))
    with pytest.raises(ValueError, match="the HFTextTower text tower has no forward_intermediates"):
        ours.forward_intermediates(text=text)
    assert list(ours.forward_intermediates(image=torch.randn(1, 3, 32, 32))) == ["image_intermediates",
                                                                                 "image_features"]


# The README's dense-feature example, run with random weights (the tag is dropped; nothing else changes).
README_EXAMPLE = '''
import torch
import clipforge

# output_tokens=True: the image tower also returns its patch tokens, as in open_clip.
model = clipforge.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k",
                               cfg_overrides={"vision_cfg": {"output_tokens": True}}).eval()
image = torch.randn(1, 3, 224, 224)  # a preprocessed image
with torch.no_grad():
    out = model.forward_intermediates(image=image, image_indices=[3, 7, -1], image_output_extra_tokens=True)
    pooled, tokens = model.visual(image)  # [1, 512] before L2 normalisation; [1, 49, 768] after ln_post
maps = out["image_intermediates"]         # blocks 3, 7 and 11: 3 x [1, 768, 7, 7], patch tokens on the 7x7 grid
cls = out["image_intermediates_prefix"]   # their class tokens: 3 x [1, 1, 768]
embedding = out["image_features"]         # [1, 512], L2-normalised: model.encode_image(image, normalize=True)
grid = tokens.reshape(1, 7, 7, 768)       # row-major over the patch grid
patch_embeddings = tokens @ model.visual.proj  # [1, 49, 512]: every patch in the joint embedding space

# A cheaper extractor: drop the blocks after block 8 (and the projection).
model.visual.prune_intermediate_layers(indices=[8])
with torch.no_grad():
    block8 = model.visual.forward_intermediates(image, indices=[8], intermediates_only=True)["image_intermediates"][0]
'''


def test_readme_dense_feature_example():
    code = README_EXAMPLE.replace(' pretrained="laion2b_s34b_b79k",', "")
    assert code != README_EXAMPLE
    features, pruning = code.split("# A cheaper extractor")
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(features, "readme_feat", "exec"), scope)
    assert [tuple(m.shape) for m in scope["maps"]] == [(1, 768, 7, 7)] * 3
    assert [tuple(c.shape) for c in scope["cls"]] == [(1, 1, 768)] * 3
    assert scope["embedding"].shape == (1, 512)
    assert scope["tokens"].shape == (1, 49, 768) and scope["patch_embeddings"].shape == (1, 49, 512)
    model, image = scope["model"], scope["image"]
    with torch.no_grad():
        torch.testing.assert_close(scope["embedding"], model.encode_image(image, normalize=True))
        torch.testing.assert_close(scope["embedding"], torch.nn.functional.normalize(scope["pooled"], dim=-1))
        # output_tokens' patch tokens are the last block's, after ln_post.
        last = model.visual.forward_intermediates(image, indices=1, normalize_intermediates=True, output_fmt="NLC")
        torch.testing.assert_close(scope["tokens"], last["image_intermediates"][0])
        full = model.visual.forward_intermediates(image, indices=[8], intermediates_only=True)["image_intermediates"]
    # The grid is row-major: token 7*r + c sits at grid[:, r, c].
    torch.testing.assert_close(scope["grid"][0, 2, 5], scope["tokens"][0, 2 * 7 + 5])
    exec(compile("#" + pruning, "readme_feat", "exec"), scope)
    torch.testing.assert_close(scope["block8"], full[0])
    assert len(model.visual.transformer.resblocks) == 9 and model.visual.proj is None
