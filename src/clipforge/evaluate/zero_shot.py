"""Zero-shot classification: text-derived class weights, then cosine logits against image features."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from tqdm import tqdm

from .features import Device, iter_image_features, model_device
from .metrics import classification_metrics
from .templates import Template, expand_prompts

# clip_benchmark and OpenCLIP scale cosine similarities by a fixed 100, not the model's logit_scale.
ZERO_SHOT_LOGIT_SCALE = 100.0


def build_zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    num_classes_per_batch: Optional[int] = 10,
    device: Optional[Device] = None,
    use_tqdm: bool = False,
) -> torch.Tensor:
    """Class weights [D, C]: per class, the mean of its normalised prompt embeddings, normalised again.

    Classes are encoded ``num_classes_per_batch`` at a time (all at once if None) so that the
    activations of all ``C * len(templates)`` prompts are never held together. The arithmetic is
    OpenCLIP's ``build_zero_shot_classifier``, so the result is equal to it bit for bit.
    """
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError("need at least one class name and one template")
    dev = model_device(model, device)
    step = num_classes_per_batch or len(classnames)
    starts = range(0, len(classnames), step)
    weights = []
    with torch.no_grad():
        for start in tqdm(starts, desc="classes", disable=not use_tqdm, unit_scale=step):
            batch = list(classnames[start:start + step])
            tokens = tokenizer(expand_prompts(batch, templates)).to(dev)
            emb = model.encode_text(tokens, normalize=True)  # [n_cls * n_tpl, D], class-major
            emb = emb.reshape(len(batch), len(templates), -1).mean(dim=1)  # [n_cls, D]
            emb = emb / emb.norm(dim=1, keepdim=True)
            weights.append(emb.T)  # [D, n_cls]
    return torch.cat(weights, dim=1)


def zero_shot_classify(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    loader: Iterable,
    device: Optional[Device] = None,
    amp: bool = False,
    use_tqdm: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32, targets [N]) over an ``(images, labels)`` loader; preds = logits.argmax(1)."""
    dev = model_device(model, device)
    clf = classifier.to(dev).float()
    logits, targets = [], []
    for feats, y in iter_image_features(model, loader, dev, amp, use_tqdm=use_tqdm, desc="zero-shot"):
        logits.append(ZERO_SHOT_LOGIT_SCALE * feats.to(dev) @ clf)
        targets.append(torch.as_tensor(y))
    if not logits:
        raise ValueError("the data loader yielded no batches")
    return torch.cat(logits).cpu(), torch.cat(targets)


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer,
    loader: Iterable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: Optional[Device] = None,
    amp: bool = False,
    use_tqdm: bool = True,
) -> Dict[str, float]:
    """clip_benchmark's zero-shot metrics: ``acc1``, ``acc5`` (NaN below 5 classes), ``mean_per_class_recall``."""
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device,
                                            use_tqdm=use_tqdm)
    logits, targets = zero_shot_classify(model, classifier, loader, device, amp, use_tqdm)
    return classification_metrics(logits, targets, num_classes=len(classnames))


def classify_images(
    model: torch.nn.Module,
    tokenizer,
    preprocess,
    image_paths: Sequence[Union[str, Path]],
    labels: Sequence[str],
    top_k: int = 5,
    templates: Sequence[Template] = ("a photo of a {}.",),
    device: Optional[Device] = None,
    batch_size: int = 32,
) -> List[Dict[str, object]]:
    """Rank ``labels`` for each image: ``[{"path": str, "predictions": [(label, probability), ...]}]``.

    Probabilities are a softmax over the labels of the model's own ``logit_scale`` times cosine
    similarity, as in CLIP's usage example; ``top_k`` is capped at the number of labels.
    """
    if not labels:
        raise ValueError("give at least one label")
    dev = model_device(model, device)
    classifier = build_zero_shot_classifier(model, tokenizer, labels, templates, device=dev)
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else ZERO_SHOT_LOGIT_SCALE
    k = min(top_k, len(labels))
    results = []
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start:start + batch_size]
        images = torch.stack([preprocess(_open_rgb(p)) for p in paths]).to(dev)
        with torch.no_grad():
            probs = (scale * model.encode_image(images, normalize=True) @ classifier).softmax(dim=-1)
        top_p, top_i = probs.float().cpu().topk(k, dim=-1)
        for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist()):
            results.append({"path": str(path), "predictions": [(labels[i], p) for i, p in zip(idx, ps)]})
    return results


def _open_rgb(path: Union[str, Path]) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
