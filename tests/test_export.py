"""``clipforge export``: ONNX / torch.export encoders against OpenCLIP 3.3 on the same weights.

Full-size ViT-B-32 and RN50 (seeded random weights, perturbed so zero biases and unit norms are
exercised) are exported once per module through the same resolver the CLI uses (architecture name
+ checkpoint file) and compared with ``open_clip``'s model holding the same state dict. SigLIP is
the tiny timm-ViT + bidirectional-text arch of ``test_siglip.py`` with a locally built Hugging Face
tokenizer (no download). int8 and CLI cases use a tiny CLIP in OpenCLIP's hub layout (``local-dir:``).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
open_clip = pytest.importorskip("open_clip")

import clipforge  # noqa: E402
from clipforge.checkpoints.openclip_hub import save_openclip_dir  # noqa: E402
from clipforge.config import CLIPConfig, PreprocessConfig  # noqa: E402
from clipforge.export import (CONFIG_NAME, ExportOptions, Int8AccuracyError, OnnxCLIP, check_images,  # noqa: E402
                              cosine_rows, export, export_model, read_export_config, trim_tokens)
from clipforge.factory import preprocess_config  # noqa: E402
from clipforge.models.clip import CLIP  # noqa: E402
from train_utils import TINY_MODEL  # noqa: E402
from parity_utils import perturb  # noqa: E402

PARITY = 1e-4  # max abs difference on unnormalised features, onnxruntime / torch.export vs OpenCLIP
PROMPTS = ["a cat", "a photo of a dog lying on a red sofa next to a window", "x", "",
           "an astronaut riding a horse on the moon, oil painting, highly detailed, trending"]


def _reference(name, tmp_path_factory):
    """(seeded OpenCLIP model, its checkpoint file in a tmp folder)."""
    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    perturb(ref)
    path = tmp_path_factory.mktemp(name) / "weights.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def _pixels(n, size, seed):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _max_abs(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _exported(name, tmp_path_factory):
    """``name`` exported to ONNX from a checkpoint file, by name (the CLI's resolver), and OpenCLIP's model."""
    ref, ckpt = _reference(name, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"{name}-export") / "onnx"
    export(name, out, pretrained=str(ckpt), progress=False)
    ckpt.unlink()
    return ref, out


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _exported("ViT-B-32", tmp_path_factory)


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
    return _exported("RN50", tmp_path_factory)


@pytest.fixture(scope="module")
def runner(vit):
    return OnnxCLIP(vit[1], threads=2)


# ---- ONNX parity, dynamic batch and text length --------------------------------------------------
def test_export_folder_layout_and_config(vit):
    ref, out = vit
    names = sorted(p.name for p in out.iterdir())
    assert names == [CONFIG_NAME, "image_encoder.onnx", "text_encoder.onnx", "tokenizer"]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["LICENSE-openai-clip-bpe.txt",
                                                                      "bpe_simple_vocab_16e6.txt.gz"]
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["image_size"] == [224, 224] and cfg["resize_mode"] == "shortest"
    assert tuple(cfg["mean"]) == open_clip.OPENAI_DATASET_MEAN and tuple(cfg["std"]) == open_clip.OPENAI_DATASET_STD
    assert cfg["interpolation"] == "bicubic"
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert cfg["context_length"] == 77 and cfg["text_length"] == "dynamic" and cfg["text_trim"] == "argmax"
    assert (cfg["sot_id"], cfg["eot_id"], cfg["pad_id"]) == (tok.sot_token_id, tok.eot_token_id, 0)
    assert cfg["logit_scale"] == pytest.approx(ref.logit_scale.exp().item(), rel=1e-6)
    assert cfg["logit_bias"] is None
    assert cfg["check"]["image_max_abs_diff"] <= PARITY and cfg["check"]["text_max_abs_diff"] <= PARITY
    session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    (text_input,) = session.get_inputs()
    assert text_input.name == "text" and text_input.type == "tensor(int64)"
    assert all(isinstance(d, str) for d in text_input.shape)  # [batch, length], both dynamic
    assert session.get_outputs()[0].name == "text_features"


@pytest.mark.parametrize("fixture", ["vit", "rn50"])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_image_features_match_open_clip(fixture, batch, request):
    ref, out = request.getfixturevalue(fixture)
    pixels = _pixels(batch, 224, seed=batch)
    session = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": pixels.numpy()})[0]
    with torch.no_grad():
        want = ref.encode_image(pixels).numpy()
    assert got.shape == want.shape == (batch, ref.visual.output_dim)
    assert np.abs(want).max() > 1e-2  # features that are not ~0 (a parity test that can fail)
    assert _max_abs(got, want) <= PARITY


@pytest.mark.parametrize("fixture", ["vit", "rn50"])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_text_features_match_open_clip_at_several_lengths(fixture, batch, request):
    """Any length >= the batch's last EOT gives OpenCLIP's full-77 feature: the trimmed, a middle and the full one."""
    ref, out = request.getfixturevalue(fixture)
    ids = open_clip.get_tokenizer("ViT-B-32")(PROMPTS[-batch:])  # [batch, 77]
    with torch.no_grad():
        want = ref.encode_text(ids).numpy()
    assert np.abs(want).max() > 1e-2
    session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    last_eot = int(ids.argmax(-1).max()) + 1
    lengths = sorted({last_eot, (last_eot + 77) // 2, 77})
    for length in lengths:
        got = session.run(None, {"text": ids[:, :length].numpy()})[0]
        assert _max_abs(got, want) <= PARITY, length
    assert trim_tokens(ids.numpy(), "argmax", None).shape[1] == last_eot


# ---- the runner ------------------------------------------------------------------------------------
def test_runner_encodes_images_and_text_like_open_clip(vit, runner, photos):
    ref, _ = vit
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        want_images = ref.encode_image(torch.stack([preprocess(p) for p in photos[:3]])).numpy()
        want_text = ref.encode_text(tokenizer(PROMPTS)).numpy()
    assert _max_abs(runner.encode_image(photos[:3]), want_images) <= PARITY  # PIL images: the folder's preprocess
    pixels = torch.stack([preprocess(p) for p in photos[:1]]).numpy()
    assert _max_abs(runner.encode_image(pixels), want_images[:1]) <= PARITY  # preprocessed array
    np.testing.assert_array_equal(runner.tokenize(PROMPTS), tokenizer(PROMPTS).numpy())
    assert _max_abs(runner.encode_text(PROMPTS), want_text) <= PARITY
    assert _max_abs(runner.encode_text(PROMPTS[:1]), want_text[:1]) <= PARITY  # a batch of one, trimmed to 4 tokens
    unit = torch.nn.functional.normalize
    with torch.no_grad():
        want_logits = ref.logit_scale.exp() * unit(torch.from_numpy(want_images), dim=-1) \
            @ unit(torch.from_numpy(want_text), dim=-1).T
    logits, logits_t = runner.get_logits(photos[:3], PROMPTS)
    assert _max_abs(logits, want_logits.numpy()) <= 1e-3 and logits_t.shape == (len(PROMPTS), 3)


def test_runner_rejects_bad_inputs(runner):
    with pytest.raises(ValueError, match=r"\[N, 3, 224, 224\]"):
        runner.encode_image(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="L <= 77"):
        runner.encode_text(np.zeros((1, 78), np.int64))


def test_folder_is_usable_without_clipforge(vit, tmp_path):
    """A fresh interpreter without clipforge on its path: onnxruntime + the folder's own BPE file and config."""
    ref, out = vit
    ids = open_clip.get_tokenizer("ViT-B-32")(PROMPTS[:2])
    with torch.no_grad():
        want = ref.encode_text(ids).numpy()
    np.save(tmp_path / "ids.npy", ids.numpy())
    script = f"""
import sys; sys.modules['clipforge'] = None  # importing clipforge would fail
import gzip, json, numpy as np, onnxruntime as ort
cfg = json.load(open({str(out / CONFIG_NAME)!r}))
merges = gzip.open({str(out)!r} + '/' + cfg['tokenizer']['vocab']).read().decode().split('\\n')[1:49152 - 256 - 2 + 1]
ids = np.load({str(tmp_path / 'ids.npy')!r})
ids = ids[:, :ids.argmax(-1).max() + 1]  # text_trim 'argmax': cut after the batch's last EOT
feats = ort.InferenceSession({str(out)!r} + '/' + cfg['text_encoder']).run(None, {{'text': ids}})[0]
np.save({str(tmp_path / 'feats.npy')!r}, feats)
print(len(merges), cfg['eot_id'])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["48894", "49407"]
    assert _max_abs(np.load(tmp_path / "feats.npy"), want) <= PARITY


# ---- torch.export ----------------------------------------------------------------------------------
def test_torch_export_programs_match_open_clip(vit, tmp_path):
    ref, _ = vit
    model = clipforge.create_model("ViT-B-32")
    model.load_state_dict(ref.state_dict())
    out = tmp_path / "pt2"
    result = export_model(model, out, clipforge.get_tokenizer("ViT-B-32"), preprocess_config(model),
                          ExportOptions(format="torch.export"), progress=False)
    assert result.config.format == "torch.export" and result.config.opset is None
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, "image_encoder.pt2", "text_encoder.pt2", "tokenizer"]
    image = torch.export.load(str(out / "image_encoder.pt2")).module()
    text = torch.export.load(str(out / "text_encoder.pt2")).module()
    ids = open_clip.get_tokenizer("ViT-B-32")(PROMPTS[-3:])
    with torch.no_grad():
        for batch in (1, 3):
            pixels = _pixels(batch, 224, seed=10 + batch)
            assert _max_abs(image(pixels), ref.encode_image(pixels)) <= PARITY
            want = ref.encode_text(ids[:batch])
            for length in (int(ids[:batch].argmax(-1).max()) + 1, 77):
                assert _max_abs(text(ids[:batch, :length]), want) <= PARITY
    with pytest.raises(ValueError, match="holds a torch.export export"):
        OnnxCLIP(out)


# ---- SigLIP: fixed text length, Hugging Face tokenizer ----------------------------------------------
@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """The tiny SigLIP arch of test_siglip.py, OpenCLIP's model as reference, and a locally built HF tokenizer."""
    pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from test_siglip import TINY_SIGLIP, _register_tiny_siglip_vit

    from clipforge.models import add_model_config
    from clipforge.tokenizer import HFTokenizer

    _register_tiny_siglip_vit()
    folder = tmp_path_factory.mktemp("siglip")
    (folder / "cf-test-SigLIP-tiny.json").write_text(json.dumps(TINY_SIGLIP))
    open_clip.add_model_config(folder / "cf-test-SigLIP-tiny.json")
    add_model_config(folder / "cf-test-SigLIP-tiny.json")
    torch.manual_seed(0)
    ref = open_clip.create_model("cf-test-SigLIP-tiny").eval()
    perturb(ref)
    ours = clipforge.create_model("cf-test-SigLIP-tiny")
    ours.load_state_dict(ref.state_dict())
    words = "a photo of cat dog the red sofa an astronaut riding horse on moon".split()
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                              pad_token="</s>")
    tokenizer = HFTokenizer(hf, context_length=16, clean="canonicalize")
    pp = PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    out = folder / "export"
    export_model(ours, out, tokenizer, pp, progress=False)
    return ref, tokenizer, out


