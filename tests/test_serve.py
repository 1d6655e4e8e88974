"""``clipforge serve``: the HTTP API against the Searcher and brute force, every bad input a 4xx, only
indexed files served, the web page driven in headless Chromium, and a concurrent load test.

The collection is built here: generated images embedded by a tiny seeded model, written in
clip-retrieval's layout (two parts, so row ids cross a part boundary) and indexed by ``build_indexes``.
Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from train_utils import TINY_MODEL  # noqa: E402

from clipforge import create_model_and_transforms, get_tokenizer  # noqa: E402
from clipforge.checkpoints.openclip_hub import save_openclip_dir  # noqa: E402
from clipforge.config import CLIPConfig  # noqa: E402
from clipforge.models.clip import CLIP  # noqa: E402
from clipforge.retrieval import layout  # noqa: E402
from clipforge.retrieval.serve import BackgroundServer, create_app  # noqa: E402
from clipforge.transforms import load_image  # noqa: E402

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "stripe", "dot")
PART_SIZE = 8
URL_ROW = 11  # its metadata names a URL, not a local file: searchable, never served
QUERIES = ["a red square", "a blue stripe", "a yellow dot", "green", "a photo of a dog"]


def _draw(color, shape: str, seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 50, (size, size, 3)).astype(np.uint8)
    lo, hi = size // 4, 3 * size // 4
    if shape == "square":
        img[lo:hi, lo:hi] = color
    elif shape == "stripe":
        img[:, lo:hi] = color
    else:
        yy, xx = np.mgrid[:size, :size]
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = color
    return Image.fromarray(img)


def _normalize(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """An embedded, indexed folder: 12 generated images with captions, in two parts."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model_dir = root / "model"
    save_openclip_dir(CLIP(CLIPConfig.from_dict(TINY_MODEL)), model_dir, tokenizer=False)
    name = f"local-dir:{model_dir}"
    model, _, preprocess = create_model_and_transforms(name)
    tokenizer = get_tokenizer(name)

    images = root / "images"
    images.mkdir()
    paths, captions = [], []
    for i, (shape, color) in enumerate((s, c) for s in SHAPES for c in COLORS):
        path = images / f"{i:03d}.png"
        _draw(COLORS[color], shape, seed=i).save(path)
        paths.append(path)
        captions.append(f"a {color} {shape}")
    (images / "notes.txt").write_text("not indexed")
    with torch.no_grad():
        img_emb = _normalize(model.encode_image(torch.stack([preprocess(load_image(p)) for p in paths])))
        txt_emb = _normalize(model.encode_text(tokenizer(captions)))

    out = root / "out"
    stored = [str(p) for p in paths]
    stored[URL_ROW] = "https://example.com/011.png"
    for part, start in enumerate(range(0, len(paths), PART_SIZE)):
        rows = slice(start, start + PART_SIZE)
        for modality, emb in (("image", img_emb), ("text", txt_emb)):
            target = layout.embedding_path(out, modality, part)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, emb[rows].astype(np.float16))
        meta = layout.metadata_path(out, part)
        meta.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({layout.IMAGE_PATH: stored[rows], layout.CAPTION: captions[rows],
                                 "n": list(range(len(paths)))[rows]}), meta)
    layout.write_info(out, layout.EmbedInfo(
        model=name, pretrained=None, dim=img_emb.shape[1], dtype="float16", modalities=["image", "text"],
        part_size=PART_SIZE, input=str(images), input_kind="folder", rows=len(paths),
        parts=len(layout.complete_parts(out)), complete=True))
    (out / "secret.txt").write_text("SECRET")

    from clipforge.retrieval.index import build_indexes

    build_indexes(out, progress=False)
    return {"out": out, "paths": paths, "captions": captions, "model": model, "tokenizer": tokenizer,
            "img_emb": img_emb.astype(np.float16).astype(np.float32)}


@pytest.fixture(scope="module")
def searcher(collection):
    from clipforge.retrieval.search import Searcher

    return Searcher(collection["out"])


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher)) as c:
        yield c


@pytest.fixture(scope="module")
def live(searcher):
    with BackgroundServer(create_app(searcher)) as server:
        yield server


def _ids(payload) -> list:
    return [h["id"] for h in payload["hits"]]


