"""Format detection and conversion between every pair of formats, each result read by its own library."""
import json

import open_clip
import pytest
import torch
import transformers

import clipforge
from clipforge.checkpoints import CheckpointError
from clipforge.checkpoints.convert import convert
from clipforge.checkpoints.formats import FORMATS, FormatName, detect_format, load_any
from clipforge.checkpoints.hf_clip import save_hf_clip
from clipforge.checkpoints.openai import openai_state_dict
from clipforge.cli.convert import main as convert_main
from clipforge.checkpoints.openclip_hub import save_openclip_dir
from conftest import CAPTIONS
from test_hf_clip import TOL, clip_images, clipforge_model, hf_features, max_diffs

SOURCES = ["openai", "open_clip", "open_clip_dir", "hf"]
OPENCLIP_NAME = "cf-test-B32-1layer-quickgelu"  # registered with open_clip to read OpenAI-layout files


@pytest.fixture(scope="module")
def inputs():
    return clip_images(), open_clip.tokenize(CAPTIONS)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, inputs):
    """One QuickGELU ViT-B-32-shaped model (OpenAI's recipe, so every format can express it) in every format."""
    root = tmp_path_factory.mktemp("sources")
    model = clipforge_model("ViT-B-32", seed=7, layers=1, quick_gelu=True)
    sd = model.state_dict()
    torch.save(openai_state_dict(model), root / "openai.pt")
    # An OpenCLIP training checkpoint: DDP-prefixed weights inside {"epoch", "state_dict", ...}.
    torch.save({"epoch": 2, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}},
               root / "epoch_2.pt")
    save_openclip_dir(model, root / "oc_dir")
    save_hf_clip(model, root / "hf_dir")
    (root / f"{OPENCLIP_NAME}.json").write_text(json.dumps(model.cfg.to_dict()))
    open_clip.add_model_config(root / f"{OPENCLIP_NAME}.json")
    clipforge.add_model_config(root / f"{OPENCLIP_NAME}.json")  # single files do not say their activation
    with torch.inference_mode():
        expected = model.encode_image(inputs[0]), model.encode_text(inputs[1])
    paths = {"openai": root / "openai.pt", "open_clip": root / "epoch_2.pt", "open_clip_dir": root / "oc_dir",
             "hf": root / "hf_dir"}
    return paths, expected


def _reference_features(to, path, images, tokens):
    """Features computed by the library that owns format ``to``."""
    if to == "hf":
        return hf_features(transformers.CLIPModel.from_pretrained(path).eval(), images, tokens)
    if to == "open_clip_dir":
        ref = open_clip.create_model("local-dir:" + str(path)).eval()
    else:  # a plain state dict: OpenCLIP needs the architecture by name, as for any .pt file
        ref = open_clip.create_model(OPENCLIP_NAME, pretrained=str(path)).eval()
    with torch.inference_mode():
        return ref.encode_image(images), ref.encode_text(tokens)


def test_detect_format(sources):
    paths, _ = sources
    assert {fmt: detect_format(path) for fmt, path in paths.items()} == {fmt: fmt for fmt in paths}


def _name(fmt):
    """The model name a single-file format needs (it does not record GELU vs QuickGELU); folders carry theirs."""
    return OPENCLIP_NAME if fmt in ("openai", "open_clip") else None


@pytest.mark.parametrize("src", SOURCES)
@pytest.mark.parametrize("to", ["openai", "open_clip", "open_clip_dir", "hf"])
def test_convert_every_pair(src, to, sources, inputs, tmp_path):
    paths, (exp_img, exp_txt) = sources
    images, tokens = inputs
    dst = tmp_path / ("model.pt" if to in ("openai", "open_clip") else "out")
    result = convert(paths[src], dst, to, _name(src))
    written = result.written
    assert all(p.exists() for p in written)
    assert (result.source_format, result.target_format) == (src, to)
    ref_img, ref_txt = _reference_features(to, dst, images, tokens)
    img_diff = (ref_img - exp_img).abs().max().item()
    txt_diff = (ref_txt - exp_txt).abs().max().item()
    print(f"\nMAXDIFF convert {src}->{to} (read by {'transformers' if to == 'hf' else 'open_clip'}): "
          f"image {img_diff:.2e} text {txt_diff:.2e}")
    assert img_diff <= TOL and txt_diff <= TOL
    # And clipforge reads the converted output back to the same features.
    back, _ = load_any(dst, _name(to))
    assert max(max_diffs(back, exp_img, exp_txt, images, tokens)) <= TOL


