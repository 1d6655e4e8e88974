"""Embed an image folder, a caption file, WebDataset shards or a text file into clip-retrieval's layout.

The layout (``clipforge.retrieval.layout``) is written part by part, and everything else follows
from one rule: part ``N`` always covers the same inputs. Inputs come in a deterministic order
(a sorted folder walk, a caption file's row order, the shard list's order) and part ``N`` is the
``N``-th slice of ``part_size`` inputs (of ``part_size`` shards for WebDataset, whose sample counts
are unknown before reading). Hence:

* resuming is skipping the parts whose metadata file exists (written last, each file atomically);
  a kill leaves at most one unfinished part per rank, which is redone whole;
* ``torchrun`` ranks need no coordination: rank ``r`` of ``W`` does parts ``r, r + W, ...``;
* memory stays flat in the collection size: one part's embeddings are held (plus the loader's
  prefetch; one part per loader worker for shards), never the collection's;
* a broken input is dropped from its part and listed with the part, so metadata row ``i`` is
  always embedding row ``i``.

The input list itself (paths and captions, not pixels) is read up front, as the caption readers do.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from ..atomic import atomic_write, cleanup_stale, write_text
from ..data.captions import read_caption_file, read_table, table_separator
from ..data.robust import BrokenSample, DataError, describe_exception
from ..data.webdataset import IMAGE_EXTS, TEXT_EXT, expand_urls, optional_import, read_shard_sizes
from ..precision import autocast, check_precision
from ..transforms import load_image_for
from . import layout
from .layout import CAPTION, IMAGE_PATH, EmbedInfo

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
INPUT_KINDS = ("auto", "folder", "table", "webdataset", "text")
DTYPES = ("float16", "float32")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".json")
DEFAULT_PART_SIZE = 100_000
TEXT_CHUNK = 4096  # captions tokenised and encoded together in text-only input (sorted by length within)


@dataclass
class EmbedResult:
    """What :func:`embed` did (``rows``/``parts``/``failed`` count the whole folder, not only this run)."""

    out: Path
    rows: int  # rows in complete parts
    parts: int  # complete parts
    failed: int  # inputs skipped so far (listed in failed.jsonl)
    seconds: float  # this run's wall time
    items_per_s: float  # inputs this rank read per second in the embedding loop (failed ones included)
    new_parts: int = 0  # parts this rank wrote in this run
    complete: bool = False  # every part exists
    modalities: Tuple[str, ...] = ()


@dataclass
class Source:
    """An input resolved to its inputs: ``table`` for files, ``shards`` for WebDataset.

    ``table`` (pyarrow) has one row per input: ``image_path`` (absolute; absent for a text file),
    ``caption`` (absent for a folder) and the caption file's other columns. It is columnar so that
    millions of inputs cost a few contiguous buffers, shared with (not copied into) loader workers,
    and a part's metadata is ``table.take(kept rows)`` with one schema for every part.
    """

    kind: str
    input: str  # what embed_info.json records
    modalities: Tuple[str, ...]
    table: Any = None  # pyarrow.Table
    shards: Optional[List[str]] = None
    sidecar_captions: bool = False  # folder input: each image's caption is the .txt file beside it

    @property
    def count(self) -> int:
        return len(self.shards) if self.shards is not None else self.table.num_rows

    def column(self, name: str) -> Any:
        """A column of ``table`` (pyarrow), or None when the input has no such column."""
        return self.table.column(name) if name in self.table.column_names else None

    def n_parts(self, part_size: int) -> int:
        return -(-self.count // part_size)


# ---- inputs --------------------------------------------------------------------------------------
def detect_input_kind(input: str) -> str:
    """``folder`` for a directory, ``text`` for ``.txt``, ``table`` for a caption file, ``webdataset``
    for ``pipe:``, brace patterns, ``::`` lists and ``.tar`` files."""
    if input.startswith("pipe:") or "{" in input or "::" in input or input.endswith(".tar") or "://" in input:
        return "webdataset"
    path = Path(input).expanduser()
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise FileNotFoundError(f"{input}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "text"
    if suffix in TABLE_SUFFIXES:
        return "table"
    raise ValueError(f"{input}: cannot tell the input kind from the suffix {suffix!r}; give input_kind "
                     f"(one of {INPUT_KINDS[1:]})")


def _folder_images(root: Path) -> Tuple[List[str], bool]:
    """Image files under ``root`` sorted by relative path (hidden files skipped), and whether every
    one has a caption ``.txt`` beside it (img2dataset's folder layout)."""
    files = sorted((p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    names = {p for p in files}
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    sidecar = bool(images) and all(p.with_suffix(".txt") in names for p in images)
    return [str(p) for p in images], sidecar


def _table_extras(path: Path, kind: str, img_key: str, caption_key: str, sep: Optional[str]) -> List[Dict[str, Any]]:
    """The fields of each record besides image and caption, in the order ``read_caption_file`` gives."""
    suffix = path.suffix.lower()
    kind = kind if kind != "auto" else {".json": "coco", ".jsonl": "jsonl"}.get(suffix, "csv")
    if kind == "coco":
        data = json.loads(path.read_text(encoding="utf-8"))
        return [{"image_id": a.get("image_id"), "annotation_id": a.get("id")} for a in data["annotations"]]
    if kind == "jsonl":
        extras = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    extras.append({k: v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v)
                                   for k, v in obj.items() if k not in ("image", "caption")})
        return extras
    return [{k: v for k, v in row.values.items() if k not in (img_key, caption_key)}
            for row in read_table(path, (img_key, caption_key), table_separator(path, sep))]


def _extras_table(extras: List[Dict[str, Any]]) -> Any:
    """The extra columns as a pyarrow table; a column whose values mix types is kept as strings."""
    import pyarrow as pa

    if not any(extras):
        return pa.table({})
    try:
        return pa.Table.from_pylist(extras)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.Table.from_pylist([{k: v if v is None or isinstance(v, str) else json.dumps(v) for k, v in e.items()}
                                     for e in extras])


def resolve_source(input: PathLike, input_kind: str = "auto", modalities: Optional[Sequence[str]] = None,
                   img_key: str = "filepath", caption_key: str = "title", sep: Optional[str] = None,
                   table_kind: str = "auto") -> Source:
    """Read the input list of ``input`` (not the images): the kind, the inputs in order, the modalities.

    Default modalities: images and captions for caption files and shards, images (and captions when
    every image has a ``.txt`` beside it) for folders, captions for text files.
    """
    import pyarrow as pa

    input = os.fspath(input)
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    kind = detect_input_kind(input) if input_kind == "auto" else input_kind
    if kind == "webdataset":
        shards, _ = expand_urls(input)
        if not shards:
            raise ValueError(f"{input}: no shards")
        source = Source(kind, input, ("image", "text"), shards=shards)
    else:
        path = Path(input).expanduser().resolve()
        if kind == "folder":
            if not path.is_dir():
                raise FileNotFoundError(f"{input}: not a folder")
            images, sidecar = _folder_images(path)
            if not images:
                tars = sorted(path.glob("*.tar"))
                hint = (f"; for its WebDataset shards give their names, e.g. '{tars[0].parent}/"
                        f"{{{tars[0].stem}..{tars[-1].stem}}}.tar'" if tars else "")
                raise DataError(f"{input}: no image files ({', '.join(IMAGE_SUFFIXES)}) under this folder{hint}")
            source = Source(kind, str(path), ("image", "text") if sidecar else ("image",),
                            table=pa.table({IMAGE_PATH: pa.array(images, pa.string())}), sidecar_captions=sidecar)
        elif kind == "table":
            records = read_caption_file(path, table_kind, img_key, caption_key, sep)
            extras = _table_extras(path, table_kind, img_key, caption_key, sep)
            if len(extras) != len(records):
                raise DataError(f"{input}: {len(records)} records but {len(extras)} rows of extra columns")
            table = _extras_table(extras)
            table = table.drop_columns([c for c in (IMAGE_PATH, CAPTION) if c in table.column_names])
            columns = {IMAGE_PATH: pa.array([str(r.path) for r in records], pa.string()),
                       CAPTION: pa.array([r.caption for r in records], pa.string()),
                       **{c: table.column(c) for c in table.column_names}}
            source = Source(kind, str(path), ("image", "text"), table=pa.table(columns))
        elif kind == "text":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            captions = [ln for ln in lines if ln]
            if not captions:
                raise DataError(f"{input}: no captions (one per line expected)")
            source = Source(kind, str(path), ("text",), table=pa.table({CAPTION: pa.array(captions, pa.string())}))
        else:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    if modalities is not None:
        wanted = tuple(m for m in layout.MODALITIES if m in modalities)
        unknown = sorted(set(modalities) - set(layout.MODALITIES))
        if unknown or not wanted:
            raise ValueError(f"modalities must be a non-empty subset of {layout.MODALITIES}, got {list(modalities)}")
        missing = [m for m in wanted if m not in source.modalities and not (m == "text" and kind == "webdataset")]
        if missing:
            raise ValueError(f"{input}: a {kind} input has no {missing[0]}s to embed (it has {source.modalities})")
        source.modalities = wanted
    return source


def assign_parts(n_parts: int, rank: int = 0, world_size: int = 1) -> List[int]:
    """The parts rank ``rank`` of ``world_size`` embeds: ``rank, rank + world_size, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return list(range(rank, n_parts, world_size))


# ---- model ---------------------------------------------------------------------------------------
def _image_size(model: torch.nn.Module) -> Optional[Tuple[int, int]]:
    """(h, w) the model's preprocessing resizes to, for draft JPEG decoding."""
    from ..config import as_tuple2

    cfg = getattr(model, "preprocess_cfg", None)
    size = getattr(cfg, "image_size", None) or getattr(getattr(getattr(model, "cfg", None), "vision_cfg", None),
                                                        "image_size", None)
    return None if size is None else as_tuple2(size)


class Encoder:
    """A model prepared for one inference mode, returning L2-normalised float32 features on the CPU."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, device: Union[str, torch.device] = "cpu",
                 precision: str = "fp32", int8: bool = False, text_batch_size: int = 256):
        check_precision(precision)
        self.device = torch.device(device)
        if int8 and (self.device.type != "cpu" or precision != "fp32"):
            raise ValueError("int8 (dynamic quantisation) runs on the CPU in fp32; drop --int8 or use "
                             f"device cpu and precision fp32 (got device {device}, precision {precision})")
        from ..inference import quantize_int8, to_bf16_inference

        model.eval().requires_grad_(False)
        if int8:
            model = quantize_int8(model, inplace=True)
        elif precision == "bf16":
            model = to_bf16_inference(model)  # bf16 weights, fp32 norms/projections/outputs; no autocast
        self.model, self.tokenizer = model, tokenizer
        self.image_size = _image_size(model)
        self.autocast_precision = "fp16" if precision == "fp16" else "fp32"
        self.text_batch_size = text_batch_size

    @property
    def dim(self) -> int:
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None and getattr(cfg, "embed_dim", None):
            return int(cfg.embed_dim)
        return int(self.encode_texts(["a"]).shape[1])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D]."""
        with torch.inference_mode(), autocast(self.autocast_precision, self.device):
            feats = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(feats.float(), dim=-1).cpu()

    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> [N, D], batched by tokenised length (``encode_text_batched``: EOT-trimmed)."""
        from ..evaluate.features import encode_text_batched

        tokens = self.tokenizer(list(captions)).to(self.device)
        with torch.inference_mode(), autocast(self.autocast_precision, self.device):
            feats = encode_text_batched(self.model, tokens, self.text_batch_size)
        return F.normalize(feats.float(), dim=-1).cpu()


def load_encoder(model: str, pretrained: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                 precision: str = "fp32", int8: bool = False, text_batch_size: int = 256) -> Tuple[Encoder, Callable]:
    """(encoder, eval image transform) of a model name (or ``hf-hub:``/``local-dir:``) and weights."""
    from ..factory import create_model_and_transforms, get_tokenizer

    net, _, transform = create_model_and_transforms(model, pretrained, device=device)
    return Encoder(net, get_tokenizer(model), device, precision, int8, text_batch_size), transform


# ---- loading: file-based inputs ------------------------------------------------------------------
class _ImageDataset(Dataset):
    """Index -> ``(index, image tensor | BrokenSample, sidecar caption | None)``; decoding runs in loader workers."""

    def __init__(self, paths: Any, transform: Callable, sidecar_captions: bool,
                 draft_size: Optional[Tuple[int, int]] = None):
        self.paths, self.transform, self.sidecar = paths, transform, sidecar_captions  # paths: pyarrow strings
        self.draft_size = draft_size  # JPEGs decoded at a reduced DCT scale that still covers this size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i].as_py()
        try:
            caption = _sidecar_caption(path) if self.sidecar else None
            image = self.transform(load_image_for(self.transform, path, self.draft_size,
                                                  draft=self.draft_size is not None))
        except Exception as e:  # one unreadable image is skipped and listed, never the end of the run
            return i, BrokenSample(path, describe_exception(e)), None
        return i, image, caption


def _sidecar_caption(image: str) -> str:
    return Path(image).with_suffix(".txt").read_text(encoding="utf-8").strip()


def _collate_items(samples: List[tuple]) -> dict:
    good = [s for s in samples if not isinstance(s[1], BrokenSample)]
    return {"indices": [s[0] for s in samples], "kept": [s[0] for s in good],
            "images": torch.stack([s[1] for s in good]) if good else None, "captions": [s[2] for s in good],
            "failed": [s[1] for s in samples if isinstance(s[1], BrokenSample)]}


class _PartBatches:
    """Batches of item indices that never cross a part boundary, parts in the given order."""

    def __init__(self, parts: Sequence[int], part_size: int, n_items: int, batch_size: int):
        self.parts, self.part_size, self.n_items, self.batch_size = list(parts), part_size, n_items, batch_size

    def _bounds(self, part: int) -> Tuple[int, int]:
        return part * self.part_size, min(self.n_items, (part + 1) * self.part_size)

    def __iter__(self) -> Iterator[List[int]]:
        for p in self.parts:
            lo, hi = self._bounds(p)
            for start in range(lo, hi, self.batch_size):
                yield list(range(start, min(hi, start + self.batch_size)))

    def __len__(self) -> int:
        spans = (self._bounds(p) for p in self.parts)
        return sum(-(-(hi - lo) // self.batch_size) for lo, hi in spans)


# ---- loading: WebDataset shards ------------------------------------------------------------------
class ShardParts(IterableDataset):
    """Each loader worker reads whole parts (``(part, shard urls)``), yielding batches of decoded samples
    and a last ``done`` batch per part; a part's batches come from one worker, in tar order."""

    def __init__(self, parts: Sequence[Tuple[int, List[str]]], transform: Optional[Callable], want_text: bool,
                 batch_size: int, draft_size: Optional[Tuple[int, int]] = None):
        self.parts, self.transform, self.want_text, self.batch_size = list(parts), transform, want_text, batch_size
        self.draft_size = draft_size

    def _decode(self, sample: Dict[str, Any]):
        where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        caption = None
        if self.want_text:
            if TEXT_EXT not in sample:
                return BrokenSample(where, "MissingCaption: no txt entry")
            caption = sample[TEXT_EXT].decode("utf-8").strip()
        image = None
        if self.transform is not None:
            img_key = next((k for k in IMAGE_EXTS if k in sample), None)
            if img_key is None:
                return BrokenSample(where, "MissingImage: no jpg/jpeg/png/webp entry")
            image = self.transform(load_image_for(self.transform, sample[img_key], self.draft_size,
                                                  draft=self.draft_size is not None))
        return sample.get("__key__"), sample.get("__url__"), image, caption

    def __iter__(self) -> Iterator[dict]:
        wds = optional_import("webdataset", "reading WebDataset shards")

        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part, urls in self.parts[wid::nworkers]:
            failed: List[BrokenSample] = []

            def handler(exn: Exception) -> bool:
                where = next((a for a in reversed(exn.args) if isinstance(a, str) and a), "?")
                failed.append(BrokenSample(where, describe_exception(exn)))
                return True

            good: List[tuple] = []
            for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=handler):
                try:
                    item = self._decode(sample)
                except Exception as e:  # an undecodable sample is listed, not fatal
                    item = BrokenSample(f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}",
                                        describe_exception(e))
                if isinstance(item, BrokenSample):
                    failed.append(item)
                    continue
                good.append(item)
                if len(good) == self.batch_size:
                    yield self._batch(part, good, failed, done=False)
                    good, failed = [], []
            yield self._batch(part, good, failed, done=True)

    @staticmethod
    def _batch(part: int, good: List[tuple], failed: List[BrokenSample], done: bool) -> dict:
        images = [g[2] for g in good if g[2] is not None]
        return {"part": part, "done": done, "keys": [g[0] for g in good], "urls": [g[1] for g in good],
                "images": torch.stack(images) if images else None, "captions": [g[3] for g in good],
                "failed": list(failed), "seen": len(good) + len(failed)}


