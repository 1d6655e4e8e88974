"""transformers CLIPModel directories <-> clipforge, checked against transformers itself."""
import json

import numpy as np
import open_clip
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.checkpoints import CheckpointError
from clipforge.checkpoints.hf_clip import (HF_TO_OPENCLIP, OPENCLIP_TO_HF, config_from_hf, hf_to_openclip,
                                           is_hf_clip_dir, load_hf_clip, openclip_to_hf, save_hf_clip)
from clipforge.config import OPENAI_MEAN, OPENAI_STD
from clipforge.models import CLIP
from conftest import CAPTIONS

TOL = 1e-5
# ViT-B-32 / ViT-B-16 widths and patch sizes, 2 blocks per tower to keep CPU time low.
SHAPES = {"ViT-B-32": 32, "ViT-B-16": 16}


def clip_images(size: int = 224) -> torch.Tensor:
    """Real photos, resized (shortest side) + centre-cropped + normalised like CLIP: [3, 3, size, size]."""
    from skimage import data

    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    out = []
    for photo in (data.astronaut, data.chelsea, data.coffee):
        img = Image.fromarray(np.asarray(photo())).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
        out.append((x - mean) / std)
    return torch.stack(out)


def randomize_norms_and_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """Default inits leave LayerNorms at 1/0 and biases at 0; random values make every weight matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=gen))


def hf_reference(patch: int, seed: int = 0, **text_overrides) -> "transformers.CLIPModel":
    vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=2,
                  image_size=224, patch_size=patch)
    text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=2, **text_overrides)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=512))
    randomize_norms_and_biases(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    return model.eval()


def clipforge_model(name: str, seed: int = 0, layers: int = 2, **cfg_changes) -> CLIP:
    cfg = clipforge.get_model_config(name)
    cfg.vision_cfg.layers = cfg.text_cfg.layers = layers
    for key, value in cfg_changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = CLIP(cfg)
    randomize_norms_and_biases(model, seed)
    return model.eval()


def hf_features(model, images, tokens):
    with torch.inference_mode():
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(input_ids=tokens)
    # transformers 5 returns BaseModelOutputWithPooling with the projected embedding as pooler_output.
    return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)


def max_diffs(model: CLIP, ref_img, ref_txt, images, tokens):
    with torch.inference_mode():
        return ((model.encode_image(images) - ref_img).abs().max().item(),
                (model.encode_text(tokens) - ref_txt).abs().max().item())


@pytest.fixture(scope="module")
def inputs():
    return clip_images(), open_clip.tokenize(CAPTIONS)


def _write_v4_layout(model, path) -> None:
    """A directory as transformers 4.2x wrote it: pytorch_model.bin with position_ids, eos_token_id 2."""
    path.mkdir()
    sd = dict(model.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(model.vision_model.embeddings.num_positions)[None]
    torch.save(sd, path / "pytorch_model.bin")
    cfg = model.config.to_dict()
    cfg.pop("dtype", None)
    cfg.update(torch_dtype="float32", transformers_version="4.21.3")
    cfg["text_config"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layout", ["v5", "v4"])
@pytest.mark.parametrize("name", SHAPES)
def test_transformers_to_clipforge(name, layout, inputs, tmp_path):
    images, tokens = inputs
    directory = tmp_path / "hf"
    if layout == "v5":
        hf_reference(SHAPES[name]).save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
    else:
        _write_v4_layout(hf_reference(SHAPES[name]), directory)
    assert is_hf_clip_dir(directory)
    ref = transformers.CLIPModel.from_pretrained(directory).eval()  # the reference reads the same files
    model = load_hf_clip(directory)
    assert model.cfg.text_cfg.pool_type == ("eos" if layout == "v5" else "argmax")
    img_diff, txt_diff = max_diffs(model, *hf_features(ref, images, tokens), images, tokens)
    print(f"\nMAXDIFF transformers({layout})->clipforge {name}: image {img_diff:.2e} text {txt_diff:.2e}")
    assert img_diff <= TOL and txt_diff <= TOL
    assert model.logit_scale.item() == pytest.approx(3.1)
    # Sequences without an end token tell argmax pooling (old configs) from first-eos pooling.
    no_eot = tokens[:, :4].clone()
    no_eot[no_eot == 49407] = 320
    with torch.inference_mode():
        ref_txt = hf_features(ref, images[:1], no_eot)[1]
        assert (model.encode_text(no_eot) - ref_txt).abs().max().item() <= TOL


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("name", SHAPES)
def test_clipforge_to_transformers(name, quick_gelu, inputs, tmp_path):
    images, tokens = inputs
    model = clipforge_model(name, quick_gelu=quick_gelu)
    written = save_hf_clip(model, tmp_path / "hf")
    assert {p.name for p in written} >= {"config.json", "model.safetensors", "preprocessor_config.json",
                                         "vocab.json", "merges.txt", "tokenizer_config.json"}
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    with torch.inference_mode():
        img_diff, txt_diff = max_diffs(model, *hf_features(ref, images, tokens), images, tokens)
    print(f"\nMAXDIFF clipforge->transformers {name} quick_gelu={quick_gelu}: image {img_diff:.2e} text {txt_diff:.2e}")
    assert img_diff <= TOL and txt_diff <= TOL
    assert ref.logit_scale.item() == pytest.approx(model.logit_scale.item())
    # Reading our own directory back gives the identical tensors.
    back = load_hf_clip(tmp_path / "hf")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_written_tokenizer_and_processor_load_in_transformers(tmp_path, photos):
    model = clipforge_model("ViT-B-32", layers=1)
    save_hf_clip(model, tmp_path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = open_clip.tokenize(CAPTIONS)
    for caption, row in zip(CAPTIONS, ours):
        ids = tokenizer(caption)["input_ids"]
        assert ids == row[: len(ids)].tolist() and row[len(ids):].eq(0).all(), caption
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path)
    pixels = processor(images=photos[:1], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert processor.image_processor.image_mean == pytest.approx(list(OPENAI_MEAN))
    # CLIPImageProcessor's resize + crop is the same recipe as clip_images(): same pixels up to resampling.
    assert (pixels[0] - clip_images()[0]).abs().mean().item() < 0.02


def test_weight_file_precedence_is_transformers(inputs, tmp_path):
    """model.safetensors wins over pytorch_model.bin, as in transformers (one reader for every HF format)."""
    from clipforge.checkpoints.hf_folder import WEIGHT_FILES, read_hf_weights

    assert WEIGHT_FILES == ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                            "pytorch_model.bin.index.json")
    images, tokens = inputs
    ref = hf_reference(32, seed=4)
    ref.save_pretrained(tmp_path)
    torch.save({k: torch.zeros_like(v) for k, v in ref.state_dict().items()}, tmp_path / "pytorch_model.bin")
    assert read_hf_weights(tmp_path)[1].endswith("model.safetensors")
    assert max(max_diffs(load_hf_clip(tmp_path), *hf_features(ref, images, tokens), images, tokens)) <= TOL


def test_sharded_safetensors(inputs, tmp_path):
    images, tokens = inputs
    ref = hf_reference(32, seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="60MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_hf_clip(tmp_path)
    assert max(max_diffs(model, *hf_features(ref, images, tokens), images, tokens)) <= TOL


def test_key_table_is_a_bijection():
    """Every HF key maps to one OpenCLIP key (q/k/v into one fused tensor) and back."""
    hf_keys = set(hf_reference(32).state_dict())
    ours = clipforge_model("ViT-B-32").state_dict()
    converted = hf_to_openclip(hf_reference(32).state_dict())
    assert set(converted) == set(ours)
    assert all(converted[k].shape == v.shape for k, v in ours.items())
    fused = [rule for rule in OPENCLIP_TO_HF.rules if len(rule.dst) == 3]
    assert sorted(key.split(".")[-2] for key in fused[0].dst) == ["k_proj", "q_proj", "v_proj"]
    kept = [rule for rule in HF_TO_OPENCLIP.rules if rule.dst is not None]  # all but the position_ids drops
    assert sum(len(r.src) for r in kept) == sum(len(r.dst) for r in OPENCLIP_TO_HF.rules)
    assert OPENCLIP_TO_HF.rules == [r.inverse() for r in kept]  # the inverse is generated, not written
    # And back: the generated inverse gives transformers' keys and tensors exactly.
    back = openclip_to_hf(converted)
    ref_sd = hf_reference(32).state_dict()
    assert set(back) == set(ref_sd) and all(torch.equal(back[k], v) for k, v in ref_sd.items())
    assert hf_keys == {k for k in hf_keys if k.split(".")[0] in {"text_model", "vision_model", "logit_scale",
                                                               "text_projection", "visual_projection"}}


def test_config_mapping_details():
    cfg = config_from_hf({"model_type": "clip", "projection_dim": 768,
                          "text_config": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
                                          "eos_token_id": 49407, "hidden_act": "gelu", "layer_norm_eps": 1e-6},
                          "vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14,
                                            "intermediate_size": 4096, "num_hidden_layers": 24, "hidden_act": "gelu"}})
    assert (cfg.embed_dim, cfg.quick_gelu, cfg.text_cfg.pool_type, cfg.text_cfg.eos_id) == (768, False, "eos", 49407)
    assert (cfg.vision_cfg.width, cfg.vision_cfg.head_width, cfg.vision_cfg.patch_size) == (1024, 64, 14)
    assert cfg.text_cfg.norm_kwargs == {"eps": 1e-6} and cfg.vision_cfg.norm_kwargs is None
    with pytest.raises(CheckpointError, match="different activations"):
        config_from_hf({"text_config": {"hidden_act": "gelu"}, "vision_config": {"hidden_act": "quick_gelu"}})
    with pytest.raises(CheckpointError, match="siglip"):
        config_from_hf({"model_type": "siglip"})


def test_missing_config_names_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"config\.json.*missing.*model\.safetensors"):
        load_hf_clip(tmp_path)
    assert not is_hf_clip_dir(tmp_path)


def test_unexpected_keys_are_named(tmp_path):
    ref = hf_reference(32)
    ref.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    sd["text_model.pooler.dense.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*2 unexpected.*layers\.0\.extra\.weight"):
        load_hf_clip(tmp_path)


def test_unrepresentable_models_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="a logit bias"):
        save_hf_clip(clipforge_model("ViT-B-32", layers=1, init_logit_bias=-10.0), tmp_path / "a")
    resnet = clipforge.create_model(clipforge.config.CLIPConfig(
        embed_dim=64, vision_cfg=clipforge.config.VisionConfig(layers=(1, 1, 1, 1), width=16, image_size=64),
        text_cfg=clipforge.config.TextConfig(width=64, heads=1, layers=1)))
    with pytest.raises(CheckpointError, match="non-ViT image tower"):
        save_hf_clip(resnet, tmp_path / "b")
    assert not (tmp_path / "a" / "config.json").exists()
