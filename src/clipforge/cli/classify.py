"""``clipforge classify``: prints :func:`clipforge.evaluate.classify_images`'s ranking of labels per image.

An image that cannot be read is reported on its own line (stderr) and the others are still
classified; the exit code is then 1. Without ``--pretrained`` (and without a hub/local folder model,
which carries weights) the weights are random, and a warning says so.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple

from ..evaluate.clip_benchmark_loader import load_clipforge
from ..evaluate.zero_shot import classify_images
from ..transforms import ImageLoadError, load_image
from . import UsageError


def readable_images(paths: List[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(paths that open as images, [(path, reason)] for those that do not)."""
    good, bad = [], []
    for path in paths:
        try:
            load_image(path)
            good.append(path)
        except ImageLoadError as e:
            bad.append((path, str(e)))
    return good, bad


def main(*images: str, labels: str, model: str = "ViT-B-32", pretrained: Optional[str] = None, top_k: int = 5,
         template: str = "a photo of a {}.", device: str = "cpu", precision: str = "fp32") -> int:
    """Zero-shot classify images against labels: the top-k labels of each image, with probabilities.

    Probabilities are a softmax over the labels of the model's logit scale times cosine similarity.
    An unreadable image is reported on stderr and the others are still classified (exit code 1).

    Args:
        images: image files
        labels: comma-separated labels, e.g. 'cat,dog,a red car'
        model: architecture name, hf-hub:ORG/REPO or local-dir:PATH
        pretrained: weights: a pretrained tag or a checkpoint file (none: random weights, with a warning)
        top_k: labels shown per image (at least 1; capped at the number of labels)
        template: prompt template; {} is replaced by each label
        device: torch device, e.g. cpu or cuda
        precision: weight dtype: fp32, bf16 or fp16
    """
    label_list = [label.strip() for label in labels.split(",") if label.strip()]
    if not label_list:
        raise UsageError("--labels must name at least one label, e.g. --labels 'cat,dog'")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    good, bad = readable_images(list(images))
    for path, reason in bad:
        print(f"clipforge classify: error: {reason}" if path in reason else f"clipforge classify: error: {path}: {reason}",
              file=sys.stderr)
    if not good:
        return 1
    net, transform, tokenizer = load_clipforge(model, pretrained, device, precision=precision)
    results = classify_images(net, tokenizer, transform, good, label_list, top_k, (template,), device)
    for row in results:
        print(row["path"])
        for label, prob in row["predictions"]:
            print(f"  {prob:7.2%}  {label}")
    return 1 if bad else 0
