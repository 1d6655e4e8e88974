"""Index build time, peak memory, recall@10 and query latency on synthetic CLIP-like embeddings.

    python benchmarks/bench_index.py                      # 1M x 512 under a 2 GB budget (the issue's size)
    python benchmarks/bench_index.py --rows 20000         # smoke test
    python benchmarks/bench_index.py --rows 1000000 --max-memory 1G --out benchmarks/results/index_1g.json

Vectors are clustered (``--clusters`` random unit centres plus noise, normalised) like real
embeddings, and written as fp16 parts in clipforge's embedding layout in a temporary folder that is
deleted afterwards. The build (:func:`clipforge.retrieval.index.build_indexes`) and the queries
(:class:`clipforge.retrieval.search.Searcher`, memory-mapped) each run in a fresh process, so their
peak RSS (the highest current RSS, sampled every 5 ms) is theirs alone; ``*_above_imports_mb``
subtracts the RSS after importing clipforge (torch), so it is what the index build or the served
index itself costs (file pages of memory-mapped parts and indexes included).
Recall@10 is reported twice: the build's own (held-out rows as queries) and on fresh queries (noisy
copies of random rows, not in the collection) against exact brute force.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def write_synthetic(out: Path, rows: int, dim: int, clusters: int, part_size: int, seed: int) -> float:
    """fp16 unit vectors around random centres, in parts; returns seconds spent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.retrieval.layout import (CAPTION, IMAGE_PATH, EmbedInfo, embedding_path, metadata_path,
                                            write_info)

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    parts = 0
    for part, start in enumerate(range(0, rows, part_size)):
        n = min(part_size, rows - start)
        x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = embedding_path(out, "image", part)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x.astype(np.float16))
        ids = range(start, start + n)
        metadata_path(out, part).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({IMAGE_PATH: [f"synthetic/{i:08d}.jpg" for i in ids],
                                 CAPTION: [f"vector {i}" for i in ids]}), metadata_path(out, part))
        parts += 1
    write_info(out, EmbedInfo(model="none", pretrained=None, dim=dim, dtype="float16", modalities=["image"],
                              part_size=part_size, input="synthetic", input_kind="table", rows=rows, parts=parts,
                              complete=True))
    return time.perf_counter() - t0


class _PeakRSS:
    """The highest current RSS seen while the block runs (sampled every 5 ms in a thread)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _current_rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _current_rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_mb())


def child_build(folder: str, max_memory: str) -> Dict:
    import faiss  # noqa: F401 (its libraries count as imports)
    import pyarrow.parquet  # noqa: F401

    import clipforge.retrieval.index as ix

    base = _current_rss_mb()
    t0 = time.perf_counter()
    with _PeakRSS() as rss:
        info = ix.build_indexes(folder, max_memory, progress=False)["image"]
    seconds = time.perf_counter() - t0
    return {"build_seconds": seconds, "peak_rss_mb": rss.peak, "imports_rss_mb": base,
            "peak_rss_above_imports_mb": rss.peak - base, "info": info}


def child_query(folder: str, queries: int, k: int, seed: int) -> Dict:
    import faiss  # noqa: F401 (its libraries count as imports)
    import pyarrow.parquet  # noqa: F401

    import clipforge.retrieval.index as ix
    from clipforge.retrieval.search import Searcher

    base = _current_rss_mb()
    t0 = time.perf_counter()
    sampler = _PeakRSS().__enter__()
    searcher = Searcher(folder)
    open_seconds = time.perf_counter() - t0
    rows = ix._Rows(folder, "image")
    rng = np.random.default_rng(seed + 1)
    q = rows.take(np.sort(rng.choice(rows.rows, queries, replace=False)))
    q = ix.normalized(q + rng.standard_normal(q.shape, dtype=np.float32) * (0.3 / np.sqrt(rows.dim)))
    latencies: List[float] = []
    got = []
    for v in q:
        t = time.perf_counter()
        hits = searcher.search_embedding(v, k=k)
        latencies.append(time.perf_counter() - t)
        got.append([h.id for h in hits] + [-1] * (k - len(hits)))
    sampler.__exit__(None, None, None)
    serve_peak = sampler.peak
    _, exact = ix.exact_knn(rows, q, k)
    ms = np.array(latencies) * 1000
    return {"open_seconds": open_seconds, "queries": queries, "k": k,
            "latency_ms_p50": float(np.percentile(ms, 50)), "latency_ms_p99": float(np.percentile(ms, 99)),
            "latency_ms_mean": float(ms.mean()), "qps_single_thread": float(1000 / ms.mean()),
            "fresh_query_recall_at_10": ix.recall_at_k(np.array(got), exact, min(10, k)),
            "serve_peak_rss_mb": serve_peak, "serve_peak_rss_above_imports_mb": serve_peak - base}


def _child(mode: str, *args: str) -> Dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-4000:]}")
    sys.stderr.write(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--part-size", type=int, default=100_000)
    p.add_argument("--max-memory", default="2G")
    p.add_argument("--queries", type=int, default=1000, help="single queries timed (and their recall)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: results/index_ROWS.json)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, folder, *rest = args.child
        result = child_build(folder, rest[0]) if mode == "build" else \
            child_query(folder, int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        folder = Path(tmp) / "emb"
        gen = write_synthetic(folder, args.rows, args.dim, args.clusters, args.part_size, args.seed)
        print(f"wrote {args.rows} x {args.dim} fp16 in {gen:.1f}s", flush=True)
        build = _child("build", str(folder), args.max_memory)
        query = _child("query", str(folder), str(args.queries), str(args.k), str(args.seed))
    info = build.pop("info")
    result = {"rows": args.rows, "dim": args.dim, "clusters": args.clusters, "max_memory": args.max_memory,
              "factory": info["factory"], "nprobe": info["nprobe"], "index_mb": info["index_bytes"] / 2 ** 20,
              "build_recall_at_10": info["recall_at_10"], "train_seconds": info["train_seconds"],
              **build, **query, "index_info": info}
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import machine

        result["machine"] = machine()
    except Exception:  # the machine description is a nicety
        pass
    out = args.out or RESULTS / f"index_{args.rows}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| rows | dim | budget | index | MiB | build s | peak RSS MiB (above imports) | recall@10 build / fresh "
          f"| p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {args.rows} | {args.dim} | {args.max_memory} | {info['factory']} nprobe={info['nprobe']} "
          f"| {result['index_mb']:.0f} | {build['build_seconds']:.1f} | {build['peak_rss_mb']:.0f} "
          f"({build['peak_rss_above_imports_mb']:.0f}) | {info['recall_at_10']:.3f} / "
          f"{query['fresh_query_recall_at_10']:.3f} | {query['latency_ms_p50']:.2f} | {query['latency_ms_p99']:.2f} |")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
