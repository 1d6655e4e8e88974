"""Contrastive losses for CLIP / SigLIP training, numerically matching ``open_clip.loss``.

* :class:`ClipLoss` - symmetric InfoNCE with OpenCLIP's global / ``local_loss`` /
  ``gather_with_grad`` distributed semantics.
* :class:`ChunkedClipLoss` - the same loss and gradients, computed in row blocks by a
  custom autograd function so that the B x B logits never exist at once (memory
  O(chunk_size * B) instead of O(B^2)).
* :class:`SigLipLoss` - pairwise sigmoid loss, distributed by passing text features
  around the ranks.
* :class:`CoCaLoss` - ``ClipLoss`` on the contrastive embeddings plus the captioning
  cross-entropy (padding ignored), weighted as ``open_clip.loss.CoCaLoss``.
* :class:`DistillClipLoss` - ``ClipLoss`` plus the cross-entropy of the student's logits
  against a frozen teacher's softmaxed logits, as ``open_clip.loss.DistillClipLoss``.

All losses take ``(image_features, text_features, logit_scale, logit_bias)`` where
``logit_scale`` is the already-exponentiated temperature, as in OpenCLIP.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed_ops import (
    all_gather_with_grad,
    all_reduce_with_grad,
    gather_features,
    neighbour_exchange_bidir_with_grad,
    neighbour_exchange_with_grad,
)

__all__ = [
    "ClipLoss",
    "ChunkedClipLoss",
    "CoCaLoss",
    "DistillClipLoss",
    "SigLipLoss",
    "clip_loss",
    "chunked_clip_loss",
    "chunked_cross_entropy",
    "siglip_loss",
]

LossOutput = Union[Tensor, Dict[str, Tensor]]
DEFAULT_CHUNK_SIZE = 1024


# --------------------------------------------------------------------------------------
# Plain InfoNCE
# --------------------------------------------------------------------------------------


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Optional[Tensor] = None,
) -> Tensor:
    """Single-process symmetric InfoNCE (materialises the B x B logits)."""
    return ClipLoss()(image_features, text_features, logit_scale, logit_bias)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE, bit-for-bit the computation of ``open_clip.loss.ClipLoss``.

    Distributed modes (``world_size > 1``):

    * global (default): every rank builds the full global logits and the loss over all
      pairs; without ``gather_with_grad`` only this rank's slice carries gradient.
    * ``local_loss``: this rank's rows/columns against all gathered features, labels
      offset by ``rank * local_batch``.

    ``chunk_size`` switches to the memory-bounded exact computation of
    :class:`ChunkedClipLoss` (same value and gradients up to float rounding).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.chunk_size = chunk_size
        self._labels: Dict[Tuple[torch.device, int], Tensor] = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> Tensor:
        """Index of the positive column for each local row."""
        key = (device, num_logits)
        if key in self._labels:
            return self._labels[key]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self._labels = {key: labels}
        return labels

    def _gather(self, image_features: Tensor, text_features: Tensor) -> Tuple[Tensor, Tensor]:
        return gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )

    def get_logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """``(logits_per_image, logits_per_text)`` exactly as OpenCLIP forms them."""
        if self.world_size > 1:
            all_images, all_texts = self._gather(image_features, text_features)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_texts.T
                per_text = logit_scale * text_features @ all_images.T
            else:
                per_image = logit_scale * all_images @ all_texts.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            # A shared bias shifts every row and column equally, so it leaves the
            # softmax cross-entropy unchanged; it is applied only for logit parity.
            per_image = per_image + logit_bias
            per_text = per_text + logit_bias
        return per_image, per_text

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor] = None,
        output_dict: bool = False,
    ) -> LossOutput:
        if self.chunk_size is not None:
            loss = self._chunked_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
            labels = self.get_ground_truth(image_features.device, per_image.shape[0])
            loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss

    def _chunked_loss(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor],
    ) -> Tensor:
        assert self.chunk_size is not None
        chunk = self.chunk_size
        if self.world_size > 1 and self.local_loss:
            all_images, all_texts = self._gather(image_features, text_features)
            offset = image_features.shape[0] * self.rank
            per_image = chunked_cross_entropy(image_features, all_texts, logit_scale, logit_bias, offset, chunk)
            per_text = chunked_cross_entropy(text_features, all_images, logit_scale, logit_bias, offset, chunk)
            return (per_image + per_text) / 2
        if self.world_size > 1:
            image_features, text_features = self._gather(image_features, text_features)
        return chunked_clip_loss(image_features, text_features, logit_scale, logit_bias, chunk)


class CoCaLoss(ClipLoss):
    """CoCa's loss: ``(clip_loss_weight * ClipLoss, caption_loss_weight * captioning CE)``.

    Same arguments, outputs and values as ``open_clip.loss.CoCaLoss``: ``forward(image_features,
    text_features, logits [B, L, V], labels [B, L], logit_scale)`` returns the two weighted terms
    (a dict with ``output_dict``); the contrastive term is distributed as ``ClipLoss`` (its
    ``local_loss`` / ``gather_with_grad``), the captioning term is each rank's own mean over its
    non-padding tokens, as in OpenCLIP. OpenCLIP's training defaults are weights 2.0 (caption)
    and 1.0 (contrastive).
    """

    def __init__(self, caption_loss_weight: float = 2.0, clip_loss_weight: float = 1.0, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, chunk_size: Optional[int] = None) -> None:
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, chunk_size=chunk_size)
        self.caption_loss_weight = caption_loss_weight
        self.clip_loss_weight = clip_loss_weight
        self.pad_id = pad_id

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                         logit_bias: Optional[Tensor] = None) -> Tensor:
        """The unweighted contrastive term: ``ClipLoss`` with this loss's distributed settings."""
        return ClipLoss.forward(self, image_features, text_features, logit_scale, logit_bias)

    def caption_loss(self, logits: Tensor, labels: Tensor, num_tokens: Optional[int] = None) -> Tensor:
        """Unweighted cross-entropy of ``logits`` [B, L, V] against ``labels`` [B, L], padding ignored:
        the mean over this batch's tokens, or their sum divided by ``num_tokens`` (the token count of
        a larger batch this one is part of, for exact gradient accumulation)."""
        if num_tokens is None:
            return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id)
        total = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id, reduction="sum")
        return total / num_tokens

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logits: Tensor,
        labels: Tensor,
        logit_scale: Tensor,
        output_dict: bool = False,
    ):
        if self.clip_loss_weight:
            clip = self.clip_loss_weight * self.contrastive_loss(image_features, text_features, logit_scale)
        else:
            clip = torch.tensor(0, device=logits.device)
        caption = self.caption_loss_weight * self.caption_loss(logits, labels)
        if output_dict:
            return {"contrastive_loss": clip, "caption_loss": caption}
        return clip, caption