def _same(payload, hits) -> None:
    """The API's hits are the Searcher's, in order, with the same scores."""
    assert _ids(payload) == [h.id for h in hits]
    np.testing.assert_allclose([h["score"] for h in payload["hits"]], [h.score for h in hits], rtol=0, atol=1e-6)


def test_api_equals_searcher_and_brute_force(client, searcher, collection):
    n = len(collection["paths"])
    for q in QUERIES:
        got = client.get("/search", params={"q": q, "k": 5})
        assert got.status_code == 200, got.text
        _same(got.json(), searcher.search_text(q, k=5))
        posted = client.post("/search", json={"query": q, "k": 5, "modality": "text"})
        assert posted.status_code == 200, posted.text
        _same(posted.json(), searcher.search_text(q, k=5, modality="text"))
        assert posted.json()["modality"] == "text"

    # an embedding computed here, outside the service, against brute-force cosine over the stored vectors
    with torch.no_grad():
        query = _normalize(collection["model"].encode_text(collection["tokenizer"](["a green dot"])))[0]
    got = client.post("/search/embedding", json={"vector": query.tolist(), "k": n}).json()
    scores = collection["img_emb"] @ query
    assert _ids(got) == list(np.argsort(-scores, kind="stable"))
    np.testing.assert_allclose([h["score"] for h in got["hits"]], np.sort(scores)[::-1], atol=1e-3)

    data = collection["paths"][3].read_bytes()
    got = client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "4"})
    assert got.status_code == 200, got.text
    _same(got.json(), searcher.search_image(load_image(data), k=4))
    assert _ids(got.json())[0] == 3

    for row in (5, 9):  # either side of the part boundary
        got = client.get(f"/search/id/{row}", params={"k": 6})
        _same(got.json(), searcher.search_id(row, k=6))
        assert _ids(got.json())[0] == row and got.json()["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)

    item = client.get("/item/9").json()
    assert item == {"id": 9, "score": None, "caption": collection["captions"][9],
                    "image_path": str(collection["paths"][9]), "image_url": "/image/9", "extra": {"n": 9}}
    assert client.get(f"/item/{URL_ROW}").json()["image_url"] is None


def _bomb() -> bytes:
    """A PNG of a few kilobytes that decodes to 100 megapixels."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests(size: int, dim: int):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    return [
        ("get", "/search", {"params": {"q": ""}}, 422),
        ("get", "/search", {"params": {"q": "   "}}, 422),
        ("get", "/search", {}, 422),
        ("get", "/search", {"params": {"q": "x" * 3000}}, 422),
        ("get", "/search", {"params": {"q": "a cat", "k": 0}}, 422),
        ("get", "/search", {"params": {"q": "a cat", "k": -3}}, 422),
        ("get", "/search", {"params": {"q": "a cat", "k": size + 1}}, 422),
        ("get", "/search", {"params": {"q": "a cat", "k": 10 ** 6}}, 422),
        ("get", "/search", {"params": {"q": "a cat", "k": "many"}}, 422),
        ("get", "/search", {"params": {"q": "a cat", "modality": "audio"}}, 422),
        ("post", "/search", {"json": {"query": ""}}, 422),
        ("post", "/search", {"json": {"k": 3}}, 422),
        ("post", "/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("post", "/search", {"content": b"[" + b"1," * 600_000 + b"1]",
                             "headers": {"content-type": "application/json"}}, 413),
        ("post", "/search/embedding", {"json": {"vector": [0.1] * (dim + 1)}}, 422),
        ("post", "/search/embedding", {"json": {"vector": [0.0] * dim}}, 422),
        ("post", "/search/embedding", {"json": {"vector": []}}, 422),
        ("post", "/search/embedding", {"json": {"vector": "abc"}}, 422),
        ("post", "/search/embedding", {"json": {"vector": [0.1] * dim, "k": 0}}, 422),
        ("post", "/search/image", {"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}}, 400),
        ("post", "/search/image", {"files": {"file": ("a.png", png, "image/png")}}, 400),
        ("post", "/search/image", {"files": {"file": ("a.png", b"", "image/png")}}, 400),
        ("post", "/search/image", {"data": {"k": "3"}}, 422),
        ("post", "/search/image", {"files": {"file": ("big.png", b"\0" * (10 * 2 ** 20 + 1), "image/png")}}, 413),
        ("post", "/search/image", {"files": {"file": ("bomb.png", _bomb(), "image/png")}}, 413),
        ("get", f"/search/id/{size}", {}, 404),
        ("get", "/search/id/-1", {}, 422),
        ("get", "/search/id/abc", {}, 422),
        ("get", f"/item/{size}", {}, 404),
        ("get", f"/item/{10 ** 12}", {}, 404),
        ("get", f"/image/{size}", {}, 404),
        ("get", f"/image/{URL_ROW}", {}, 404),
        ("get", "/nowhere", {}, 404),
    ]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb case warns, then is refused
def test_bad_inputs_are_clear_4xx(client, collection):
    size, dim = len(collection["paths"]), collection["img_emb"].shape[1]
    for method, url, kwargs, status in _bad_requests(size, dim):
        got = getattr(client, method)(url, **kwargs)
        where = f"{method.upper()} {url} {str(kwargs)[:80]}"
        assert got.status_code == status, f"{where}: {got.status_code} {got.text[:300]}"
        assert "detail" in got.json(), where  # a JSON error saying what is wrong
        assert got.json()["detail"], where


def test_upload_limit_is_configurable(searcher, collection):
    data = collection["paths"][0].read_bytes()
    with TestClient(create_app(searcher, max_upload_bytes=len(data) - 1, max_k=3, warmup=False)) as small:
        got = small.post("/search/image", files={"file": ("q.png", data, "image/png")})
        assert got.status_code == 413 and "limit" in got.json()["detail"]
        assert small.get("/search", params={"q": "a cat", "k": 4}).status_code == 422
        assert small.get("/search", params={"q": "a cat", "k": 3}).status_code == 200


def test_only_indexed_files_are_served(client, collection):
    got = client.get("/image/2")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == collection["paths"][2].read_bytes()
    for url in ("/image/..%2Fsecret.txt", "/image/../secret.txt", "/image/%2e%2e/%2e%2e/out/secret.txt",
                "/static/../secret.txt", "/static/..%2F..%2F..%2Fsecret.txt", "/static/%2e%2e/serve.py",
                "/static//etc/passwd", "/image/0/../../secret.txt", "/image/%2Fetc%2Fpasswd"):
        got = client.get(url)
        assert got.status_code in (404, 422), f"{url}: {got.status_code}"
        assert b"SECRET" not in got.content and b"root:" not in got.content and b"import" not in got.content
    assert client.get("/static/app.js").status_code == 200


def test_health_metrics_docs_page(client, collection):
    n = len(collection["paths"])
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["size"] == {"image": n, "text": n}
    assert sorted(health["modalities"]) == ["image", "text"]
    before = client.get("/metrics").text
    for _ in range(3):
        client.get("/search", params={"q": "a red dot", "k": 2})
    client.get("/item/999")
    text = client.get("/metrics").text

    def count(body: str, labels: str) -> float:
        lines = [ln for ln in body.splitlines() if ln.startswith(f"clipforge_http_requests_total{{{labels}}}")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    ok = 'endpoint="/search",method="GET",status="200"'
    assert count(text, ok) - count(before, ok) == 3
    assert count(text, 'endpoint="/item/{id}",method="GET",status="404"') >= 1
    assert 'clipforge_http_request_duration_seconds_bucket{endpoint="/search",le="0.1",method="GET"}' in text
    assert f'clipforge_index_rows{{modality="image"}} {float(n)}' in text
    docs = client.get("/docs")  # Swagger UI served from this server, not a CDN (works offline)
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+\.(?:js|css))['"]""", docs.text)
    assert len(assets) == 2 and all(a.startswith("/") for a in assets), assets
    assert all(client.get(a).status_code == 200 for a in assets)
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/image", "/search/embedding", "/search/id/{id}", "/item/{id}", "/image/{id}",
            "/health", "/metrics"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "static/app.js" in page.text


