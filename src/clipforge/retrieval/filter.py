"""Curate image-caption pairs before training: keep pairs CLIP scores high, drop near-duplicate images.

What LAION did to Common Crawl with ViT-B/32 (keep cosine >= 0.28), as one step over a caption file
(CSV/TSV, JSON lines or COCO captions, read by :mod:`clipforge.data.captions`) or a WebDataset shard
set (a ``.tar``, a brace pattern, a ``::`` list; read with :mod:`clipforge.retrieval.embed`'s shard
reader, each sample one pair):

1. each distinct image and each caption is embedded with the model (images in a DataLoader, broken
   ones skipped and listed; captions through the EOT-trimmed batched text path);
2. a pair's score is the cosine of its image and caption embeddings; pairs with ``score >=
   threshold`` are kept, or the ``top_fraction`` best (the effective threshold is then reported);
3. among the kept images, near-duplicates (cosine > ``dedup``) are found with a faiss range search
   (exact ``IndexFlatIP`` up to 100k images, an inverted file above) and, walking the images in file
   order, the first of each group is kept and every image within ``dedup`` of a kept one dropped
   (with all of its pairs);
4. the kept pairs are written in the input's format (other columns and keys untouched; relative
   image paths re-based on the output's folder so the new file reads back as it is; shards as a new
   shard set by :func:`clipforge.data.shards.write_shards`, image bytes copied verbatim, in input
   order, after a second pass over the input so no image is held in memory), atomically, with a JSON
   report (counts, thresholds, a histogram, examples) and a score histogram PNG.

Only reading and writing differ between the two kinds of input (:class:`_Pairs`); scoring, the cut,
de-duplication and the report are one code path.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_write, write_text
from ..data.captions import _KIND_BY_SUFFIX, CAPTION_KINDS, CaptionRecord, read_caption_file, read_table, \
    table_separator
from ..data.robust import BrokenSample, DataError
from .index import EXACT_MAX_ROWS, normalized, plan_index
from .layout import PathLike

logger = logging.getLogger(__name__)

LAION_THRESHOLD = 0.28  # LAION-400M's cut for OpenAI ViT-B/32 cosine similarity
TEXT_CHUNK = 8192  # captions tokenised at a time


@dataclass
class FilterResult:
    """What :func:`filter_pairs` kept and dropped, and where it wrote."""

    input: str
    output: str
    report: str
    histogram: str
    pairs: int  # pairs read
    images: int  # distinct images
    broken: int  # pairs dropped because the image could not be read or the caption is empty
    dropped_score: int  # pairs below the threshold
    dropped_duplicate: int  # pairs whose image is a near-duplicate of a kept one
    duplicate_images: int
    kept: int
    threshold: float  # the cut applied (given, or the score of the last pair within top_fraction)
    top_fraction: Optional[float]
    dedup: Optional[float]
    dedup_index: Optional[str]  # faiss factory of the duplicate search
    broken_examples: List[Dict[str, str]] = field(default_factory=list)
    duplicate_examples: List[Dict[str, Any]] = field(default_factory=list)


# ---- the caption file, read and written in its own format ----------------------------------------
def _kind(path: Path, kind: str) -> str:
    if kind not in CAPTION_KINDS:
        raise ValueError(f"unknown caption file kind {kind!r}; expected one of {CAPTION_KINDS}")
    return _KIND_BY_SUFFIX.get(path.suffix.lower(), "csv") if kind == "auto" else kind


def _rebase(original: str, absolute: Path, out_dir: Path) -> str:
    """An absolute path as it was; a relative one re-expressed relative to the output's folder."""
    return original if Path(original).expanduser().is_absolute() else os.path.relpath(absolute, out_dir)


