"""Precision names and the one autocast context, shared by model building, training and evaluation.

A precision is one of three names everywhere (config files, command lines, function arguments), so the
table below is the only place that maps a name to a dtype. ``autocast`` turns a name into the context
under which a forward pass runs: nothing for fp32 (exact), ``torch.autocast`` in that dtype otherwise.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Union

import torch

PRECISIONS: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    """``precision`` itself when it is a key of :data:`PRECISIONS`; a ValueError naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: Union[str, torch.device]) -> ContextManager:
    """The context a forward pass in ``precision`` runs under on ``device``.

    ``fp32`` is a no-op context (results stay exact); ``bf16``/``fp16`` are ``torch.autocast`` in that
    dtype for the device's type (``cuda``, ``cpu``, ...).
    """
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision])


def amp_precision(device: Union[str, torch.device]) -> str:
    """What clip_benchmark's ``--amp`` means on ``device``: fp16 autocast on CUDA, bf16 elsewhere.

    These are ``torch.autocast``'s own default dtypes for those devices.
    """
    return "fp16" if torch.device(device).type == "cuda" else "bf16"