# ---- writing -------------------------------------------------------------------------------------
class _PartBuffer:
    """One part's rows while it is being embedded: the input rows kept (or, for shards, their keys)."""

    def __init__(self, part: int):
        self.part = part
        self.image: List[np.ndarray] = []
        self.rows: List[int] = []  # kept rows of Source.table
        self.captions: List[Optional[str]] = []  # captions the loader read (sidecar files, shards)
        self.keys: List[str] = []  # shards: sample keys and their shard
        self.urls: List[str] = []
        self.failed: List[BrokenSample] = []

    def add_image(self, image: Optional[torch.Tensor], dtype: str) -> None:
        if image is not None:
            self.image.append(image.numpy().astype(dtype))

    def metadata(self, source: Source) -> Any:
        """The part's metadata table: one row per kept input, in order."""
        import pyarrow as pa

        if source.shards is not None:
            columns = {IMAGE_PATH: pa.array(self.keys, pa.string())}
            if "text" in source.modalities:
                columns[CAPTION] = pa.array(self.captions, pa.string())
            columns["shard"] = pa.array(self.urls, pa.string())
            return pa.table(columns)
        table = source.table.take(pa.array(self.rows, pa.int64()))
        if source.sidecar_captions and CAPTION not in table.column_names:
            table = table.append_column(CAPTION, pa.array(self.captions, pa.string()))
        return table


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, np.ascontiguousarray(array))

    atomic_write(path, write)