def _writer(path: Path, kind: str, records: Sequence[CaptionRecord], img_key: str, caption_key: str,
            sep: Optional[str]) -> Callable[[Sequence[int], Path], None]:
    """A function writing records ``keep`` (indices) of ``path`` to a new file of the same format."""
    if kind == "coco":
        data = json.loads(path.read_text(encoding="utf-8"))

        file_of = {ann["image_id"]: rec.path for ann, rec in zip(data["annotations"], records)}

        def write_coco(keep: Sequence[int], out: Path) -> None:
            anns = [data["annotations"][i] for i in keep]
            used = {a["image_id"] for a in anns}
            images = [{**im, "file_name": _rebase(im["file_name"], file_of[im["id"]], out.parent)}
                      for im in data["images"] if im["id"] in used]
            write_text(out, json.dumps({**data, "images": images, "annotations": anns}) + "\n")

        return write_coco
    if kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            objects = [json.loads(line) for line in f if line.strip()]

        def write_jsonl(keep: Sequence[int], out: Path) -> None:
            lines = [json.dumps({**objects[i], "image": _rebase(str(objects[i]["image"]), records[i].path,
                                                                  out.parent)}) for i in keep]
            write_text(out, "".join(line + "\n" for line in lines))

        return write_jsonl
    separator = table_separator(path, sep)
    rows = read_table(path, (img_key, caption_key), sep)
    header = list(rows[0].values)

    def write_table(keep: Sequence[int], out: Path) -> None:
        table = [header] + [[_rebase(v, records[i].path, out.parent) if k == img_key else v
                             for k, v in rows[i].values.items()] for i in keep]
        buf = io.StringIO()
        if separator == "\t":  # read without quote handling, so written without
            buf.writelines("\t".join(values) + "\n" for values in table)
        else:
            csv.writer(buf, delimiter=separator, lineterminator="\n").writerows(table)
        write_text(out, buf.getvalue())

    return write_table


