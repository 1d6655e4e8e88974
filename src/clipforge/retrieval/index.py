"""faiss indexes over an embedding folder: exact for small sets, compressed inverted files for a budget.

The rule (:func:`plan_index`), for ``N`` rows of dimension ``d`` and a memory budget ``B`` bytes
that the build must fit in: the index (what a server later keeps in RAM or page cache) plus the
build's working memory, i.e. the training sample, one float32 chunk of rows, the held-out queries
and the list assignments (the process's own libraries, and the file pages of the part being read,
aside):

1. **Flat** (exact inner product) when ``N <= EXACT_MAX_ROWS`` (100k) and ``4*N*d`` fits. Exact
   search of 100k x 512 is ~50 MFLOP, a few ms per query, so nothing is gained by approximating.
2. Otherwise an **inverted file** ``IVF{nlist},{code}`` with ``nlist`` the power of two nearest
   ``4*sqrt(N)`` (at most ``N/50``, so that the training sample, which leaves out the held-out
   queries, keeps faiss's minimum of 39 points per centroid), and the most accurate code whose
   build fits ``B``: ``Flat`` (4d bytes a row, exact distances), ``SQfp16`` (2d), ``SQ8`` (d),
   ``SQ4`` (d/2), then product quantisation ``PQ{m}x8`` (m bytes) for m = d/8, d/16, ... down to
   4 (sub-vectors of 8+ dims: faiss's k-means is ~10x slower on 4-d ones); each code also costs
   8 bytes of id a row and the centroids. This is autofaiss's family of choices (IVF with the
   largest code the budget allows) without HNSW: an HNSW graph costs ~``2*M*4`` more bytes a row,
   builds slowest on CPU and, unlike inverted lists and flat codes, cannot be memory-mapped, which
   is how :mod:`clipforge.retrieval.search` serves. OPQ is not used (at 512-d its training
   dominates the build), nor polysemous PQ training (it only serves Hamming-filtered search).
   For 1M x 512 this gives ``IVF4096,SQfp16`` under 2 GiB, ``IVF4096,SQ8`` under 1 GiB.

The quantiser (and SQ/PQ codebooks) train on a random sample of ``max(40*nlist, 9984)`` rows; the
rows are then streamed part by part into storage reserved at its final size, so memory holds the
index, the training sample and one chunk. ``nprobe`` is tuned: the smallest power of two whose
recall@10 reaches ``target_recall`` (0.9) on held-out queries, else the one with the best recall
(a warning says the code limits it). Queries are ``recall_queries`` (1000) rows sampled from the
collection, **excluded from the training sample** but kept in the index (they are collection
items, as a query by an indexed row's id is); the reference is exact brute-force inner product
over every row, streamed. Recall@10 is ``|approx top-10 ∩ exact top-10| / 10`` averaged over the
queries (exact indexes are measured too, as a check: 1.0 up to ties).

Files: ``OUT/index`` is a symbolic link to a build folder ``OUT/.index-<random>`` holding
``image.index``, ``text.index`` and ``index_info.json``. A new build writes a fresh folder and swaps
the link with one ``os.replace``, so a kill at any moment leaves the old indexes or the new ones.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_write, write_text
from .layout import MODALITIES, EMB_DIRS, INDEX_DIR, PathLike, embedding_path, index_dir, part_rows, read_info

logger = logging.getLogger(__name__)

INFO_NAME = "index_info.json"
EXACT_MAX_ROWS = 100_000
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per k-means centroid
TRAIN_ROWS_PER_LIST = 40  # training sample rows per inverted list
ADD_CHUNK = 16_384
_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def index_file(folder: PathLike, modality: str) -> Path:
    """``FOLDER/image.index`` or ``FOLDER/text.index``."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return Path(folder) / f"{modality}.index"


def parse_memory(size: Union[str, int]) -> int:
    """Bytes of ``"4G"``, ``"512M"``, ``"1.5GB"``, ``"2GiB"`` or a plain integer (binary units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"memory size {size!r}: expected a number with an optional unit K/M/G/T, e.g. 4G")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"memory size {size!r} must be positive")
    return value


@dataclass
class IndexPlan:
    """Which faiss index to build, and why."""

    factory: str  # faiss.index_factory string
    exact: bool
    nlist: int  # inverted lists (0 for Flat)
    bytes: int  # estimated size of the built index
    build_bytes: int  # estimated peak memory of the build: the index, the training sample, one chunk, the queries
    reason: str


def _nearest_power_of_two(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def train_rows_for(nlist: int) -> int:
    """Rows the quantiser trains on: 40 per list, and at least what PQ's 256 centroids per sub-vector need."""
    return max(TRAIN_ROWS_PER_LIST * nlist, 256 * MIN_POINTS_PER_CENTROID)