def test_gelu_state_dict_needs_its_model_name(tmp_path, inputs, capsys):
    """OpenAI-layout files do not record the activation: without the name, loading refuses to guess."""
    images, tokens = inputs
    config = clipforge_model("ViT-B-32", layers=1).cfg.to_dict()
    (tmp_path / "cf-test-B32-1layer.json").write_text(json.dumps(config))
    clipforge.add_model_config(tmp_path / "cf-test-B32-1layer.json")
    model = clipforge_model("ViT-B-32", seed=2, layers=1)
    save_openclip_dir(model, tmp_path / "gelu_dir")
    assert convert_main(str(tmp_path / "gelu_dir"), str(tmp_path / "gelu.pt"), to="openai") == 0
    out = capsys.readouterr().out
    assert "open_clip_dir" in out and f"wrote {tmp_path / 'gelu.pt'}" in out and "GELU" in out
    with pytest.raises(CheckpointError, match="GELU or QuickGELU.*cf-test-B32-1layer"):
        load_any(tmp_path / "gelu.pt")
    named, _ = load_any(tmp_path / "gelu.pt", model_name="cf-test-B32-1layer")
    with torch.inference_mode():
        expected = model.encode_image(images), model.encode_text(tokens)
    assert max(max_diffs(named, *expected, images, tokens)) <= TOL


def test_text_prefixed_state_dict_needs_a_model_name(tmp_path):
    cfg = clipforge_model("ViT-B-32", layers=1).cfg
    cfg.custom_text = True
    (tmp_path / "cf-test-B32-custom.json").write_text(json.dumps(cfg.to_dict()))
    clipforge.add_model_config(tmp_path / "cf-test-B32-custom.json")
    model = clipforge.create_model("cf-test-B32-custom")
    torch.save(model.state_dict(), tmp_path / "custom.pt")
    assert detect_format(tmp_path / "custom.pt") == "open_clip"
    with pytest.raises(CheckpointError, match=r"custom\.pt.*pass a model name"):
        load_any(tmp_path / "custom.pt")
    loaded, _ = load_any(tmp_path / "custom.pt", model_name="cf-test-B32-custom")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # Written in OpenAI layout, the same weights no longer need the name.
    convert(tmp_path / "custom.pt", tmp_path / "openai.pt", "openai", model_name="cf-test-B32-custom")
    assert "text_projection" in torch.load(tmp_path / "openai.pt", weights_only=True)


def test_bad_inputs_name_files_and_keys(tmp_path, sources):
    paths, _ = sources
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"empty: neither.*notes\.txt"):
        detect_format(tmp_path / "empty")
    sd = torch.load(paths["openai"], weights_only=True)
    sd["visual.head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra\.pt.*unexpected: visual\.head\.weight"):
        load_any(tmp_path / "extra.pt", OPENCLIP_NAME)
    hf_weights = paths["hf"] / "model.safetensors"
    with pytest.raises(CheckpointError, match="transformers CLIPModel weights; pass the directory"):
        detect_format(hf_weights)
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "missing.pt", tmp_path / "x", "hf")
    with pytest.raises(ValueError, match="to must be one of"):
        convert(paths["openai"], tmp_path / "y", "onnx")
    with pytest.raises(ValueError, match="directory"):
        convert(paths["openai"], tmp_path, "openai")


def test_formats_registry_and_target_choices(sources, tmp_path):
    """Every registered format offers the same surface; the CLI's --to choices are the registry's names."""
    import typing

    assert typing.get_args(FormatName) == tuple(FORMATS)
    for name, module in FORMATS.items():
        assert isinstance(module.DESCRIPTION, str) and isinstance(module.IS_DIRECTORY, bool), name
        assert all(callable(getattr(module, f)) for f in ("detect", "load", "save")), name
    paths, _ = sources
    # Each path is claimed by exactly its own format's detect.
    for fmt, path in paths.items():
        claims = [name for name, module in FORMATS.items()
                  if module.IS_DIRECTORY == path.is_dir() and module.detect(path)]
        assert claims == [fmt], (fmt, claims)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="single file.*open_clip_dir format"):
        convert(paths["openai"], tmp_path / "folder", "open_clip")


def test_open_clip_file_keeps_the_models_layout(tmp_path, sources, inputs):
    """--to open_clip writes model.state_dict() as OpenCLIP keeps it; .safetensors picks that serialization."""
    paths, (exp_img, exp_txt) = sources
    images, tokens = inputs
    written = convert(paths["hf"], tmp_path / "model.safetensors", "open_clip").written
    assert written == [tmp_path / "model.safetensors"]
    sd = clipforge.checkpoints.read_checkpoint(written[0])
    assert "text_projection" in sd and "visual.proj" in sd
    back, _ = load_any(written[0], model_name=OPENCLIP_NAME)
    assert max(max_diffs(back, exp_img, exp_txt, images, tokens)) <= TOL


def test_cli_main_reports_errors_without_a_traceback(tmp_path, capsys):
    assert convert_main(str(tmp_path / "missing.pt"), str(tmp_path / "out"), to="hf") == 1
    assert "missing.pt" in capsys.readouterr().err
