"""Caption files (CSV/TSV, COCO captions JSON, JSON lines) and the map-style datasets built on them.

These readers are the only ones in clipforge: training, validation, ``clipforge shards`` and the
evaluation tables all parse their index files here, with one separator rule (:func:`table_separator`).
Readers parse the index file eagerly into :class:`CaptionRecord`s (so a malformed file fails
at start-up, naming the file and line), while images are opened lazily in ``__getitem__``,
where a broken training image only becomes a :class:`BrokenSample` to be skipped and counted.
"""
from __future__ import annotations

import contextlib
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from torch import Tensor
from torch.utils.data import Dataset

from ..transforms import load_image_for
from .robust import BrokenSample, DataError, describe_exception

PathLike = Union[str, Path]
Transform = Callable[[Any], Tensor]
Tokenize = Callable[[List[str]], Tensor]


class CaptionRecord(NamedTuple):
    path: Path
    caption: str
    source: str  # "file:line" of the index entry, for messages


class TableRow(NamedTuple):
    values: Dict[str, str]  # column name -> field
    source: str  # "file:line", for messages


CAPTION_KINDS = ("csv", "tsv", "coco", "jsonl", "auto")
_KIND_BY_SUFFIX = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".jsonl": "jsonl", ".json": "coco"}


@contextlib.contextmanager
def utf8_text(path: PathLike):
    """Reading ``path`` as UTF-8: a byte that is not UTF-8 raises a DataError naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}, byte {e.object[e.start:e.start + 1]!r}); "
                        f"save it as UTF-8") from None


def resolve_path(root: Path, p: str) -> Path:
    """``p`` itself when absolute (``~`` expanded), else relative to ``root``."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def table_separator(path: PathLike, sep: Optional[str] = None) -> str:
    """The field separator of a header-first table, by one rule used by every reader in clipforge.

    An explicit ``sep`` wins (``"\\t"`` and ``"tab"`` mean a tab); else ``.tsv``/``.tab`` files are
    tab-separated and ``.csv`` files comma-separated; any other name is decided by its header line:
    tabs and no comma mean tab, commas and no tab mean comma, anything else is an error asking for
    ``sep`` (a guess there would silently read one column).
    """
    if sep is not None:
        return "\t" if sep in ("\\t", "tab") else sep
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    with utf8_text(path), open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
    tabs, commas = header.count("\t"), header.count(",")
    if tabs and not commas:
        return "\t"
    if commas and not tabs:
        return ","
    raise DataError(f"{path}: cannot tell the separator from the header line {header[:80]!r} "
                    f"({tabs} tabs, {commas} commas); name the file .tsv or .csv, or give sep")


def read_table(path: PathLike, columns: Sequence[str], sep: Optional[str] = None) -> List[TableRow]:
    """Rows of a header-first CSV/TSV (separator by :func:`table_separator`) that has ``columns``.

    Tab files are read without quote handling (captions often hold an unbalanced ``"``); other
    separators follow the CSV quoting rules, so ``"hello, world"`` is one field. Every error names
    the file, and the line where there is one.
    """
    path = Path(path)
    sep = table_separator(path, sep)
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    rows = []
    with utf8_text(path), open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row") from None
        except csv.Error as e:
            raise DataError(f"{path}:1: malformed header: {e}") from None
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}: header {header} lacks column(s) {missing} (sep={sep!r})")
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
                raise DataError(f"{path}:{reader.line_num}: malformed row with {len(row)} fields, "
                                f"header has {len(header)}: {row[:4]}")
            rows.append(TableRow(dict(zip(header, row)), f"{path}:{reader.line_num}"))
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows


DEFAULT_CAPTION_KEY = "title"  # OpenCLIP's --csv-caption-key default


def table_header(path: PathLike, sep: Optional[str] = None) -> List[str]:
    """The column names of a header-first table (separator by :func:`table_separator`)."""
    path = Path(path)
    sep = table_separator(path, sep)
    with utf8_text(path), open(path, newline="", encoding="utf-8") as f:
        line = f.readline()
    if not line.strip():
        raise DataError(f"{path}: empty file, expected a header row")
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    return next(csv.reader([line], delimiter=sep, quoting=quoting))


def caption_column(path: PathLike, img_key: str = "filepath", sep: Optional[str] = None) -> str:
    """The caption column of a table when none is named: ``title`` (OpenCLIP's default) if present, else
    the one column besides ``img_key``; more than one candidate is an error listing them."""
    header = table_header(path, sep)
    if DEFAULT_CAPTION_KEY in header:
        return DEFAULT_CAPTION_KEY
    others = [c for c in header if c != img_key]
    if len(others) == 1 and img_key in header:
        return others[0]
    raise DataError(f"{path}: cannot tell the caption column: header {header} has "
                    f"{'no ' + repr(img_key) + ' column and ' if img_key not in header else ''}"
                    f"{len(others)} other column(s); name them with caption_key / img_key "
                    f"(clipforge shards --caption-key COLUMN --img-key COLUMN)")