def _write_part(out: Path, buf: _PartBuffer, image: Optional[np.ndarray], text: Optional[np.ndarray],
                table: Any) -> None:
    """Embeddings, then the part's failures, then the metadata (whose existence marks the part complete)."""
    import pyarrow.parquet as pq

    if image is not None:
        _save_npy(layout.embedding_path(out, "image", buf.part), image)
    if text is not None:
        _save_npy(layout.embedding_path(out, "text", buf.part), text)
    failed = "".join(json.dumps({"source": f.path, "reason": f.reason, "part": buf.part}) + "\n" for f in buf.failed)
    write_text(layout.failed_part_path(out, buf.part), failed)
    atomic_write(layout.metadata_path(out, buf.part), lambda tmp: pq.write_table(table, tmp))


# ---- settings and resume -------------------------------------------------------------------------
_COMPARED = ("model", "pretrained", "input", "input_kind", "modalities", "part_size", "dtype", "precision", "int8",
             "input_count", "dim", "extra")


def check_resume(old: EmbedInfo, new: EmbedInfo, out: PathLike) -> None:
    """Raise ValueError naming every setting in which ``new`` differs from the folder's ``old`` one."""
    diffs = [k for k in _COMPARED if getattr(old, k) != getattr(new, k)]
    if diffs:
        detail = ", ".join(f"{k}: {getattr(old, k)!r} there, {getattr(new, k)!r} now" for k in diffs)
        raise ValueError(f"{out} holds embeddings made with other settings ({detail}); rerun with the same "
                         f"settings to resume, or pass overwrite=True (--overwrite) to start again")


