"""AdamW parameter groups and the learning-rate schedule as a pure function of the step."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from .config import OptimSettings

_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Decay matrices only: gains, biases, embeddings, class token and logit scale/bias are left undecayed.

    ``model.no_weight_decay()`` names the 2-D parameters that are embeddings rather than weights
    (positional embeddings); everything below 2-D (biases, norms, scales) is excluded by shape.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim < 2 or name in skip or name.endswith("token_embedding.weight")
        (no_decay if excluded else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _sharded(params: List[torch.Tensor]) -> bool:
    """FSDP2's parameters are DTensors, which torch's fused AdamW kernels do not take."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in params)


def optimizer_kernel(cfg: OptimSettings, params: List[torch.Tensor]) -> Dict[str, bool]:
    """torch.optim.AdamW's ``fused``/``foreach`` flags for ``cfg.implementation``.

    ``auto`` is the fused kernel on CUDA (one launch per parameter group instead of ~10 per
    parameter) and on the CPU from torch 2.4, which has one there: on the bench model's 22M
    parameters a CPU step takes 26 ms fused against 110 ms foreach, which also allocates several
    parameter-sized temporaries, and the whole trainer ran 6% faster (``benchmarks/results/
    trainer_ctx32.md``). The multi-tensor ``foreach`` path is kept for FSDP2's sharded parameters
    (DTensors), other devices and older torch. All give the same update up to float rounding order.
    """
    kind = cfg.implementation
    if kind == "auto":
        device = params[0].device.type if params else "cpu"
        fused_here = device == "cuda" or (device == "cpu" and _TORCH_VERSION >= (2, 4))
        kind = "fused" if fused_here and not _sharded(params) else "foreach"
    return {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
            "for-loop": {"fused": False, "foreach": False}}[kind]


def build_optimizer(model: nn.Module, cfg: OptimSettings) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: both towers are locked")
    kernel = optimizer_kernel(cfg, [p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)


def lr_at(step: int, cfg: OptimSettings, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based), OpenCLIP's schedules.

    Warm-up is linear from ``lr / warmup`` to ``lr``; then ``cosine`` decays to zero at
    ``total_steps``, ``const`` stays, ``const-cooldown`` stays until the last ``cooldown_steps``
    and then decays to ``lr_end`` as ``(1 - progress) ** cooldown_power``.
    """
    base, warmup = cfg.lr, cfg.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.schedule == "const":
        return base
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * base
    start = total_steps - cfg.cooldown_steps
    if step < start:
        return base
    progress = (step - start) / max(1, cfg.cooldown_steps)
    return cfg.lr_end + (base - cfg.lr_end) * (1.0 - progress) ** cfg.cooldown_power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
