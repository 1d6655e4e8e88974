"""Classification and retrieval metrics with clip_benchmark's definitions (its numbers, our code).

Retrieval follows clip_benchmark's ``zeroshot_retrieval``: a text query has exactly one correct image;
an image query is correct at k if ANY of its captions is among the top k texts. Ranks are 1-based
(1 = the best match came first) and count only strictly higher scores, so ties favour the query.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[float]:
    """Fraction of rows whose target is among the ``k`` highest logits, for each ``k`` in ``ks``."""
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {targets.shape[0]} targets")
    top = logits.topk(max(ks), dim=1).indices  # [N, max_k]
    hit = top == targets.view(-1, 1).to(top.device)  # [N, max_k]
    return [hit[:, :k].any(dim=1).sum().item() / len(targets) for k in ks]  # exact count / n, as clip_benchmark


def mean_per_class_recall(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Balanced accuracy: recall averaged over the classes present in ``targets`` (sklearn's definition)."""
    preds, targets = preds.view(-1).long().cpu(), targets.view(-1).long().cpu()
    n = int(max(preds.max(), targets.max())) + 1
    support = torch.bincount(targets, minlength=n)
    correct = torch.bincount(targets[preds == targets], minlength=n)
    present = support > 0
    return (correct[present].double() / support[present].double()).mean().item()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> Dict[str, float]:
    """clip_benchmark's single-label dict: ``acc1``, ``acc5`` (NaN with fewer than 5 classes), balanced recall."""
    if num_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, targets, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, targets, (1,)), float("nan")
    recall = mean_per_class_recall(logits.argmax(dim=1), targets)
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def text_query_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     batch_size: int = 1024) -> torch.Tensor:
    """1-based rank of each text's own image among all images [N_text] (text → image retrieval)."""
    ranks = []
    for start in range(0, len(text_emb), batch_size):
        scores = text_emb[start:start + batch_size] @ image_emb.T  # [b, N_img]
        own = scores.gather(1, text_to_image[start:start + batch_size].view(-1, 1))  # [b, 1]
        ranks.append((scores > own).sum(dim=1) + 1)
    return torch.cat(ranks)


def image_query_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      batch_size: int = 1024) -> torch.Tensor:
    """1-based rank of each image's best-ranked caption among all texts [N_img] (image → text retrieval)."""
    counts = torch.bincount(text_to_image, minlength=len(image_emb))
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).view(-1)[:5].tolist()
        raise ValueError(f"images without any caption (e.g. indices {missing}): their recall is undefined")
    ranks = []
    for start in range(0, len(image_emb), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(image_emb)))
        scores = image_emb[idx] @ text_emb.T  # [b, N_text]
        positive = text_to_image.view(1, -1) == idx.view(-1, 1)  # [b, N_text]
        best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values  # [b, 1]
        ranks.append((scores > best).sum(dim=1) + 1)
    return torch.cat(ranks)


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    recall_k: Sequence[int] = (1, 5, 10),
    batch_size: int = 1024,
) -> Dict[str, float]:
    """Recall@k, mean and median rank in both directions from L2-normalised embeddings.

    Keys use clip_benchmark's names: ``image_retrieval_*`` are text queries retrieving images,
    ``text_retrieval_*`` image queries retrieving captions. Scores are computed ``batch_size`` queries
    at a time, so memory stays O(batch_size * N) rather than O(N_text * N_img).
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    if len(text_to_image) != len(text_emb):
        raise ValueError(f"{len(text_emb)} text embeddings but {len(text_to_image)} text→image indices")
    ranks = {
        "image_retrieval": text_query_ranks(image_emb, text_emb, text_to_image, batch_size),
        "text_retrieval": image_query_ranks(image_emb, text_emb, text_to_image, batch_size),
    }
    out: Dict[str, float] = {}
    for k in recall_k:  # clip_benchmark's key order
        for name, r in ranks.items():
            out[f"{name}_recall@{k}"] = (r <= k).float().mean().item()
    for name, r in ranks.items():
        out[f"{name}_mean_rank"] = r.float().mean().item()
        out[f"{name}_median_rank"] = float(np.median(r.numpy()))
    return out
