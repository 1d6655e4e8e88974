"""WiSE-FT (Wortsman et al. 2022): interpolate zero-shot and fine-tuned weights of one architecture."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import torch

from ..checkpoints import read_checkpoint, save_safetensors, save_torch, unwrap_state_dict

PathLike = Union[str, Path]


def interpolate_weights(zero_shot: Dict[str, torch.Tensor], fine_tuned: Dict[str, torch.Tensor],
                        alpha: float) -> Dict[str, torch.Tensor]:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` per tensor; integer buffers are taken from fine_tuned."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    missing, extra = sorted(set(fine_tuned) - set(zero_shot)), sorted(set(zero_shot) - set(fine_tuned))
    if missing or extra:
        raise ValueError(f"the checkpoints hold different tensors: only fine-tuned {missing[:5]}, "
                         f"only zero-shot {extra[:5]}")
    out = {}
    for key, ft in fine_tuned.items():
        zs = zero_shot[key]
        if zs.shape != ft.shape:
            raise ValueError(f"{key}: zero-shot shape {tuple(zs.shape)} vs fine-tuned {tuple(ft.shape)}")
        if ft.is_floating_point():
            mixed = (1.0 - alpha) * zs.double() + alpha * ft.double()
            out[key] = mixed.to(ft.dtype)
        else:
            out[key] = ft.clone()
    return out


def _read_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        from ..checkpoints.openclip_hub import find_weights
        path = find_weights(path)
    return unwrap_state_dict(read_checkpoint(path))


def wise_ft(zero_shot: PathLike, fine_tuned: PathLike, alpha: float, out: PathLike) -> Path:
    """Write the interpolated weights to ``out`` (``.safetensors``, else a torch state dict)."""
    mixed = interpolate_weights(_read_weights(zero_shot), _read_weights(fine_tuned), alpha)
    out = Path(out)
    if out.suffix == ".safetensors":
        save_safetensors(mixed, out)
    else:
        save_torch(mixed, out)
    return out
