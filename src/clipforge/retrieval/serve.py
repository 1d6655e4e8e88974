"""Search an indexed collection over HTTP: a JSON API, Prometheus metrics and a search web page.

FastAPI + uvicorn because they are the standard Python stack for this: request validation and the
OpenAPI page (``/docs``) come from the typed endpoint signatures, and uvicorn is what people deploy.
``fastapi-offline`` serves the docs page's Swagger UI from the package instead of a CDN, and the web
page is plain HTML + JS in ``web/``: both work on a machine without internet.
Endpoints are plain ``def`` functions, so FastAPI runs them in its threadpool: the model and faiss
calls (CPU/GPU-bound, releasing the GIL) never block the event loop, and they share one
:class:`~clipforge.retrieval.search.Searcher` whose model is loaded once, at start-up.

Safety rules, each tested: files are served by row id only (``/image/{id}`` opens the file that the
metadata of an indexed row names, never a path taken from the request, so there is no path
traversal); request bodies are capped (an upload over ``max_upload_bytes`` is refused with 413 while
it streams in, before it is stored); every bad input is a 4xx JSON error ``{"detail": ...}``: 400 a
file that is not an image, 404 an unknown id, 413 too large, 422 an invalid parameter (empty query,
``k`` out of range, a vector of the wrong dimension, an unknown modality).
"""
from __future__ import annotations

import io
import math
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypeVar

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Path as PathParam, Query
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from .search import Hit, Searcher

WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_UPLOAD_BYTES = 10 * 2 ** 20  # an uploaded query image
MAX_UPLOAD_PIXELS = 50_000_000  # decoded size of an upload (a small PNG can decode to gigabytes)
MAX_BODY_BYTES = 2 ** 20  # any other request body (a 4096-d vector as JSON is ~80 kB)
MULTIPART_OVERHEAD = 64 * 2 ** 10  # form fields and boundaries around the uploaded file
MAX_K = 1000
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

T = TypeVar("T")


class HitOut(BaseModel):
    """One result row."""

    id: int = Field(description="global row id (metadata row)")
    score: Optional[float] = Field(description="cosine similarity to the query; null for /item")
    caption: Optional[str] = None
    image_path: Optional[str] = Field(None, description="as stored in the metadata")
    image_url: Optional[str] = Field(None, description="/image/{id} when the row's image is a local file")
    extra: Dict[str, Any] = Field(default_factory=dict, description="other metadata columns")


class SearchOut(BaseModel):
    """The hits of one query, best first."""

    query: Dict[str, Any] = Field(description="what was searched: text, image (file name), id or embedding (dim)")
    modality: str = Field(description="the index searched: image or text")
    k: int
    hits: List[HitOut]


class TextQuery(BaseModel):
    query: str = Field(description="the text to search for", examples=["a dog on a beach"])
    k: int = Field(20, ge=1, description="number of hits")
    modality: Optional[str] = Field(None, description="index to search: image (default) or text")


class EmbeddingQuery(BaseModel):
    vector: List[float] = Field(description="a query embedding of the index's dimension (normalised or not)")
    k: int = Field(20, ge=1, description="number of hits")
    modality: Optional[str] = Field(None, description="index to search: image (default) or text")


class Health(BaseModel):
    status: str
    modalities: List[str]
    size: Dict[str, int] = Field(description="rows per index")
    max_k: int
    max_upload_bytes: int


