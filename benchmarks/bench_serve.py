"""Query latency of ``clipforge serve`` under concurrent load, at a chosen index size.

    python benchmarks/bench_serve.py --rows 1000000 --dim 512 --max-memory 2G      # the issue's setting
    python benchmarks/bench_serve.py --rows 2000 --dim 64 --clients 2 --queries 10  # smoke test
    python benchmarks/bench_serve.py --folder OUT                                    # an existing indexed folder

Without ``--folder`` it writes a synthetic collection in clip-retrieval's layout (``--rows`` clustered
random unit vectors, fp16, with path/caption metadata, and a small random model of the same
dimension for text queries), builds its index with ``build_indexes`` under ``--max-memory`` and
reports build time and recall@10 from ``index_info.json``. Then it serves the folder with uvicorn on
127.0.0.1 and runs ``--clients`` threads, each sending ``--queries`` requests in turn: text
(``GET /search``, the model's text tower + index search), embedding (``POST /search/embedding``,
index search only) and id (``GET /search/id/{id}``). Latency is wall time per request at the client
(HTTP included); it reports p50/p90/p99/max per kind and overall, throughput and the error count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import numpy as np

KINDS = ("text", "embedding", "id")
TEXT_QUERIES = ["a dog on a beach", "a red car", "two people walking in the snow", "a plate of food",
                "a cat sleeping on a sofa", "a city skyline at night", "a man riding a bicycle", "flowers"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, help="an indexed folder to serve (default: write a synthetic one)")
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic collection size")
    p.add_argument("--dim", type=int, default=512, help="synthetic embedding dimension")
    p.add_argument("--part-size", type=int, default=100_000, help="rows per synthetic part")
    p.add_argument("--max-memory", default="2G", help="index memory budget (build_indexes)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--queries", type=int, default=200, help="requests per client")
    p.add_argument("--k", type=int, default=20, help="hits per query")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}")
    p.add_argument("--omp-threads", type=int, default=None, help="faiss OpenMP threads (default: faiss's)")
    p.add_argument("--workdir", type=Path, default=None, help="where the synthetic folder goes (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(args.kinds) - set(KINDS)
    if unknown or not args.kinds:
        p.error(f"--kinds must name some of {KINDS}, got {sorted(unknown) or 'none'}")
    return args


def write_synthetic(out: Path, rows: int, dim: int, part_size: int, seed: int = 0) -> Dict[str, object]:
    """Clustered unit vectors (1000 centres + noise, so an approximate index has real work) in parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from clipforge.checkpoints.openclip_hub import save_openclip_dir
    from clipforge.config import CLIPConfig
    from clipforge.models.clip import CLIP
    from clipforge.retrieval import layout

    torch.manual_seed(seed)
    model_dir = out.parent / f"{out.name}-model"
    cfg = {"embed_dim": dim,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    save_openclip_dir(CLIP(CLIPConfig.from_dict(cfg)), model_dir, tokenizer=False)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    parts = 0
    for part, start in enumerate(range(0, rows, part_size)):
        n = min(part_size, rows - start)
        x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = layout.embedding_path(out, "image", part)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x.astype(np.float16))
        ids = np.arange(start, start + n)
        meta = layout.metadata_path(out, part)
        meta.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({layout.IMAGE_PATH: [f"synthetic/{i:08d}.jpg" for i in ids],
                                 layout.CAPTION: [f"synthetic item {i}" for i in ids]}), meta)
        parts += 1
    layout.write_info(out, layout.EmbedInfo(
        model=f"local-dir:{model_dir}", pretrained=None, dim=dim, dtype="float16", modalities=["image"],
        part_size=part_size, input="synthetic", input_kind="folder", rows=rows, parts=parts, complete=True))
    return {"rows": rows, "dim": dim, "parts": parts}


