"""Collective helpers shared by the contrastive losses.

The gradient semantics here deliberately mirror OpenCLIP's, so that a loss built
on them gives the same per-rank gradients as ``open_clip.loss`` in DDP training.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

__all__ = [
    "all_gather_with_grad",
    "all_reduce_with_grad",
    "gather_features",
    "neighbour_exchange",
    "neighbour_exchange_bidir",
    "neighbour_exchange_with_grad",
    "neighbour_exchange_bidir_with_grad",
]

ProcessGroup = Any  # torch's ProcessGroup type is not stable across versions


def all_gather_with_grad(tensor: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0; backward sums each rank's slice grads."""
    return torch.cat(dist_fn.all_gather(tensor, group=group or dist.group.WORLD), dim=0)


def all_reduce_with_grad(tensor: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Differentiable SUM all-reduce (backward all-reduces the incoming grads)."""
    return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group or dist.group.WORLD)


def _all_gather_no_grad(tensor: Tensor, world_size: int, group: Optional[ProcessGroup]) -> list[Tensor]:
    chunks = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(chunks, tensor.contiguous(), group=group)
    return chunks


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    group: Optional[ProcessGroup] = None,
) -> Tuple[Tensor, Tensor]:
    """Gather image/text features of all ranks (rank order along dim 0).

    With ``gather_with_grad`` gradients flow back to the rank that produced each
    slice. Without it the gather is detached; for the global loss the local slice
    is put back so this rank's own features still receive gradient (for
    ``local_loss`` the local rows already carry it, so nothing is reinserted).
    """
    if world_size == 1:
        return image_features, text_features
    if gather_with_grad:
        return all_gather_with_grad(image_features, group), all_gather_with_grad(text_features, group)
    images = _all_gather_no_grad(image_features, world_size, group)
    texts = _all_gather_no_grad(text_features, world_size, group)
    if not local_loss:
        images[rank] = image_features
        texts[rank] = text_features
    return torch.cat(images, dim=0), torch.cat(texts, dim=0)


def neighbour_exchange(
    from_rank: int, to_rank: int, tensor: Tensor, group: Optional[ProcessGroup] = None
) -> Tensor:
    """Send ``tensor`` to ``to_rank`` while receiving a same-shaped tensor from ``from_rank``."""
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), to_rank, group=group),
        dist.P2POp(dist.irecv, received, from_rank, group=group),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def neighbour_exchange_bidir(
    left_rank: int,
    right_rank: int,
    tensor_to_left: Tensor,
    tensor_to_right: Tensor,
    group: Optional[ProcessGroup] = None,
) -> Tuple[Tensor, Tensor]:
    """Send one tensor each way round the ring; returns ``(from_right, from_left)``."""
    from_left = torch.empty_like(tensor_to_right)
    from_right = torch.empty_like(tensor_to_left)
    ops = [
        dist.P2POp(dist.isend, tensor_to_right.contiguous(), right_rank, group=group),
        dist.P2POp(dist.isend, tensor_to_left.contiguous(), left_rank, group=group),
        dist.P2POp(dist.irecv, from_right, right_rank, group=group),
        dist.P2POp(dist.irecv, from_left, left_rank, group=group),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return from_right, from_left


class _NeighbourExchange(torch.autograd.Function):
    """Ring shift whose backward sends the gradient back the opposite way."""

    @staticmethod
    def forward(ctx: Any, from_rank: int, to_rank: int, group: Optional[ProcessGroup], tensor: Tensor) -> Tensor:
        ctx.from_rank, ctx.to_rank, ctx.group = from_rank, to_rank, group
        return neighbour_exchange(from_rank, to_rank, tensor, group=group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[None, None, None, Tensor]:
        return None, None, None, _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, ctx.group, grad)


class _NeighbourExchangeBidir(torch.autograd.Function):
    """Two-way ring exchange whose backward returns both gradients to their senders."""

    @staticmethod
    def forward(
        ctx: Any,
        left_rank: int,
        right_rank: int,
        group: Optional[ProcessGroup],
        tensor_to_left: Tensor,
        tensor_to_right: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        ctx.left_rank, ctx.right_rank, ctx.group = left_rank, right_rank, group
        return neighbour_exchange_bidir(left_rank, right_rank, tensor_to_left, tensor_to_right, group=group)

    @staticmethod
    def backward(ctx: Any, grad_from_right: Tensor, grad_from_left: Tensor) -> Tuple[Any, ...]:
        # What came from the right must go back to the right, and vice versa: swapping
        # the rank roles does exactly that.
        back = _NeighbourExchangeBidir.apply(ctx.right_rank, ctx.left_rank, ctx.group, grad_from_right, grad_from_left)
        return (None, None, None) + tuple(back)


def neighbour_exchange_with_grad(
    from_rank: int, to_rank: int, tensor: Tensor, group: Optional[ProcessGroup] = None
) -> Tensor:
    return _NeighbourExchange.apply(from_rank, to_rank, group, tensor)


def neighbour_exchange_bidir_with_grad(
    left_rank: int,
    right_rank: int,
    tensor_to_left: Tensor,
    tensor_to_right: Tensor,
    group: Optional[ProcessGroup] = None,
) -> Tuple[Tensor, Tensor]:
    return _NeighbourExchangeBidir.apply(left_rank, right_rank, group, tensor_to_left, tensor_to_right)
