"""Fast inference modes: exact ones match fp32, approximate ones stay within stated bounds."""
import copy
import os
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge import inference
from clipforge.config import CLIPConfig
from conftest import CAPTIONS

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "layers": 2, "heads": 2},
}


def _randomize_norms(model: torch.nn.Module) -> None:
    """Give norms non-trivial affine parameters/statistics, so every parameter matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def vit_pair():
    """(OpenCLIP ViT-S-32, clipforge ViT-S-32) with the same seeded random weights."""
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-S-32").eval()
    _randomize_norms(ref)
    model = clipforge.create_model("ViT-S-32").eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


@pytest.fixture(scope="module")
def images(photos):
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32")
    return torch.stack([preprocess(p) for p in photos])


def _prompts():
    classes = ["cat", "golden retriever", "red-breasted merganser", "airliner", "tree frog", "grand piano"]
    templates = ["a photo of a {}.", "a bad photo of the {}.", "itap of a {}.",
                 "a low resolution photo of the {}, taken on a cloudy day in the mountains.", "{}"]
    return [t.format(c) for c in classes for t in templates] + CAPTIONS


def test_bucketed_text_encoding_is_exact(vit_pair):
    _, model = vit_pair
    tokens = clipforge.get_tokenizer("ViT-S-32")(_prompts())
    with torch.inference_mode():
        plain = model.encode_text(tokens)
        bucketed = inference.encode_text_batched(model, tokens, batch_size=5)
        plain_n = model.encode_text(tokens, normalize=True)
        bucketed_n = inference.encode_text_batched(model, tokens, batch_size=5, normalize=True)
    assert bucketed.shape == plain.shape
    assert (bucketed_n - plain_n).abs().max().item() <= 1e-6
    assert ((bucketed - plain).norm(dim=-1) / plain.norm(dim=-1)).max().item() <= 1e-6
    # Order is restored: a row shuffled out of place would be far away, not 1e-6 away.
    assert not torch.allclose(plain_n[0], plain_n[1], atol=1e-3)


def test_bucketing_sorts_by_eot_position(vit_pair):
    _, model = vit_pair
    tokens = clipforge.get_tokenizer("ViT-S-32")(["a", "a much longer prompt than the first one", ""])
    lengths = inference.text_lengths(model, tokens)
    assert lengths.tolist() == [int(tokens[i].argmax()) + 1 for i in range(3)]
    assert lengths[1] > lengths[0] > lengths[2]


def test_bf16_inference_close_and_better_than_whole_cast(vit_pair, images):
    ref, model = vit_pair
    tokens = clipforge.get_tokenizer("ViT-S-32")(_prompts())
    fast = inference.to_bf16_inference(copy.deepcopy(model))
    assert fast.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert fast.visual.proj.dtype == torch.float32 and fast.visual.ln_post.weight.dtype == torch.float32
    whole = copy.deepcopy(ref).to(torch.bfloat16)  # OpenCLIP's pure_bf16
    with torch.inference_mode():
        img32, txt32 = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        img16, txt16 = fast.encode_image(images, normalize=True), fast.encode_text(tokens, normalize=True)
        img_w = F.normalize(whole.encode_image(images.bfloat16()).float(), dim=-1)
        txt_w = F.normalize(whole.encode_text(tokens).float(), dim=-1)
    assert img16.dtype == torch.float32 and txt16.dtype == torch.float32
    cos_img, cos_txt = inference.cosine_to(img32, img16), inference.cosine_to(txt32, txt16)
    assert cos_img.min().item() >= 0.99 and cos_txt.min().item() >= 0.99
    assert not torch.equal(img16, img32)  # it really ran in bf16
    err = (1 - cos_img).mean() + (1 - cos_txt).mean()
    err_whole = (1 - inference.cosine_to(img32, img_w)).mean() + (1 - inference.cosine_to(txt32, txt_w)).mean()
    assert err.item() < err_whole.item()


def test_int8_runs_with_bounded_deviation(images):
    torch.manual_seed(0)
    model = clipforge.create_model(CLIPConfig.from_dict(TINY)).eval()
    _randomize_norms(model)
    quant = inference.quantize_int8(model)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.c_fc, torch.nn.Linear)  # original untouched
    assert type(quant.visual.transformer.resblocks[0].mlp.c_fc).__module__.startswith("torch.ao.nn.quantized")
    small = F.interpolate(images, size=32, mode="bilinear", antialias=True)
    tokens = clipforge.get_tokenizer()(CAPTIONS)
    with torch.inference_mode():
        img32, txt32 = model.encode_image(small, normalize=True), model.encode_text(tokens, normalize=True)
        img8, txt8 = quant.encode_image(small, normalize=True), quant.encode_text(tokens, normalize=True)
    assert not torch.equal(img8, img32)
    assert inference.cosine_to(img32, img8).min().item() >= 0.98
    assert inference.cosine_to(txt32, txt8).min().item() >= 0.98


def test_channels_last_resnet_matches_fp32(images):
    torch.manual_seed(0)
    model = clipforge.create_model("RN50").eval()
    _randomize_norms(model)
    fast = inference.to_channels_last(copy.deepcopy(model))
    assert fast.visual.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        diff = (fast.encode_image(images[:2]) - model.encode_image(images[:2])).abs().max().item()
    assert diff <= 1e-5
    with pytest.raises(ValueError, match="ResNet"):
        inference.to_channels_last(clipforge.create_model(CLIPConfig.from_dict(TINY)))


def test_bf16_rejects_unknown_tower():
    model = clipforge.create_model(CLIPConfig.from_dict(TINY))
    model.visual = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fp32"):
        inference.to_bf16_inference(model)


@pytest.mark.skipif(not os.environ.get("CLIPFORGE_TEST_COMPILE"),
                    reason="torch.compile takes minutes on small CPUs; set CLIPFORGE_TEST_COMPILE=1")
def test_compile_matches_eager():
    torch.manual_seed(0)
    model = clipforge.create_model(CLIPConfig.from_dict(TINY)).eval()
    compiled = inference.compile_model(copy.deepcopy(model))
    assert set(compiled.state_dict()) == set(model.state_dict())
    image = torch.randn(2, 3, 32, 32)
    tokens = clipforge.get_tokenizer()(CAPTIONS[:4])
    start = time.perf_counter()
    with torch.inference_mode():
        assert torch.allclose(compiled.encode_image(image), model.encode_image(image), atol=1e-5)
        assert torch.allclose(compiled.encode_text(tokens), model.encode_text(tokens), atol=1e-5)
    assert time.perf_counter() - start < 600


def test_bucketed_zero_shot_classifier_equals_default(vit_pair):
    from clipforge.evaluate.zero_shot import build_zero_shot_classifier

    _, model = vit_pair
    tok = clipforge.get_tokenizer("ViT-S-32")
    classes = ["cat", "golden retriever", "red-breasted merganser", "airliner"]
    templates = ["a photo of a {}.", "itap of a {}.", "a low resolution photo of the {}, taken at night."]
    with torch.inference_mode():
        fast = build_zero_shot_classifier(model, tok, classes, templates, bucket_size=4)
        plain = build_zero_shot_classifier(model, tok, classes, templates)
    assert fast.shape == plain.shape == (model.cfg.embed_dim, len(classes))
    assert (fast - plain).abs().max().item() <= 1e-6
    with pytest.raises(ValueError):
        build_zero_shot_classifier(model, tok, [], templates, bucket_size=4)
