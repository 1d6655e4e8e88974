"""Run clip_benchmark itself on clipforge models.

clip_benchmark picks a model loader by ``--model_type`` from ``clip_benchmark.models.TYPE2FUNC``; a
loader takes ``(model_name, pretrained, cache_dir, device)`` and returns ``(model, transform, tokenizer)``.
``register_with_clip_benchmark()`` adds ``load_clipforge`` there under the type ``clipforge``.
From Python::

    from clipforge.evaluate.clip_benchmark_loader import register_with_clip_benchmark
    register_with_clip_benchmark()
    import sys, clip_benchmark.cli
    sys.argv = ["clip_benchmark", "eval", "--model_type", "clipforge", "--model", "ViT-B-32",
                "--pretrained", "/path/to/weights.safetensors", "--dataset", "cifar10",
                "--dataset_root", "/data/cifar10", "--output", "result.json"]
    clip_benchmark.cli.main()

or from a shell, the same through this module::

    python -m clipforge.evaluate.clip_benchmark_loader eval --model_type clipforge --model ViT-B-32 \\
        --pretrained /path/to/weights.safetensors --dataset cifar10 --dataset_root /data/cifar10

``--pretrained`` is a checkpoint file (or ``none`` for random weights); clipforge downloads nothing.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

MODEL_TYPE = "clipforge"


def load_clipforge(model_name: str, pretrained: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                   cache_dir: Optional[str] = None, precision: str = "fp32", **kwargs):
    """(model in eval mode, eval transform, tokenizer) — clip_benchmark's loader contract.

    ``cache_dir`` is accepted for that contract and unused (weights are local files); other keyword
    arguments go to ``clipforge.create_model_and_transforms``.
    """
    from clipforge import create_model_and_transforms, get_tokenizer  # lazy: keeps evaluate free of model code

    if pretrained is not None and str(pretrained).lower() in ("", "none"):
        pretrained = None
    model, _, transform = create_model_and_transforms(model_name, pretrained, precision=precision,
                                                      device=device, **kwargs)
    model.eval()
    return model, transform, get_tokenizer(model_name)


def register_with_clip_benchmark(model_type: str = MODEL_TYPE) -> None:
    """Make ``--model_type clipforge`` valid in clip_benchmark (idempotent)."""
    from clip_benchmark import models

    models.TYPE2FUNC[model_type] = load_clipforge
    if model_type not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(model_type)  # the same list object clip_benchmark.cli offers as choices


def main() -> int:
    """clip_benchmark's own command line with the clipforge loader registered."""
    register_with_clip_benchmark()
    from clip_benchmark.cli import main as clip_benchmark_main

    return clip_benchmark_main()


if __name__ == "__main__":
    raise SystemExit(main())
