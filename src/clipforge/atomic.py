"""Atomic file writes, shared by every writer in the package (checkpoints, tokenizer files, configs).

It lives at the package root so that ``tokenizer/`` and ``checkpoints/`` can both use it without one
importing the other.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str) -> Path:
    """``text`` written atomically as UTF-8; returns the path."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(path)
