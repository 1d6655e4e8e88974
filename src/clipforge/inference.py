"""Fast inference paths for a built :class:`~clipforge.models.clip.CLIP`.

Each function takes a model (usually in eval mode, weights loaded) and either returns features or a
model prepared for a faster execution mode:

==========================  =======================  ==============================================
function                    exact vs fp32?           what it buys
==========================  =======================  ==============================================
``encode_text_batched``     yes (<= 1e-6)            prompts sorted by length, so every batch stops
                                                     at its own longest EOT instead of position 77
                                                     (``build_zero_shot_classifier(bucket_size=N)``
                                                     builds a zero-shot classifier that way)
``to_bf16_inference``       no (cos >= 0.99)         bf16 weights/activations on bf16 matmul units;
                                                     norms, final projections and outputs in fp32
``to_channels_last``        yes (<= 1e-5)            NHWC convolutions for ResNet towers (oneDNN)
``quantize_int8``           no (bounded)             dynamic int8 ``nn.Linear`` for CPU serving
``compile_model``           yes (<= 1e-5)            ``torch.compile`` of both towers
==========================  =======================  ==============================================

``text_lengths`` and ``encode_text_batched`` are evaluation's own (``clipforge.evaluate.features``),
re-exported here. Measured speed-ups and accuracy deltas are in ``benchmarks/results/latest.md``.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate.features import encode_text_batched, text_lengths
from .models.clip import CLIP
from .models.modified_resnet import ModifiedResNet
from .models.text_transformer import TextTransformer
from .models.vision_transformer import VisionTransformer

__all__ = ["text_lengths", "encode_text_batched", "to_bf16_inference", "to_channels_last",
           "quantize_int8", "compile_model", "cosine_to", "FP32_KEPT"]


# Per tower class: the parameters/submodules that bf16 inference keeps in fp32 (besides all norms).
# They are the last, small layers whose rounding would go straight into the output features.
FP32_KEPT: Dict[Type[nn.Module], Tuple[str, ...]] = {
    VisionTransformer: ("proj",),
    TextTransformer: ("text_projection",),
    ModifiedResNet: ("attnpool",),
}
_NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)


def _fp32_kept(tower: nn.Module) -> Tuple[str, ...]:
    for cls, names in FP32_KEPT.items():
        if isinstance(tower, cls):
            return names
    raise ValueError(f"bf16 inference does not know which layers of a {type(tower).__name__} tower "
                     f"to keep in fp32; supported: {[c.__name__ for c in FP32_KEPT]}")


def to_bf16_inference(model: CLIP) -> CLIP:
    """Cast the model in place for bf16 inference and return it (eval mode, no gradients).

    Unlike a whole-model ``.to(torch.bfloat16)`` (OpenCLIP's ``precision='pure_bf16'``), norms keep
    fp32 parameters (clipforge's LayerNorm also computes in fp32), the final projections
    (``FP32_KEPT``) and logit scale/bias stay fp32, and inputs/outputs are fp32: image pixels are
    cast at the patch embedding and features are returned as fp32, ready to normalise. Attention
    runs through SDPA, whose CPU/GPU kernels accumulate bf16 softmax in fp32. It avoids autocast,
    which re-casts weights every call and is slower than fp32 on CPU.
    """
    towers = {"visual": model.visual, "text": model.text}
    kept = {name: _fp32_kept(tower) for name, tower in towers.items()}
    model.eval().requires_grad_(False)
    for name, tower in towers.items():
        tower.to(torch.bfloat16)
        for module in tower.modules():
            if isinstance(module, _NORMS):
                module.float()
        for attr in kept[name]:
            value = getattr(tower, attr)
            if isinstance(value, nn.Module):
                value.float()
            elif isinstance(value, nn.Parameter):
                value.data = value.data.float()
    return model


def to_channels_last(model: CLIP) -> CLIP:
    """Store a ResNet tower's conv weights NHWC (in place), so oneDNN runs its fast NHWC kernels.

    PyTorch picks the channels-last path for a convolution whose weight is channels-last, and the
    format then propagates through BatchNorm/ReLU/pooling, so callers need not convert images.
    Exact: only memory layout changes. ViT towers have a single patch conv and are left as is.
    """
    if not isinstance(model.visual, ModifiedResNet):
        raise ValueError(f"channels-last applies to ResNet image towers, not {type(model.visual).__name__}")
    model.visual.to(memory_format=torch.channels_last)
    return model


def quantize_int8(model: CLIP, inplace: bool = False) -> CLIP:
    """Dynamically quantised copy for CPU serving: every ``nn.Linear`` runs int8 x int8 -> int32.

    Weights are quantised per tensor once; activations are quantised per batch at run time, so no
    calibration data is needed. Layers that are not ``nn.Linear`` (the fused attention in-projection,
    convolutions, the final projection parameters) stay fp32. Accuracy deltas versus fp32 are in
    the benchmark results; use it where throughput matters more than the last 1e-3 of cosine.
    """
    from torch.ao.quantization import quantize_dynamic

    target = model if inplace else copy.deepcopy(model)
    target.eval().requires_grad_(False)
    return quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8, inplace=True)


def compile_model(model: CLIP, mode: Optional[str] = None) -> CLIP:
    """``torch.compile`` both towers in place (state-dict keys unchanged) and return the model.

    The text tower is compiled with dynamic shapes because clipforge trims prompts to their longest
    EOT, so the sequence length changes between batches. The first calls are slow (compilation).
    """
    model.visual.compile(mode=mode)
    model.text.compile(mode=mode, dynamic=True)
    return model


def cosine_to(reference: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of two feature sets [N, D] -> [N], computed in fp32."""
    return F.cosine_similarity(reference.float(), features.float(), dim=-1)
