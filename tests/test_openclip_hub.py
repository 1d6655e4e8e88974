"""OpenCLIP hub-layout directories, read and written, checked against open_clip's ``local-dir:`` loader."""
import json

import open_clip
import pytest
import torch
from open_clip.push_to_hf_hub import save_for_hf

from clipforge.checkpoints import CheckpointError
from clipforge.checkpoints.openclip_hub import is_openclip_dir, load_openclip_dir, save_openclip_dir
from clipforge.config import PreprocessConfig
from conftest import CAPTIONS
from test_hf_clip import SHAPES, TOL, clip_images, clipforge_model, max_diffs, randomize_norms_and_biases


@pytest.fixture(scope="module")
def inputs():
    return clip_images(), open_clip.tokenize(CAPTIONS)


def _features(model, images, tokens):
    with torch.inference_mode():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("name", SHAPES)
def test_clipforge_dir_loads_in_open_clip(name, inputs, tmp_path):
    images, tokens = inputs
    model = clipforge_model(name, quick_gelu=(name == "ViT-B-16"))
    pp = PreprocessConfig(image_size=224, interpolation="bilinear", resize_mode="squash")
    written = save_openclip_dir(model, tmp_path, pp)
    assert {p.name for p in written} >= {"open_clip_config.json", "open_clip_model.safetensors", "vocab.json"}
    ref, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path))
    ref.eval()
    img_diff, txt_diff = max_diffs(model, *_features(ref, images, tokens), images, tokens)
    print(f"\nMAXDIFF clipforge->open_clip local-dir {name}: image {img_diff:.2e} text {txt_diff:.2e}")
    assert img_diff <= TOL and txt_diff <= TOL
    assert set(ref.state_dict()) == set(model.state_dict())
    assert "squash" in repr(preprocess) or "Resize(size=(224, 224)" in repr(preprocess)
    assert "bilinear" in repr(preprocess)
    assert open_clip.get_tokenizer("local-dir:" + str(tmp_path))(CAPTIONS).equal(tokens)


class _NoTokenizer:
    """save_for_hf writes a tokenizer next to the weights; the default CLIP BPE needs no files."""

    def save_pretrained(self, directory):
        pass


@pytest.mark.parametrize("name", SHAPES)
def test_open_clip_dir_loads_in_clipforge(name, inputs, tmp_path):
    images, tokens = inputs
    model_cfg = open_clip.get_model_config(name)
    model_cfg["vision_cfg"]["layers"] = model_cfg["text_cfg"]["layers"] = 2
    model_cfg["text_cfg"].update(pool_type="eos", eos_id=49407)  # a non-default field must travel too
    torch.manual_seed(5)
    ref = open_clip.CLIP(**model_cfg).eval()
    randomize_norms_and_biases(ref, seed=5)
    ref.visual.image_mean, ref.visual.image_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # set by open_clip's factory
    save_for_hf(ref, _NoTokenizer(), model_cfg, tmp_path, safe_serialization="both")
    assert is_openclip_dir(tmp_path)
    model, pp = load_openclip_dir(tmp_path)
    assert model.cfg.text_cfg.pool_type == "eos" and model.cfg.text_cfg.eos_id == 49407
    assert pp == PreprocessConfig(image_size=224, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    img_diff, txt_diff = max_diffs(model, *_features(ref, images, tokens), images, tokens)
    print(f"\nMAXDIFF open_clip save_for_hf->clipforge {name}: image {img_diff:.2e} text {txt_diff:.2e}")
    assert img_diff <= TOL and txt_diff <= TOL
    # Only the torch pickle: still found, read with weights_only.
    (tmp_path / "open_clip_model.safetensors").unlink()
    model_bin, _ = load_openclip_dir(tmp_path)
    assert all(torch.equal(v, model_bin.state_dict()[k]) for k, v in model.state_dict().items())


def test_round_trip_keeps_config_and_preprocess(tmp_path):
    model = clipforge_model("ViT-B-32", layers=1, init_logit_bias=-10.0, nonscalar_logit_scale=True)
    pp = PreprocessConfig(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="longest")
    save_openclip_dir(model, tmp_path, pp, torch_bin=True)
    back, back_pp = load_openclip_dir(tmp_path)
    assert back.cfg == model.cfg and back_pp == pp
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    hub = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert hub["model_cfg"]["vision_cfg"]["width"] == 768  # core sizes are spelled out, as OpenCLIP's JSONs do


def test_errors_name_files_and_keys(tmp_path):
    with pytest.raises(CheckpointError, match=r"open_clip_config\.json: missing"):
        load_openclip_dir(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(CheckpointError, match="no 'model_cfg'"):
        load_openclip_dir(tmp_path)
    model = clipforge_model("ViT-B-32", layers=1)
    save_openclip_dir(model, tmp_path)
    (tmp_path / "open_clip_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no OpenCLIP weights"):
        load_openclip_dir(tmp_path)
    sd = dict(model.state_dict(), **{"visual.extra_head.weight": torch.zeros(2)})
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"open_clip_pytorch_model\.bin.*unexpected: visual\.extra_head\.weight"):
        load_openclip_dir(tmp_path)
