"""``clipforge filter``: prints :func:`clipforge.retrieval.filter.filter_pairs`'s counts and where it wrote."""
from __future__ import annotations

import logging
import sys
from typing import Optional

from ..retrieval.filter import filter_pairs


def main(input: str, out: str, *, model: str, pretrained: Optional[str] = None, threshold: Optional[float] = None,
         top_fraction: Optional[float] = None, dedup: Optional[float] = 0.95, kind: str = "auto",
         img_key: str = "filepath", caption_key: str = "title", sep: Optional[str] = None,
         image_root: Optional[str] = None, shard_size: int = 10000, batch_size: int = 64, workers: int = 0,
         device: str = "cpu", precision: str = "fp32", progress: bool = True) -> int:
    """Keep the image-caption pairs of a caption file or shard set CLIP scores high; drop near-duplicate images.

    Writes OUT in the input's format (for shards: a folder of shards), OUT's stem + .report.json
    (counts, thresholds, score histogram) and + .scores.png (the histogram), beside OUT.

    Args:
        input: a caption file (CSV/TSV, JSON lines or COCO captions JSON) or WebDataset shards (a .tar, a
            brace pattern such as 'data/{000..009}.tar', or a '::' list)
        out: the caption file to write (same format), or for shards the folder of shards to write
        model: architecture name, hf-hub:ORG/REPO or local-dir:PATH
        pretrained: weights: a pretrained tag or a checkpoint file
        threshold: keep pairs whose image-caption cosine is at least this (default 0.28, LAION's)
        top_fraction: instead of a threshold, keep this fraction of the pairs, best first
        dedup: drop images whose cosine with an earlier kept image exceeds this; null: keep duplicates
        kind: input kind: auto, csv, tsv, jsonl, coco or webdataset
        img_key: image path column of a CSV/TSV
        caption_key: caption column of a CSV/TSV
        sep: CSV/TSV separator (default: by the file name or header)
        image_root: folder relative image paths start from (default: the caption file's)
        shard_size: samples per output shard (shard input)
        batch_size: images (and captions) encoded at a time
        workers: image decoding processes
        device: torch device, e.g. cpu or cuda
        precision: weight dtype: fp32, bf16 or fp16
        progress: show progress bars
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        r = filter_pairs(input, out, model, pretrained, threshold=threshold, top_fraction=top_fraction, dedup=dedup,
                         kind=kind, img_key=img_key, caption_key=caption_key, sep=sep, image_root=image_root,
                         shard_size=shard_size, batch_size=batch_size, workers=workers, device=device,
                         precision=precision, progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"clipforge filter: error: {e}", file=sys.stderr)
        return 2
    print(f"kept {r.kept} of {r.pairs} pairs ({r.images} images): {r.dropped_score} below {r.threshold:.4f}, "
          f"{r.dropped_duplicate} of {r.duplicate_images} near-duplicate images, {r.broken} unreadable")
    print(f"wrote {r.output}\nreport {r.report}\nhistogram {r.histogram}")
    return 0
