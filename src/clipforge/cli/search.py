"""``clipforge search``: prints :class:`clipforge.retrieval.search.Searcher`'s top-k hits (or JSON).

The text query is an optional positional argument (an image query needs none), and ``-k`` and
``--top-k`` are aliases of ``--k``; the generic signature parser has neither, so this module has its
own ``parse``.
"""
from __future__ import annotations

import dataclasses
import json as json_lib
import sys
from typing import Any, Dict, Optional, Sequence

from ..retrieval.search import Searcher
from ..transforms import load_image

ALIASES = {"-k": "--k", "--top_k": "--k"}  # also --top-k: options arrive snake-cased


def _alias(token: str) -> str:
    name, eq, value = token.partition("=")
    return ALIASES.get(name, name) + eq + value if name in ALIASES else token


def main(out: str, query: Optional[str] = None, *, image: Optional[str] = None, k: int = 20,
         modality: str = "image", model: Optional[str] = None, pretrained: Optional[str] = None,
         device: str = "cpu", json: bool = False) -> int:
    """Search an indexed collection by a text query or an image: the top-k rows with scores and metadata.

    Args:
        out: a folder indexed by `clipforge index`
        query: the text query, e.g. 'a dog on a beach'
        image: an image file to search by, instead of a text query
        k: number of results (also -k or --top-k)
        modality: the index to search: image or text
        model: the model (default: the one of embed_info.json)
        pretrained: its weights (default: embed_info.json's)
        device: torch device for the query model
        json: print the hits as JSON lines
    """
    try:
        searcher = Searcher(out, model_name=model, pretrained=pretrained, device=device)
        if image is None:
            results = searcher.search_text(query or "", k, modality)
        else:
            results = searcher.search_image(load_image(image, convert_rgb=False), k, modality)
    except (ValueError, FileNotFoundError, IndexError) as e:
        print(f"clipforge search: error: {e}", file=sys.stderr)
        return 2
    for rank, h in enumerate(results, 1):
        if json:
            print(json_lib.dumps(dataclasses.asdict(h), default=str))
        else:
            print(f"{rank:3d}. {h.score:.4f}  #{h.id}  {h.image_path or ''}  {h.caption or ''}".rstrip())
    return 0


def parse(args: Sequence[str], prog: str, description: str) -> Dict[str, Any]:
    """``main``'s arguments, with ``query`` an optional positional and ``-k``/``--top-k`` spelled ``--k``."""
    from jsonargparse import ArgumentParser

    from . import _bool_flags

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_function_arguments(main, as_positional=True, as_group=False, skip={"query"})
    parser.add_argument("query", nargs="?", default=None, help="the text query, e.g. 'a dog on a beach'")
    namespace = parser.parse_args(_bool_flags([_alias(a) for a in args], ["json"]))
    keywords = dict(parser.instantiate(namespace))
    if (keywords["query"] is None) == (keywords["image"] is None):
        raise ValueError("give a text query or --image FILE (one of them)")
    return keywords
