"""Conversion between any two registered checkpoint formats (see ``formats.FORMATS``).

``convert`` reads ``src`` in whatever format it is detected to be and writes it with the target
format's ``save``; it returns what it did and never prints (``clipforge convert`` does).

Over an existing destination the result is the old output or the new one, never a mix: a file is
renamed into place, a folder is built in a temporary sibling and swapped in whole
(``clipforge.atomic``). Temporaries a killed earlier conversion left next to ``dst`` are removed first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..atomic import atomic_directory, cleanup_stale
from .formats import FORMATS, detect_format, format_notes, load_detected
from .io import CheckpointError, PathLike


@dataclass
class ConversionResult:
    source_format: str  # the format ``src`` was detected as
    target_format: str
    written: List[Path]  # the files written, in order
    notes: List[str] = field(default_factory=list)  # what a reader of the written files must know


def convert(src: PathLike, dst: PathLike, to: str, model_name: Optional[str] = None) -> ConversionResult:
    """Convert ``src`` (any format in ``FORMATS``) to format ``to`` at ``dst``.

    ``dst`` is a file for single-file formats (``openai``, ``open_clip``), a directory otherwise.
    ``model_name`` picks the architecture of a state dict whose shapes do not identify it.
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {tuple(FORMATS)}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"refusing to convert {src} onto itself")
    target = FORMATS[to]
    if not target.IS_DIRECTORY and dst.is_dir():
        hint = "; OpenCLIP's hub folder is the open_clip_dir format" if to == "open_clip" else ""
        raise ValueError(f"{dst} is a directory; the {to} format is a single file (e.g. model.pt){hint}")
    if target.IS_DIRECTORY and dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} is a file; the {to} format is a directory")
    cleanup_stale(dst.parent)
    model, preprocess, source_format = load_detected(src, model_name)
    if not target.IS_DIRECTORY:
        written = target.save(model, dst, preprocess)  # one file, renamed into place
    else:
        with atomic_directory(dst, replaceable=_is_checkpoint) as tmp:
            written = [dst / Path(f).relative_to(tmp) for f in target.save(model, tmp, preprocess)]
    return ConversionResult(source_format, to, written, format_notes(to, model))


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder of a known format (which a conversion may replace)."""
    try:
        detect_format(path)
        return True
    except (CheckpointError, OSError):
        return False