def _jsonable(value: Any) -> Any:
    """Metadata values as JSON: numpy scalars as Python ones, NaN as null, bytes as their length."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # timestamps and other parquet types


def _metrics(registry: Any) -> Any:
    """Request counter and latency histogram, labelled by route template (bounded cardinality)."""
    from prometheus_client import Counter, Histogram

    requests = Counter("clipforge_http_requests", "HTTP requests served", ("method", "endpoint", "status"),
                       registry=registry)
    latency = Histogram("clipforge_http_request_duration_seconds", "time to serve a request",
                        ("method", "endpoint"), buckets=LATENCY_BUCKETS, registry=registry)

    class Middleware:
        """Pure ASGI (no buffering): times each request and counts it with its status."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            status = [500]

            async def send_status(message: Dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            start = time.perf_counter()
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = scope.get("route")  # set by the router on a match
                endpoint = getattr(route, "path", None) or "unmatched"
                latency.labels(scope["method"], endpoint).observe(time.perf_counter() - start)
                requests.labels(scope["method"], endpoint, str(status[0])).inc()

    return Middleware


class _BodyLimit:
    """Refuse request bodies over a per-path limit with a JSON 413, before they are stored.

    A declared ``Content-Length`` over the limit is answered at once, without reading the body; a
    streamed (chunked) body is counted as it arrives and refused when it passes the limit.
    """

    def __init__(self, app: Any, limits: Dict[str, int], default: int) -> None:  # limits: path suffix -> bytes
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next((n for path, n in self.limits.items() if scope["path"].endswith(path)), self.default)
        message = f"request body over the limit of {limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            from fastapi.responses import JSONResponse

            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Dict[str, Any]:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise HTTPException(413, message)  # inside the endpoint's body parsing: a JSON 413
            return msg

        await self.app(scope, counted, send)


def create_app(searcher: "Searcher", *, max_k: int = MAX_K, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_upload_pixels: int = MAX_UPLOAD_PIXELS, warmup: bool = True) -> FastAPI:
    """The service over ``searcher``: JSON API, ``/metrics``, ``/docs`` and the web page at ``/``.

    ``warmup`` runs one text query at start-up so the model is loaded before the first request
    (and once, not by several threads racing). Each app has its own metrics registry.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

    from ..transforms import ImageLoadError, load_image

    modalities = list(searcher.modalities)
    if not modalities:
        raise ValueError("the searcher has no index; run `clipforge index OUT` first")
    default_modality = "image" if "image" in modalities else modalities[0]
    registry = CollectorRegistry()
    rows = Gauge("clipforge_index_rows", "rows in each index", ("modality",), registry=registry)
    sizes = {m: int(searcher.size(m)) for m in modalities}
    for m, n in sizes.items():
        rows.labels(m).set(n)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warmup:
            searcher.search_text("a photo", k=1, modality=default_modality)
        yield

    app = FastAPIOffline(title="clipforge search", lifespan=lifespan,
                         description="Search an indexed collection by text, image, embedding or row id. "
                                     "The web page is at /, Prometheus metrics at /metrics.")
    app.add_middleware(_BodyLimit, limits={"/search/image": max_upload_bytes + MULTIPART_OVERHEAD},
                       default=MAX_BODY_BYTES)
    app.add_middleware(_metrics(registry))  # added last: outermost, so it also counts the 413s above

    def checked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Searcher errors as HTTP errors: IndexError -> 404, ValueError -> 422 (message kept)."""
        try:
            return fn(*args, **kwargs)
        except IndexError as e:
            raise HTTPException(404, str(e)) from e
        except ValueError as e:
            raise HTTPException(422, str(e)) from e

    def check_k(k: int) -> int:
        if not 1 <= k <= max_k:
            raise HTTPException(422, f"k must be between 1 and {max_k}, got {k}")
        return k

    def local_file(id: int) -> Optional[Path]:
        path = checked(searcher.image_file, id)
        return Path(path) if path is not None and Path(path).is_file() else None

    def image_url(id: int) -> Optional[str]:  # exactly the rows /image/{id} serves
        return f"/image/{id}" if local_file(id) is not None else None

    def hit_out(hit: "Hit") -> HitOut:
        score = None if hit.score is None or not math.isfinite(hit.score) else float(hit.score)
        return HitOut(id=int(hit.id), score=score, caption=hit.caption, image_path=hit.image_path,
                      image_url=image_url(int(hit.id)), extra=_jsonable(dict(hit.extra or {})))

    def result(query: Dict[str, Any], modality: Optional[str], k: int, fn: Callable[..., List["Hit"]],
               arg: Any) -> SearchOut:
        modality = modality or default_modality
        hits = checked(fn, arg, k=check_k(k), modality=modality)
        return SearchOut(query=query, modality=modality, k=k, hits=[hit_out(h) for h in hits])

    k_query = Query(20, ge=1, description=f"number of hits (1 to {max_k}, at most the index size)")
    modality_query = Query(None, description=f"index to search: {' or '.join(modalities)} (default {default_modality})")

    @app.get("/search", response_model=SearchOut, tags=["search"])
    def search_text_get(q: str = Query(..., max_length=2000, description="text query"), k: int = k_query,
                        modality: Optional[str] = modality_query) -> SearchOut:
        """Search by text (the query is embedded by the model's text tower)."""
        return result({"text": q}, modality, k, searcher.search_text, q)

    @app.post("/search", response_model=SearchOut, tags=["search"])
    def search_text_post(body: TextQuery) -> SearchOut:
        """Search by text, the query as JSON."""
        return result({"text": body.query}, body.modality, body.k, searcher.search_text, body.query)

    @app.post("/search/image", response_model=SearchOut, tags=["search"])
    def search_image(file: bytes = File(..., description=f"an image file (at most {max_upload_bytes} bytes)"),
                     k: int = Form(20, ge=1), modality: Optional[str] = Form(None)) -> SearchOut:
        """Search by an uploaded image (multipart form field ``file``)."""
        if len(file) > max_upload_bytes:
            raise HTTPException(413, f"upload of {len(file)} bytes is over the limit of {max_upload_bytes} bytes")
        try:
            with Image.open(io.BytesIO(file)) as header:  # the size is in the header: refuse bombs undecoded
                pixels = header.size[0] * header.size[1]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            pixels = 0  # not an image (load_image below says why) or one PIL itself refuses
        if pixels > max_upload_pixels:
            raise HTTPException(413, f"image of {pixels} pixels is over the limit of {max_upload_pixels}")
        try:
            image = load_image(file, convert_rgb=False)  # search_image converts as its transform needs
        except ImageLoadError as e:
            raise HTTPException(400, f"the upload is not a readable image: {e}") from e
        return result({"image": f"<{len(file)} bytes>"}, modality, k, searcher.search_image, image)

    @app.post("/search/embedding", response_model=SearchOut, tags=["search"])
    def search_embedding(body: EmbeddingQuery) -> SearchOut:
        """Search by a query embedding (e.g. one computed elsewhere with the same model)."""
        vector = np.asarray(body.vector, dtype=np.float32)  # the Searcher checks its dimension and values
        return result({"embedding": int(vector.size)}, body.modality, body.k, searcher.search_embedding, vector)

    id_path = PathParam(..., ge=0, description="global row id")

    @app.get("/search/id/{id}", response_model=SearchOut, tags=["search"])
    def search_id(id: int = id_path, k: int = k_query, modality: Optional[str] = modality_query) -> SearchOut:
        """Search by an indexed row's own vector ("more like this")."""
        return result({"id": id}, modality, k, searcher.search_id, id)

    @app.get("/item/{id}", response_model=HitOut, tags=["items"])
    def item(id: int = id_path) -> HitOut:
        """The metadata of one row."""
        return hit_out(checked(searcher.hit, id))

    @app.get("/image/{id}", tags=["items"], response_class=FileResponse,
             responses={404: {"description": "no such row, or its image is not a local file"}})
    def image(id: int = id_path) -> FileResponse:
        """The image file of an indexed row (looked up by id: no other file can be served)."""
        path = local_file(id)
        if path is None:
            raise HTTPException(404, f"row {id} has no local image file")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> Health:
        """Liveness, the indexes and the limits (the web page reads these)."""
        return Health(status="ok", modalities=modalities, size=sizes, max_k=max_k,
                      max_upload_bytes=max_upload_bytes)

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics: requests and latency per endpoint, index sizes."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


class BackgroundServer:
    """Run ``app`` with uvicorn in a thread on ``host:port`` (``port=0``: a free one), as a context manager.

    For tests, benchmarks and notebooks: ``with BackgroundServer(app) as server: httpx.get(server.url)``.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 60.0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.start_timeout = start_timeout
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, model: Optional[str] = None,
          pretrained: Optional[str] = None, device: str = "cpu", max_k: int = MAX_K,
          max_upload_bytes: int = MAX_UPLOAD_BYTES, log_level: str = "info") -> None:
    """Serve the indexed ``folder`` until interrupted (uvicorn handles Ctrl-C / SIGTERM)."""
    import uvicorn

    from .search import Searcher

    searcher = Searcher(folder, model_name=model, pretrained=pretrained, device=device)
    app = create_app(searcher, max_k=max_k, max_upload_bytes=max_upload_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["BackgroundServer", "HitOut", "SearchOut", "create_app", "serve", "MAX_K", "MAX_UPLOAD_BYTES"]
