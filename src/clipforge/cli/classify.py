"""``clipforge classify``: prints :func:`clipforge.evaluate.classify_images`'s ranking of labels per image."""
from __future__ import annotations

from typing import Optional

from ..evaluate.clip_benchmark_loader import load_clipforge
from ..evaluate.zero_shot import classify_images


def main(*images: str, labels: str, model: str = "ViT-B-32", pretrained: Optional[str] = None, top_k: int = 5,
         template: str = "a photo of a {}.", device: str = "cpu", precision: str = "fp32") -> int:
    """Zero-shot classify images against labels: the top-k labels of each image, with probabilities.

    Probabilities are a softmax over the labels of the model's logit scale times cosine similarity.

    Args:
        images: image files
        labels: comma-separated labels, e.g. 'cat,dog,a red car'
        model: architecture name, hf-hub:ORG/REPO or local-dir:PATH
        pretrained: weights: a pretrained tag or a checkpoint file (none: random weights)
        top_k: labels shown per image
        template: prompt template; {} is replaced by each label
        device: torch device, e.g. cpu or cuda
        precision: weight dtype: fp32, bf16 or fp16
    """
    label_list = [label.strip() for label in labels.split(",") if label.strip()]
    if not label_list:
        raise ValueError("--labels must name at least one label, e.g. --labels 'cat,dog'")
    net, transform, tokenizer = load_clipforge(model, pretrained, device, precision=precision)
    results = classify_images(net, tokenizer, transform, list(images), label_list, top_k, (template,), device)
    for row in results:
        print(row["path"])
        for label, prob in row["predictions"]:
            print(f"  {prob:7.2%}  {label}")
    return 0
