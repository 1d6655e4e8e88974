"""One optimizer step's forward/backward, with GradCache-style accumulation over micro-batches.

With ``k`` micro-batches the loss is that of one batch ``k`` times larger: every micro-batch's
features are first computed without gradient, then each micro-batch is recomputed with gradient
and scored against the cached features of all the others. The sum of those backward passes is
exactly the big batch's gradient, at the memory of one micro-batch. The logit scale (and bias)
are used with gradient in one pass only, so their gradient is not counted ``k`` times.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..precision import autocast
from .distributed import no_grad_sync

MicroBatch = Tuple[Tensor, Tensor]


def _loss(loss_fn: Callable, out: Dict[str, Optional[Tensor]], images: Tensor, texts: Tensor,
          with_scale_grad: bool) -> Tensor:
    scale, bias = out["logit_scale"], out.get("logit_bias")
    if not with_scale_grad:
        scale = scale.detach()
        bias = bias.detach() if bias is not None else None
    return loss_fn(images, texts, scale, bias)


def forward_backward(
    model: nn.Module,
    loss_fn: Callable,
    micro_batches: Sequence[MicroBatch],
    precision: str,
    device: torch.device,
    backward: Callable[[Tensor], None] = lambda loss: loss.backward(),
) -> Tensor:
    """Accumulate gradients of the contrastive loss over ``micro_batches``; returns the (detached) loss."""
    moved = [(img.to(device, non_blocking=True), txt.to(device, non_blocking=True)) for img, txt in micro_batches]
    if len(moved) == 1:
        images, texts = moved[0]
        with autocast(precision, device):
            out = model(images, texts)
            loss = _loss(loss_fn, out, out["image_features"], out["text_features"], True)
        backward(loss)
        return loss.detach()

    cached_images: List[Tensor] = []
    cached_texts: List[Tensor] = []
    with torch.no_grad(), autocast(precision, device):
        for images, texts in moved:
            out = model(images, texts)
            cached_images.append(out["image_features"])
            cached_texts.append(out["text_features"])
    last = len(moved) - 1
    for j, (images, texts) in enumerate(moved):
        # Gradients sync across ranks only on the last micro-batch, which is also the one that
        # carries the logit scale's gradient (so DDP sees every parameter used when it reduces).
        with no_grad_sync(model, skip=j < last), autocast(precision, device):
            out = model(images, texts)
            all_images = torch.cat(cached_images[:j] + [out["image_features"]] + cached_images[j + 1:])
            all_texts = torch.cat(cached_texts[:j] + [out["text_features"]] + cached_texts[j + 1:])
            loss = _loss(loss_fn, out, all_images, all_texts, with_scale_grad=j == last)
            backward(loss)
    return loss.detach()