def test_siglip_export_has_fixed_text_length_and_matches_open_clip(siglip, photos):
    ref, tokenizer, out = siglip
    cfg = read_export_config(out)
    assert cfg.text_length == "fixed" and cfg.text_trim is None and "fixed length 16" in cfg.notes[0]
    assert cfg.logit_bias == pytest.approx(ref.logit_bias.item(), rel=1e-6)
    assert (cfg.pad_id, cfg.eot_id) == (1, 1) and cfg.tokenizer["type"] == "hf"
    session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == 16  # not dynamic: trimming would change a bidirectional tower
    runner = OnnxCLIP(out, threads=2)
    np.testing.assert_array_equal(runner.tokenize(PROMPTS), tokenizer(PROMPTS).numpy())  # the saved files
    ids = tokenizer(PROMPTS[-3:])
    pixels = check_images(cfg.preprocess_config(), n=3, seed=5)
    with torch.no_grad():
        want_text, want_image = ref.encode_text(ids).numpy(), ref.encode_image(pixels).numpy()
        cut = ref.encode_text(ids[:, :8]).numpy()
    assert _max_abs(cut, want_text) > 1e-3  # the reason for the fixed length: cutting padding changes SigLIP
    for batch in (1, 3):
        assert _max_abs(runner.encode_text(PROMPTS[-3:][:batch]), want_text[:batch]) <= PARITY
        assert _max_abs(runner.encode_image(pixels[:batch].numpy()), want_image[:batch]) <= PARITY
    with pytest.raises(ValueError, match="exactly 16 tokens"):
        runner.encode_text(ids[:, :8].numpy())


