"""OpenAI CLIP checkpoints: architecture inferred from tensor shapes, so files load without a name."""
from __future__ import annotations

import math
from typing import Dict

import torch

from ..config import CLIPConfig, TextConfig, VisionConfig

# Scalars OpenAI's TorchScript archives keep next to the weights.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def _count_blocks(state_dict: Dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def infer_config(state_dict: Dict[str, torch.Tensor]) -> CLIPConfig:
    """Rebuild the CLIP architecture from an OpenAI-layout state dict.

    OpenAI's own weights were trained with QuickGELU, so the inferred config uses it.
    """
    sd = state_dict
    try:
        if "visual.proj" in sd:
            width, _, patch, _ = sd["visual.conv1.weight"].shape
            grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
            vision = VisionConfig(layers=_count_blocks(sd, "visual.transformer.resblocks."), width=width,
                                  patch_size=patch, image_size=patch * grid)
        else:
            layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
            grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
            vision = VisionConfig(layers=layers, width=sd["visual.layer1.0.conv1.weight"].shape[0],
                                  image_size=grid * 32)
        text_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], width=text_width,
                          heads=text_width // 64, layers=_count_blocks(sd, "transformer.resblocks."))
        embed_dim = sd["text_projection"].shape[1]
    except KeyError as e:
        raise ValueError(f"cannot infer a CLIP architecture: the state dict has no key {e.args[0]!r} "
                         f"(is this an OpenAI/OpenCLIP CLIP checkpoint?)") from None
    return CLIPConfig(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
