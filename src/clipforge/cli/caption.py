"""``clipforge caption``: prints :func:`clipforge.evaluate.captioning.caption_files`' caption of each image."""
from __future__ import annotations

import sys
from json import dumps
from typing import Literal, Optional

from ..evaluate.captioning import caption_files, generate_options, require_captioner
from ..evaluate.clip_benchmark_loader import load_clipforge


def main(*images: str, model: str, pretrained: Optional[str] = None, beams: Optional[int] = None,
         beam_groups: Optional[int] = None, generation_type: Optional[Literal["beam_search", "top_k", "top_p"]] = None,
         seq_len: Optional[int] = None, batch_size: int = 16, device: str = "cpu", precision: str = "fp32",
         json: bool = False) -> int:
    """Caption images with a CoCa model: one line per image, its path then its caption.

    Generation is OpenCLIP's (beam search with 6 beams and at most 30 tokens unless told otherwise).
    An image that cannot be read is reported on stderr and the others are still captioned; the exit
    code is then 1.

    Args:
        images: image files
        model: a CoCa architecture name, hf-hub:ORG/REPO or local-dir:PATH
        pretrained: weights: a pretrained tag or a checkpoint file (none: random weights)
        beams: beams of beam search (default 6); a multiple of beam_groups
        beam_groups: groups of diverse beam search (default 3)
        generation_type: beam_search, top_k or top_p (default beam_search)
        seq_len: longest caption in tokens, start token included (default 30)
        batch_size: images per generate call
        device: torch device, e.g. cpu or cuda
        precision: weight dtype: fp32, bf16 or fp16
        json: print one JSON object per image ({"path", "caption"} or {"path", "error"})
    """
    net, transform, tokenizer = load_clipforge(model, pretrained, device, precision=precision)
    try:
        require_captioner(net, model)
        results = caption_files(net, list(images), tokenizer, transform, batch_size, device,
                                **generate_options(beams, generation_type, seq_len, beam_groups))
    except ValueError as e:  # not a CoCa, or settings generate refuses (e.g. 4 beams in 3 groups)
        print(f"clipforge caption: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        if json:
            fields = {"path": r.path, "caption": r.caption} if r.error is None else {"path": r.path, "error": r.error}
            print(dumps(fields))
        elif r.error is None:
            print(f"{r.path}\t{r.caption}")
        if r.error is not None:
            print(f"clipforge caption: error: {r.error}", file=sys.stderr)
    return 1 if any(r.error is not None for r in results) else 0