def test_concurrent_load(live, searcher, collection):
    """8 clients x 60 mixed queries on a live uvicorn: every answer 200 and equal to the Searcher's."""
    n = len(collection["paths"])
    vectors = {i: collection["img_emb"][i].tolist() for i in range(n)}
    expect_text = {q: [h.id for h in searcher.search_text(q, k=5)] for q in QUERIES}
    expect_id = {i: [h.id for h in searcher.search_id(i, k=5)] for i in range(n)}
    expect_vec = {i: [h.id for h in searcher.search_embedding(np.asarray(vectors[i], np.float32), k=5)]
                  for i in range(n)}

    def one_client(c: int) -> list:
        errors = []
        with httpx.Client(base_url=live.url, timeout=30) as http:
            for j in range(60):
                i = (c * 7 + j) % n
                if j % 3 == 0:
                    q = QUERIES[(c + j) % len(QUERIES)]
                    got, want = http.get("/search", params={"q": q, "k": 5}), expect_text[q]
                elif j % 3 == 1:
                    got, want = http.get(f"/search/id/{i}", params={"k": 5}), expect_id[i]
                else:
                    got, want = http.post("/search/embedding", json={"vector": vectors[i], "k": 5}), expect_vec[i]
                if got.status_code != 200 or _ids(got.json()) != want:
                    errors.append((got.request.url, got.status_code, got.text[:200]))
        return errors

    with ThreadPoolExecutor(8) as pool:
        errors = [e for errs in pool.map(one_client, range(8)) for e in errs]
    assert errors == []
    assert 'status="200"' in httpx.get(f"{live.url}/metrics").text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(collection):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipforge", "serve", str(collection["out"]), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        if health is None:
            proc.kill()
            pytest.fail(f"`clipforge serve` did not answer on port {port}: {proc.communicate()[0].decode()[-2000:]}")
        assert health.status_code == 200
        got = httpx.get(f"http://127.0.0.1:{port}/search", params={"q": "a red square", "k": 3}, timeout=30)
        assert got.status_code == 200 and len(got.json()["hits"]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = proc.communicate(timeout=20)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0].decode()
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output