# ---- int8 ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_dict(TINY_MODEL)).eval()
    perturb(model)
    save_openclip_dir(model, path)
    return path


def test_int8_kept_when_cosine_is_high_enough_and_reported(tiny_dir, tmp_path):
    ref, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    ref.eval()
    out = tmp_path / "int8"
    result = export(f"local-dir:{tiny_dir}", out, options=ExportOptions(int8=True, int8_min_cosine=0.9),
                    progress=False)
    cfg = result.config
    assert cfg.weights == "int8"
    runner = OnnxCLIP(out, threads=2)
    pixels = check_images(cfg.preprocess_config())
    with torch.no_grad():
        want_image = ref.encode_image(pixels).numpy()
        want_text = ref.encode_text(open_clip.get_tokenizer(f"local-dir:{tiny_dir}")(PROMPTS)).numpy()
    image_cos = cosine_rows(runner.encode_image(pixels.numpy()), want_image)
    assert image_cos.min() == pytest.approx(cfg.check["image_int8_min_cosine"], abs=1e-5)  # what it measured
    assert image_cos.min() >= 0.9 and image_cos.min() < 1 - 1e-7  # quantised: close, not equal
    assert cosine_rows(runner.encode_text(PROMPTS), want_text).min() >= 0.9
    graph = (out / "image_encoder.onnx").read_bytes()
    assert b"DynamicQuantizeLinear" in graph and b"MatMulInteger" in graph
    # per output channel and 7 bits (no int16 overflow on CPUs without VNNI): every weight of a
    # MatMulInteger has one zero point per output column and values within [-64, 64] (8 bits: 127)
    import onnx
    from onnx import numpy_helper

    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        model = onnx.load(str(out / name))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits]
        assert matmuls, name
        for node in matmuls:
            weight = inits[node.input[1]]
            assert weight.dtype == np.int8 and np.abs(weight.astype(np.int16)).max() <= 64, node.name
            assert inits[node.input[3]].shape == (weight.shape[1],), node.name  # weight zero point per column


