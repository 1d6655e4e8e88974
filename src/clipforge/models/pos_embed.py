"""Positional-embedding resampling, as pure functions shared by models and checkpoint loaders."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def resample_grid_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], num_prefix_tokens: int = 1,
                            mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Interpolate a ViT's [prefix + H*W, D] embedding to a new patch grid (prefix tokens kept as is)."""
    prefix, grid_tokens = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    old_side = int(math.isqrt(grid_tokens.shape[0]))
    if old_side * old_side != grid_tokens.shape[0]:
        raise ValueError(f"positional embedding with {grid_tokens.shape[0]} grid tokens is not a square grid")
    if (old_side, old_side) == tuple(new_grid):
        return pos_embed
    dim = grid_tokens.shape[-1]
    orig_dtype = grid_tokens.dtype
    grid = grid_tokens.float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)  # [1, D, h, w]
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], dim)  # [H*W, D]
    return torch.cat([prefix, grid.to(orig_dtype)], dim=0)


def resample_1d_pos_embed(pos_embed: torch.Tensor, new_length: int) -> torch.Tensor:
    """Linearly interpolate a text tower's [L, D] embedding to a new context length."""
    if pos_embed.shape[0] == new_length:
        return pos_embed
    x = pos_embed.float().T.unsqueeze(0)  # [1, D, L]
    x = F.interpolate(x, size=new_length, mode="linear", align_corners=False)
    return x[0].T.to(pos_embed.dtype)