class DistillClipLoss(ClipLoss):
    """InfoNCE plus distillation from a teacher's logits, as ``open_clip.loss.DistillClipLoss``.

    ``forward(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
    dist_logit_scale)`` returns ``(contrastive_loss, distill_loss)`` (a dict with ``output_dict``),
    whose sum is what is trained. ``distill_loss`` is the mean over rows of the cross-entropy
    ``-sum_j softmax(T)_ij log_softmax(S)_ij`` between the teacher's logits T (soft targets) and
    the student's S, averaged over both directions. Both logit matrices are formed by
    :meth:`ClipLoss.get_logits`, so across ranks the teacher's features are gathered exactly as the
    student's are (``local_loss`` / ``gather_with_grad``), as in OpenCLIP. The teacher's inputs are
    expected without gradient; nothing here detaches them.

    ``logit_bias`` / ``dist_logit_bias`` (SigLIP-style models) may be given by keyword: a shared
    bias cancels in every softmax, so they change no value (OpenCLIP's version does not accept them).
    The soft targets need each row's whole logits, so there is no chunked variant.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size)

    @staticmethod
    def dist_loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        """Row-mean cross-entropy of the student's log-softmax against the teacher's softmax."""
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        dist_image_features: Tensor,
        dist_text_features: Tensor,
        dist_logit_scale: Tensor,
        output_dict: bool = False,
        *,
        logit_bias: Optional[Tensor] = None,
        dist_logit_bias: Optional[Tensor] = None,
    ):
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        dist_per_image, dist_per_text = self.get_logits(dist_image_features, dist_text_features,
                                                        dist_logit_scale, dist_logit_bias)
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])
        contrastive = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        distill = (self.dist_loss(dist_per_image, per_image) + self.dist_loss(dist_per_text, per_text)) / 2
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class ChunkedClipLoss(ClipLoss):
    """:class:`ClipLoss` computed in blocks of ``chunk_size`` rows: exact, O(B) memory."""

    def __init__(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
            chunk_size=chunk_size,
        )


# --------------------------------------------------------------------------------------
# Chunked (memory-bounded) InfoNCE
# --------------------------------------------------------------------------------------
#
# With L = s * Q K^T + b and p(i) the positive column of row i, the row-wise loss is
#   l = 1/n * sum_i [ logsumexp_j L_ij - L_i,p(i) ]
# and its gradient w.r.t. the logits is G = 1/n * (softmax_rows(L) - onehot(p)).
# Through the bilinear form: dQ = s G K, dK = s G^T Q, ds = sum(G * Q K^T), db = sum(G).
# The symmetric loss adds the column-wise term, whose logit gradient is
# 1/n * (softmax_cols(L) - onehot); both only need the row/column logsumexp vectors
# (O(B)) saved from the forward pass, and the blocks of L are recomputed in backward.


def _accumulation_dtype(features: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs (exp/logsumexp need it), float64 kept as is."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _as_scalar(value: Tensor, dtype: torch.dtype) -> Tensor:
    return value.reshape(()).to(dtype)


def _block_logits(rows: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Raw dot products and the scaled/biased logits for one row block (in ``keys.dtype``)."""
    raw = rows.to(keys.dtype) @ keys.T
    logits = raw * scale
    if bias is not None:
        logits = logits + bias
    return raw, logits


