"""Validation during training: retrieval recall and contrastive loss on a held-out caption set.

Images and captions are encoded once per evaluation (by the evaluation module); the validation
loss is then computed from those embeddings, pairing each image with its first caption, in
batches of ``val.batch_size`` pairs (the loss depends on the batch size, so it is fixed).
A captioning model (CoCa) also writes a caption per validation image with its ``generate``
(OpenCLIP's defaults) and reports clip_benchmark's caption metrics against all of the image's
captions, as ``caption_Bleu_4``, ``caption_CIDEr``, ...

Zero-shot classification (``val.zeroshot``, OpenCLIP's ``--imagenet-val``) is clipforge.evaluate's
own: :func:`~clipforge.evaluate.zero_shot.evaluate_zero_shot` on the data
:func:`~clipforge.evaluate.datasets.open_eval_dataset` opens, with the class names and templates
read here, so a logged ``zeroshot_acc1`` is what ``clipforge eval`` reports for the same weights.
``clipforge wise-ft --data`` scores its merged models with the same functions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Subset

from ..data.loader import DataConfig, caption_groups
from ..evaluate.captioning import can_generate, evaluate_captioning
from ..evaluate.datasets import CaptionedImages, captions_collate
from ..evaluate.metrics import retrieval_metrics
from ..evaluate.retrieval import retrieval_embeddings
from ..evaluate.runner import resolve_templates
from ..evaluate.templates import Template
from ..evaluate.zero_shot import evaluate_zero_shot
from ..loss import ClipLoss, SigLipLoss
from ..models.generation import max_sequence_length
from .config import ValSettings


def build_val_loader(cfg: ValSettings, transform: Callable) -> DataLoader:
    """Images with all their captions, in file order; the caption file is read as training data is."""
    source = DataConfig(kind=cfg.kind, train_data=cfg.data, img_key=cfg.img_key, caption_key=cfg.caption_key)
    ds = CaptionedImages.from_groups(caption_groups(source), transform)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                      collate_fn=captions_collate)


@torch.no_grad()
def validate(model: torch.nn.Module, tokenizer: Callable, loader: DataLoader, batch_size: int,
             loss_kind: str, device: torch.device, progress: bool = False,
             precision: str = "fp32") -> Dict[str, float]:
    """``val_loss`` plus clip_benchmark's retrieval metrics (``image_retrieval_recall@k`` ...), and
    for captioning models its caption metrics (``caption_CIDEr`` ...).

    The embeddings are computed under ``autocast(precision)`` (:mod:`clipforge.precision`); the
    default fp32 keeps validation exact whatever precision training runs in.
    """
    was_training = model.training
    model.eval()
    try:
        image_emb, text_emb, owner = retrieval_embeddings(model, tokenizer, loader, device, precision,
                                                         use_tqdm=progress)
        metrics = retrieval_metrics(image_emb, text_emb, owner)
        first = torch.full((len(image_emb),), -1, dtype=torch.long)
        for t in range(len(owner) - 1, -1, -1):  # backwards, so the first caption of each image wins
            first[owner[t]] = t
        scale = model.logit_scale.exp().float().cpu()
        bias = model.logit_bias.float().cpu() if getattr(model, "logit_bias", None) is not None else None
        loss_fn = SigLipLoss() if loss_kind == "siglip" else ClipLoss()
        total, pairs = 0.0, 0
        for start in range(0, len(image_emb), batch_size):
            img = image_emb[start:start + batch_size]
            txt = text_emb[first[start:start + batch_size]]
            if len(img) < 2:
                break  # a 1-pair "batch" has no negatives
            total += loss_fn(img, txt, scale, bias).item() * len(img)
            pairs += len(img)
        metrics["val_loss"] = total / max(pairs, 1)
        if can_generate(model):
            # OpenCLIP's defaults, within the model's text context (tiny test models have short ones)
            seq_len = min(30, max_sequence_length(model))
            captions = evaluate_captioning(model, tokenizer, loader, device, precision, use_tqdm=progress,
                                           seq_len=seq_len, min_seq_len=min(5, seq_len - 1))
            metrics.update({f"caption_{k}": v for k, v in captions.items()})
    finally:
        model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


# -- zero-shot classification ---------------------------------------------------------------------------
NamesSpec = Union[str, Sequence[str], None]
ZEROSHOT_PREFIX = "zeroshot_"
SUBSET_SEED = 0  # max_images draws the same images in every run and at every validation


def _read_list(path: Path, key: str, where: str) -> Optional[List[str]]:
    """``key``'s list from a JSON file ({"classes": [...], "templates": [...]} or a bare list), or a text file's lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {path} is not valid JSON ({e})") from e
    if isinstance(data, dict):
        data = data.get(key, data.get("classnames") if key == "classes" else None)
    if data is not None and not (isinstance(data, list) and all(isinstance(x, str) for x in data)):
        raise ValueError(f"{where}: {path} must hold a list of strings (or a {key!r} list)")
    return data


