"""The folder an embedded collection lives in: clip-retrieval's layout, so its users' tools read ours.

::

    OUT/
      img_emb/img_emb_00000.npy          (rows, dim) float16 by default, L2-normalised
      text_emb/text_emb_00000.npy        same rows, text side (when captions exist)
      metadata/metadata_00000.parquet    one row per embedding row: image_path, caption, extra columns
      embed_info.json                    how the parts were made (model, dim, dtype, part size, ...)
      failed.jsonl                       inputs that could not be read: {"source", "reason", "part"} per line
      failed_parts/failed_00000.jsonl    the same, per part (written with the part; failed.jsonl merges them)
      index/                             written by ``clipforge index``: image.index, text.index, index_info.json

Part ``N``'s files describe the same rows in the same order. Each file is written atomically and the
metadata file last, so a part is complete exactly when its metadata file exists and a kill leaves at
most one unfinished part (per rank), which a rerun redoes. Part ``N`` always covers the same inputs
(inputs ``N * part_size`` to ``(N + 1) * part_size - 1`` of a deterministic order, or the shards
``N * part_size ...`` of a shard list); inputs that fail are left out, so a part may hold fewer
rows than ``part_size``, and global row ``i`` is row ``i - offset`` of the part whose rows span it
(:func:`part_offsets`). Part numbers are zero-padded so that a lexicographic
sort (what clip-retrieval's ``embedding-reader`` does) is the numeric order.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

MODALITIES = ("image", "text")
EMB_DIRS: Dict[str, str] = {"image": "img_emb", "text": "text_emb"}
METADATA_DIR = "metadata"
INFO_NAME = "embed_info.json"
FAILED_NAME = "failed.jsonl"
FAILED_PARTS_DIR = "failed_parts"
INDEX_DIR = "index"
IMAGE_PATH = "image_path"  # metadata column of the image's path (or WebDataset key)
CAPTION = "caption"  # metadata column of the caption
PART_DIGITS = 5
_PART = re.compile(r"^metadata_(\d+)\.parquet$")


def _part(n: int) -> str:
    return str(n).zfill(PART_DIGITS)


def embedding_path(out: PathLike, modality: str, part: int) -> Path:
    """``OUT/img_emb/img_emb_00003.npy`` for ``("image", 3)``."""
    if modality not in EMB_DIRS:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    folder = EMB_DIRS[modality]
    return Path(out) / folder / f"{folder}_{_part(part)}.npy"


def metadata_path(out: PathLike, part: int) -> Path:
    return Path(out) / METADATA_DIR / f"metadata_{_part(part)}.parquet"


def index_dir(out: PathLike) -> Path:
    return Path(out) / INDEX_DIR


def failed_part_path(out: PathLike, part: int) -> Path:
    """``OUT/failed_parts/failed_00003.jsonl``: the inputs of part 3 that could not be embedded."""
    return Path(out) / FAILED_PARTS_DIR / f"failed_{_part(part)}.jsonl"


@dataclass
class EmbedInfo:
    """``embed_info.json``: what a reader must know to use the parts (and a rerun to continue them)."""

    model: str
    pretrained: Optional[str]
    dim: int
    dtype: str  # numpy dtype name of the .npy files: "float16" or "float32"
    modalities: List[str]  # which of MODALITIES were embedded
    part_size: int  # inputs per part (shards per part for WebDataset input); failed inputs leave fewer rows
    input: str  # what was embedded (absolute path, or the shard URL pattern as given)
    input_kind: str  # "folder" | "table" | "webdataset" | "text"
    normalized: bool = True
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16": the inference mode the embeddings were made in
    int8: bool = False  # dynamically quantised int8 linear layers
    input_count: int = 0  # inputs (shards for WebDataset) when the run started; a different count refuses a resume
    rows: int = 0  # rows in complete parts (set when a run ends; 0 while the first run is in progress)
    parts: int = 0  # complete parts (idem)
    failed: int = 0  # inputs skipped (listed in failed.jsonl)
    complete: bool = False  # every part exists (false after a kill: rerun the same command to finish)
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EmbedInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{INFO_NAME}: unknown keys {unknown}")
        return cls(**d)


def read_info(out: PathLike) -> EmbedInfo:
    """The folder's ``embed_info.json``; a clear error when the folder was not written by ``embed``."""
    path = Path(out) / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no {INFO_NAME}; is this a folder written by `clipforge embed`?")
    return EmbedInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))


def write_info(out: PathLike, info: EmbedInfo) -> Path:
    from ..atomic import write_text

    return write_text(Path(out) / INFO_NAME, json.dumps(info.to_dict(), indent=2) + "\n")


def read_failed(out: PathLike) -> List[dict]:
    """The records of ``failed.jsonl`` (``[]`` when there is none)."""
    path = Path(out) / FAILED_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def complete_parts(out: PathLike) -> List[int]:
    """Part numbers whose metadata file exists (written last, so their embeddings are complete), sorted."""
    folder = Path(out) / METADATA_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_PART.match, os.listdir(folder)) if m)


def part_rows(out: PathLike, modality: str) -> List[Tuple[int, int]]:
    """``[(part, rows)]`` of the complete parts, read from the .npy headers (no data loaded)."""
    return [(p, int(np.load(embedding_path(out, modality, p), mmap_mode="r").shape[0]))
            for p in complete_parts(out)]


def part_offsets(out: PathLike, modality: str) -> List[Tuple[int, int, int]]:
    """``[(part, first global row, rows)]`` of the complete parts: where each part's rows sit in the
    concatenation that :func:`load_embeddings` returns and the index's row ids count."""
    offsets, start = [], 0
    for p, n in part_rows(out, modality):
        offsets.append((p, start, n))
        start += n
    return offsets


def read_metadata(out: PathLike, part: int):
    """One part's metadata as a ``pyarrow.Table`` (row ``i`` describes embedding row ``i``)."""
    import pyarrow.parquet as pq

    return pq.read_table(metadata_path(out, part))


def iter_embeddings(out: PathLike, modality: str) -> Iterator[Tuple[int, np.ndarray]]:
    """``(part, array)`` for each complete part in order, memory-mapped (read lazily)."""
    for p in complete_parts(out):
        yield p, np.load(embedding_path(out, modality, p), mmap_mode="r")


def load_embeddings(out: PathLike, modality: str, dtype: str = "float32") -> np.ndarray:
    """All complete parts' embeddings as one array (row ``i`` is metadata row ``i``)."""
    arrays = [np.asarray(a, dtype=dtype) for _, a in iter_embeddings(out, modality)]
    if not arrays:
        raise FileNotFoundError(f"{out}: no complete {EMB_DIRS[modality]} parts")
    return np.concatenate(arrays)
