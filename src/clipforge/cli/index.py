"""``clipforge index``: prints :func:`clipforge.retrieval.index.build_indexes`'s summary per modality."""
from __future__ import annotations

import logging
import sys
from typing import Optional

from ..retrieval.index import build_indexes


def main(out: str, *, max_memory: str = "4G", modality: str = "all", factory: Optional[str] = None,
         recall_queries: int = 1000, target_recall: float = 0.9, seed: int = 0, progress: bool = True) -> int:
    """Build a faiss index per modality of an embedding folder (exact when small, compressed for the budget).

    Writes OUT/index/{image,text}.index and index_info.json with the factory string, rows, build time,
    nprobe and the recall@10 of the index against exact search on held-out queries.

    Args:
        out: a folder written by `clipforge embed`
        max_memory: memory each index must fit in, e.g. 4G or 512M
        modality: image, text or all
        factory: a faiss index_factory string instead of the automatic choice, e.g. IVF1024,SQ8
        recall_queries: rows sampled as queries to measure recall@10 and tune nprobe
        target_recall: the recall@10 that nprobe is tuned to reach
        seed: seed of the query and training samples
        progress: show a progress bar
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = build_indexes(out, max_memory, modality, factory=factory, recall_queries=recall_queries,
                             target_recall=target_recall, seed=seed, progress=progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"clipforge index: error: {e}", file=sys.stderr)
        return 2
    for name, entry in info.items():
        probe = f", nprobe {entry['nprobe']}" if entry.get("nprobe") else ""
        print(f"{name}: {entry['factory']}, {entry['rows']} rows x {entry['dim']}, recall@10 {entry['recall_at_10']:.4f}"
              f"{probe}, {entry['index_bytes'] / 2**20:.1f} MiB, built in {entry['build_seconds']:.1f}s")
    return 0
