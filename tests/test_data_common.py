"""Shared helpers (no tests) for the test_data* files: small JPEGs and a reversible toy tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch
from PIL import Image

CTX = 24


def toy_tokenize(texts: List[str]) -> torch.Tensor:
    """Bytes of the caption, zero padded: reversible, so tests can read captions back."""
    out = torch.zeros(len(texts), CTX, dtype=torch.long)
    for i, t in enumerate(texts):
        b = t.encode("utf-8")[:CTX]
        out[i, : len(b)] = torch.tensor(list(b))
    return out


def detok(row: torch.Tensor) -> str:
    return bytes([int(x) for x in row if int(x) != 0]).decode("utf-8")


def small_transform(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.uint8).copy()).permute(2, 0, 1).float()


def write_jpeg(path: Path, i: int, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, 128)).save(path, quality=95)
    return path


def make_caption_folder(root: Path, n: int, sub: str = "images") -> List[tuple]:
    """n JPEGs under root/sub; returns (relative path, caption) pairs."""
    pairs = []
    for i in range(n):
        rel = f"{sub}/img{i:03d}.jpg"
        write_jpeg(root / rel, i)
        pairs.append((rel, f"caption number {i}"))
    return pairs


def write_tsv(path: Path, pairs, header=("filepath", "title"), sep="\t") -> Path:
    lines = [sep.join(header)] + [sep.join(p) for p in pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
