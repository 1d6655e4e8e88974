"""Precision names and the one autocast context, shared by model building, training and evaluation.

A precision is one of three names everywhere (config files, command lines, function arguments), so the
table below is the only place that maps a name to a dtype. ``autocast`` turns a name into the context
under which a forward pass runs: nothing for fp32 (exact), ``torch.autocast`` in that dtype otherwise.

``auto`` (the trainer's default) is resolved once per run by :func:`resolve_precision`: bf16 where the
device computes bf16 matrix products in hardware, fp32 where bf16 would be emulated. On CPUs this is
decided by the instruction-set flags (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm), not by
timing, so the same machine always chooses the same precision and the numbers are reproducible: on an
AVX2-only CPU a bf16 GEMM of the training shapes runs ~6x *slower* than fp32 (emulated), on an
AVX-512 BF16 CPU ~2.2x faster (AMD EPYC Zen 4, 2 cores: 383-418 against 128-187 GFLOP/s).

Training in bf16/fp16 on the CPU runs attention as plain GEMMs in that dtype (``models.layers.attention``)
instead of torch's CPU attention kernels, whose bf16 backward is slow; the dispatch is there, so the
same autocast context serves training and inference.
"""
from __future__ import annotations

import contextlib
import platform
from functools import lru_cache
from typing import ContextManager, Dict, FrozenSet, Tuple, Union

import torch

PRECISIONS: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
# CPU flags (as /proc/cpuinfo spells them) that mean bf16 matrix products run in hardware.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


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


@lru_cache(maxsize=None)
def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_description() -> Dict[str, object]:
    """What a benchmark result records about the CPU: the flags that decide bf16 speed and torch's view."""
    flags = cpu_flags()
    return {"machine": platform.machine(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_flags": sorted(f for f in BF16_CPU_FLAGS if f in flags),
            "avx512": sorted(f for f in flags if f.startswith("avx512")), "amx": sorted(f for f in flags if f.startswith("amx")),
            "threads": torch.get_num_threads()}


def resolve_precision(precision: str, device: Union[str, torch.device]) -> Tuple[str, str]:
    """``(precision, why)``: ``auto`` made concrete for ``device``, any other name checked and kept.

    CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16 (autocast + grad scaler). CPU:
    bf16 when the CPU has bf16 matrix instructions (:data:`BF16_CPU_FLAGS`), else fp32.
    """
    if precision != AUTO:
        return check_precision(precision), "as configured"
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU computes bf16 in hardware"
        return "fp16", "auto: this GPU has no bf16; fp16 autocast with a grad scaler"
    if device.type != "cpu":
        return "fp32", f"auto: no bf16 speed information for device type {device.type!r}"
    found = sorted(f for f in BF16_CPU_FLAGS if f in cpu_flags())
    if found:
        return "bf16", f"auto: the CPU has bf16 matrix instructions ({', '.join(found)}); bf16 autocast"
    return "fp32", ("auto: the CPU has no bf16 matrix instructions (AVX-512 BF16 / AMX / Arm BF16), so bf16 "
                    f"would be emulated and slower than fp32 (torch CPU capability {torch.backends.cpu.get_cpu_capability()})")
