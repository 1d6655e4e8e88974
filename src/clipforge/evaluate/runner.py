"""One evaluation run → a result dict in clip_benchmark's JSON shape, optionally written to a file.

``run_eval`` takes a built model (``clip_benchmark_loader.load_clipforge`` loads one by name, as
``clipforge eval`` does) and returns the result; it prints nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from ..atomic import write_text
from ..precision import amp_precision
from .captioning import evaluate_captioning, require_captioner
from .datasets import TASKS, captions_collate, open_eval_dataset
from .features import model_device
from .linear_probe import evaluate_linear_probe
from .retrieval import evaluate_retrieval
from .templates import DATASETS, Template, get_templates
from .zero_shot import evaluate_zero_shot

PathLike = Union[str, Path]
DEFAULT_OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}.json"  # clip_benchmark's default
# captioning reads the retrieval data (images with all their captions), as in clip_benchmark
EVAL_TASKS = TASKS + ("captioning",)


def _loader(dataset, batch_size: int, num_workers: int, retrieval: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=captions_collate if retrieval else None)


def resolve_templates(templates: Union[str, Sequence[Template], None], dataset, dataset_name: str) -> List[Template]:
    """Templates asked for (a list, or a built-in set's name), else the dataset's own, else the
    built-in set named like the dataset, else OpenAI's 80 ImageNet templates."""
    if isinstance(templates, str):
        return get_templates(templates)
    if templates:
        return list(templates)
    if getattr(dataset, "templates", None):
        return list(dataset.templates)
    return get_templates(dataset_name if dataset_name in DATASETS else "imagenet1k")


def run_eval(
    task: str,
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    dataset: PathLike,
    *,
    dataset_name: Optional[str] = None,
    model_name: str = "",
    pretrained: str = "",
    output: Optional[PathLike] = None,
    split: str = "test",
    train_split: str = "train",
    batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    amp: bool = False,
    recall_k: Sequence[int] = (1, 5, 10),
    classnames: Optional[List[str]] = None,
    templates: Union[str, Sequence[Template], None] = None,
    image_root: Optional[PathLike] = None,
    language: str = "en",
    use_tqdm: bool = True,
    generate_kwargs: Optional[Dict[str, Any]] = None,
) -> Dict[str, object]:
    """Evaluate ``model`` on the dataset at ``dataset`` (see ``open_eval_dataset`` for accepted layouts).

    ``task`` is ``zeroshot_classification``, ``zeroshot_retrieval``, ``linear_probe`` (which reads
    ``train_split`` of the same dataset for training) or ``captioning`` (a model with ``generate``,
    e.g. CoCa, on retrieval data; ``generate_kwargs`` go to ``model.generate``). ``output`` may hold
    clip_benchmark's placeholders ``{dataset} {model} {pretrained} {task} {language}``. ``amp`` is clip_benchmark's
    ``--amp``: autocast in :func:`clipforge.precision.amp_precision` (fp16 on CUDA, bf16 elsewhere).
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")
    if task == "captioning":
        require_captioner(model, model_name)
    name = dataset_name or Path(dataset).stem
    precision = amp_precision(model_device(model, device)) if amp else "fp32"
    model.eval()
    retrieval = task in ("zeroshot_retrieval", "captioning")
    ds = open_eval_dataset(dataset, "zeroshot_retrieval" if retrieval else task, transform, split, image_root,
                           classnames)
    loader = _loader(ds, batch_size, num_workers, retrieval)
    if task == "captioning":
        metrics = evaluate_captioning(model, tokenizer, loader, device, precision, use_tqdm, **(generate_kwargs or {}))
    elif retrieval:
        metrics = evaluate_retrieval(model, tokenizer, loader, recall_k, device, precision, use_tqdm)
    elif task == "zeroshot_classification":
        names = classnames or ds.classnames
        if not names:
            raise ValueError(f"{dataset} has no class names: pass classnames=[...]")
        metrics = evaluate_zero_shot(model, tokenizer, loader, names, resolve_templates(templates, ds, name),
                                     device, precision, use_tqdm)
    else:
        train_ds = open_eval_dataset(dataset, task, transform, train_split, image_root, classnames)
        num_classes = len(classnames or ds.classnames or []) or None
        metrics = evaluate_linear_probe(model, _loader(train_ds, batch_size, num_workers, False), loader,
                                        num_classes, device, precision, use_tqdm=use_tqdm)
    result = {"dataset": name, "model": model_name, "pretrained": pretrained, "task": task,
              "metrics": metrics, "language": language}
    if getattr(model, "random_weights", False):  # said in the file too, not only in a warning
        result["random_weights"] = True
    if output is not None:
        path = Path(str(output).format(dataset=name.replace("/", "_"), model=model_name,
                                       pretrained=Path(pretrained).name if pretrained else "",
                                       task=task, language=language))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(result))
    return result

