"""SigLIP: OpenCLIP parity of the timm-ViT + bidirectional text architecture, and HF SiglipModel both ways."""
import json
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

import clipforge  # noqa: E402
from clipforge.checkpoints import CheckpointError  # noqa: E402
from clipforge.checkpoints.convert import convert  # noqa: E402
from clipforge.checkpoints.hf_siglip import (CLIPFORGE_TO_HF, HF_TO_CLIPFORGE, clip_config_from_hf,  # noqa: E402
                                             load_hf_siglip, save_hf_siglip)
from clipforge.checkpoints.openclip_hub import load_openclip_dir, save_openclip_dir  # noqa: E402
from clipforge.config import CLIPConfig, PreprocessConfig  # noqa: E402
from clipforge.models import add_model_config, get_model_config  # noqa: E402
from parity_utils import perturb  # noqa: E402

ATOL = 1e-5
SIGLIP_MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _register_tiny_siglip_vit():
    """vit_base_patch16_siglip_224 shrunk to 2 blocks of width 64 at 64px (exact GELU, as timm builds it)."""
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if timm.is_model("cf_test_vit_siglip_64"):
        return

    @register_model
    def cf_test_vit_siglip_64(pretrained=False, **kwargs):
        args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                    class_token=False, global_pool="map")
        return _create_vision_transformer("vit_base_patch16_siglip_224", pretrained=False, **dict(args, **kwargs))


TINY_SIGLIP = {
    "embed_dim": 64,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 64, "timm_model_name": "cf_test_vit_siglip_64", "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 48, "heads": 2, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                 "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}},
}


@pytest.fixture(scope="module")
def pixels(photos):
    from clipforge.transforms import image_transform

    pp = PreprocessConfig(image_size=64, resize_mode="squash", interpolation="bicubic", **SIGLIP_MEAN_STD)
    tf = image_transform(pp, is_train=False)
    return torch.stack([tf(p) for p in photos])


@pytest.fixture(scope="module")
def token_ids():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 300, (4, 16), generator=gen)
    ids[0, 6:] = 1  # SigLIP pads with id 1 and does not mask padding
    ids[1, 12:] = 1
    return ids


# ---- OpenCLIP parity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_siglip(tmp_path_factory):
    _register_tiny_siglip_vit()
    folder = tmp_path_factory.mktemp("siglip-cfg")
    path = folder / "cf-test-SigLIP-tiny.json"
    path.write_text(json.dumps(TINY_SIGLIP))
    open_clip.add_model_config(path)
    add_model_config(path)
    torch.manual_seed(0)
    ref = open_clip.create_model("cf-test-SigLIP-tiny").eval()
    perturb(ref)
    ckpt = folder / "tiny.pt"
    torch.save(ref.state_dict(), ckpt)
    return ref, ckpt


def test_open_clip_siglip_checkpoint_loads_with_equal_outputs(open_clip_siglip, pixels, token_ids):
    ref, ckpt = open_clip_siglip
    ours = clipforge.create_model("cf-test-SigLIP-tiny", pretrained=ckpt)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert any(k.startswith("visual.trunk.attn_pool.") for k in ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), ref.encode_image(pixels), rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.encode_text(token_ids), ref.encode_text(token_ids), rtol=0, atol=ATOL)
        out = ours(pixels, token_ids)
        _, _, ref_scale, ref_bias = ref(pixels, token_ids)  # OpenCLIP's tuple output
        torch.testing.assert_close(out["logit_bias"], ref_bias)
        torch.testing.assert_close(out["logit_scale"], ref_scale)


