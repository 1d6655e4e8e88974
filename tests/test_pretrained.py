"""Pretrained tags, downloads and the factory's tag/hf-hub/local-dir resolution; nothing leaves 127.0.0.1."""
import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from PIL import Image

import clipforge
from clipforge import pretrained as pt
from clipforge.factory import UnknownPretrainedError
from clipforge.pretrained import DownloadError, HubFile, IntegrityError, PretrainedTag, UrlFile

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TINY_NAME = "cf-pretrained-tiny"
CAPTIONS = ["a photo of a cat", "a diagram", ""]


# ---------------------------------------------------------------- registry

def test_tags_match_open_clip_registry():
    """Every OpenCLIP (model, tag) is listed, and names the same files, digest, activation and preprocessing."""
    models = set(clipforge.list_models())
    pairs = pt.list_pretrained()
    assert len(set(pairs)) == len(pairs)
    assert set(pairs) == set(open_clip.list_pretrained()) and len(pairs) == 196  # OpenCLIP 3.3's registry
    for model, tag in pairs:
        ours, ref = pt.get_pretrained_cfg(model, tag), open_clip.get_pretrained_cfg(model, tag)
        assert model in models and ref, (model, tag)
        # OpenCLIP writes "org/repo/" for its default file name and "org/repo/file" otherwise (ViTamin).
        filename = "" if ours.hub.filename == pt.tags.HUB_TORCH_NAME else ours.hub.filename
        assert f"{ours.hub.repo_id}/{filename}" == ref["hf_hub"], (model, tag)
        assert (ours.url.url if ours.url else "") == ref["url"], (model, tag)
        # The digest OpenCLIP checks: the full sha256 in OpenAI's URL path, else the prefix in the file name.
        digest = re.search(r"/([0-9a-f]{64})/|-([0-9a-f]{8})\.pth?$", ref["url"])
        expected = next(g for g in digest.groups() if g) if digest else None
        assert (ours.url.sha256 if ours.url else None) == expected, (model, tag)
        assert ours.quick_gelu == ref.get("quick_gelu", False), (model, tag)
        assert (ours.mean, ours.std, ours.interpolation, ours.resize_mode) == (
            tuple(ref["mean"]), tuple(ref["std"]), ref["interpolation"], ref["resize_mode"]), (model, tag)


def test_main_releases_present():
    openai = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]
    for model in openai:
        tag = pt.get_pretrained_cfg(model, "openai")
        assert tag.quick_gelu and tag.url.format == "openai-torchscript"
        assert tag.url.url.split("/")[-2] == tag.url.sha256 and len(tag.url.sha256) == 64
        assert tag.hub.candidates() == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    for model, tag in [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-H-14", "laion2b_s32b_b79k"),
                       ("ViT-bigG-14", "laion2b_s39b_b160k"), ("ViT-L-14", "datacomp_xl_s13b_b90k"),
                       ("ViT-H-14-quickgelu", "dfn5b"), ("ViT-B-32-quickgelu", "metaclip_400m"),
                       ("ViT-B-32-quickgelu", "metaclip_fullcc"), ("ViT-B-16-SigLIP", "webli"),
                       ("ViT-SO400M-14-SigLIP", "webli"), ("ViT-B-16-SigLIP2", "webli")]:
        assert pt.is_pretrained_tag(model, tag), (model, tag)
    assert pt.get_pretrained_cfg("ViT-B-32", "laion400m_e31").url.sha256 == "d867053b"  # prefix in the file name
    assert pt.get_pretrained_cfg("ViT-B-32", "LAION2B-S34B-B79K").tag == "laion2b_s34b_b79k"  # OpenCLIP's cleaning
    # -quickgelu aliases list only the QuickGELU-trained tags, as OpenCLIP does
    assert "laion2b_s34b_b79k" not in pt.list_pretrained_tags_by_model("ViT-B-32-quickgelu")


def test_unknown_tag_lists_available_tags():
    with pytest.raises(ValueError, match="laion2b_s34b_b79k.*datacomp_xl_s13b_b90k"):
        pt.get_pretrained_cfg("ViT-B-32", "laion5b")
    with pytest.raises(UnknownPretrainedError, match="neither a known tag.*tags of 'ViT-B-32': openai, "):
        clipforge.create_model("ViT-B-32", pretrained="openia")


