"""Zero-shot image↔text retrieval over a loader of ``(images, list of captions per image)``."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from .features import Device, iter_image_features, model_device, text_features
from .metrics import retrieval_metrics


def retrieval_embeddings(
    model: torch.nn.Module,
    tokenizer,
    loader: Iterable,
    device: Optional[Device] = None,
    precision: str = "fp32",
    use_tqdm: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb [N_img, D], text_emb [N_text, D], text_to_image [N_text]), normalised, on CPU.

    Captions are encoded with their batch of images, so at most one batch of activations is live.
    """
    dev = model_device(model, device)
    images, texts, owner = [], [], []
    n_seen = 0
    for feats, captions in iter_image_features(model, loader, dev, precision, use_tqdm=use_tqdm, desc="retrieval"):
        if len(captions) != len(feats):
            raise ValueError(f"a batch has {len(feats)} images but {len(captions)} caption lists; "
                             "use clipforge.evaluate.datasets.captions_collate")
        flat = [c for caps in captions for c in caps]
        if flat:
            texts.append(text_features(model, tokenizer, flat, dev, precision, batch_size=len(flat)))
        owner.extend(n_seen + i for i, caps in enumerate(captions) for _ in caps)
        images.append(feats)
        n_seen += len(feats)
    if not texts:
        raise ValueError("the data loader yielded no images with captions")
    return torch.cat(images), torch.cat(texts), torch.tensor(owner, dtype=torch.long)


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer,
    dataloader: Iterable,
    recall_k: Sequence[int] = (1, 5, 10),
    device: Optional[Device] = None,
    precision: str = "fp32",
    use_tqdm: bool = True,
) -> Dict[str, float]:
    """clip_benchmark's retrieval metrics (``image_retrieval_recall@k``, ``text_retrieval_recall@k``)
    plus mean/median ranks; see :func:`clipforge.evaluate.metrics.retrieval_metrics`."""
    image_emb, text_emb, owner = retrieval_embeddings(model, tokenizer, dataloader, device, precision, use_tqdm)
    return retrieval_metrics(image_emb, text_emb, owner, recall_k)