def percentiles(seconds: List[float]) -> Dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000
    return {"n": int(ms.size), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def load_test(url: str, size: int, dim: int, clients: int, queries: int, k: int, kinds: List[str],
              seed: int = 0) -> Dict[str, object]:
    """``clients`` threads x ``queries`` requests, kinds in turn; latency per kind, errors listed."""
    import httpx

    latencies: Dict[str, List[float]] = {kind: [] for kind in kinds}
    errors: List[str] = []
    lock = threading.Lock()

    def one_client(c: int) -> None:
        rng = np.random.default_rng(seed + c)
        with httpx.Client(base_url=url, timeout=60) as http:
            for j in range(queries):
                kind = kinds[j % len(kinds)]
                if kind == "text":
                    request = lambda: http.get("/search", params={"q": TEXT_QUERIES[rng.integers(len(TEXT_QUERIES))],
                                                                  "k": k})
                elif kind == "embedding":
                    v = rng.standard_normal(dim).astype(np.float32)
                    request = lambda: http.post("/search/embedding", json={"vector": v.tolist(), "k": k})
                else:
                    request = lambda: http.get(f"/search/id/{int(rng.integers(size))}", params={"k": k})
                t0 = time.perf_counter()
                try:
                    got = request()
                    ok = got.status_code == 200 and len(got.json()["hits"]) == k
                    problem = None if ok else f"{kind}: {got.status_code} {got.text[:200]}"
                except Exception as e:  # noqa: BLE001 - a benchmark counts every failure
                    problem = f"{kind}: {type(e).__name__}: {e}"
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies[kind].append(elapsed)
                    if problem:
                        errors.append(problem)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    everything = [t for ts in latencies.values() for t in ts]
    return {"clients": clients, "queries_per_client": queries, "k": k, "wall_s": wall,
            "requests_per_s": len(everything) / wall, "errors": len(errors), "error_samples": errors[:5],
            "overall": percentiles(everything), "by_kind": {kind: percentiles(ts) for kind, ts in latencies.items()}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from clipforge.retrieval.index import build_indexes, read_index_info
    from clipforge.retrieval.search import Searcher
    from clipforge.retrieval.serve import BackgroundServer, create_app

    if args.omp_threads:
        import faiss

        faiss.omp_set_num_threads(args.omp_threads)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "loadavg": list(os.getloadavg())}, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "out"
            t0 = time.perf_counter()
            results["synthetic"] = write_synthetic(folder, args.rows, args.dim, args.part_size)
            results["synthetic"]["write_s"] = time.perf_counter() - t0
        if args.folder is None or not (folder / "index").exists():
            t0 = time.perf_counter()
            build_indexes(folder, max_memory=args.max_memory, progress=False)
            results["index_build_s"] = time.perf_counter() - t0
        results["index"] = read_index_info(folder)
        searcher = Searcher(folder)
        modality = "image" if "image" in searcher.modalities else searcher.modalities[0]
        size, dim = searcher.size(modality), int(searcher.indexes[modality].d)
        with BackgroundServer(create_app(searcher)) as server:
            load_test(server.url, size, dim, 1, 2 * len(args.kinds), args.k, args.kinds)  # warm-up
            results["load"] = load_test(server.url, size, dim, args.clients, args.queries, args.k, args.kinds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def summary(results: dict) -> str:
    load = results["load"]
    lines = [f"{load['clients']} clients x {load['queries_per_client']} queries, k={load['k']}: "
             f"{load['requests_per_s']:.1f} req/s, {load['errors']} errors"]
    for name, p in [("overall", load["overall"]), *load["by_kind"].items()]:
        if p:
            lines.append(f"  {name:9s} n={p['n']:5d}  p50 {p['p50_ms']:8.2f} ms  p90 {p['p90_ms']:8.2f} ms  "
                         f"p99 {p['p99_ms']:8.2f} ms  max {p['max_ms']:8.2f} ms")
    for modality, entry in results["index"].items():
        if isinstance(entry, dict):
            lines.append(f"  index {modality}: {entry.get('factory')} rows={entry.get('rows')} "
                         f"recall@10={entry.get('recall_at_10')} "
                         f"build={results.get('index_build_s', float('nan')):.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    res = main()
    print(summary(res))
    sys.exit(1 if res["load"]["errors"] else 0)