def _chromium():
    """Debian's chromium + chromedriver under selenium, headless; a skip saying why where they are missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (browser, driver) if not Path(p).is_file()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} missing (`make test` installs Debian's chromium and "
                    "chromium-driver with apt-get; that failed or was not run here)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-proxy-server", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_web_page_in_headless_chromium(live, searcher, collection, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    n = len(collection["paths"])
    browser = _chromium()
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(f"{live.url}/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")

        def shown_ids(label: str) -> list:
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
                       and label in b.find_element(By.ID, "status-text").text)
            return [int(el.get_attribute("data-id")) for el in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]

        def images_loaded() -> int:  # every result image decoded by the browser
            return wait.until(lambda b: b.execute_script(
                "const imgs = [...document.querySelectorAll('#results img')];"
                "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;"))

        box = browser.find_element(By.ID, "query")
        box.send_keys("a blue square", Keys.RETURN)
        assert shown_ids("a blue square") == [h.id for h in searcher.search_text("a blue square", k=n)]
        assert images_loaded() == n - 1  # every row but the URL one has a served image
        first = browser.find_elements(By.CSS_SELECTOR, "#results .hit")[0]
        assert collection["captions"][int(first.get_attribute("data-id"))] in first.text

        clicked = int(first.get_attribute("data-id"))
        first.click()  # more like this
        assert shown_ids(f"similar to #{clicked}") == [h.id for h in searcher.search_id(clicked, k=n)]
        images_loaded()

        browser.find_element(By.ID, "upload").send_keys(str(collection["paths"][6]))
        by_image = searcher.search_image(load_image(collection["paths"][6]), k=n)
        assert shown_ids("like 006.png") == [h.id for h in by_image]

        # drag and drop: a File dropped on the page (built from an indexed image's bytes)
        browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/image/8').then(r => r.blob()).then(blob => {
              const data = new DataTransfer();
              data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
              document.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
              done();
            });""")
        assert shown_ids("like dropped.png")[0] == 8
        images_loaded()

        box.clear()
        box.send_keys(Keys.RETURN)  # an empty query: a message, not a request
        wait.until(lambda b: "error" in b.find_element(By.ID, "status").get_attribute("class"))

        shot = tmp_path / "search_page.png"
        assert browser.save_screenshot(str(shot))

        browser.get(f"{live.url}/docs")  # the OpenAPI page renders offline
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")) >= 8)
    finally:
        browser.quit()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert Image.open(shot).size[0] >= 1000
