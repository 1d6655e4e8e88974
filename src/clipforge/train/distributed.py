"""torch.distributed plumbing: find the rank from torchrun or SLURM, wrap the model in DDP or FSDP2.

This is the only training module that reads environment variables.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..models.layers import CrossAttentionBlock, ResidualAttentionBlock


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_ranks() -> tuple:
    """(rank, local_rank, world_size) from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in env:
            raise RuntimeError("SLURM job without MASTER_ADDR: export MASTER_ADDR (the first node's host name) "
                               "and MASTER_PORT in the batch script, or launch with srun torchrun")
        env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched with several processes; pick this rank's device."""
    rank, local_rank, world_size = _env_ranks()
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def fsdp_units(model: nn.Module) -> list:
    """What FSDP2 shards, in the order it must be sharded (inner units first): every residual block
    (self- and cross-attention, e.g. CoCa's decoder), then each tower, i.e. every top-level child that
    holds parameters (``visual``, ``text``, CoCa's ``text_decoder``)."""
    blocks = [m for m in model.modules() if isinstance(m, (ResidualAttentionBlock, CrossAttentionBlock))]
    towers = [m for m in model.children() if next(m.parameters(), None) is not None]
    return blocks + towers


def wrap_model(model: nn.Module, kind: str, info: DistInfo) -> nn.Module:
    """DDP, or FSDP2 with :func:`fsdp_units` sharded.

    FSDP2 cannot shard 0-d parameters, so the logit scale/bias stay whole on every rank; their
    gradients are averaged by :func:`sync_replicated_grads` (DDP would do it for us).
    """
    if not info.distributed:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    # Sharded parameters are gathered around forward() only, so sharded models call forward alone
    # (CoCa's generation then recomputes the prefix instead of using its KV cache).
    for unit in fsdp_units(model):
        fully_shard(unit)
    return model


def describe_sharding(model: nn.Module, replicated: list) -> str:
    """One line for the log: how much of the model FSDP2 shards, and which parameters stay whole."""
    kept = {id(p) for p in replicated}
    names = [n for n, p in model.named_parameters() if id(p) in kept]
    total = sum(p.numel() for p in model.parameters())
    whole = sum(p.numel() for p in replicated)
    return (f"fsdp: {total - whole:,} of {total:,} parameters sharded; "
            f"replicated on every rank: {', '.join(names) or 'none'}")


def replicated_params(model: nn.Module, kind: str, info: DistInfo) -> list:
    """Parameters whose gradients no wrapper averages (FSDP2's unsharded scalars)."""
    if not info.distributed or kind != "fsdp":
        return []
    return [p for p in model.parameters() if p.requires_grad and not hasattr(p, "device_mesh")]


def sync_replicated_grads(params: list, info: DistInfo) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip by the global norm, for plain and FSDP2-sharded (DTensor) gradients alike."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = []
    for g in grads:
        n = torch.linalg.vector_norm(g.float())
        full = getattr(n, "full_tensor", None)
        squares.append((full() if callable(full) else n) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype) if not hasattr(g, "device_mesh") else coef.item())
    return total


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce) while ``skip``; DDP's ``no_sync`` or FSDP2's switch."""
    if not skip:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    sharded = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]  # FSDP2 towers
    for m in sharded:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True, recurse=False)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
