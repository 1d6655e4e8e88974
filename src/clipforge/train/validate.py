"""Validation during training: retrieval recall and contrastive loss on a held-out caption set.

Images and captions are encoded once per evaluation (by the evaluation module); the validation
loss is then computed from those embeddings, pairing each image with its first caption, in
batches of ``val.batch_size`` pairs (the loss depends on the batch size, so it is fixed).
A captioning model (CoCa) also writes a caption per validation image with its ``generate``
(OpenCLIP's defaults) and reports clip_benchmark's caption metrics against all of the image's
captions, as ``caption_Bleu_4``, ``caption_CIDEr``, ...
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch.utils.data import DataLoader

from ..data.loader import DataConfig, caption_groups
from ..evaluate.captioning import can_generate, evaluate_captioning
from ..evaluate.datasets import CaptionedImages, captions_collate
from ..evaluate.metrics import retrieval_metrics
from ..evaluate.retrieval import retrieval_embeddings
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