def _int8_matmuls(path):
    import onnx
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulInteger"]


def test_int8_of_the_image_encoder_only_keeps_the_text_encoder_fp32(tiny_dir, tmp_path):
    ref, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    ref.eval()
    out = tmp_path / "int8-image"
    cfg = export(f"local-dir:{tiny_dir}", out, progress=False,
                 options=ExportOptions(int8=True, int8_encoders=("image",), int8_min_cosine=0.9)).config
    assert (cfg.weights, cfg.encoder_weights) == ("mixed", {"image": "int8", "text": "fp32"})
    assert "image_int8_min_cosine" in cfg.check and "text_int8_min_cosine" not in cfg.check
    assert _int8_matmuls(out / "image_encoder.onnx") and not _int8_matmuls(out / "text_encoder.onnx")
    runner = OnnxCLIP(out, threads=2)
    with torch.no_grad():
        want_text = ref.encode_text(open_clip.get_tokenizer(f"local-dir:{tiny_dir}")(PROMPTS)).numpy()
    assert _max_abs(runner.encode_text(PROMPTS), want_text) <= PARITY  # the fp32 text encoder, exact
    # a threshold the text encoder cannot meet refuses only where text is quantised
    text_only = ExportOptions(int8=True, int8_encoders=("text",), int8_min_cosine=1.0)
    with pytest.raises(Int8AccuracyError, match=r"int8 text encoder refused: .*quantise only the other encoder"):
        export(f"local-dir:{tiny_dir}", tmp_path / "int8-text", options=text_only, progress=False)
    assert not (tmp_path / "int8-text").exists()
    plain = export(f"local-dir:{tiny_dir}", tmp_path / "fp32", progress=False).config
    assert (plain.weights, plain.encoder_weights) == ("fp32", {"image": "fp32", "text": "fp32"})
    done = _cli(f"local-dir:{tiny_dir}", tmp_path / "cli", "--no-progress", "--int8", "--int8_encoders", "image",
                "--int8_min_cosine", "0.9")
    assert done.returncode == 0 and "onnx (image int8, text fp32)" in done.stdout, done.stderr


