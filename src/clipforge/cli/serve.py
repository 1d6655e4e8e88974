"""``clipforge serve``: runs :func:`clipforge.retrieval.serve.serve` (JSON API + web page) until interrupted."""
from __future__ import annotations

from typing import Optional

from ..retrieval.serve import MAX_K, MAX_UPLOAD_BYTES, serve


def main(out: str, *, host: str = "127.0.0.1", port: int = 8000, model: Optional[str] = None,
         pretrained: Optional[str] = None, device: str = "cpu", max_k: int = MAX_K,
         max_upload_mb: float = MAX_UPLOAD_BYTES / 2 ** 20, log_level: str = "info") -> int:
    """Serve an indexed collection over HTTP: a search web page at /, the JSON API (documented at
    /docs), /health and Prometheus /metrics. Stop it with Ctrl-C.

    Args:
        out: folder written by `clipforge embed` and indexed by `clipforge index`
        host: address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
        port: TCP port
        model: model for text/image queries (default: the one the folder was embedded with)
        pretrained: its weights (default: the folder's)
        device: torch device for the query encoder, e.g. cpu or cuda
        max_k: the most hits one query may ask for
        max_upload_mb: the largest image upload accepted, in MiB
        log_level: uvicorn log level: critical, error, warning, info, debug
    """
    print(f"serving {out} on http://{host}:{port}/ (API docs: http://{host}:{port}/docs)", flush=True)
    serve(out, host=host, port=port, model=model, pretrained=pretrained, device=device, max_k=max_k,
          max_upload_bytes=int(max_upload_mb * 2 ** 20), log_level=log_level)
    return 0
