"""Tokenizer files in transformers' format, written next to converted weights.

``write_hf_tokenizer`` generates CLIP's BPE as ``CLIPTokenizer`` files from clipforge's own
vocabulary (no download); ``copy_hf_tokenizer`` re-saves a Hugging Face tokenizer read from a local
folder (SigLIP's sentencepiece, ...). Both write atomically, file by file.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import List

from ..atomic import TAG, PathLike, atomic_write, write_text
from .bpe import byte_to_unicode, read_merges

SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names for CLIP's special tokens


def write_hf_tokenizer(path: PathLike, context_length: int = 77) -> List[Path]:
    """CLIP's BPE as transformers ``CLIPTokenizer`` files (vocab.json, merges.txt, configs).

    Generated from clipforge's own vocabulary file, so no download is needed; ids match OpenCLIP's.
    """
    path = Path(path)
    merges = read_merges()
    symbols = list(byte_to_unicode().values())
    # CLIP's id order: 256 byte symbols, the same with "</w>", one token per merge, then SOT and EOT.
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
    specials = dict(bos_token=SOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)
    files = {"vocab.json": json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
             "tokenizer_config.json": json.dumps(dict(tokenizer_class="CLIPTokenizer",
                                                      model_max_length=context_length, **specials), indent=2),
             "special_tokens_map.json": json.dumps(specials, indent=2)}
    return [write_text(path / name, text) for name, text in files.items()]


def copy_hf_tokenizer(source: PathLike, path: PathLike) -> List[Path]:
    """The transformers tokenizer saved in folder ``source``, re-saved into ``path`` (needs transformers)."""
    from .hf import _load_auto_tokenizer

    tokenizer = _load_auto_tokenizer(str(source), cache_dir=None)
    written = []
    Path(path).mkdir(parents=True, exist_ok=True)
    # Staged inside ``path`` under a name clipforge.atomic.cleanup_stale recognises, so a kill leaks nothing.
    with tempfile.TemporaryDirectory(prefix=f".tokenizer.{TAG}", suffix=".tmp", dir=path) as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).iterdir()):
            if file.is_file():
                atomic_write(Path(path) / file.name, lambda t, file=file: shutil.copyfile(file, t))
                written.append(Path(path) / file.name)
    return written