def test_int8_refused_below_min_cosine_and_nothing_written(tiny_dir, tmp_path):
    out = tmp_path / "int8"
    refused = r"int8 image encoder refused: .*cosine 0\.\d+.*below int8_min_cosine=1"
    with pytest.raises(Int8AccuracyError, match=refused):
        export(f"local-dir:{tiny_dir}", out, options=ExportOptions(int8=True, int8_min_cosine=1.0), progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- CLI -------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "clipforge", "export", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_then_refuses_then_overwrites(tiny_dir, tmp_path):
    out = tmp_path / "out"
    done = _cli(f"local-dir:{tiny_dir}", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "text length dynamic" in done.stdout and f"wrote {out / 'image_encoder.onnx'}" in done.stdout
    first = (out / CONFIG_NAME).read_text()
    again = _cli(f"local-dir:{tiny_dir}", out, "--no-progress")
    assert again.returncode == 1 and "already holds an export; pass overwrite (--overwrite)" in again.stderr
    replaced = _cli(f"local-dir:{tiny_dir}", out, "--no-progress", "--overwrite", "--opset", "20")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / CONFIG_NAME).read_text())["opset"] == 20 and json.loads(first)["opset"] == 18
    import onnx
    assert max(o.version for o in onnx.load(str(out / "text_encoder.onnx")).opset_import if o.domain == "") == 20


@pytest.mark.parametrize("args, code, message", [
    (["--format", "tflite"], 2, "format 'tflite' is not one of onnx, torch.export"),
    (["--opset", "13"], 2, "opset 13 is too old"),
    (["--format", "torch.export", "--int8"], 2, "int8 applies to the onnx format"),
    (["--int8_min_cosine", "1.5"], 2, "int8_min_cosine must be in (0, 1]"),
    (["--int8_encoders", "image"], 2, "int8_encoders applies with int8: add --int8"),
    (["--int8", "--int8_encoders", "image,audio"], 2, "int8_encoders must name image and/or text once each"),
])
def test_cli_bad_options(tiny_dir, tmp_path, args, code, message):
    done = _cli(f"local-dir:{tiny_dir}", tmp_path / "out", *args)
    assert done.returncode == code and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_cli_refuses_an_out_that_is_not_an_export(tiny_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"not yours")
    done = _cli(f"local-dir:{tiny_dir}", tmp_path / "photos")
    assert done.returncode == 1 and "not a clipforge export (cat.jpg)" in done.stderr
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"not yours"
    (tmp_path / "file").write_text("x")
    done = _cli(f"local-dir:{tiny_dir}", tmp_path / "file")
    assert done.returncode == 1 and "exists and is not a folder" in done.stderr
    done = _cli("no-such-arch", tmp_path / "new")
    assert done.returncode == 1 and "no-such-arch" in done.stderr and not (tmp_path / "new").exists()