def plan_index(rows: int, dim: int, budget: int, exact_max_rows: int = EXACT_MAX_ROWS,
               recall_queries: int = 1000) -> IndexPlan:
    """The index for ``rows`` x ``dim`` vectors whose build fits ``budget`` bytes (rule: module docstring)."""
    if rows < 1 or dim < 1:
        raise ValueError(f"cannot index {rows} rows of dimension {dim}")
    flat = 4 * rows * dim
    working = 4 * dim * (min(rows, ADD_CHUNK) + min(rows, recall_queries))  # one float32 chunk + the queries
    if rows <= exact_max_rows and flat + working <= budget:
        return IndexPlan("Flat", True, 0, flat, flat + working,
                         f"{rows} rows <= {exact_max_rows} and exact vectors fit the budget")
    nlist = max(1, min(_nearest_power_of_two(4 * math.sqrt(rows)), rows // 50))
    overhead = rows * 8 + nlist * dim * 4 + 4096  # ids + centroids (+ headers)
    working += 4 * dim * min(rows, train_rows_for(nlist)) + 8 * rows  # training sample + list assignments
    codes: List[Tuple[str, int]] = [("Flat", 4 * dim), ("SQfp16", 2 * dim), ("SQ8", dim), ("SQ4", (dim + 1) // 2)]
    m = dim // 8  # sub-vectors of >= 8 dims: faiss's k-means is ~10x slower on 4-d ones
    while m >= 4:
        if dim % m == 0 and rows >= 256 * MIN_POINTS_PER_CENTROID:  # PQ trains 256 centroids per sub-vector
            codes.append((f"PQ{m}x8", m))
        m //= 2
    why = f"{rows} rows > {exact_max_rows}" if rows > exact_max_rows else f"exact vectors need {flat / 2**20:.0f} MiB"
    for code, per_row in codes:
        size = rows * per_row + overhead + (256 * dim * 4 if code.startswith("PQ") else 0)
        if size + working <= budget:
            reason = (f"{why}; {code} codes ({per_row} B/row) are the most accurate whose build fits "
                      f"{budget / 2**20:.0f} MiB")
            return IndexPlan(f"IVF{nlist},{code}", False, nlist, size, size + working, reason)
    smallest = rows * codes[-1][1] + overhead + working
    raise ValueError(f"{rows} x {dim} vectors cannot be indexed in {budget / 2**20:.1f} MiB: the smallest index "
                     f"({codes[-1][0]}) needs about {smallest / 2**20:.1f} MiB to build; raise --max-memory")


# ----------------------------------------------------------------------------------------------
# reading rows of the parts

class _Rows:
    """The complete parts of one modality as one logical array (rows read lazily, memory-mapped)."""

    def __init__(self, out: PathLike, modality: str):
        self.parts = [(p, n) for p, n in part_rows(out, modality) if n > 0]
        self.out, self.modality = Path(out), modality
        self.offsets = np.cumsum([0] + [n for _, n in self.parts])
        self.rows = int(self.offsets[-1])
        if self.rows == 0:
            raise ValueError(f"{out}: no complete {EMB_DIRS[modality]} parts to index; run `clipforge embed` first")
        first = self.array(0)
        if first.ndim != 2:
            raise ValueError(f"{embedding_path(out, modality, self.parts[0][0])}: expected a 2-D array, "
                             f"got shape {first.shape}")
        self.dim = int(first.shape[1])

    def array(self, i: int) -> np.ndarray:
        return np.load(embedding_path(self.out, self.modality, self.parts[i][0]), mmap_mode="r")

    def chunks(self, size: int = ADD_CHUNK) -> Iterator[np.ndarray]:
        """Normalised float32 chunks of at most ``size`` rows, in row order."""
        for i, (part, n) in enumerate(self.parts):
            arr = self.array(i)
            if arr.shape != (n, self.dim):
                raise ValueError(f"{embedding_path(self.out, self.modality, part)}: shape {arr.shape}, "
                                 f"expected ({n}, {self.dim})")
            for start in range(0, n, size):
                yield normalized(arr[start:start + size])

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Normalised float32 rows ``ids`` (any order), reading only their parts."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for i in np.unique(part_of):
            sel = np.nonzero(part_of == i)[0]
            local = ids[sel] - self.offsets[i]
            order = np.argsort(local)
            out[sel[order]] = self.array(int(i))[local[order]]
        return normalized(out)


def normalized(x: np.ndarray) -> np.ndarray:
    """``x`` as contiguous float32 with unit rows (zero rows stay zero)."""
    import faiss

    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def exact_knn(rows: _Rows, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-``k`` over every row, streamed part by part: (scores, ids)."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    start = 0
    for chunk in rows.chunks():
        scores, ids = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        if scores.shape[1] < k:  # pad a short chunk
            pad = k - scores.shape[1]
            scores = np.hstack([scores, np.full((len(queries), pad), -np.inf, np.float32)])
            ids = np.hstack([ids, np.full((len(queries), pad), -1, np.int64)])
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
        start += len(chunk)
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k``."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)


def _ivf(index):
    import faiss

    return faiss.try_extract_index_ivf(index)


def _add_rows(index, rows: _Rows, modality: str, progress: bool) -> None:
    """Stream every row into ``index``, with its storage allocated once at its final size.

    Growing a faiss vector one ``add`` at a time over-allocates by up to 2x (a vector doubles), which
    would spoil the memory budget; so flat codes are reserved up front, and for an inverted file a
    first pass assigns each row its list (kept: 8 bytes a row) to reserve each list exactly, then a
    second pass adds the rows with those assignments (``add_core``: the quantiser runs once).
    """
    import faiss

    inner = faiss.downcast_index(index)
    bar = tqdm(total=rows.rows, desc=f"index {modality}", unit="rows", disable=not progress)
    if isinstance(inner, faiss.IndexIVF) and isinstance(faiss.downcast_InvertedLists(inner.invlists),
                                                          faiss.ArrayInvertedLists):
        assign = np.empty(rows.rows, dtype=np.int64)
        start = 0
        for chunk in rows.chunks():
            assign[start:start + len(chunk)] = inner.quantizer.search(chunk, 1)[1][:, 0]
            start += len(chunk)
        lists = faiss.downcast_InvertedLists(inner.invlists)
        for list_no, count in enumerate(np.bincount(assign, minlength=inner.nlist).tolist()):
            lists.resize(list_no, count)  # allocates exactly count entries ...
            lists.resize(list_no, 0)  # ... and keeps them as capacity
        start = 0
        for chunk in rows.chunks():
            part = np.ascontiguousarray(assign[start:start + len(chunk)])
            inner.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(part))
            start += len(chunk)
            bar.update(len(chunk))
    else:
        if isinstance(inner, faiss.IndexFlatCodes):
            inner.codes.resize(rows.rows * inner.code_size)
            inner.codes.resize(0)
        for chunk in rows.chunks():
            index.add(chunk)
            bar.update(len(chunk))
    bar.close()


def build_index(out: PathLike, modality: str, budget: int, *, factory: Optional[str] = None,
                exact_max_rows: int = EXACT_MAX_ROWS, recall_queries: int = 1000, target_recall: float = 0.9,
                seed: int = 0, progress: bool = True):
    """(faiss index, its info dict) for one modality of ``out``, streamed from the parts."""
    import faiss

    t0 = time.perf_counter()
    rows = _Rows(out, modality)
    plan = plan_index(rows.rows, rows.dim, budget, exact_max_rows, recall_queries) if factory is None else \
        IndexPlan(factory, factory == "Flat", 0, 0, 0, "factory given by the caller")
    logger.info("%s: %d rows x %d -> %s (%s)", modality, rows.rows, rows.dim, plan.factory, plan.reason)
    rng = np.random.default_rng(seed)
    n_queries = min(recall_queries, rows.rows)
    query_ids = np.sort(rng.choice(rows.rows, n_queries, replace=False))
    index = faiss.index_factory(rows.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIVFPQ):
        inner.do_polysemous_training = False  # only serves Hamming-filtered search, which is not used; slow
    train_seconds = 0.0
    train_rows = 0
    if not index.is_trained:
        ivf = _ivf(index)
        nlist = ivf.nlist if ivf is not None else 1
        pool = np.setdiff1d(np.arange(rows.rows), query_ids) if rows.rows > n_queries else np.arange(rows.rows)
        train_rows = min(len(pool), train_rows_for(nlist))
        sample = np.sort(rng.choice(pool, train_rows, replace=False))
        t = time.perf_counter()
        index.train(rows.take(sample))
        train_seconds = time.perf_counter() - t
        del sample, pool
        logger.info("%s: trained on %d rows in %.1fs", modality, train_rows, train_seconds)
    _add_rows(index, rows, modality, progress)
    queries = rows.take(query_ids)
    _, exact_ids = exact_knn(rows, queries, 10)
    ivf = _ivf(index)
    sweep: List[Dict[str, float]] = []
    if ivf is None:
        recall = recall_at_k(index.search(queries, 10)[1], exact_ids)
        nprobe = None
    else:
        nprobe, recall = 1, 0.0
        while True:
            ivf.nprobe = nprobe
            recall = recall_at_k(index.search(queries, 10)[1], exact_ids)
            sweep.append({"nprobe": nprobe, "recall_at_10": round(recall, 4)})
            if recall >= target_recall or nprobe >= ivf.nlist:
                break
            nprobe = min(2 * nprobe, ivf.nlist)
        if recall < target_recall:
            best = max(sweep, key=lambda s: (s["recall_at_10"], -s["nprobe"]))
            nprobe, recall = int(best["nprobe"]), float(best["recall_at_10"])
            ivf.nprobe = nprobe
            logger.warning("%s: recall@10 %.3f < target %.2f at every nprobe (the code %s limits it); "
                           "raise --max-memory for a finer code", modality, recall, target_recall, plan.factory)
    t = time.perf_counter()
    index.search(queries, 10)
    query_ms = (time.perf_counter() - t) * 1000 / max(1, n_queries)
    info = {
        "factory": plan.factory, "exact": plan.exact, "reason": plan.reason, "rows": rows.rows, "dim": rows.dim,
        "parts": [p for p, _ in rows.parts], "part_rows": [n for _, n in rows.parts], "nlist": ivf.nlist if ivf is not None else 0, "nprobe": nprobe,
        "recall_at_10": round(recall, 4), "target_recall": target_recall, "recall_queries": n_queries,
        "recall_queries_from": "rows sampled from the collection, excluded from training, kept in the index; "
                               "reference: exact inner product over all rows",
        "nprobe_sweep": sweep, "train_rows": train_rows, "train_seconds": round(train_seconds, 3),
        "build_seconds": round(time.perf_counter() - t0, 3), "batch_query_ms": round(query_ms, 4),
        "budget_bytes": budget, "estimated_bytes": plan.bytes, "file": index_file("", modality).name,
    }
    logger.info("%s: %s, %d rows, recall@10 %.4f%s, built in %.1fs", modality, plan.factory, rows.rows, recall,
                f" at nprobe={nprobe}" if nprobe else "", info["build_seconds"])
    return index, info


# ----------------------------------------------------------------------------------------------
# the index folder

def current_index_folder(out: PathLike) -> Optional[Path]:
    """The folder ``OUT/index`` resolves to now (read files from it, not through the link), or None."""
    link = index_dir(out)
    return Path(os.path.realpath(link)) if link.is_dir() else None


def read_index_info(out: PathLike) -> dict:
    """``OUT/index/index_info.json``: per modality, the factory, rows, dim, recall@10, nprobe, build time."""
    folder = current_index_folder(out)
    path = None if folder is None else folder / INFO_NAME
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{out}: no {INDEX_DIR}/{INFO_NAME}; run `clipforge index {out}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(out: Path, stage: Path) -> None:
    """Point ``OUT/index`` at ``stage`` with one atomic rename; then delete the older build folders."""
    link = index_dir(out)
    tmp_link = out / f".index-link-{uuid.uuid4().hex}"
    os.symlink(stage.name, tmp_link)
    if link.is_dir() and not link.is_symlink():  # a real folder (copied with -L, or made by another tool)
        os.replace(link, out / f".index-old-{uuid.uuid4().hex}")
    os.replace(tmp_link, link)
    _fsync_dir(out)
    for stale in out.glob(".index-*"):  # older builds, and staging folders of killed ones
        if stale.resolve() != stage.resolve():
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()


def _select_modalities(out: Path, modality: str) -> List[str]:
    info = read_info(out)
    present = [m for m in MODALITIES if m in info.modalities and part_rows(out, m)]
    if modality == "all":
        if not present:
            raise ValueError(f"{out}: no complete embedding parts to index; run `clipforge embed` first")
        return present
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES} or 'all', got {modality!r}")
    if modality not in present:
        raise ValueError(f"{out}: no {modality} embeddings to index (present: {', '.join(present) or 'none'})")
    return [modality]


def build_indexes(out: PathLike, max_memory: Union[str, int] = "4G", modality: str = "all", *,
                  factory: Optional[str] = None, exact_max_rows: int = EXACT_MAX_ROWS, recall_queries: int = 1000,
                  target_recall: float = 0.9, seed: int = 0, progress: bool = True) -> dict:
    """Build ``OUT/index/{image,text}.index`` and ``index_info.json``; returns the info dict.

    ``max_memory`` is the budget each index must fit in (see :func:`plan_index`); ``factory`` forces
    a faiss factory string instead. Building one modality keeps the other's existing index.
    """
    out = Path(out)
    budget = parse_memory(max_memory)
    chosen = _select_modalities(out, modality)
    embed = read_info(out)
    if not embed.complete:
        logger.warning("%s: embedding is not complete; indexing the %d complete parts", out, embed.parts)
    stage = Path(tempfile.mkdtemp(prefix=".index-", dir=out))
    try:
        old = current_index_folder(out)
        info: dict = {}
        if old is not None and (old / INFO_NAME).is_file():  # keep the modalities not rebuilt now
            previous = json.loads((old / INFO_NAME).read_text(encoding="utf-8"))
            for m, entry in previous.items():
                if m in MODALITIES and m not in chosen and index_file(old, m).is_file():
                    try:  # a hard link: the file is immutable once written
                        os.link(index_file(old, m), index_file(stage, m))
                    except OSError:
                        shutil.copy2(index_file(old, m), index_file(stage, m))
                    info[m] = entry
        for m in chosen:
            index, entry = build_index(out, m, budget, factory=factory, exact_max_rows=exact_max_rows,
                                       recall_queries=recall_queries, target_recall=target_recall, seed=seed,
                                       progress=progress)
            entry["max_memory"] = str(max_memory)
            write_index(index, index_file(stage, m))
            entry["index_bytes"] = index_file(stage, m).stat().st_size
            info[m] = entry
            del index
        write_text(stage / INFO_NAME, json.dumps(info, indent=2) + "\n")
        _fsync_dir(stage)
        _swap_in(out, stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return info


def write_index(index, path: PathLike) -> Path:
    """``faiss.write_index`` through a temporary sibling and a rename (atomic)."""
    import faiss

    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
    return Path(path)


def read_index(path: PathLike, mmap: bool = True):
    """A faiss index from ``path``; memory-mapped and read-only where its type allows.

    Inverted lists map with ``IO_FLAG_MMAP``, flat codes with ``IO_FLAG_MMAP_IFC``; other types are
    read into memory.
    """
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file; run `clipforge index` first")
    if mmap:
        with open(path, "rb") as f:
            fourcc = f.read(4)
        flag = faiss.IO_FLAG_MMAP_IFC if fourcc.startswith(b"IxF") else faiss.IO_FLAG_MMAP
        try:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:  # a type whose data cannot be mapped
            logger.info("%s: not memory-mapped (%s); reading it into memory", path, str(e).splitlines()[-1])
    return faiss.read_index(str(path))


def is_memory_mapped(index) -> bool:
    """Whether ``index``'s bulk data (inverted lists or flat codes) is a file mapping, not a copy."""
    import faiss

    ivf = _ivf(index)
    if ivf is not None:
        return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    codes = getattr(faiss.downcast_index(index), "codes", None)
    return codes is not None and getattr(codes, "is_owned", True) is False


__all__ = ["EXACT_MAX_ROWS", "INFO_NAME", "IndexPlan", "build_index", "build_indexes", "current_index_folder",
           "exact_knn", "index_file", "is_memory_mapped", "normalized", "parse_memory", "plan_index", "read_index",
           "read_index_info", "recall_at_k", "write_index"]
