"""``clipforge shards``: prints what :func:`clipforge.data.write_shards` wrote (the library prints nothing)."""
from __future__ import annotations

from typing import Optional

from ..data.captions import read_caption_file
from ..data.shards import write_shards


def main(input_path: str, out_dir: str, kind: str = "auto", img_key: str = "filepath", caption_key: Optional[str] = None,
         sep: Optional[str] = None, image_root: Optional[str] = None, max_count_per_shard: int = 10000,
         prefix: str = "shard") -> int:
    """Write WebDataset tar shards and sizes.json from a CSV/TSV, COCO or JSONL caption file.

    Image bytes are copied unchanged; unreadable or empty samples are skipped and listed. The
    printed brace pattern is what a training config's data.train_data takes.

    Args:
        input_path: the caption file
        out_dir: folder for prefix-000000.tar ... and sizes.json
        kind: csv, tsv, coco, jsonl, or auto (by suffix: .json COCO, .jsonl JSON lines, else a table)
        img_key: table column holding image paths (relative to the file's folder or image_root)
        caption_key: table column holding captions (default: 'title' if the table has one, else its one
            column besides img_key)
        sep: table separator (default: tab for .tsv, comma for .csv, else told by the header line)
        image_root: folder image paths are relative to
        max_count_per_shard: samples per shard
        prefix: shard file name prefix
    """
    records = read_caption_file(input_path, kind, img_key, caption_key, sep, image_root)
    res = write_shards(records, out_dir, max_count_per_shard, prefix)
    print(f"wrote {res.n_written} samples in {len(res.shard_paths)} shards to {out_dir} "
          f"({len(res.skipped)} skipped); train_data: {res.url_pattern}")
    for s in res.skipped:
        print(f"  skipped {s.path}: {s.reason}")
    return 0
