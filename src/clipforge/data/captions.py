"""Map-style (image, caption) datasets: CSV/TSV, COCO captions JSON, image folder + JSONL.

Readers parse the index file eagerly into :class:`CaptionRecord`s (so a malformed file fails
at start-up, naming the file and line), while images are opened lazily in ``__getitem__``,
where a broken image only becomes a :class:`BrokenSample` to be skipped and counted.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

from torch import Tensor
from torch.utils.data import Dataset

from .robust import BrokenSample, DataError, describe_exception, load_pil_image

PathLike = Union[str, Path]
Transform = Callable[[Any], Tensor]
Tokenize = Callable[[List[str]], Tensor]


class CaptionRecord(NamedTuple):
    path: Path
    caption: str
    source: str  # "file:line" of the index entry, for messages


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def guess_separator(path: PathLike, sep: Optional[str] = None) -> str:
    """Explicit ``sep`` wins; else ``.csv`` means comma and anything else (``.tsv``) a tab."""
    if sep is not None:
        return "\t" if sep in ("\\t", "tab") else sep
    return "," if Path(path).suffix.lower() == ".csv" else "\t"


def read_csv_records(
    path: PathLike,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: Optional[str] = None,
    image_root: Optional[PathLike] = None,
) -> List[CaptionRecord]:
    """Read a header-first CSV/TSV; paths are relative to the file's folder (or ``image_root``)."""
    path = Path(path)
    sep = guess_separator(path, sep)
    root = Path(image_root) if image_root is not None else path.parent
    # Tab files are read without quote handling: captions often hold unbalanced '"'.
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row") from None
        except csv.Error as e:
            raise DataError(f"{path}:1: malformed header: {e}") from None
        for key in (img_key, caption_key):
            if key not in header:
                raise DataError(f"{path}: no column {key!r} in header {header} (sep={sep!r})")
        i_img, i_cap = header.index(img_key), header.index(caption_key)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: malformed row: {e}") from None
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: malformed row with {len(row)} fields, "
                    f"header has {len(header)}: {row[:4]}"
                )
            records.append(
                CaptionRecord(_resolve(root, row[i_img]), row[i_cap], f"{path}:{reader.line_num}")
            )
    return records


def coco_image_root(json_path: Path) -> Path:
    """COCO keeps ``captions_val2017.json`` next to (or in ``annotations/`` beside) ``val2017/``."""
    m = re.match(r"captions_(.+)$", json_path.stem)
    if m:
        for cand in (json_path.parent / m.group(1), json_path.parent.parent / m.group(1)):
            if cand.is_dir():
                return cand
    return json_path.parent


def read_coco_records(path: PathLike, image_root: Optional[PathLike] = None) -> List[CaptionRecord]:
    """One record per caption, ordered by annotation order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: not a COCO captions file (no {key!r} list)")
    root = Path(image_root) if image_root is not None else coco_image_root(path)
    files: Dict[Any, str] = {}
    for i, im in enumerate(data["images"]):
        if "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
        files[im["id"]] = im["file_name"]
    records = []
    for i, ann in enumerate(data["annotations"]):
        if ann.get("image_id") not in files or "caption" not in ann:
            raise DataError(f"{path}: annotations[{i}] has an unknown image_id or no caption")
        records.append(CaptionRecord(root / files[ann["image_id"]], ann["caption"], f"{path}:annotations[{i}]"))
    return records


def read_jsonl_records(
    path: PathLike,
    image_root: Optional[PathLike] = None,
    img_key: str = "image",
    caption_key: str = "caption",
) -> List[CaptionRecord]:
    """``{"image": ..., "caption": ...}`` per line, image paths relative to ``image_root``."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict) or img_key not in obj or caption_key not in obj:
                raise DataError(f"{path}:{lineno}: expected an object with {img_key!r} and {caption_key!r}")
            records.append(CaptionRecord(_resolve(root, str(obj[img_key])), str(obj[caption_key]), f"{path}:{lineno}"))
    return records


class CaptionDataset(Dataset):
    """(image, caption) records -> ``(transform(image), tokenize([caption])[0])``.

    A broken record yields a :class:`BrokenSample` (see ``robust``); the most recent ones are
    also kept in ``self.broken`` for single-process use.
    """

    def __init__(self, records: Sequence[CaptionRecord], transform: Transform, tokenize: Tokenize):
        self.records = list(records)
        self.transform = transform
        self.tokenize = tokenize
        self.broken: List[BrokenSample] = []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int):
        rec = self.records[idx]
        if not rec.caption or not rec.caption.strip():
            return self._broken(rec, "EmptyCaption: empty caption")
        try:
            image = self.transform(load_pil_image(rec.path))
        except Exception as e:  # any decode/transform failure makes just this sample unusable
            return self._broken(rec, describe_exception(e))
        return image, self.tokenize([rec.caption])[0]

    def _broken(self, rec: CaptionRecord, reason: str) -> BrokenSample:
        b = BrokenSample(str(rec.path), f"{reason} [{rec.source}]")
        if len(self.broken) < 1000:
            self.broken.append(b)
        return b


@dataclass
class CaptionGroups:
    """Images with all of their captions, in first-seen order, for retrieval evaluation."""

    image_paths: List[Path]
    captions: List[List[str]]
    texts: List[str] = field(init=False)
    text_to_image: List[int] = field(init=False)  # flat text index -> image index

    def __post_init__(self) -> None:
        self.texts = [c for caps in self.captions for c in caps]
        self.text_to_image = [i for i, caps in enumerate(self.captions) for _ in caps]

    @classmethod
    def from_records(cls, records: Sequence[CaptionRecord]) -> "CaptionGroups":
        order: Dict[Path, int] = {}
        caps: List[List[str]] = []
        for r in records:
            if r.path not in order:
                order[r.path] = len(caps)
                caps.append([])
            caps[order[r.path]].append(r.caption)
        return cls(list(order), caps)

    def image_to_texts(self) -> List[List[int]]:
        out: List[List[int]] = [[] for _ in self.image_paths]
        for t, i in enumerate(self.text_to_image):
            out[i].append(t)
        return out

    def image_dataset(self, transform: Transform) -> "ImageListDataset":
        return ImageListDataset(self.image_paths, transform)

    def __len__(self) -> int:
        return len(self.image_paths)


class ImageListDataset(Dataset):
    """Transformed images by index. Evaluation must be exact, so a broken image raises."""

    def __init__(self, paths: Sequence[PathLike], transform: Transform):
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> Tensor:
        try:
            return self.transform(load_pil_image(self.paths[idx]))
        except Exception as e:
            raise DataError(f"cannot load evaluation image {self.paths[idx]}: {describe_exception(e)}") from e


def csv_dataset(path: PathLike, transform: Transform, tokenize: Tokenize, img_key: str = "filepath",
                caption_key: str = "title", sep: Optional[str] = None,
                image_root: Optional[PathLike] = None) -> CaptionDataset:
    return CaptionDataset(read_csv_records(path, img_key, caption_key, sep, image_root), transform, tokenize)


def coco_dataset(path: PathLike, transform: Transform, tokenize: Tokenize,
                 image_root: Optional[PathLike] = None) -> CaptionDataset:
    return CaptionDataset(read_coco_records(path, image_root), transform, tokenize)


def jsonl_dataset(path: PathLike, transform: Transform, tokenize: Tokenize,
                  image_root: Optional[PathLike] = None) -> CaptionDataset:
    return CaptionDataset(read_jsonl_records(path, image_root), transform, tokenize)
