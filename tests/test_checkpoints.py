"""Loading checkpoints written by OpenCLIP / OpenAI in every supported format."""
import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.checkpoints import CheckpointError, read_checkpoint, save_torch
from conftest import CAPTIONS

FORMATS = ["state_dict", "ddp_wrapped", "safetensors", "torchscript"]


def _write(model, fmt, path):
    sd = model.state_dict()
    if fmt == "state_dict":
        torch.save(sd, path)
    elif fmt == "ddp_wrapped":
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "torchscript":
        # A TorchScript archive as OpenAI released them (traced encode_image / encode_text).
        size = model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        images, text = torch.ones(1, 3, *size), torch.zeros(1, 77, dtype=torch.int)
        with torch.no_grad():
            traced = torch.jit.trace_module(model, {"encode_image": (images,), "encode_text": (text,)},
                                            check_trace=False)
        torch.jit.save(traced, str(path))


@pytest.fixture(scope="module")
def inputs(photos):
    _, _, preprocess = open_clip.create_model_and_transforms("RN50")
    return torch.stack([preprocess(p) for p in photos]), open_clip.tokenize(CAPTIONS)


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "ViT-B-16"])
def test_every_format_loads_with_identical_features(name, inputs, tmp_path):
    images, tokens = inputs
    torch.manual_seed(1)
    ref = open_clip.create_model(name).eval()
    with torch.inference_mode():
        ref_img, ref_txt = ref.encode_image(images), ref.encode_text(tokens)
    for fmt in FORMATS:
        path = tmp_path / f"{name}-{fmt}.{'safetensors' if fmt == 'safetensors' else 'pt'}"
        _write(ref, fmt, path)
        model, _, _ = clipforge.create_model_and_transforms(name, pretrained=path)
        with torch.inference_mode():
            img_diff = (model.encode_image(images) - ref_img).abs().max().item()
            txt_diff = (model.encode_text(tokens) - ref_txt).abs().max().item()
        assert img_diff <= 1e-5 and txt_diff <= 1e-5, (fmt, img_diff, txt_diff)
        path.unlink()  # full-size models: keep at most one on disk at a time


@pytest.mark.parametrize("name", ["RN50-quickgelu", "ViT-B-32-quickgelu"])
def test_openai_fp16_file_loads_without_a_name(name, inputs, tmp_path):
    """OpenAI releases: fp16 weights, QuickGELU, metadata scalars; the architecture comes from shapes."""
    images, tokens = inputs
    torch.manual_seed(2)
    ref = open_clip.create_model(name).eval()
    open_clip.model.convert_weights_to_lp(ref, torch.float16)
    sd = ref.state_dict()
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "openai.pt")
    ref = ref.float()
    model = clipforge.create_model(None, pretrained=tmp_path / "openai.pt")
    assert model.cfg.quick_gelu
    assert model.cfg.to_dict()["vision_cfg"] == clipforge.get_model_config(name).to_dict()["vision_cfg"]
    with torch.inference_mode():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max() <= 1e-5


def test_positional_embedding_is_interpolated_for_new_image_size(tmp_path):
    torch.manual_seed(0)
    src = clipforge.create_model("ViT-B-32")
    save_torch(src.state_dict(), tmp_path / "b32.pt")
    model = clipforge.create_model("ViT-B-32-256", pretrained=tmp_path / "b32.pt")
    assert model.visual.positional_embedding.shape == (1 + 8 * 8, 768)
    assert torch.equal(model.visual.positional_embedding[0], src.visual.positional_embedding[0])
    assert model.encode_image(torch.randn(1, 3, 256, 256)).shape == (1, 512)


def test_refuses_arbitrary_pickled_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    torch.save({"weights": torch.zeros(1), "obj": Payload()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="refusing|not a readable"):
            read_checkpoint(p)


def test_mismatch_error_names_keys(tmp_path):
    sd = clipforge.create_model("ViT-S-32").state_dict()
    sd.pop("visual.proj")
    sd["visual.extra_thing"] = torch.zeros(3)
    sd["ln_final.weight"] = torch.zeros(7)
    save_torch(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        clipforge.create_model("ViT-S-32", pretrained=tmp_path / "bad.pt")
    msg = str(err.value)
    assert "bad.pt" in msg and "visual.proj" in msg and "visual.extra_thing" in msg and "ln_final.weight" in msg


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        clipforge.create_model("ViT-S-32", pretrained=tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        read_checkpoint(tmp_path / "garbage.pt")


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_torch({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        save_torch({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
