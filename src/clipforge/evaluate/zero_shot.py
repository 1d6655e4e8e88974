"""Zero-shot classification: text-derived class weights, then cosine logits against image features."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from ..transforms import load_image_for
from .features import Device, encode_text_batched, iter_image_features, model_device
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
    bucket_size: Optional[int] = None,
) -> torch.Tensor:
    """Class weights [D, C]: per class, the mean of its normalised prompt embeddings, normalised again.

    By default classes are encoded ``num_classes_per_batch`` at a time (all at once if None) so that
    the activations of all ``C * len(templates)`` prompts are never held together; the arithmetic is
    OpenCLIP's ``build_zero_shot_classifier``, so the result is equal to it bit for bit.

    With ``bucket_size`` the prompts are bucketed instead: all of them are tokenized, sorted by length
    and encoded ``bucket_size`` at a time (:func:`encode_text_batched`), so each batch stops at its own
    longest prompt. Faster for templates of mixed length, equal to the default up to 1e-6, and it works
    unchanged on a model prepared by ``clipforge.inference`` (bf16 mode, int8).
    """
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError("need at least one class name and one template")
    dev = model_device(model, device)
    with torch.no_grad():
        if bucket_size is not None:
            tokens = tokenizer(expand_prompts(classnames, templates)).to(dev)
            emb = encode_text_batched(model, tokens, bucket_size, normalize=True, use_tqdm=use_tqdm)
            return _class_weights(emb, len(classnames), len(templates))
        step = num_classes_per_batch or len(classnames)
        weights = []
        for start in tqdm(range(0, len(classnames), step), desc="classes", disable=not use_tqdm, unit_scale=step):
            batch = list(classnames[start:start + step])
            tokens = tokenizer(expand_prompts(batch, templates)).to(dev)
            weights.append(_class_weights(model.encode_text(tokens, normalize=True), len(batch), len(templates)))
    return torch.cat(weights, dim=1)


def _class_weights(emb: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """Normalised prompt embeddings [n_classes * n_templates, D], class-major -> class weights [D, n_classes]."""
    emb = emb.reshape(n_classes, n_templates, -1).mean(dim=1)  # [n_cls, D]
    emb = emb / emb.norm(dim=1, keepdim=True)
    return emb.T


def zero_shot_classify(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    loader: Iterable,
    device: Optional[Device] = None,
    precision: str = "fp32",
    use_tqdm: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32, targets [N]) over an ``(images, labels)`` loader; preds = logits.argmax(1)."""
    dev = model_device(model, device)
    clf = classifier.to(dev).float()
    logits, targets = [], []
    for feats, y in iter_image_features(model, loader, dev, precision, use_tqdm=use_tqdm, desc="zero-shot"):
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
    precision: str = "fp32",
    use_tqdm: bool = True,
) -> Dict[str, float]:
    """clip_benchmark's zero-shot metrics: ``acc1``, ``acc5`` (NaN below 5 classes), ``mean_per_class_recall``."""
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device,
                                            use_tqdm=use_tqdm)
    logits, targets = zero_shot_classify(model, classifier, loader, device, precision, use_tqdm)
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
        images = torch.stack([preprocess(load_image_for(preprocess, p)) for p in paths]).to(dev)
        with torch.no_grad():
            probs = (scale * model.encode_image(images, normalize=True) @ classifier).softmax(dim=-1)
        top_p, top_i = probs.float().cpu().topk(k, dim=-1)
        for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist()):
            results.append({"path": str(path), "predictions": [(labels[i], p) for i, p in zip(idx, ps)]})
    return results