# ---- embedding -----------------------------------------------------------------------------------
class _Images:
    """Distinct image files -> ``(transform(image), index)``, or a (index, reason) marker when broken."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.robust import describe_exception
        from ..transforms import load_image_for

        try:
            return self.transform(load_image_for(self.transform, self.paths[i])), i
        except Exception as e:  # any decode/transform failure drops just this image
            return None, (i, describe_exception(e))


def _collate(samples):
    import torch

    good = [s for s in samples if s[0] is not None]
    images = torch.stack([s[0] for s in good]) if good else torch.empty(0)
    return images, ([s[1] for s in good], [s[1] for s in samples if s[0] is None])


def _image_features(model, transform, paths: Sequence[Path], device: str, precision: str, batch_size: int,
                    workers: int, progress: bool) -> Tuple[np.ndarray, Dict[int, str]]:
    """(normalised features [len(paths), D] float32, {index: reason} of the images that failed)."""
    from torch.utils.data import DataLoader

    from ..evaluate.features import iter_image_features

    loader = DataLoader(_Images(paths, transform), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    broken: Dict[int, str] = {}

    def batches():
        for images, (idx, bad) in loader:
            broken.update(bad)
            if idx:
                yield images, idx

    feats: Optional[np.ndarray] = None
    for f, idx in iter_image_features(model, tqdm(batches(), total=len(loader), desc="images", disable=not progress),
                                      device, precision, use_tqdm=False):
        if feats is None:
            feats = np.zeros((len(paths), f.shape[1]), dtype=np.float32)
        feats[idx] = f.numpy()
    if feats is None:
        raise ValueError(f"none of the {len(paths)} images could be read; first failure: "
                         f"{next(iter(broken.values()), '?')}")
    return feats, broken


def _text_features(model, tokenizer, captions: Sequence[str], device: str, precision: str,
                   batch_size: int, progress: bool) -> np.ndarray:
    import torch

    from ..evaluate.features import encode_text_batched, model_device
    from ..precision import autocast

    dev = model_device(model, device)
    out = []
    for start in tqdm(range(0, len(captions), TEXT_CHUNK), desc="captions", disable=not progress):
        tokens = tokenizer(list(captions[start:start + TEXT_CHUNK])).to(dev)
        with torch.no_grad(), autocast(precision, dev):
            out.append(encode_text_batched(model, tokens, batch_size, normalize=True).float().cpu().numpy())
    return normalized(np.concatenate(out))


# ---- near-duplicates -----------------------------------------------------------------------------
def near_duplicates(features: np.ndarray, threshold: float, batch: int = 4096) -> Tuple[np.ndarray, Dict[int, Tuple[int, float]], str]:
    """(dropped mask, {dropped: (kept it duplicates, cosine)}, faiss factory) over rows in order.

    Walking rows first to last, a row not yet dropped is kept and drops every later row whose
    cosine with it exceeds ``threshold`` (a faiss range search). Exact up to ``EXACT_MAX_ROWS``
    rows; above, an ``IVF{nlist},Flat`` index searched with ``nprobe=32`` may miss a few pairs.
    """
    import faiss

    x = normalized(features)
    n, d = x.shape
    if n <= EXACT_MAX_ROWS:
        factory = "Flat"
        index = faiss.IndexFlatIP(d)
    else:
        factory = f"IVF{plan_index(n, d, 2 ** 62, exact_max_rows=0).nlist},Flat"
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(x[np.sort(rng.choice(n, min(n, 40 * faiss.extract_index_ivf(index).nlist), replace=False))])
        faiss.extract_index_ivf(index).nprobe = 32
    index.add(x)
    dropped = np.zeros(n, dtype=bool)
    by: Dict[int, Tuple[int, float]] = {}
    for start in range(0, n, batch):
        lims, sims, ids = index.range_search(x[start:start + batch], float(threshold))
        for q in range(len(lims) - 1):
            i = start + q
            if dropped[i]:
                continue
            for j, s in zip(ids[lims[q]:lims[q + 1]].tolist(), sims[lims[q]:lims[q + 1]].tolist()):
                if j > i and not dropped[j]:
                    dropped[j] = True
                    by[j] = (i, s)
    return dropped, by, factory


# ---- inputs read into pairs ----------------------------------------------------------------------
@dataclass
class _Pairs:
    """An input read for scoring: per pair a caption, a source and an image index; per image a feature."""

    captions: List[str]
    sources: List[str]  # "file:line" or "shard#key", for the report
    image_of: np.ndarray  # [pairs] index into images
    images: List[str]  # image names, for the report
    image_feats: np.ndarray  # [images, D] normalised
    broken_images: Dict[int, str]  # image index -> why it could not be read
    unread: List[BrokenSample]  # samples dropped before they became pairs (shards: no image/caption, undecodable)
    write: Callable[[Sequence[int], Path], None]  # writes the pairs at the given indices


def _read_caption_pairs(input: Path, kind: str, img_key: str, caption_key: str, sep: Optional[str],
                        image_root: Optional[PathLike], net, transform, device: str, precision: str,
                        batch_size: int, workers: int, progress: bool) -> _Pairs:
    kind = _kind(input, kind)
    records = read_caption_file(input, kind, img_key, caption_key, sep, image_root)
    write = _writer(input, kind, records, img_key, caption_key, sep)
    order: Dict[Path, int] = {}
    image_of = np.array([order.setdefault(r.path, len(order)) for r in records], dtype=np.int64)
    paths = list(order)
    feats, broken = _image_features(net, transform, paths, device, precision, batch_size, workers, progress)
    return _Pairs([r.caption for r in records], [r.source for r in records], image_of, [str(p) for p in paths],
                  feats, broken, [], write)


def _local_shard(url: str) -> Optional[Path]:
    if url.startswith("pipe:") or "://" in url:
        return None
    return Path(url[len("file:"):] if url.startswith("file:") else url).expanduser()


def _shard_urls(input: str, out: Path) -> List[str]:
    """The shard urls of ``input``; local ones must exist and must not live in ``out``."""
    from ..data.webdataset import expand_urls

    urls, _ = expand_urls(input)
    if not urls:
        raise ValueError(f"{input}: no shards")
    for url in urls:
        local = _local_shard(url)
        if local is None:
            continue
        if not local.is_file():
            raise FileNotFoundError(f"{url}: no such shard (of {input})")
        if local.resolve() == out.resolve() or local.resolve().parent == out.resolve():
            raise ValueError(f"{out}: the output would overwrite the input shard {url}; choose another folder")
    return urls


def _read_shard_pairs(urls: List[str], shard_size: int, net, transform, device: str, precision: str,
                      batch_size: int, workers: int, progress: bool) -> _Pairs:
    """One pass decoding every sample (a loader worker per shard); a second, when writing, copies the kept."""
    from torch.utils.data import DataLoader

    from ..data.shards import write_shards
    from ..data.webdataset import IMAGE_EXTS, TEXT_EXT, optional_import
    from ..evaluate.features import iter_image_features
    from .embed import ShardParts

    dataset = ShardParts([(i, [u]) for i, u in enumerate(urls)], transform, True, batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, len(urls)))
    unread: List[BrokenSample] = []
    per_shard: Dict[int, List[Tuple[list, list, list, np.ndarray]]] = {i: [] for i in range(len(urls))}

    def batches():
        for b in loader:
            unread.extend(b["failed"])
            if b["keys"]:
                yield b["images"], b

    for f, b in iter_image_features(net, tqdm(batches(), desc="images", unit="batch", disable=not progress),
                                    device, precision, use_tqdm=False):
        per_shard[b["part"]].append((b["urls"], b["keys"], b["captions"], f.numpy()))
    chunks = [c for i in range(len(urls)) for c in per_shard[i]]  # shard order, tar order within
    ids = [(u, k) for c in chunks for u, k in zip(c[0], c[1])]
    if not ids:
        first = f"{unread[0].path}: {unread[0].reason}" if unread else "they hold no samples"
        raise ValueError(f"none of the samples of {len(urls)} shards could be read; first failure: {first}")
    names = [f"{u}#{k}" for u, k in ids]
    feats = np.concatenate([c[3] for c in chunks]).astype(np.float32)

    def write_shard_set(keep: Sequence[int], out: Path) -> None:
        wds = optional_import("webdataset", "reading WebDataset shards")
        wanted = {ids[i] for i in keep}

        def kept_samples():
            # unreadable samples were counted in the first pass; here they are only passed over
            for s in wds.tarfile_samples(({"url": u} for u in urls), handler=lambda exn: True):
                if (s.get("__url__"), s.get("__key__")) in wanted:
                    yield s[next(e for e in IMAGE_EXTS if e in s)], s[TEXT_EXT].decode("utf-8")

        res = write_shards(kept_samples(), out, max_count_per_shard=shard_size)
        if res.n_written != len(keep):
            raise DataError(f"{out}: wrote {res.n_written} of the {len(keep)} kept samples; did the input shards "
                            f"change while filtering? ({[b.path for b in res.skipped][:3]})")

    return _Pairs([c for ch in chunks for c in ch[2]], names, np.arange(len(ids), dtype=np.int64), names, feats,
                  {}, unread, write_shard_set)


def is_shard_input(input: PathLike, kind: str = "auto") -> bool:
    """Whether ``input`` is read as WebDataset shards: ``kind`` "webdataset", or (auto) a ``.tar``,
    brace pattern, ``::`` list or url, as ``clipforge embed`` tells them."""
    from .embed import detect_input_kind

    if kind != "auto":
        return kind == "webdataset"
    try:
        return detect_input_kind(os.fspath(input)) == "webdataset"
    except (FileNotFoundError, ValueError):
        return False


# ---- the whole step ------------------------------------------------------------------------------
def _histogram_png(scores: np.ndarray, threshold: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores, bins=50, color="#4477aa")
    ax.axvline(threshold, color="#cc3311", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity of image and caption")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def report_paths(out: PathLike) -> Tuple[Path, Path]:
    """``kept.tsv`` -> (``kept.report.json``, ``kept.scores.png``), beside the output."""
    out = Path(out)
    return out.with_name(out.stem + ".report.json"), out.with_name(out.stem + ".scores.png")


def filter_pairs(input: PathLike, out: PathLike, model: str, pretrained: Optional[str] = None, *,
                 threshold: Optional[float] = None, top_fraction: Optional[float] = None,
                 dedup: Optional[float] = 0.95, kind: str = "auto", img_key: str = "filepath",
                 caption_key: str = "title", sep: Optional[str] = None, image_root: Optional[PathLike] = None,
                 shard_size: int = 10000, batch_size: int = 64, workers: int = 0, device: str = "cpu",
                 precision: str = "fp32", progress: bool = True) -> FilterResult:
    """Score the pairs of ``input``, keep the good ones, drop duplicates; write ``out``.

    ``input`` is a caption file (``out``: a caption file of the same format) or WebDataset shards
    (``kind`` "webdataset" or auto: a ``.tar``, brace pattern or ``::`` list; ``out``: a folder of
    shards of up to ``shard_size`` samples, replaced whole if it holds a shard set).
    ``threshold`` (default LAION's 0.28 when ``top_fraction`` is not given either) keeps pairs with
    ``score >= threshold``; ``top_fraction`` keeps that fraction of the readable pairs, best first.
    ``dedup`` is the cosine above which two images count as duplicates (None: no de-duplication).
    """
    from ..factory import create_model_and_transforms, get_tokenizer

    shards = is_shard_input(input, kind)
    input_name, out = os.fspath(input), Path(out)
    if threshold is not None and top_fraction is not None:
        raise ValueError("give a threshold or a top fraction, not both")
    if threshold is None and top_fraction is None:
        threshold = LAION_THRESHOLD
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top fraction must be in (0, 1], got {top_fraction}")
    if dedup is not None and not 0.0 < dedup <= 1.0:
        raise ValueError(f"dedup is a cosine similarity in (0, 1], got {dedup}")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if shards:
        urls = _shard_urls(input_name, out)
    else:
        if not Path(input).is_file():
            raise FileNotFoundError(f"{input}: no such caption file")
        if out.resolve() == Path(input).resolve():
            raise ValueError(f"{out}: the output would overwrite the input; choose another file")
        _kind(Path(input), kind)  # an unknown kind fails before the model loads

    net, _, transform = create_model_and_transforms(model, pretrained=pretrained, precision=precision, device=device)
    net.eval()
    tokenizer = get_tokenizer(model, context_length=net.cfg.text_cfg.context_length)
    if shards:
        data = _read_shard_pairs(urls, shard_size, net, transform, device, precision, batch_size, workers, progress)
    else:
        data = _read_caption_pairs(Path(input), kind, img_key, caption_key, sep, image_root, net, transform, device,
                                   precision, batch_size, workers, progress)
    image_of, paths, image_feats, broken_images = data.image_of, data.images, data.image_feats, data.broken_images
    n_pairs = len(data.captions)
    empty = np.array([not c.strip() for c in data.captions])
    text_feats = _text_features(net, tokenizer, data.captions, device, precision, batch_size, progress)
    scores = np.einsum("nd,nd->n", image_feats[image_of], text_feats)  # [pairs] cosine
    broken = empty | np.isin(image_of, list(broken_images))
    valid = ~broken
    if not valid.any():
        raise ValueError(f"{input_name}: no readable pair (every image failed or every caption is empty)")
    if top_fraction is not None:
        n_keep = max(1, math.ceil(top_fraction * int(valid.sum())))
        candidates = np.nonzero(valid)[0]
        best = candidates[np.argsort(-scores[candidates], kind="stable")[:n_keep]]
        keep = np.zeros(n_pairs, dtype=bool)
        keep[best] = True
        cut = float(scores[best].min())
    else:
        keep = valid & (scores >= threshold)
        cut = float(threshold)
    dropped_score = int((valid & ~keep).sum())

    dup_images: np.ndarray = np.zeros(len(paths), dtype=bool)
    dup_examples: List[Dict[str, Any]] = []
    factory = None
    if dedup is not None and keep.any():
        kept_images = np.unique(image_of[keep])  # sorted: first-seen order
        dropped, by, factory = near_duplicates(image_feats[kept_images], dedup)
        dup_images[kept_images[dropped]] = True
        for j, (i, s) in list(by.items())[:20]:
            dup_examples.append({"dropped": str(paths[kept_images[j]]), "kept": str(paths[kept_images[i]]),
                                 "cosine": round(float(s), 4)})
    dup_pairs = keep & dup_images[image_of]
    keep &= ~dup_pairs
    kept = np.nonzero(keep)[0].tolist()
    if not kept:
        logger.warning("%s: no pair kept (threshold %.3f)", input_name, cut)
    data.write(kept, out)

    report, histogram = report_paths(out)
    broken_examples = [{"image": str(paths[i]), "reason": reason} for i, reason in list(broken_images.items())[:20]]
    broken_examples += [{"source": b.path, "reason": b.reason} for b in data.unread[:20]]
    broken_examples += [{"source": data.sources[i], "reason": "empty caption"} for i in np.nonzero(empty)[0][:20]]
    total = n_pairs + len(data.unread)
    result = FilterResult(
        input=input_name, output=str(out), report=str(report), histogram=str(histogram), pairs=total,
        images=len(paths), broken=int(broken.sum()) + len(data.unread), dropped_score=dropped_score,
        dropped_duplicate=int(dup_pairs.sum()), duplicate_images=int(dup_images.sum()), kept=len(kept),
        threshold=cut, top_fraction=top_fraction, dedup=dedup, dedup_index=factory,
        broken_examples=broken_examples, duplicate_examples=dup_examples)
    counts, edges = np.histogram(scores[valid], bins=50)
    summary = {**dataclasses.asdict(result), "model": model, "pretrained": pretrained,
               "score": {"mean": float(scores[valid].mean()), "min": float(scores[valid].min()),
                         "max": float(scores[valid].max()),
                         "histogram": {"counts": counts.tolist(), "edges": [round(float(e), 5) for e in edges]}}}
    _histogram_png(scores[valid], cut, f"{Path(input_name).name}: kept {len(kept)} of {total} pairs", histogram)
    write_text(report, json.dumps(summary, indent=2) + "\n")
    logger.info("%s: kept %d of %d pairs (%d below %.3f, %d duplicates, %d broken) -> %s", input_name, len(kept),
                total, dropped_score, cut, result.dropped_duplicate, result.broken, out)
    return result


__all__ = ["FilterResult", "LAION_THRESHOLD", "filter_pairs", "is_shard_input", "near_duplicates", "report_paths"]