def test_cli_rows(capsys):
    from clipforge.cli import main

    rows = pt.pretrained_rows("ViT-B-32")
    assert ("ViT-B-32", "openai", "quick_gelu") == rows[0][:3] and "openaipublic" in rows[0][3]
    assert dict(pt.model_rows())["ViT-B-16-SigLIP"] == 1 and dict(pt.model_rows())["ViT-M-16"] == 0
    assert main(["pretrained", "--model", "RN50"]) == 0
    assert capsys.readouterr().out.startswith("RN50\topenai\tquick_gelu\thf-hub:timm/resnet50_clip.openai")
    assert main(["models"]) == 0
    assert "ViT-L-14\t" in capsys.readouterr().out


# ---------------------------------------------------------------- URL downloads (local HTTP server)

@pytest.fixture
def http_dir(tmp_path):
    """A threaded HTTP server on 127.0.0.1 serving a fresh folder: (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_download_verified_and_cached(http_dir, tmp_path):
    root, base = http_dir
    payload = bytes(range(256)) * 4000
    (root / "w.pt").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    path = pt.fetch_url(f"{base}/w.pt", digest, cache_dir=cache)
    assert path == cache / "w.pt" and path.read_bytes() == payload
    (root / "w.pt").unlink()  # now only the cache can answer
    assert pt.fetch_url(f"{base}/w.pt", digest[:8], cache_dir=cache) == path
    path.write_bytes(payload[:1000])  # a torn copy (e.g. from another tool) is re-fetched, not trusted
    (root / "w.pt").write_bytes(payload)
    assert pt.fetch_url(f"{base}/w.pt", digest, cache_dir=cache).read_bytes() == payload


def test_url_download_shows_progress(http_dir, tmp_path, capsys):
    root, base = http_dir
    (root / "p.pt").write_bytes(b"x" * 300_000)
    pt.fetch_url(f"{base}/p.pt", cache_dir=tmp_path / "a")
    err = capsys.readouterr().err
    assert "p.pt" in err and "100%" in err  # the bar knows the size from Content-Length
    pt.fetch_url(f"{base}/p.pt", cache_dir=tmp_path / "b", progress=False)
    assert "100%" not in capsys.readouterr().err  # (the test server still logs its request line)


def test_url_sha_mismatch_leaves_nothing(http_dir, tmp_path):
    root, base = http_dir
    (root / "bad.pt").write_bytes(b"tampered" * 1000)
    cache = tmp_path / "cache"
    tag = PretrainedTag("ViT-S-32", "mirror", url=UrlFile(f"{base}/bad.pt", "ab" * 32))
    with pytest.raises(IntegrityError, match=r"bad\.pt: sha256 .* does not match the published abab"):
        pt.download_pretrained(tag, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither the file nor a temporary


def test_unreachable_url_fails_fast_with_instructions(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/clip/ViT-X.pt"
    tag = PretrainedTag("ViT-S-32", "mirror", url=UrlFile(url, "0" * 64), quick_gelu=True)
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        pt.download_pretrained(tag, cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert url in msg and "put ViT-X.pt into cache_dir" in msg
    assert "create_model_and_transforms('ViT-S-32-quickgelu', pretrained='/path/to/file')" in msg


# ---------------------------------------------------------------- Hugging Face Hub, offline

def test_hub_offline_fails_fast_naming_repo_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tag = pt.get_pretrained_cfg("ViT-B-32", "openai")
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        clipforge.create_model_and_transforms("ViT-B-32", pretrained="openai", cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "hf-hub:timm/vit_base_patch32_clip_224.openai file open_clip_model.safetensors" in msg
    assert tag.url.url in msg and "HF_HUB_OFFLINE" in msg
    assert "create_model_and_transforms('ViT-B-32-quickgelu', pretrained='/path/to/file')" in msg
    with pytest.raises(DownloadError, match=r"hf-hub:apple/DFN5B-CLIP-ViT-H-14 file open_clip_model.safetensors"
                       r"(.|\n)*'ViT-H-14-quickgelu', pretrained='/path/to/file', "
                       r"preprocess=get_pretrained_cfg\('ViT-H-14', 'dfn5b'\).preprocess\(224\)"):
        pt.download_pretrained(pt.get_pretrained_cfg("ViT-H-14", "dfn5b"), cache_dir=tmp_path)


def test_hub_unreachable_fails_fast_without_retries(tmp_path, monkeypatch):
    """Online mode with a dead endpoint: one probe, no back-off loop (hf_hub_download alone takes ~20 s)."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        dead + "/{repo_id}/resolve/{revision}/{filename}")
    cache_only = huggingface_hub.hf_hub_download

    def no_download(*args, **kw):  # reaching a real download here would be a test bug (and a 3.9 GB file)
        assert kw.get("local_files_only"), "download attempted although the Hub is unreachable"
        return cache_only(*args, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K file open_clip_model") as err:
        pt.download_pretrained(pt.get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k"), cache_dir=tmp_path)
    assert "Connect" in str(err.value)  # the probe reached the dead local endpoint, not the Internet
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------- loading through the factory

@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    """A tiny QuickGELU OpenCLIP model, its OpenCLIP hub-layout dir (save_for_hf) and inputs."""
    from open_clip.push_to_hf_hub import save_for_hf

    folder = tmp_path_factory.mktemp("tiny")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(folder / f"{TINY_NAME}.json")
    if TINY_NAME not in clipforge.list_models():
        clipforge.add_model_config(folder / f"{TINY_NAME}.json")
    torch.manual_seed(0)
    ref = open_clip.create_model(TINY_NAME, force_quick_gelu=True).eval()
    hub_dir = folder / "hub"
    ref.visual.preprocess_cfg = dict(ref.visual.preprocess_cfg, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    ref.visual.image_mean, ref.visual.image_std = (0.5,) * 3, (0.5,) * 3  # what save_for_hf writes
    no_tokenizer_files = SimpleNamespace(save_pretrained=lambda d: None)  # CLIP BPE needs none
    save_for_hf(ref, no_tokenizer_files, {**TINY, "quick_gelu": True}, str(hub_dir), safe_serialization=True)
    images = torch.randn(2, 3, 32, 32)
    return ref, hub_dir, images, open_clip.tokenize(CAPTIONS)


@pytest.fixture
def own_tags():
    """Tags a test registers are dropped afterwards, so the registry tests see only the built-in table."""
    saved = list(pt.tags._TAGS)
    yield pt.add_pretrained_tag
    pt.tags._TAGS[:] = saved


def _max_diff(model, ref, images, tokens):
    with torch.no_grad():
        return max((model.encode_image(images) - ref.encode_image(images)).abs().max().item(),
                   (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item())


def _fake_hub(monkeypatch, repos, etags=None):
    """The Hub served from local folders (repo id -> folder): a cache, metadata with sha256 etags, downloads."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls, cached = [], set()

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("local_files_only", False)))
        src = repos[repo_id] / filename
        dst = Path(kw["cache_dir"]) / repo_id / filename
        if kw.get("local_files_only") and dst not in cached:
            raise LocalEntryNotFoundError(f"{filename} not cached")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        cached.add(dst)
        return str(dst)

    def metadata(url, timeout=None):
        repo, _, filename = url.partition("/resolve/main/")
        repo_id, folder = next((r, f) for r, f in repos.items() if repo.endswith(r))
        if not (folder / filename).is_file():
            raise RemoteEntryNotFoundError(f"{url}: 404", response=SimpleNamespace(status_code=404, headers={}))
        digest = (etags or {}).get(filename) or hashlib.sha256((folder / filename).read_bytes()).hexdigest()
        return SimpleNamespace(etag=digest)

    from huggingface_hub.errors import RemoteEntryNotFoundError
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    return calls


def test_local_dir_matches_open_clip(tiny_ref):
    ref, hub_dir, images, tokens = tiny_ref
    model, _, val = clipforge.create_model_and_transforms("local-dir:" + str(hub_dir))
    assert model.cfg.quick_gelu and not model.training
    assert _max_diff(model, ref, images, tokens) < 1e-5
    assert model.preprocess_cfg.mean == (0.5,) * 3 and model.preprocess_cfg.resize_mode == "squash"
    _, _, ref_val = open_clip.create_model_and_transforms("local-dir:" + str(hub_dir))
    img = Image.new("RGB", (64, 40), (200, 30, 90))
    assert torch.equal(val(img), ref_val(img))
    assert torch.equal(clipforge.get_tokenizer("local-dir:" + str(hub_dir))(CAPTIONS), tokens)
    with pytest.raises(ValueError, match="carries its own weights"):
        clipforge.create_model("local-dir:" + str(hub_dir), pretrained="x.pt")


def test_hf_hub_name_resolves_through_hub_download(tiny_ref, monkeypatch, tmp_path):
    ref, hub_dir, images, tokens = tiny_ref
    calls = _fake_hub(monkeypatch, {"someorg/tiny-clip": hub_dir})
    model = clipforge.create_model("hf-hub:someorg/tiny-clip", cache_dir=tmp_path)
    assert _max_diff(model, ref, images, tokens) < 1e-5
    # cache first, then a download; the safetensors file is preferred, as OpenCLIP does
    assert calls[:2] == [("someorg/tiny-clip", "open_clip_config.json", True),
                         ("someorg/tiny-clip", "open_clip_config.json", False)]
    assert calls[-1] == ("someorg/tiny-clip", "open_clip_model.safetensors", False)
    del calls[:]
    clipforge.create_model("hf-hub:someorg/tiny-clip", cache_dir=tmp_path)
    assert all(local_only for _, _, local_only in calls)  # served from the cache, no Hub request
    assert torch.equal(clipforge.get_tokenizer("hf-hub:someorg/tiny-clip", cache_dir=tmp_path)(CAPTIONS), tokens)


def test_tag_applies_quick_gelu_and_preprocessing(tiny_ref, monkeypatch, tmp_path, own_tags):
    ref, hub_dir, images, tokens = tiny_ref
    _fake_hub(monkeypatch, {"someorg/tiny-weights": hub_dir})
    own_tags(PretrainedTag(TINY_NAME, "tinytag", HubFile("someorg/tiny-weights"), quick_gelu=True,
                           mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash"))
    model, _, val = clipforge.create_model_and_transforms(TINY_NAME, pretrained="tinytag", cache_dir=tmp_path)
    assert model.cfg.quick_gelu  # the architecture's JSON says GELU; the tag's weights need QuickGELU
    assert _max_diff(model, ref, images, tokens) < 1e-5
    plain = clipforge.create_model(TINY_NAME, pretrained=str(hub_dir / "open_clip_model.safetensors"))
    assert _max_diff(plain, ref, images, tokens) > 1e-4  # so the activation really matters here
    ref_val = open_clip.image_transform(32, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    img = Image.new("RGB", (64, 40), (10, 200, 90))
    assert torch.equal(val(img), ref_val(img))
    half = clipforge.create_model(TINY_NAME, pretrained="tinytag", precision="bf16", cache_dir=tmp_path)
    assert half.visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        clipforge.create_model(TINY_NAME, precision="fp8")
    with pytest.raises(ValueError, match="already registered"):
        own_tags(PretrainedTag(TINY_NAME, "tinytag", HubFile("x/y")))


def test_hub_digest_mismatch_removes_download(tiny_ref, monkeypatch, tmp_path):
    _, hub_dir, _, _ = tiny_ref
    _fake_hub(monkeypatch, {"someorg/bad": hub_dir}, etags={"open_clip_model.safetensors": "0" * 64})
    with pytest.raises(IntegrityError, match="hf-hub:someorg/bad file open_clip_model.safetensors: sha256"):
        pt.fetch_hub_file("someorg/bad", HubFile("someorg/bad").candidates(), cache_dir=tmp_path)
    assert not (tmp_path / "someorg/bad/open_clip_model.safetensors").exists()


def test_url_tag_loads_verified_weights(tiny_ref, http_dir, tmp_path, own_tags):
    """A tag with only a URL: fetched from the local server, sha256-checked, loaded, cached for next time."""
    ref, hub_dir, images, tokens = tiny_ref
    root, base = http_dir
    shutil.copy(hub_dir / "open_clip_model.safetensors", root / "tiny.safetensors")
    digest = hashlib.sha256((root / "tiny.safetensors").read_bytes()).hexdigest()
    own_tags(PretrainedTag(TINY_NAME, "tinyurl", url=UrlFile(f"{base}/tiny.safetensors", digest), quick_gelu=True))
    model = clipforge.create_model(TINY_NAME, pretrained="tinyurl", cache_dir=tmp_path)
    assert _max_diff(model, ref, images, tokens) < 1e-5 and (tmp_path / "tiny.safetensors").is_file()
    assert model.preprocess_cfg == clipforge.PreprocessConfig(image_size=32)  # OpenAI's normalisation by default