def test_open_clip_siglip_through_hf_format(open_clip_siglip, pixels, token_ids, tmp_path):
    """OpenCLIP SigLIP weights -> clipforge -> transformers SiglipModel give OpenCLIP's features."""
    ref, ckpt = open_clip_siglip
    ours = clipforge.create_model("cf-test-SigLIP-tiny", pretrained=ckpt)
    save_hf_siglip(ours, tmp_path)
    hf = transformers.SiglipModel.from_pretrained(tmp_path).eval()
    assert hf.config.vision_config.hidden_act == "gelu"  # timm's SigLIP ViT uses exact GELU
    assert hf.config.text_config.hidden_act == "gelu_pytorch_tanh"
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixels).pooler_output,
                                   ref.encode_image(pixels), rtol=0, atol=ATOL)
        torch.testing.assert_close(hf.get_text_features(input_ids=token_ids).pooler_output,
                                   ref.encode_text(token_ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2-256", "ViT-SO400M-14-SigLIP"])
def test_builtin_siglip_configs_match_open_clip_keys(name):
    """Full-size SigLIP architectures, built on the meta device: same keys and shapes as OpenCLIP."""
    with torch.device("meta"):
        ref = open_clip.create_model(name, device="meta").state_dict()
        ours = clipforge.models.CLIP(get_model_config(name)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


# ---- transformers SiglipModel, both directions -----------------------------------------------------


def _tiny_tokenizer(folder):
    """A word-level tokenizer with SigLIP's special ids (pad 1, eos 1), saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = "a photo of an astronaut cat lying on sofa cup coffee saucer rocket the launch pad".split()
    vocab = {"<unk>": 2, "</s>": 1, "<pad>": 0, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                                pad_token="</s>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def hf_siglip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-siglip")
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_size=64,
                         pad_token_id=1, eos_token_id=1, bos_token_id=None),
    )
    model = transformers.SiglipModel(config).eval()
    perturb(model)
    model.save_pretrained(folder)
    _tiny_tokenizer(folder)
    return folder, model


def test_load_hf_siglip_matches_transformers(hf_siglip_dir, pixels, token_ids):
    folder, hf = hf_siglip_dir
    ours = load_hf_siglip(folder)
    assert ours.cfg.vision_cfg.timm_model_name and ours.cfg.text_cfg.pool_type == "last"
    with torch.no_grad():
        image = ours.encode_image(pixels)
        torch.testing.assert_close(image, hf.get_image_features(pixel_values=pixels).pooler_output, rtol=0, atol=ATOL)
        text = ours.encode_text(token_ids)
        torch.testing.assert_close(text, hf.get_text_features(input_ids=token_ids).pooler_output, rtol=0, atol=ATOL)
        ref = hf(input_ids=token_ids, pixel_values=pixels)
        logits, _ = ours.get_logits(pixels, token_ids)
        torch.testing.assert_close(logits, ref.logits_per_image, rtol=0, atol=1e-4)


def test_hf_siglip_tokenizer_through_clipforge(hf_siglip_dir):
    folder, hf = hf_siglip_dir
    ours = load_hf_siglip(folder)
    tokenizer = clipforge.get_tokenizer(ours.cfg)
    texts = ["A photo of an astronaut.", "a cat lying on the sofa"]
    ids = tokenizer(texts)
    assert ids.shape == (2, 16)
    assert ids[0, :6].tolist() == [3, 4, 5, 6, 7, 1]  # canonicalized: lower case, punctuation dropped
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(ids), hf.get_text_features(input_ids=ids).pooler_output,
                                   rtol=0, atol=ATOL)


def test_save_hf_siglip_round_trip(hf_siglip_dir, pixels, token_ids, tmp_path):
    folder, hf = hf_siglip_dir
    ours = load_hf_siglip(folder)
    save_hf_siglip(ours, tmp_path)
    back = transformers.SiglipModel.from_pretrained(tmp_path).eval()
    ref_sd, back_sd = hf.state_dict(), back.state_dict()
    assert sorted(back_sd) == sorted(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(back_sd[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(back.get_image_features(pixel_values=pixels).pooler_output,
                                   ours.encode_image(pixels), rtol=0, atol=ATOL)
    again = load_hf_siglip(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_hf_siglip_table_covers_real_size_model():
    """google/siglip-base-patch16-224's architecture (default SiglipConfig), converted on the meta device."""
    config = transformers.SiglipConfig()
    cfg = clip_config_from_hf(config.to_dict())
    with torch.device("meta"):
        hf_sd = transformers.SiglipModel(config).state_dict()
        ours_sd = clipforge.models.CLIP(cfg).state_dict()
    converted = HF_TO_CLIPFORGE.apply(hf_sd, ours_sd)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours_sd.items()}
    back = CLIPFORGE_TO_HF.apply(ours_sd, hf_sd)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in hf_sd.items()}
    # The writer's table is generated from the reader's: every rule but the position_ids drops, inverted.
    assert CLIPFORGE_TO_HF.rules == [r.inverse() for r in HF_TO_CLIPFORGE.rules if r.dst is not None]


def test_unexpected_and_missing_keys_raise(hf_siglip_dir):
    folder, hf = hf_siglip_dir
    ours = load_hf_siglip(folder)
    sd = dict(hf.state_dict())
    sd["vision_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="no SigLIP mapping.*vision_model.extra.weight"):
        HF_TO_CLIPFORGE.apply(sd, ours.state_dict())
    del sd["vision_model.extra.weight"], sd["text_model.head.bias"]
    with pytest.raises(CheckpointError, match="missing text_model.head.bias"):
        HF_TO_CLIPFORGE.apply(sd, ours.state_dict())


def test_non_siglip_model_is_refused(tmp_path):
    model = clipforge.create_model(CLIPConfig.from_dict({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}))
    with pytest.raises(CheckpointError, match="not a SigLIP model"):
        save_hf_siglip(model, tmp_path)


# ---- conversion: the command line and OpenCLIP hub folders ------------------------------------------


def _clipforge_convert(*args):
    return subprocess.run([sys.executable, "-m", "clipforge", "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _hf_features(model, pixels, token_ids):
    with torch.no_grad():
        return (model.get_image_features(pixel_values=pixels).pooler_output,
                model.get_text_features(input_ids=token_ids).pooler_output)


def test_convert_command_reads_and_writes_transformers_siglip(hf_siglip_dir, pixels, token_ids, photos, tmp_path):
    """transformers SigLIP folder -> OpenCLIP hub folder -> transformers SigLIP folder, from the command line."""
    folder, hf = hf_siglip_dir
    ref_img, ref_txt = _hf_features(hf, pixels, token_ids)
    run = _clipforge_convert(folder, tmp_path / "oc", "--to", "open_clip_dir")
    assert run.returncode == 0, run.stderr
    assert "(hf_siglip)" in run.stdout and "open_clip_config.json" in run.stdout
    ours = clipforge.create_model("local-dir:" + str(tmp_path / "oc"))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), ref_img, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.encode_text(token_ids), ref_txt, rtol=0, atol=ATOL)

    run = _clipforge_convert(tmp_path / "oc", tmp_path / "hf", "--to", "hf_siglip")
    assert run.returncode == 0, run.stderr
    assert "(open_clip_dir)" in run.stdout
    back = transformers.SiglipModel.from_pretrained(tmp_path / "hf").eval()
    img, txt = _hf_features(back, pixels, token_ids)
    torch.testing.assert_close(img, ref_img, rtol=0, atol=ATOL)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=ATOL)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())
    # The written processor and tokenizer load in transformers and agree with clipforge's.
    processor = transformers.SiglipImageProcessor.from_pretrained(tmp_path / "hf")
    theirs = processor(images=photos[:2], return_tensors="pt")["pixel_values"]
    assert theirs.shape == (2, 3, 64, 64)
    assert (theirs - pixels[:2]).abs().mean().item() < 0.02  # same recipe, up to resampling
    texts = ["a photo of an astronaut", "a cat lying on the sofa"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(texts[0])["input_ids"] == clipforge.get_tokenizer(ours.cfg)(texts)[0, :6].tolist()

    run = _clipforge_convert(folder, tmp_path / "clip", "--to", "hf")
    assert run.returncode != 0 and "hf_siglip" in run.stderr  # a SigLIP model is not a CLIPModel
    assert not (tmp_path / "clip" / "config.json").exists()


def test_siglip_from_transformers_round_trips_through_openclip_dir(hf_siglip_dir, pixels, token_ids, tmp_path):
    folder, hf = hf_siglip_dir
    ours = load_hf_siglip(folder)
    assert CLIPConfig.from_dict(ours.cfg.to_dict()) == ours.cfg
    assert ours.cfg.vision_cfg.timm_model_kwargs["class_token"] is False
    pp = PreprocessConfig(image_size=64, resize_mode="squash", **SIGLIP_MEAN_STD)
    save_openclip_dir(ours, tmp_path, pp)
    back, back_pp = load_openclip_dir(tmp_path)
    assert back.cfg == ours.cfg and back_pp == pp
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    by_name = clipforge.create_model("local-dir:" + str(tmp_path))
    with torch.no_grad():
        expected = ours.encode_image(pixels), ours.encode_text(token_ids)
        for model in (back, by_name):
            assert torch.equal(model.encode_image(pixels), expected[0])
            assert torch.equal(model.encode_text(token_ids), expected[1])
    texts = ["A photo of an astronaut.", "a cat lying on the sofa"]
    assert torch.equal(clipforge.get_tokenizer("local-dir:" + str(tmp_path))(texts),
                       clipforge.get_tokenizer(ours.cfg)(texts))  # the tokenizer travelled with the weights


def test_siglip_to_clip_format_points_to_hf_siglip(hf_siglip_dir, tmp_path):
    folder, _ = hf_siglip_dir
    with pytest.raises(CheckpointError, match="logit bias.*hf_siglip"):
        convert(folder, tmp_path / "clip", "hf")
    result = convert(folder, tmp_path / "siglip", "hf_siglip")
    assert (result.source_format, result.target_format) == ("hf_siglip", "hf_siglip")
    assert {p.name for p in result.written} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
