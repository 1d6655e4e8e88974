"""``clipforge.available_models / load / tokenize`` against OpenAI's own ``clip`` package (openai-clip 1.0.1).

Both load the same small seeded checkpoints written here: OpenAI-format state dicts made with OpenAI's
model class (weights rounded to fp16 by OpenAI's ``convert_weights``, as in its releases) and a
TorchScript archive traced from that class in fp16 (as OpenAI's releases were). OpenAI's ``clip.load``
cannot read a state-dict file on this torch (the failed ``torch.jit.load`` leaves the file at its
end), nor patch an archive for ``jit=True`` (``node["value"]`` is gone from torch 2); there the
reference is what its ``load`` does after reading: ``clip.model.build_model(state_dict).float()``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():  # openai-clip imports pkg_resources
    warnings.simplefilter("ignore")
    clip = pytest.importorskip("clip")
    import clip.model as openai_model

import clipforge
from clipforge.checkpoints.io import CheckpointError
from clipforge.openai_api import OpenAICLIP

RES_VIT, RES_RN = 32, 64


def _openai_tiny(kind: str) -> torch.nn.Module:
    """A seeded OpenAI CLIP (OpenAI's class) with its Linear/Conv weights in fp16, as OpenAI builds it."""
    torch.manual_seed(0 if kind == "vit" else 1)
    if kind == "vit":
        model = openai_model.CLIP(32, RES_VIT, 2, 64, 8, 77, 49408, 64, 1, 2)
    else:
        model = openai_model.CLIP(64, RES_RN, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 1)
    # spread the logit scale and the embeddings so the features differ visibly between texts
    with torch.no_grad():
        model.token_embedding.weight.normal_(std=0.5)
    openai_model.convert_weights(model)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai_api")
    out = {}
    for kind in ("vit", "rn"):
        out[kind] = root / f"{kind}.pt"
        torch.save(_openai_tiny(kind).state_dict(), out[kind])
    model = _openai_tiny("vit")
    for name, value in (("input_resolution", RES_VIT), ("context_length", 77), ("vocab_size", 49408)):
        model.__dict__.pop(name, None)  # OpenAI's archives keep these as tensors
        model.register_buffer(name, torch.tensor(value))
    image, text = torch.randn(1, 3, RES_VIT, RES_VIT).half(), clip.tokenize(["a dog"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"forward": (image, text), "encode_image": (image,),
                                                "encode_text": (text,)}, check_trace=False)
    out["jit"] = root / "ViT-tiny.pt"
    traced.save(str(out["jit"]))
    return out


def _reference(path) -> torch.nn.Module:
    """What OpenAI's clip.load(path, device="cpu") builds from a state-dict file."""
    return openai_model.build_model(torch.load(path, map_location="cpu")).float().eval()


def _inputs(res: int):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, res, res, generator=g)
    text = clip.tokenize(["a diagram", "a photo of a dog", "a cat sitting on a mat, 1999"])
    return image, text


