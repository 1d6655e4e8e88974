"""Write WebDataset tar shards (plus ``sizes.json``) from caption records or (image, caption) pairs.

``write_shards(read_caption_file(path), out_dir)`` shards a CSV/TSV, COCO or JSONL caption file
(``clipforge shards`` does just that, then prints the result).

Image bytes are copied verbatim: re-encoding would lose quality and make round trips inexact.
Tar members get fixed metadata (mtime 0, uid 0) so the same input gives byte-identical shards.

The shard set is one output: it is built in a temporary sibling of ``out_dir`` and swapped in whole
(``clipforge.atomic.atomic_directory``), so a kill or a full disk leaves the previous set or the
new one, never new shards next to old ones and an old ``sizes.json``. (Per-shard renames plus a
manifest written last would not give that: a rerun over a larger old set would mix them.)
"""
from __future__ import annotations

import errno
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from ..atomic import atomic_directory, cleanup_stale, no_space_error, write_text
from ..transforms import load_image
from .captions import CaptionRecord
from .robust import BrokenSample, describe_exception

ImageSource = Union[str, Path, bytes]
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"))


def image_ext(src: ImageSource, data: bytes) -> str:
    """Extension for the tar member: from the file suffix, else sniffed from the bytes."""
    if not isinstance(src, (bytes, bytearray)):
        suf = Path(src).suffix.lower().lstrip(".")
        if suf in ("jpg", "jpeg", "png", "webp"):
            return suf
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    raise ValueError("unknown image format (expected jpg, png or webp)")


@dataclass
class ShardWriteResult:
    shard_paths: List[Path] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)  # shard basename -> sample count
    n_written: int = 0
    skipped: List[BrokenSample] = field(default_factory=list)

    @property
    def url_pattern(self) -> str:
        """Brace pattern covering all shards, for ``DataConfig.train_data``."""
        if not self.shard_paths:
            return ""
        first, last = self.shard_paths[0], self.shard_paths[-1]
        if len(self.shard_paths) == 1:
            return str(first)
        prefix, a = first.stem.rsplit("-", 1)
        b = last.stem.rsplit("-", 1)[1]
        return str(first.parent / f"{prefix}-{{{a}..{b}}}.tar")


def is_shard_folder(path: Path) -> bool:
    """Whether ``path`` holds only a shard set (tars and JSON), which a new set may replace."""
    return (path / "sizes.json").is_file() or all(p.suffix in (".tar", ".json") for p in path.iterdir()
                                                   if not p.name.startswith("."))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[Union[CaptionRecord, Tuple[ImageSource, str]]],
    out_dir: Union[str, Path],
    max_count_per_shard: int = 10000,
    prefix: str = "shard",
    key_digits: int = 9,
    shard_digits: int = 6,
) -> ShardWriteResult:
    """Write ``prefix-000000.tar`` ... and ``sizes.json``; unreadable or empty samples are skipped.

    ``samples`` are (image path or bytes, caption) pairs or :class:`CaptionRecord`s. Keys are the
    running sample index, zero padded to ``key_digits``. An existing ``out_dir`` is replaced as a
    whole when it holds a shard set; one holding other files is refused (``FileExistsError``).
    """
    if max_count_per_shard < 1:
        raise ValueError("max_count_per_shard must be >= 1")
    out = Path(out_dir)
    cleanup_stale(out.parent)  # what a killed earlier run left next to out_dir
    with atomic_directory(out, replaceable=is_shard_folder) as tmp:
        res = _write_into(samples, tmp, max_count_per_shard, prefix, key_digits, shard_digits)
    res.shard_paths = [out / p.name for p in res.shard_paths]
    return res


def _write_into(samples, out: Path, max_count_per_shard: int, prefix: str, key_digits: int,
                shard_digits: int) -> ShardWriteResult:
    res = ShardWriteResult()
    tar: Optional[tarfile.TarFile] = None
    count = 0
    path = out / "sizes.json"
    try:
        for item in samples:
            src, caption = item[0], item[1]
            name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
            if not caption or not str(caption).strip():
                res.skipped.append(BrokenSample(name, "EmptyCaption: empty caption"))
                continue
            try:
                data = bytes(src) if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
                ext = image_ext(src, data)
                load_image(data)  # bytes that do not decode are not written (a reader would only skip them)
            except Exception as e:  # missing file / unknown format: skip, keep going
                res.skipped.append(BrokenSample(name, describe_exception(e)))
                continue
            if tar is None or count == max_count_per_shard:
                if tar is not None:
                    tar.close()
                path = out / f"{prefix}-{len(res.shard_paths):0{shard_digits}d}.tar"
                tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
                res.shard_paths.append(path)
                res.sizes[path.name] = 0
                count = 0
            key = f"{res.n_written:0{key_digits}d}"
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", str(caption).encode("utf-8"))
            count += 1
            res.sizes[res.shard_paths[-1].name] += 1
            res.n_written += 1
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space_error(path) from e
        raise
    finally:
        if tar is not None:
            tar.close()
    write_text(out / "sizes.json", json.dumps(res.sizes, indent=1) + "\n")
    return res

