"""Tokenizer throughput: clipforge's CLIPTokenizer vs open_clip's SimpleTokenizer.

Tokenizes ImageNet zero-shot prompts (1000 classes x 80 templates) from ../shared when present,
otherwise the same number of generated prompts, and prints prompts/s of both and the ratio.
Each timing uses a fresh tokenizer, so caches start empty: this is the cost of a first pass.

    .venv/bin/python benchmarks/tokenizer_speed.py [--limit N] [--repeats R]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Callable, List

import torch

from clipforge.tokenizer import CLIPTokenizer

TEMPLATES_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "imagenet_classes_templates.json"


def load_prompts() -> List[str]:
    if TEMPLATES_FILE.is_file():
        data = json.loads(TEMPLATES_FILE.read_text())
        return [t.format(c) for c in data["classes"] for t in data["templates"]]
    print(f"{TEMPLATES_FILE} not found; using generated prompts")
    rng = random.Random(0)
    nouns = [f"{rng.choice(['red', 'small', 'wild', 'Old'])} thing-{i}" for i in range(1000)]
    templates = [f"a {adj} photo of the {{}}{end}" for adj in ("bad", "good", "blurry", "dark", "bright",
                 "cropped", "close-up", "jpeg", "pixelated", "black and white") for end in (".", "!", "", " ;)",
                 " in the wild.", " (rendition)", "s.", "'s toy.")]
    return [t.format(n) for n in nouns for t in templates]


def best_seconds(make: Callable[[], Callable], prompts: List[str], repeats: int) -> "tuple[float, torch.Tensor]":
    times, out = [], None
    for _ in range(repeats):
        tokenizer = make()
        start = time.perf_counter()
        out = tokenizer(prompts)
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="tokenize only the first N prompts")
    parser.add_argument("--repeats", type=int, default=1, help="report the best of R fresh-tokenizer runs")
    args = parser.parse_args()

    prompts = load_prompts()[: args.limit]
    ours, our_ids = best_seconds(CLIPTokenizer, prompts, args.repeats)
    print(f"clipforge CLIPTokenizer  : {len(prompts) / ours:12,.0f} prompts/s ({ours:.2f} s for {len(prompts):,})")
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        print("open_clip not installed; skipping the comparison")
        return
    theirs, their_ids = best_seconds(SimpleTokenizer, prompts, args.repeats)
    print(f"open_clip SimpleTokenizer: {len(prompts) / theirs:12,.0f} prompts/s ({theirs:.2f} s)")
    print(f"speed-up: {theirs / ours:.1f}x; identical ids: {torch.equal(our_ids, their_ids)}")


if __name__ == "__main__":
    main()
