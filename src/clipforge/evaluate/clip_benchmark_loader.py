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

``--pretrained`` is a checkpoint file or a pretrained tag (or ``none`` for random weights, which
``load_clipforge`` warns about and marks as ``model.random_weights``).

clip_benchmark's own ``clip_benchmark`` console script has no plug-in hook, so ``--model_type clipforge``
works only through this module (or after ``register_with_clip_benchmark()`` in Python). ``clipforge eval``
runs the same three tasks with clip_benchmark's metrics without clip_benchmark itself.
"""
from __future__ import annotations

import warnings
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
    model.random_weights = has_random_weights(model_name, pretrained)  # for result files to record
    if model.random_weights:
        warnings.warn(f"{model_name} has random weights (no pretrained tag or checkpoint given): its outputs "
                      f"mean nothing; pass pretrained=TAG or a file (see `clipforge pretrained`)", stacklevel=2)
    return model, transform, get_tokenizer(model_name)


def has_random_weights(model_name: str, pretrained: Optional[str]) -> bool:
    """Whether ``load_clipforge(model_name, pretrained)`` loads no weights (hub and local folders carry theirs)."""
    from clipforge.factory import HF_HUB_PREFIX, LOCAL_DIR_PREFIX

    no_file = pretrained is None or str(pretrained).lower() in ("", "none")
    return no_file and not str(model_name).startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))


def topk_accuracy_numpy2(output: torch.Tensor, target: torch.Tensor, topk=(1,)):
    """clip_benchmark's ``accuracy`` (same arithmetic) without its ``float(1-element array)``, which NumPy >= 2 rejects."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def shim_clip_benchmark_accuracy() -> bool:
    """Replace clip_benchmark's ``accuracy`` where it crashes (1.6.2 under NumPy >= 2); True if it was replaced.

    clip_benchmark 1.6.2 computes top-k accuracy with ``float(tensor.numpy())`` on a shape-(1,)
    array: a ``TypeError`` for every model type on NumPy 2.4. Its zero-shot and linear-probe
    modules both use it, so both get the fixed copy; a release that works is left alone.
    """
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    try:
        zeroshot_classification.accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), topk=(1,))
        return False
    except TypeError:
        for module in (zeroshot_classification, linear_probe):
            module.accuracy = topk_accuracy_numpy2
        return True


def register_with_clip_benchmark(model_type: str = MODEL_TYPE) -> None:
    """Make ``--model_type clipforge`` valid in clip_benchmark (idempotent), with its accuracy NumPy-2-safe."""
    from clip_benchmark import models

    models.TYPE2FUNC[model_type] = load_clipforge
    if model_type not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(model_type)  # the same list object clip_benchmark.cli offers as choices
    shim_clip_benchmark_accuracy()


def main() -> int:
    """clip_benchmark's own command line with the clipforge loader registered."""
    register_with_clip_benchmark()
    from clip_benchmark.cli import main as clip_benchmark_main

    return clip_benchmark_main()


if __name__ == "__main__":
    raise SystemExit(main())
