"""``clipforge push``: uploads through huggingface_hub to a stand-in Hub on 127.0.0.1, then the received
files are loaded by the libraries the layouts are for (open_clip ``local-dir:``, transformers
``from_pretrained``) and compared with the pushed model's features."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import yaml

from clipforge.checkpoints.openclip_hub import save_openclip_dir
from clipforge.cli import main as cli_main
from clipforge.checkpoints.push import push_to_hub
from clipforge.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.models import build_model
from clipforge.tokenizer import tokenize

TOKEN = "hf_standin_token"


class StandInHub:
    """The Hub endpoints ``create_repo``, ``create_branch`` and ``upload_folder`` call, storing commits on disk.

    Every file is accepted as a regular (non-LFS) upload, sent base64 inside the commit, as the
    Hub's API allows; README.md front matter is checked to be YAML, as the Hub's validate-yaml does.
    """

    def __init__(self, root: Path):
        self.root, self.requests, self.repos, self.commits = root, [], {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append((self.path, self.headers.get("Authorization")))
                status, reply = hub.handle(unquote(self.path.split("?")[0]), body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, body: bytes):
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = payload
            return 200, {"url": f"{self.url}/{repo}"}
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            yaml.safe_load(content.split("---")[1])  # raises (500) on invalid front matter
            return 200, {"errors": [], "warnings": []}
        parts = path.split("/")  # /api/models/OWNER/NAME/ACTION/REVISION
        repo, action, revision = "/".join(parts[3:5]), parts[5], "/".join(parts[6:])
        if repo not in self.repos:
            return 404, {"error": f"Repository {repo} not found"}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if action == "branch":
            self.repos[repo].setdefault("branches", []).append(revision)
            return 200, {}
        if action == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            folder = self.root / repo / revision
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64"
                target = folder / line["value"]["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(line["value"]["content"]))
            self.commits.append((repo, revision, lines[0]["value"]["summary"]))
            oid = f"{len(self.commits):040x}"
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}
        return 404, {"error": f"no route {path}"}

    def files(self, repo: str, revision: str = "main") -> Path:
        return self.root / repo / revision


@pytest.fixture
def hub(tmp_path):
    server = StandInHub(tmp_path / "hub")
    yield server
    server.server.shutdown()
    server.server.server_close()


def _tiny_model():
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=32, quick_gelu=True,
                     vision_cfg=VisionConfig(image_size=32, patch_size=8, layers=2, width=64),
                     text_cfg=TextConfig(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    return build_model(cfg).eval()


@pytest.fixture
def source(tmp_path):
    """A clipforge/OpenCLIP hub folder with a model card naming its license."""
    model = _tiny_model()
    folder = tmp_path / "tiny"
    save_openclip_dir(model, folder, PreprocessConfig(image_size=32, interpolation="bilinear"))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return model, folder


def _inputs():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, tokenize(["a photo of a dog", "a diagram"])


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _card(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_push_open_clip_layout_loads_in_open_clip(hub, source):
    import open_clip

    model, folder = source
    result = push_to_hub(folder, "me/tiny-clip", private=True, revision="v1", torch_bin=True,
                         token=TOKEN, endpoint=hub.url)
    assert hub.repos["me/tiny-clip"]["visibility"] == "private" and hub.repos["me/tiny-clip"]["branches"] == ["v1"]
    assert all(auth == f"Bearer {TOKEN}" for _, auth in hub.requests)
    received = hub.files("me/tiny-clip", "v1")
    assert sorted(p.name for p in received.iterdir()) == result.files == sorted(
        ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
         "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"])
    assert result.commit_url.startswith(f"{hub.url}/me/tiny-clip/commit/")
    ref, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(received))
    images, tokens = _inputs()
    for ours, theirs in zip(_features(model, images, tokens), _features(ref.eval(), images, tokens)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert "bilinear" in repr(preprocess)  # the source's preprocessing travelled
    import clipforge

    again, _, _ = clipforge.create_model_and_transforms("local-dir:" + str(received))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert again.preprocess_cfg.interpolation == "bilinear"
    assert open_clip.get_tokenizer("local-dir:" + str(received))(["a diagram"]).equal(tokens[1:])
    card = _card(received)
    assert card == {"library_name": "open_clip", "license": "apache-2.0", "pipeline_tag": "zero-shot-image-classification",
                    "tags": ["clip", "zero-shot-image-classification", "clipforge"]}
    text = (received / "README.md").read_text()
    assert 'open_clip.create_model_and_transforms("hf-hub:me/tiny-clip")' in text and "clipforge" in text
    # pushing again: the repository exists (409 from create_repo is fine), a second commit lands on main
    second = push_to_hub(folder, "me/tiny-clip", commit_message="second", license="mit", token=TOKEN, endpoint=hub.url)
    assert hub.commits[-1] == ("me/tiny-clip", "main", "second") and second.revision is None
    assert _card(hub.files("me/tiny-clip"))["license"] == "mit"


def test_cli_push_transformers_layout_loads_in_transformers(hub, source, capsys):
    import transformers

    model, folder = source
    code = cli_main(["push", str(folder), "me/tiny-hf", "--layout", "transformers", "--commit-message", "hello",
                     "--endpoint", hub.url, "--token", TOKEN])
    out = capsys.readouterr().out
    assert code == 0 and "pushed" in out and "me/tiny-hf" in out
    assert hub.commits == [("me/tiny-hf", "main", "hello")]
    received = hub.files("me/tiny-hf")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "README.md"} <= {
        p.name for p in received.iterdir()}
    ref = transformers.CLIPModel.from_pretrained(str(received)).eval()
    images, tokens = _inputs()
    with torch.no_grad():
        theirs = ref.get_image_features(pixel_values=images), ref.get_text_features(input_ids=tokens)
    theirs = [getattr(t, "pooler_output", t) for t in theirs]
    for ours, want in zip(_features(model, images, tokens), theirs):
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    processor = transformers.CLIPProcessor.from_pretrained(str(received))
    assert processor.tokenizer("a diagram")["input_ids"] == tokens[1, :4].tolist()
    card = _card(received)
    assert card["library_name"] == "transformers" and card["pipeline_tag"] == "zero-shot-image-classification"
    assert 'CLIPModel.from_pretrained("me/tiny-hf")' in (received / "README.md").read_text()


@pytest.mark.parametrize("case", ["missing", "not_a_model", "bad_repo_id", "bin_with_transformers"])
def test_push_user_errors(hub, source, tmp_path, capsys, case):
    _, folder = source
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    args = {"missing": [str(tmp_path / "nope"), "me/x"], "not_a_model": [str(junk), "me/x"],
            "bad_repo_id": [str(folder), "me/bad//name"],
            "bin_with_transformers": [str(folder), "me/x", "--layout", "transformers", "--torch-bin"]}[case]
    code = cli_main(["push", *args, "--endpoint", hub.url, "--token", TOKEN])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("clipforge push: error: ") and len(err.strip().splitlines()) == 1
    expected = {"missing": "nope", "not_a_model": "notes.txt", "bad_repo_id": "me/bad//name",
                "bin_with_transformers": "open_clip layout"}[case]
    assert expected in err
    assert not hub.commits and not any(path.endswith("/commit/main") for path, _ in hub.requests)
