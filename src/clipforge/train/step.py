"""One optimizer step's forward/backward, with GradCache-style accumulation over micro-batches.

With ``k`` micro-batches the loss is that of one batch ``k`` times larger: every micro-batch's
features are first computed without gradient, then each micro-batch is recomputed with gradient
and scored against the cached features of all the others. The sum of those backward passes is
exactly the big batch's gradient, at the memory of one micro-batch. The logit scale (and bias)
are used with gradient in one pass only, so their gradient is not counted ``k`` times.

Captioning models (CoCa: outputs with ``logits`` and ``labels``) add the captioning cross-entropy.
It is a per-token mean, so accumulation is exact too: each micro-batch contributes its token sum
divided by the token count of the whole batch (counted from the texts before the first pass).

With a ``teacher`` (distillation) the loss is ``DistillClipLoss`` against the teacher's outputs on
all micro-batches, computed once before the passes; the accumulation above is exact for it too.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..loss import CoCaLoss
from ..precision import autocast
from .distributed import no_grad_sync
from .teacher import Teacher

MicroBatch = Tuple[Tensor, Tensor]


def _captioning(out: Dict[str, Optional[Tensor]]) -> bool:
    return out.get("logits") is not None and out.get("labels") is not None


def captioning_loss_fn(loss_fn: Callable) -> CoCaLoss:
    """``loss_fn`` when it is the CoCa loss; a captioning model trained with a contrastive loss alone
    would silently skip its decoder, so anything else is refused."""
    if not isinstance(loss_fn, CoCaLoss):
        raise ValueError(f"a captioning (CoCa) model trains with CoCaLoss, got {type(loss_fn).__name__} "
                         "(the trainer's loss.kind=auto picks it)")
    return loss_fn


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
    teacher: Optional[Teacher] = None,
) -> Tensor:
    """Accumulate gradients of the contrastive loss over ``micro_batches``; returns the (detached) loss."""
    moved = [(img.to(device, non_blocking=True), txt.to(device, non_blocking=True)) for img, txt in micro_batches]
    if teacher is not None:  # distillation: the teacher scores all micro-batches once, without gradient
        loss_fn = teacher.objective(loss_fn, moved)
    if len(moved) == 1:
        images, texts = moved[0]
        with autocast(precision, device):
            out = model(images, texts)
            if _captioning(out):
                coca = captioning_loss_fn(loss_fn)
                loss = sum(coca(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                out["logit_scale"]))
            else:
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
    caption_total: Optional[Tensor] = None
    for j, (images, texts) in enumerate(moved):
        # Gradients sync across ranks only on the last micro-batch, which is also the one that
        # carries the logit scale's gradient (so DDP sees every parameter used when it reduces).
        with no_grad_sync(model, skip=j < last), autocast(precision, device):
            out = model(images, texts)
            all_images = torch.cat(cached_images[:j] + [out["image_features"]] + cached_images[j + 1:])
            all_texts = torch.cat(cached_texts[:j] + [out["text_features"]] + cached_texts[j + 1:])
            if _captioning(out):
                coca = captioning_loss_fn(loss_fn)
                if caption_total is None:  # the labels are the texts shifted by one (CoCa.forward)
                    caption_total = torch.zeros((), device=device)
                    num_tokens = sum(int((t[:, 1:] != coca.pad_id).sum()) for _, t in moved)
                contrastive = coca.clip_loss_weight * _loss(coca.contrastive_loss, out, all_images,
                                                            all_texts, with_scale_grad=j == last)
                caption = coca.caption_loss_weight * coca.caption_loss(out["logits"], out["labels"],
                                                                       num_tokens=max(num_tokens, 1))
                caption_total = caption_total + caption.detach()
                loss = contrastive + caption
            else:
                loss = _loss(loss_fn, out, all_images, all_texts, with_scale_grad=j == last)
            backward(loss)
    if caption_total is not None:  # the contrastive value of the whole batch plus all captioning terms
        return (contrastive.detach() + caption_total).detach()
    return loss.detach()