def _images():
    rng = np.random.RandomState(0)
    rgb = Image.fromarray(rng.randint(0, 256, (45, 70, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.randint(0, 256, (80, 50, 4), dtype=np.uint8), "RGBA")
    return [rgb, rgba, rgb.convert("P"), rgb.convert("L"), rgb.resize((20, 12))]


def test_available_models_are_openais():
    assert clipforge.available_models() == clip.available_models()


def test_names_fetch_openais_release_files(files, monkeypatch, tmp_path):
    calls = []

    def fake_fetch(url, sha256=None, cache_dir=None, timeout=None):
        calls.append((url, sha256, cache_dir))
        return files["jit"]

    monkeypatch.setattr("clipforge.pretrained.fetch_url", fake_fetch)
    for name in clip.available_models():
        clipforge.openai_api._model_file(name, None)
    for (url, sha, root), name in zip(calls, clip.available_models()):
        assert url == clip.clip._MODELS[name]
        assert sha == url.split("/")[-2]  # OpenAI checks the full sha256 in the URL
        assert str(root) == os.path.expanduser("~/.cache/clip")
    calls.clear()
    model, _ = clipforge.load("ViT-B/32", device="cpu", download_root=str(tmp_path))
    assert calls[0][2] == tmp_path and isinstance(model, OpenAICLIP)


def test_unknown_name_raises_as_openai(tmp_path):
    name = str(tmp_path / "no-such-model")
    with pytest.raises(RuntimeError) as ours:
        clipforge.load(name)
    with pytest.raises(RuntimeError) as theirs:
        clip.load(name)
    assert str(ours.value) == str(theirs.value)
    assert "available models = ['RN50'" in str(ours.value)


@pytest.mark.parametrize("kind,res", [("vit", RES_VIT), ("rn", RES_RN)])
def test_state_dict_file_matches_openai(files, kind, res):
    ref = _reference(files[kind])
    model, preprocess = clipforge.load(str(files[kind]), device="cpu")
    image, text = _inputs(res)
    with torch.no_grad():
        for ours, theirs in [(model.encode_image(image), ref.encode_image(image)),
                             (model.encode_text(text), ref.encode_text(text))]:
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            assert ours.norm(dim=-1).sub(1).abs().max() > 1e-3  # unnormalised, as OpenAI's
        for ours, theirs in zip(model(image, text), ref(image, text)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        logits_per_image, logits_per_text = model(image, text)
        assert logits_per_image.shape == (3, 3) and torch.equal(logits_per_text, logits_per_image.t())
    assert model.visual.input_resolution == ref.visual.input_resolution == res
    assert (model.context_length, model.vocab_size) == (ref.context_length, ref.vocab_size) == (77, 49408)
    assert model.dtype == ref.dtype == torch.float32
    assert torch.equal(model.logit_scale, ref.logit_scale)
    assert not model.training and not ref.training
    # OpenAI's keys: a fine-tuned model's state dict goes back into OpenAI's class
    assert set(model.state_dict()) == set(ref.state_dict())
    openai_model.build_model({k: v.clone() for k, v in model.state_dict().items()})


def test_archive_matches_openai_and_jit_returns_torchscript(files):
    ref, ref_preprocess = clip.load(str(files["jit"]), device="cpu", jit=False)
    eager, preprocess = clipforge.load(str(files["jit"]), device="cpu")
    scripted, jit_preprocess = clipforge.load(str(files["jit"]), device="cpu", jit=True)
    assert isinstance(scripted, torch.jit.ScriptModule) and not isinstance(eager, torch.jit.ScriptModule)
    graph = str(torch.jit.load(str(files["jit"])).encode_image.graph)
    assert re.search(r"prim::Constant\[value=5\]", graph)  # the archive casts to fp16 ...
    image, text = _inputs(RES_VIT)
    with torch.no_grad():
        want_image, want_text = ref.encode_image(image), ref.encode_text(text)
        for model in (eager, scripted):  # ... and on the CPU both run in fp32, as OpenAI's eager model
            assert model.encode_image(image).dtype == torch.float32
            torch.testing.assert_close(model.encode_image(image), want_image, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.encode_text(text), want_text, rtol=1e-5, atol=1e-6)
            for ours, theirs in zip(model(image, text), ref(image, text)):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for img in _images():
        want = ref_preprocess(img)
        assert want.shape == (3, RES_VIT, RES_VIT)
        assert torch.equal(preprocess(img), want) and torch.equal(jit_preprocess(img), want)


def test_jit_on_a_state_dict_warns_as_openai(files):
    with pytest.warns(UserWarning, match="is not a JIT archive. Loading as a state dict instead"):
        model, _ = clipforge.load(str(files["vit"]), device="cpu", jit=True)
    assert isinstance(model, OpenAICLIP)


def test_fp16_off_the_cpu_as_openai(files):
    model, _ = clipforge.load(str(files["jit"]), device="meta")
    ref, _ = clip.load(str(files["jit"]), device="meta")
    assert model.dtype == ref.dtype == torch.float16
    assert model.visual.conv1.weight.device.type == "meta"


def test_open_clip_layout_is_refused(files, tmp_path):
    sd = torch.load(files["vit"])
    moved = {(k if k.startswith(("visual.", "logit_scale")) else "text." + k): v for k, v in sd.items()}
    torch.save(moved, tmp_path / "open_clip.pt")
    with pytest.raises(CheckpointError, match="not in OpenAI's layout.*create_model_and_transforms"):
        clipforge.load(str(tmp_path / "open_clip.pt"), device="cpu")


TEXTS = ["a dog", "A  PHOTO\tof a\ncat ", "", "x" * 200, "é ﬁ ü ¿ 日本語 😀", "&amp;amp;amp; &lt;b&gt;",
         "<|endoftext|> x <|startoftext|>", "<|ENDOFTEXT|>", "hello<|endoftext|>world",
         "<end_of_text> and <start_of_text>", "it's 3.14, isn't it?"]


def test_tokenize_ids_dtype_and_errors_match_openai():
    ours, theirs = clipforge.tokenize(TEXTS, truncate=True), clip.tokenize(TEXTS, truncate=True)
    assert ours.dtype == theirs.dtype == torch.int32
    assert torch.equal(ours, theirs)
    assert torch.equal(clipforge.tokenize("a photo of a cat"), clip.tokenize("a photo of a cat"))
    assert torch.equal(clipforge.tokenize(TEXTS[:3], context_length=16), clip.tokenize(TEXTS[:3], context_length=16))
    long = "a " * 80
    truncated = clipforge.tokenize(long, truncate=True)
    assert torch.equal(truncated, clip.tokenize(long, truncate=True)) and truncated[0, -1] == 49407
    with pytest.raises(RuntimeError) as e_ours:
        clipforge.tokenize(["ok", long])
    with pytest.raises(RuntimeError) as e_theirs:
        clip.tokenize(["ok", long])
    assert str(e_ours.value) == str(e_theirs.value)
    assert "is too long for context length 77" in str(e_ours.value)


# OpenAI's README, verbatim ("Usage" and "Zero-Shot Prediction"); the test only points the names at
# local files (SUBSTITUTIONS) and swaps the module.
USAGE = '''
import torch
import clip
from PIL import Image

device = "cuda" if torch.cuda.is_available() else "cpu"
model, preprocess = clip.load("ViT-B/32", device=device)

image = preprocess(Image.open("CLIP.png")).unsqueeze(0).to(device)
text = clip.tokenize(["a diagram", "a dog", "a cat"]).to(device)

with torch.no_grad():
    image_features = model.encode_image(image)
    text_features = model.encode_text(text)
    
    logits_per_image, logits_per_text = model(image, text)
    probs = logits_per_image.softmax(dim=-1).cpu().numpy()

print("Label probs:", probs)  # prints: [[0.9927937  0.00421068 0.00299572]]
'''

ZERO_SHOT = '''
import os
import clip
import torch
from torchvision.datasets import CIFAR100

# Load the model
device = "cuda" if torch.cuda.is_available() else "cpu"
model, preprocess = clip.load('ViT-B/32', device)

# Download the dataset
cifar100 = CIFAR100(root=os.path.expanduser("~/.cache"), download=True, train=False)

# Prepare the inputs
image, class_id = cifar100[3637]
image_input = preprocess(image).unsqueeze(0).to(device)
text_inputs = torch.cat([clip.tokenize(f"a photo of a {c}") for c in cifar100.classes]).to(device)

# Calculate features
with torch.no_grad():
    image_features = model.encode_image(image_input)
    text_features = model.encode_text(text_inputs)

# Pick the top 5 most similar labels for the image
image_features /= image_features.norm(dim=-1, keepdim=True)
text_features /= text_features.norm(dim=-1, keepdim=True)
similarity = (100.0 * image_features @ text_features.T).softmax(dim=-1)
values, indices = similarity[0].topk(5)

# Print the result
print("\\nTop predictions:\\n")
for value, index in zip(values, indices):
    print(f"{cifar100.classes[index]:>16s}: {100 * value.item():.2f}%")
'''


class CIFAR100:
    """Stand-in for torchvision's (no download): CIFAR-100's first ten class names, one seeded image."""

    classes = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle"]

    def __init__(self, root, download, train):
        self.image = Image.fromarray(np.random.RandomState(3637).randint(0, 256, (32, 32, 3), dtype=np.uint8))

    def __getitem__(self, index):
        return self.image, 0


def _run_snippet(code: str, module_name: str, checkpoint, image_file) -> str:
    substitutions = [("import clip\n", f"import {module_name} as clip\n" if module_name != "clip" else "import clip\n"),
                     ('"ViT-B/32"', repr(str(checkpoint))), ("'ViT-B/32'", repr(str(checkpoint))),
                     ('"CLIP.png"', repr(str(image_file))),
                     ("from torchvision.datasets import CIFAR100\n", "")]
    for old, new in substitutions:
        code = code.replace(old, new)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "<OpenAI README>", "exec"), {"CIFAR100": CIFAR100, "__name__": "__main__"})
    return out.getvalue()


def test_openai_readme_snippets_run_unchanged(files, tmp_path):
    image_file = tmp_path / "CLIP.png"
    _images()[0].save(image_file)
    for code in (USAGE, ZERO_SHOT):
        ours = _run_snippet(code, "clipforge", files["jit"], image_file)
        theirs = _run_snippet(code, "clip", files["jit"], image_file)
        numbers = [np.array(re.findall(r"\d+\.\d+(?:e-?\d+)?", text), dtype=float) for text in (ours, theirs)]
        assert len(numbers[0]) >= 3 and numbers[0].shape == numbers[1].shape
        np.testing.assert_allclose(numbers[0], numbers[1], atol=0.011)  # printed with 2 decimals in %
        layout = [re.findall(r"[A-Za-z_:]+", text) for text in (ours, theirs)]
        assert layout[0] == layout[1]  # same labels in the same order
    assert "Label probs:" in _run_snippet(USAGE, "clipforge", files["vit"], image_file)


class _CoOpTextEncoder(torch.nn.Module):
    """CoOp's TextEncoder (KaiyangZhou/CoOp, trainers/coop.py), verbatim: built from OpenAI's root attributes."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        x = x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection
        return x


def _coop_features(clip_model, n_ctx: int = 4):
    """CoOp's prompt learner: learned context vectors between SOS and the class name; (features, ctx)."""
    classnames = ["dog", "cat", "a small red car"]
    tokenized = clip.tokenize([" ".join(["X"] * n_ctx) + " " + name + "." for name in classnames])
    with torch.no_grad():
        embedding = clip_model.token_embedding(tokenized).type(clip_model.dtype)
    ctx = torch.nn.Parameter(torch.randn(n_ctx, embedding.shape[-1], generator=torch.Generator().manual_seed(0)) * 0.02)
    prompts = torch.cat([embedding[:, :1], ctx.expand(len(classnames), -1, -1), embedding[:, 1 + n_ctx:]], dim=1)
    return _CoOpTextEncoder(clip_model)(prompts, tokenized), ctx


def test_prompt_learning_code_runs_on_the_root_attributes_as_on_openais(files):
    """CoOp-style code reaches the text tower through ``model.transformer`` (sequence-first),
    ``positional_embedding``, ``ln_final``, ``text_projection`` and ``token_embedding``: the same
    features and context gradients as on OpenAI's class, with the state dict unchanged."""
    ref = _reference(files["vit"])
    model, _ = clipforge.load(str(files["vit"]), device="cpu")
    keys = set(model.state_dict())
    ours, ctx_ours = _coop_features(model)
    theirs, ctx_theirs = _coop_features(ref)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(ctx_ours.grad, ctx_theirs.grad, rtol=1e-4, atol=1e-6)
    assert ctx_ours.grad.abs().max() > 0
    # the blocks are the model's: a frozen text tower is frozen through the view, and no key is added
    assert all(a is b for a, b in zip(model.transformer.parameters(), model.text.transformer.parameters()))
    assert len(model.transformer.resblocks) == model.transformer.layers == len(ref.transformer.resblocks)
    assert model.transformer.width == ref.transformer.width
    assert set(model.state_dict()) == keys
    # without prompts the path is encode_text
    text = clip.tokenize(["a photo of a dog"])
    with torch.no_grad():
        through_view = _CoOpTextEncoder(model)(model.token_embedding(text), text)
        torch.testing.assert_close(through_view, model.encode_text(text), rtol=1e-5, atol=1e-6)