def read_classnames(spec: NamesSpec, where: str = "classnames") -> Optional[List[str]]:
    """Class names from a list, a JSON file (``classes``) or a text file (one per line); None stays None."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return [str(c) for c in spec]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file {spec!r} (give a list, a JSON or a text file)")
    names = _read_list(path, "classes", where)
    if not names:
        raise ValueError(f"{where}: {path} holds no class names")
    return names


def read_templates(spec: NamesSpec, classnames_spec: NamesSpec = None,
                   where: str = "templates") -> Optional[List[Template]]:
    """Templates from a list, a JSON/text file or a built-in set's name; None: the classnames JSON's, if it has any."""
    if spec is None:
        if isinstance(classnames_spec, str) and classnames_spec.lower().endswith(".json"):
            return _read_list(Path(classnames_spec), "templates", where) or None
        return None
    if not isinstance(spec, str):
        templates = list(spec)
    elif Path(spec).is_file():
        templates = _read_list(Path(spec), "templates", where)
    else:
        from ..evaluate.templates import get_templates

        try:
            templates = get_templates(spec)
        except KeyError as e:
            raise ValueError(f"{where}: {spec!r} is neither a file nor a built-in template set ({e.args[0]})") from None
    if not templates:
        raise ValueError(f"{where}: no templates in {spec!r}")
    bad = [t for t in templates if isinstance(t, str) and "{" not in t]
    if bad:
        raise ValueError(f"{where}: templates need a {{}} where the class name goes, e.g. 'a photo of a {{}}.'; "
                         f"got {bad[:3]}")
    return templates


@dataclass
class ZeroShotTask:
    """A labelled image set ready for :func:`zeroshot_metrics`: its loader, class names and templates."""

    loader: DataLoader
    classnames: List[str]
    templates: List[Template]
    num_images: int


def build_zeroshot_task(data: str, transform: Callable, classnames: NamesSpec = None, templates: NamesSpec = None,
                        batch_size: int = 256, max_images: Optional[int] = None, workers: int = 0,
                        where: str = "zeroshot") -> ZeroShotTask:
    """Open ``data`` as ``clipforge eval`` does (an ImageFolder, or a ``filepath,label`` table) with its names.

    Given class names replace an ImageFolder's folder names in sorted-folder order, so their count
    must match. ``max_images`` keeps a fixed random subset (seed 0), in file order.
    """
    from ..evaluate.datasets import open_eval_dataset

    names = read_classnames(classnames, f"{where}.classnames")
    ds = open_eval_dataset(data, "zeroshot_classification", transform, classnames=names)
    found = getattr(ds, "classnames", None)
    if names is not None and found is not None and len(found) != len(names):
        raise ValueError(f"{where}.classnames: {len(names)} names, but {data} has {len(found)} classes ({found[:5]} ...)")
    names = names or found
    if not names:
        raise ValueError(f"{where}: {data} has no class names; set {where}.classnames")
    chosen = read_templates(templates, classnames, f"{where}.templates")
    chosen = resolve_templates(chosen, ds, Path(data).name)
    n = len(ds)
    if n == 0:
        raise ValueError(f"{where}: {data} holds no images")
    if max_images is not None and max_images < n:
        g = torch.Generator().manual_seed(SUBSET_SEED)
        keep = torch.randperm(n, generator=g)[:max_images].sort().values  # [max_images]
        ds, n = Subset(ds, keep.tolist()), max_images
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return ZeroShotTask(loader, list(names), list(chosen), n)


@torch.no_grad()
def zeroshot_metrics(model: torch.nn.Module, tokenizer: Callable, task: ZeroShotTask, device: torch.device,
                     precision: str = "fp32", progress: bool = False) -> Dict[str, float]:
    """``zeroshot_acc1``, ``zeroshot_acc5`` (only with 5 classes or more) and ``zeroshot_mean_per_class_recall``.

    The classifier is rebuilt from the text tower every time: fine-tuning changes it too.
    """
    was_training = model.training
    model.eval()
    try:
        metrics = evaluate_zero_shot(model, tokenizer, task.loader, task.classnames, task.templates, device,
                                     precision, use_tqdm=progress)
    finally:
        model.train(was_training)
    return {ZEROSHOT_PREFIX + k: float(v) for k, v in metrics.items() if not math.isnan(v)}


def accuracy_drops(baseline: Dict[str, float], now: Dict[str, float]) -> Dict[str, float]:
    """``<metric>_drop`` = baseline - now for every metric both have (positive: accuracy was lost)."""
    return {f"{k}_drop": baseline[k] - v for k, v in now.items() if k in baseline}