def _parameter_grads(
    ctx: Any,
    scale_grad: Tensor,
    bias_grad: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    grad_scale = scale_grad.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[3]:
        grad_bias = bias_grad.reshape(bias.shape).to(bias.dtype)
    return grad_scale, grad_bias


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Row-wise InfoNCE of queries Q (n x d) against keys K (m x d), positives at ``offset + i``."""

    @staticmethod
    def forward(
        ctx: Any,
        queries: Tensor,
        keys: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor],
        offset: int,
        chunk_size: int,
    ) -> Tensor:
        n, acc = queries.shape[0], _accumulation_dtype(queries)
        scale = _as_scalar(logit_scale, acc)
        bias = None if logit_bias is None else _as_scalar(logit_bias, acc)
        row_lse = torch.empty(n, device=queries.device, dtype=acc)
        with torch.no_grad():
            keys_acc = keys.to(acc)
            for start in range(0, n, chunk_size):
                _, logits = _block_logits(queries[start : start + chunk_size], keys_acc, scale, bias)
                row_lse[start : start + chunk_size] = torch.logsumexp(logits, dim=1)
            positives = (queries.to(acc) * keys_acc[offset : offset + n]).sum(dim=1) * scale
            if bias is not None:
                positives = positives + bias
            loss = (row_lse - positives).mean()
        ctx.save_for_backward(queries, keys, logit_scale, logit_bias, row_lse)
        ctx.offset, ctx.chunk_size = offset, chunk_size
        return loss.to(queries.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> Tuple[Optional[Tensor], ...]:
        queries, keys, logit_scale, logit_bias, row_lse = ctx.saved_tensors
        n, offset, chunk = queries.shape[0], ctx.offset, ctx.chunk_size
        acc = _accumulation_dtype(queries)
        scale = _as_scalar(logit_scale, acc)
        bias = None if logit_bias is None else _as_scalar(logit_bias, acc)
        coef = grad_loss.to(acc) / n
        keys_acc = keys.to(acc)
        grad_q = torch.empty(queries.shape, device=queries.device, dtype=acc)
        grad_k = torch.zeros(keys.shape, device=keys.device, dtype=acc) if ctx.needs_input_grad[1] else None
        scale_grad = torch.zeros((), device=queries.device, dtype=acc)
        bias_grad = torch.zeros((), device=queries.device, dtype=acc)
        for start in range(0, n, chunk):
            rows = queries[start : start + chunk].to(acc)
            raw, logits = _block_logits(rows, keys_acc, scale, bias)
            grad_logits = torch.exp(logits - row_lse[start : start + chunk, None])
            local = torch.arange(rows.shape[0], device=rows.device)
            grad_logits[local, local + offset + start] -= 1.0
            grad_logits *= coef
            scale_grad += torch.dot(grad_logits.view(-1), raw.view(-1))
            bias_grad += grad_logits.sum()
            grad_q[start : start + chunk] = (grad_logits @ keys_acc) * scale
            if grad_k is not None:
                grad_k.addmm_(grad_logits.T, rows, alpha=float(scale))
        grad_scale, grad_bias = _parameter_grads(ctx, scale_grad, bias_grad, logit_scale, logit_bias)
        return (
            grad_q.to(queries.dtype) if ctx.needs_input_grad[0] else None,
            None if grad_k is None else grad_k.to(keys.dtype),
            grad_scale,
            grad_bias,
            None,
            None,
        )


class _ChunkedSymmetricCrossEntropy(torch.autograd.Function):
    """Mean of image->text and text->image InfoNCE for square I T^T, one matmul per block."""

    @staticmethod
    def forward(
        ctx: Any,
        images: Tensor,
        texts: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor],
        chunk_size: int,
    ) -> Tensor:
        n, acc = images.shape[0], _accumulation_dtype(images)
        scale = _as_scalar(logit_scale, acc)
        bias = None if logit_bias is None else _as_scalar(logit_bias, acc)
        row_lse = torch.empty(n, device=images.device, dtype=acc)
        # Column logsumexp is accumulated across row blocks as a running (max, sum of exp)
        # pair; repeated logaddexp would round once per block.
        col_max = torch.full((n,), float("-inf"), device=images.device, dtype=acc)
        col_sum = torch.zeros(n, device=images.device, dtype=acc)
        with torch.no_grad():
            texts_acc = texts.to(acc)
            for start in range(0, n, chunk_size):
                _, logits = _block_logits(images[start : start + chunk_size], texts_acc, scale, bias)
                row_lse[start : start + chunk_size] = torch.logsumexp(logits, dim=1)
                new_max = torch.maximum(col_max, logits.amax(dim=0))
                col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(logits.sub_(new_max)).sum(dim=0)
                col_max = new_max
            col_lse = col_max + torch.log(col_sum)
            positives = (images.to(acc) * texts_acc).sum(dim=1) * scale
            if bias is not None:
                positives = positives + bias
            # Per-element differences first (as F.cross_entropy does): subtracting large sums
            # would cancel catastrophically at big batch sizes.
            loss = ((row_lse - positives).mean() + (col_lse - positives).mean()) / 2
        ctx.save_for_backward(images, texts, logit_scale, logit_bias, row_lse, col_lse)
        ctx.chunk_size = chunk_size
        return loss.to(images.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> Tuple[Optional[Tensor], ...]:
        images, texts, logit_scale, logit_bias, row_lse, col_lse = ctx.saved_tensors
        n, chunk = images.shape[0], ctx.chunk_size
        acc = _accumulation_dtype(images)
        scale = _as_scalar(logit_scale, acc)
        bias = None if logit_bias is None else _as_scalar(logit_bias, acc)
        coef = grad_loss.to(acc) / (2 * n)
        texts_acc = texts.to(acc)
        grad_i = torch.empty(images.shape, device=images.device, dtype=acc)
        grad_t = torch.zeros(texts.shape, device=texts.device, dtype=acc) if ctx.needs_input_grad[1] else None
        scale_grad = torch.zeros((), device=images.device, dtype=acc)
        bias_grad = torch.zeros((), device=images.device, dtype=acc)
        for start in range(0, n, chunk):
            rows = images[start : start + chunk].to(acc)
            raw, logits = _block_logits(rows, texts_acc, scale, bias)
            # softmax over the row plus softmax over each column, minus 2 on the diagonal.
            grad_logits = torch.exp(logits - row_lse[start : start + chunk, None])
            grad_logits += torch.exp(logits.sub_(col_lse[None, :]))
            local = torch.arange(rows.shape[0], device=rows.device)
            grad_logits[local, local + start] -= 2.0
            grad_logits *= coef
            scale_grad += torch.dot(grad_logits.view(-1), raw.view(-1))
            bias_grad += grad_logits.sum()
            grad_i[start : start + chunk] = (grad_logits @ texts_acc) * scale
            if grad_t is not None:
                grad_t.addmm_(grad_logits.T, rows, alpha=float(scale))
        grad_scale, grad_bias = _parameter_grads(ctx, scale_grad, bias_grad, logit_scale, logit_bias)
        return (
            grad_i.to(images.dtype) if ctx.needs_input_grad[0] else None,
            None if grad_t is None else grad_t.to(texts.dtype),
            grad_scale,
            grad_bias,
            None,
        )


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")


def chunked_cross_entropy(
    queries: Tensor,
    keys: Tensor,
    logit_scale: Tensor,
    logit_bias: Optional[Tensor] = None,
    offset: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """``F.cross_entropy(s * Q @ K.T + b, offset + arange(n))`` without the n x m matrix."""
    _check_chunk(chunk_size)
    if queries.shape[0] + offset > keys.shape[0]:
        raise ValueError("positive columns offset + arange(n) fall outside the keys")
    return _ChunkedCrossEntropy.apply(queries, keys, logit_scale, logit_bias, offset, chunk_size)


def chunked_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Symmetric InfoNCE over paired (B x d) features in O(chunk_size * B) memory."""
    _check_chunk(chunk_size)
    if image_features.shape != text_features.shape:
        raise ValueError(f"paired features must match: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    return _ChunkedSymmetricCrossEntropy.apply(image_features, text_features, logit_scale, logit_bias, chunk_size)


# --------------------------------------------------------------------------------------
# SigLIP
# --------------------------------------------------------------------------------------


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Optional[Tensor] = None,
    negative_only: bool = False,
) -> Tensor:
    """``-sum(logsigmoid(y * (s * I T^T + b))) / B`` with y = +1 on the diagonal, -1 elsewhere.

    ``negative_only`` treats every pair as negative (text features from another rank).
    """
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    signs = -torch.ones_like(logits)
    if not negative_only:
        signs.fill_diagonal_(1.0)
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


class SigLipLoss(nn.Module):
    """Sigmoid loss (Zhai et al. 2023) matching ``open_clip.loss.SigLipLoss``.

    Across ranks each rank scores its images against every rank's texts as negatives;
    the texts travel instead of a gathered logit matrix:

    * ``bidir``: ring exchange in both directions (about half the hops of ``shift``),
    * ``shift``: one-directional ring,
    * ``reduce``: one all-reduce per source rank,
    * ``gather``: a single all-gather.
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
    ) -> None:
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self.DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels  # accepted for OpenCLIP signature parity; labels are cheap
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor] = None,
        output_dict: bool = False,
    ) -> LossOutput:
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            loss = self._add_remote_negatives(loss, image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _add_remote_negatives(
        self, loss: Tensor, images: Tensor, texts: Tensor, logit_scale: Tensor, logit_bias: Optional[Tensor]
    ) -> Tensor:
        """Add the negative-pair terms against every other rank's texts, in OpenCLIP's order."""

        def negatives(other_texts: Tensor) -> Tensor:
            return siglip_loss(images, other_texts, logit_scale, logit_bias, negative_only=True)

        right = (self.rank + 1) % self.world_size
        left = (self.rank - 1) % self.world_size
        if self.dist_impl == "bidir":
            to_left = to_right = texts
            rounds, odd = divmod(self.world_size - 1, 2)
            for _ in range(rounds):
                received = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
                for other in received:
                    loss = loss + negatives(other)
                to_left, to_right = received
            if odd:
                loss = loss + negatives(neighbour_exchange_with_grad(left, right, to_right))
        elif self.dist_impl == "shift":
            travelling = texts
            for _ in range(self.world_size - 1):
                travelling = neighbour_exchange_with_grad(left, right, travelling)
                loss = loss + negatives(travelling)
        elif self.dist_impl == "reduce":
            for source in range(self.world_size):
                own = source == self.rank
                # Non-source ranks contribute zeros, but through texts so that the result
                # requires grad everywhere and every rank runs the same all-reduces in backward.
                other = all_reduce_with_grad(texts * float(own))
                loss = loss + (other.sum() * 0.0 if own else negatives(other))
        else:  # gather
            for source, other in enumerate(all_gather_with_grad(texts).chunk(self.world_size)):
                if source != self.rank:
                    loss = loss + negatives(other)
        return loss