def _clear(out: Path) -> None:
    """Remove what ``embed`` writes (and the index built on it); other files in ``out`` are left alone."""
    for name in (*layout.EMB_DIRS.values(), layout.METADATA_DIR, layout.FAILED_PARTS_DIR, layout.INDEX_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (layout.INFO_NAME, layout.FAILED_NAME):
        (out / name).unlink(missing_ok=True)


def _remove_temporaries(out: Path) -> None:
    """Temporary files of writes a kill interrupted (``atomic_write``'s, recognised by name and lock)."""
    for name in (*layout.EMB_DIRS.values(), layout.METADATA_DIR, layout.FAILED_PARTS_DIR, "."):
        cleanup_stale(out / name)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(f"world_size={world_size} but no torch.distributed process group; launch with "
                               "torchrun (the CLI joins the group) or call torch.distributed.init_process_group")
        dist.barrier()


def _finish(out: Path, info: EmbedInfo, n_parts: int) -> EmbedInfo:
    """Merge the per-part failure lists of complete parts into failed.jsonl and record the totals."""
    done = layout.complete_parts(out)
    lines: List[str] = []
    for p in done:
        path = layout.failed_part_path(out, p)
        if path.is_file():
            lines.extend(ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())
    write_text(out / layout.FAILED_NAME, "".join(ln + "\n" for ln in lines))
    info.rows = sum(n for _, n in layout.part_rows(out, info.modalities[0]))
    info.parts, info.failed = len(done), len(lines)
    info.complete = set(range(n_parts)) <= set(done)
    layout.write_info(out, info)
    return info


# ---- the embedding loop --------------------------------------------------------------------------
def embed(
    input: PathLike,
    out: PathLike,
    model: str,
    pretrained: Optional[str] = None,
    *,
    input_kind: str = "auto",
    modalities: Optional[Sequence[str]] = None,
    part_size: int = DEFAULT_PART_SIZE,
    batch_size: int = 256,
    workers: int = 4,
    dtype: str = "float16",
    precision: str = "fp32",
    int8: bool = False,
    draft: bool = False,
    device: Union[str, torch.device] = "cpu",
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: Optional[str] = None,
    progress: bool = True,
    encoder: Optional[Tuple[Encoder, Callable]] = None,
) -> EmbedResult:
    """Embed ``input`` into ``out`` (clip-retrieval's layout), resuming what a previous run left.

    ``part_size`` is inputs per part (shards per part for WebDataset input). With ``world_size > 1``
    (a torch.distributed group must be initialised), this rank does parts ``rank, rank + W, ...`` and
    rank 0 writes the final ``embed_info.json`` once every rank is done. ``encoder`` (an
    :class:`Encoder` and its image transform) replaces loading ``model``/``pretrained``. ``draft``
    decodes JPEGs at a reduced DCT scale that still covers twice the model's input size
    (``load_image(draft=True)``): much faster on large photos, close to but not equal to a full decode.
    """
    start_time = time.perf_counter()
    out = Path(out)
    if part_size < 1 or batch_size < 1 or workers < 0:
        raise ValueError(f"part_size and batch_size must be >= 1 and workers >= 0, got {part_size}, {batch_size}, "
                         f"{workers}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_precision(precision)
    source = resolve_source(input, input_kind, modalities, img_key, caption_key, sep)
    enc, transform = encoder or load_encoder(model, pretrained, device, precision, int8)
    if pretrained is not None and Path(pretrained).is_file():
        pretrained = str(Path(pretrained).resolve())  # a rerun from another folder names the same file
    info = EmbedInfo(model=model, pretrained=None if pretrained is None else str(pretrained), dim=enc.dim,
                     dtype=dtype, modalities=list(source.modalities), part_size=part_size, input=source.input,
                     input_kind=source.kind, precision=precision, int8=int8, input_count=source.count,
                     extra={"draft": True} if draft else {})
    n_parts = source.n_parts(part_size)

    # Every rank checks the old settings before rank 0 rewrites anything.
    if (out / layout.INFO_NAME).is_file() and not overwrite:
        check_resume(layout.read_info(out), info, out)
    elif not overwrite and layout.complete_parts(out):
        raise ValueError(f"{out} has metadata parts but no {layout.INFO_NAME}; pass overwrite=True (--overwrite) "
                         "to replace them")
    _barrier(world_size)
    if rank == 0:
        if overwrite:
            _clear(out)
        _remove_temporaries(out)
        layout.write_info(out, info)
    _barrier(world_size)

    done = set(layout.complete_parts(out))
    todo = [p for p in assign_parts(n_parts, rank, world_size) if p not in done]
    log.info("%s: %d parts, %d complete, this rank embeds %d", out, n_parts, len(done), len(todo))
    bar = tqdm(total=_todo_inputs(source, todo, part_size), disable=not progress, unit="item",
               desc=f"embed rank {rank}" if world_size > 1 else "embed", dynamic_ncols=True,
               position=rank if world_size > 1 else None)
    seen, loop_start = 0, time.perf_counter()
    try:
        draft_size = enc.image_size if draft else None
        for n in _run(source, todo, part_size, enc, transform, out, batch_size, workers, dtype, bar, draft_size):
            seen += n
    finally:
        bar.close()
    loop_seconds = time.perf_counter() - loop_start

    _barrier(world_size)
    if rank == 0:
        info = _finish(out, info, n_parts)
    _barrier(world_size)
    if rank != 0:
        info = layout.read_info(out)
    seconds = time.perf_counter() - start_time
    return EmbedResult(out, info.rows, info.parts, info.failed, seconds, seen / loop_seconds if seen else 0.0,
                       new_parts=len(todo), complete=info.complete, modalities=source.modalities)


def _run(source: Source, todo: Sequence[int], part_size: int, enc: Encoder, transform: Callable, out: Path,
         batch_size: int, workers: int, dtype: str, bar: tqdm, draft_size: Optional[Tuple[int, int]]) -> Iterator[int]:
    """Embed and write the parts ``todo``, yielding the number of inputs read as they are read."""
    if not todo:
        return iter(())
    if source.kind == "webdataset":
        return _run_shards(source, todo, part_size, enc, transform, out, batch_size, workers, dtype, bar, draft_size)
    if "image" in source.modalities:
        return _run_items(source, todo, part_size, enc, transform, out, batch_size, workers, dtype, bar, draft_size)
    return _run_texts(source, todo, part_size, enc, out, dtype, bar)


def _todo_inputs(source: Source, todo: Sequence[int], part_size: int) -> Optional[int]:
    if source.shards is not None:  # samples per shard are known only from a sizes.json beside the shards
        return read_shard_sizes([u for p in todo for u in source.shards[p * part_size:(p + 1) * part_size]])
    return sum(min(source.count, (p + 1) * part_size) - p * part_size for p in todo)


def _flush(out: Path, buf: _PartBuffer, source: Source, enc: Encoder, dtype: str) -> None:
    """Encode the part's captions (all at once: sorted by length, the fewest padded positions) and write it."""
    table = buf.metadata(source)
    image = text = None
    if "image" in source.modalities:
        image = np.concatenate(buf.image) if buf.image else np.zeros((0, enc.dim), dtype)
    if "text" in source.modalities:
        captions = table.column(CAPTION).to_pylist()
        text = enc.encode_texts(captions).numpy().astype(dtype) if captions else np.zeros((0, enc.dim), dtype)
    _write_part(out, buf, image, text, table)


def _loader_kwargs(workers: int, device: torch.device) -> dict:
    kw: Dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw.update(prefetch_factor=4, persistent_workers=False)
    return kw


def _run_items(source: Source, todo: Sequence[int], part_size: int, enc: Encoder, transform: Callable, out: Path,
               batch_size: int, workers: int, dtype: str, bar: tqdm,
               draft_size: Optional[Tuple[int, int]] = None) -> Iterator[int]:
    """File inputs with images: batches never cross parts and arrive in order, so a part ends with the
    batch holding its last index."""
    n = source.count
    dataset = _ImageDataset(source.column(IMAGE_PATH).combine_chunks(), transform, source.sidecar_captions, draft_size)
    loader = DataLoader(dataset, batch_sampler=_PartBatches(todo, part_size, n, batch_size),
                        collate_fn=_collate_items, **_loader_kwargs(workers, enc.device))
    buf: Optional[_PartBuffer] = None
    for batch in loader:
        part = batch["indices"][0] // part_size
        if buf is None:
            buf = _PartBuffer(part)
        buf.rows.extend(batch["kept"])
        buf.captions.extend(batch["captions"])
        buf.add_image(enc.encode_images(batch["images"]) if batch["images"] is not None else None, dtype)
        buf.failed.extend(batch["failed"])
        bar.update(len(batch["indices"]))
        yield len(batch["indices"])
        if batch["indices"][-1] == min(n, (part + 1) * part_size) - 1:
            _flush(out, buf, source, enc, dtype)
            buf = None


def _run_texts(source: Source, todo: Sequence[int], part_size: int, enc: Encoder, out: Path, dtype: str,
               bar: tqdm) -> Iterator[int]:
    """Captions only: a part is read in chunks of ``TEXT_CHUNK`` (each sorted by length) and written whole."""
    for part in todo:
        buf = _PartBuffer(part)
        lo, hi = part * part_size, min(source.count, (part + 1) * part_size)
        buf.rows = list(range(lo, hi))
        text = []
        for start in range(lo, hi, TEXT_CHUNK):
            stop = min(hi, start + TEXT_CHUNK)
            if source.sidecar_captions:
                captions = [_sidecar_caption(p) for p in source.column(IMAGE_PATH)[start:stop].to_pylist()]
                buf.captions.extend(captions)
            else:
                captions = source.column(CAPTION)[start:stop].to_pylist()
            text.append(enc.encode_texts(captions).numpy().astype(dtype))
            bar.update(stop - start)
            yield stop - start
        _write_part(out, buf, None, np.concatenate(text), buf.metadata(source))


def _run_shards(source: Source, todo: Sequence[int], part_size: int, enc: Encoder, transform: Callable, out: Path,
                batch_size: int, workers: int, dtype: str, bar: tqdm,
                draft_size: Optional[Tuple[int, int]] = None) -> Iterator[int]:
    """Shard inputs: each worker reads whole parts, so up to ``workers`` parts are open at once."""
    shards = source.shards
    assert shards is not None
    parts = [(p, shards[p * part_size:(p + 1) * part_size]) for p in todo]
    dataset = ShardParts(parts, transform if "image" in source.modalities else None, "text" in source.modalities,
                          batch_size, draft_size)
    loader = DataLoader(dataset, batch_size=None, **_loader_kwargs(min(workers, len(parts)), enc.device))
    open_parts: Dict[int, _PartBuffer] = {}
    for batch in loader:
        buf = open_parts.setdefault(batch["part"], _PartBuffer(batch["part"]))
        buf.keys.extend(batch["keys"])
        buf.urls.extend(batch["urls"])
        buf.captions.extend(batch["captions"])
        buf.add_image(enc.encode_images(batch["images"]) if batch["images"] is not None else None, dtype)
        buf.failed.extend(batch["failed"])
        bar.update(batch["seen"])
        yield batch["seen"]
        if batch["done"]:
            _flush(out, open_parts.pop(batch["part"]), source, enc, dtype)