def read_csv_records(
    path: PathLike,
    img_key: str = "filepath",
    caption_key: Optional[str] = DEFAULT_CAPTION_KEY,
    sep: Optional[str] = None,
    image_root: Optional[PathLike] = None,
) -> List[CaptionRecord]:
    """Read a header-first CSV/TSV; paths are relative to the file's folder (or ``image_root``).

    ``caption_key=None`` finds the caption column by :func:`caption_column`.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if caption_key is None:
        caption_key = caption_column(path, img_key, sep)
    return [CaptionRecord(resolve_path(root, row.values[img_key]), row.values[caption_key], row.source)
            for row in read_table(path, (img_key, caption_key), sep)]


def coco_image_root(json_path: Path) -> Path:
    """COCO keeps ``captions_val2017.json`` next to (or in ``annotations/`` beside) ``val2017/``."""
    m = re.match(r"captions_(.+)$", json_path.stem)
    if m:
        for cand in (json_path.parent / m.group(1), json_path.parent.parent / m.group(1)):
            if cand.is_dir():
                return cand
    return json_path.parent


def read_coco_records(path: PathLike, image_root: Optional[PathLike] = None) -> List[CaptionRecord]:
    """One record per caption (stripped of surrounding white space), in annotation order."""
    path = Path(path)
    try:
        with utf8_text(path):
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
        records.append(CaptionRecord(root / files[ann["image_id"]], str(ann["caption"]).strip(),
                                     f"{path}:annotations[{i}]"))
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
    with utf8_text(path), open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict) or img_key not in obj or caption_key not in obj:
                raise DataError(f"{path}:{lineno}: expected an object with {img_key!r} and {caption_key!r}")
            records.append(CaptionRecord(resolve_path(root, str(obj[img_key])), str(obj[caption_key]),
                                         f"{path}:{lineno}"))
    return records


def read_caption_file(
    path: PathLike,
    kind: str = "auto",
    img_key: str = "filepath",
    caption_key: Optional[str] = DEFAULT_CAPTION_KEY,
    sep: Optional[str] = None,
    image_root: Optional[PathLike] = None,
) -> List[CaptionRecord]:
    """(image, caption) records of a caption file of ``kind`` (one of ``CAPTION_KINDS``).

    ``auto`` goes by the suffix: ``.json`` COCO, ``.jsonl`` JSON lines, anything else a table.
    ``img_key``/``caption_key``/``sep`` are the table's columns and separator (``caption_key=None``:
    found by :func:`caption_column`); JSON lines use their own ``image``/``caption`` keys.
    """
    if kind not in CAPTION_KINDS:
        raise ValueError(f"unknown caption file kind {kind!r}; expected one of {CAPTION_KINDS}")
    if kind == "auto":
        kind = _KIND_BY_SUFFIX.get(Path(path).suffix.lower(), "csv")
    if kind == "coco":
        return read_coco_records(path, image_root)
    if kind == "jsonl":
        return read_jsonl_records(path, image_root)
    return read_csv_records(path, img_key, caption_key, sep, image_root)


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
            image = self.transform(load_image_for(self.transform, rec.path))
        except Exception as e:  # any decode/transform failure makes just this sample unusable
            return self._broken(rec, describe_exception(e))
        return image, self.tokenize([rec.caption])[0]

    def _broken(self, rec: CaptionRecord, reason: str) -> BrokenSample:
        b = BrokenSample(str(rec.path), f"{reason} [{rec.source}]", rec.source)
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
    """``transform(image)`` by index, or ``(transform(image), target)`` when ``targets`` are given.

    The base of every evaluation dataset. Evaluation must be exact, so a broken image raises
    (an :class:`~clipforge.transforms.ImageLoadError` naming the file) instead of being skipped.
    Without a ``transform`` items hold the PIL image itself.
    """

    def __init__(self, paths: Sequence[PathLike], transform: Optional[Transform] = None,
                 targets: Optional[Sequence[Any]] = None):
        self.transform = transform
        self.paths = [Path(p) for p in paths]
        if targets is not None and len(targets) != len(self.paths):
            raise ValueError(f"{len(targets)} targets for {len(self.paths)} images")
        self.targets = None if targets is None else list(targets)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int):
        image = load_image_for(self.transform, self.paths[idx])
        if self.transform is not None:
            image = self.transform(image)
        return image if self.targets is None else (image, self.targets[idx])

    def _pairs(self) -> List[Tuple[Path, Any]]:
        return list(zip(self.paths, self.targets or [None] * len(self.paths)))

    def _set_pairs(self, pairs: Sequence[Tuple[PathLike, Any]]) -> None:
        pairs = list(pairs)
        self.paths = [Path(p) for p, _ in pairs]
        self.targets = [t for _, t in pairs]


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
