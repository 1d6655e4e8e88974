"""``clipforge convert``: one checkpoint format to another (the library's ``checkpoints.convert``)."""
from __future__ import annotations

import sys
from typing import Optional

from ..checkpoints.convert import convert
from ..checkpoints.formats import FormatName


def main(src: str, dst: str, *, to: FormatName, model_name: Optional[str] = None) -> int:
    """Convert a checkpoint between OpenAI, OpenCLIP (file or hub folder) and transformers CLIP / SigLIP formats.

    Args:
        src: checkpoint file or folder; its format is detected
        dst: output: a file for the openai and open_clip formats, a folder for open_clip_dir, hf and hf_siglip
        to: target format: openai (OpenAI's .pt layout), open_clip (an OpenCLIP state-dict file),
            open_clip_dir (OpenCLIP's hub folder), hf (transformers CLIPModel), hf_siglip (transformers SiglipModel)
        model_name: architecture of a state-dict file whose shapes do not identify it (see `clipforge models`)
    """
    try:
        result = convert(src, dst, to, model_name)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError; both name the file
        print(f"clipforge convert: error: {e}", file=sys.stderr)
        return 1
    print(f"read {src} ({result.source_format})")
    for path in result.written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for note in result.notes:
        print(f"note: {note}")
    return 0
