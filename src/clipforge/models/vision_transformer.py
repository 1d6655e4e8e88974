"""The ViT image tower of CLIP (OpenAI / OpenCLIP layout).

``forward_intermediates`` gives per-block tokens for dense features and probing, with OpenCLIP's
signature and output keys, so code written against ``open_clip`` runs unchanged.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import VisionConfig, as_tuple2
from .layers import AttentionalPooler, PatchDropout, Transformer, activation, lock_groups, norm

OUTPUT_FMTS = ("NCHW", "NLC")


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool = False, device=None, dtype=None):
        super().__init__()
        if cfg.pos_embed_type != "learnable":
            raise ValueError(f"unsupported pos_embed_type {cfg.pos_embed_type!r}; clipforge supports 'learnable'")
        if cfg.pool_type not in ("tok", "avg", "none"):
            raise ValueError(f"vision pool_type must be 'tok', 'avg' or 'none', got {cfg.pool_type!r}")
        self.cfg = cfg
        self.image_size = as_tuple2(cfg.image_size)
        self.patch_size = as_tuple2(cfg.patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = output_dim
        width = cfg.width
        factory = dict(device=device, dtype=dtype)
        norm_layer = norm(cfg.norm_kwargs)

        self.conv1 = nn.Conv2d(3, width, kernel_size=self.patch_size, stride=self.patch_size, bias=False, **factory)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width, **factory))
        num_tokens = self.grid_size[0] * self.grid_size[1] + 1
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width, **factory))
        self.patch_dropout = PatchDropout(cfg.patch_dropout) if cfg.patch_dropout > 0 else nn.Identity()
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else norm_layer(width, **factory)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.ls_init_value,
                                       activation(quick_gelu, cfg.act_kwargs), norm_layer, **factory)
        if cfg.attentional_pool:
            if isinstance(cfg.attentional_pool, str):
                raise ValueError("parallel/cascade attentional pooling (CoCa) is not supported")
            self.attn_pool = AttentionalPooler(output_dim, width, cfg.attn_pooler_heads, cfg.attn_pooler_queries,
                                               norm_layer, **factory)
            pool_dim = output_dim
        else:
            self.attn_pool = None
            pool_dim = width
        self.ln_post = norm_layer(pool_dim, **factory)
        self.proj = nn.Parameter(scale * torch.randn(pool_dim, output_dim, **factory))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, D, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, D]
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+N, D]
        x = self.patch_dropout(x)
        return self.ln_pre(x)

    def pool(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled [B, D], tokens) according to the configured pooling."""
        if self.attn_pool is not None:
            x = self.ln_post(self.attn_pool(x))  # [B, Q, D]
            return self._global_pool(x)
        if self.cfg.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            return self.ln_post(pooled), tokens
        return self._global_pool(self.ln_post(x))

    def _global_pool(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.pool_type == "tok":
            return x[:, 0], x[:, 1:]
        if self.cfg.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        return x, x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token features after the trunk, before pooling: [B, 1+N, D]."""
        return self.transformer(self.embed(x))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.proj is None:  # removed by prune_intermediate_layers
            return pooled
        # A no-op in fp32; lets bf16 inference keep the projection (and its output) in fp32.
        return pooled.to(self.proj.dtype) @ self.proj

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The image embedding [B, output_dim]; with ``output_tokens`` also the tokens after ``ln_post``
        (patch tokens [B, N, D] for ``tok``/``avg`` pooling, the pooler's other queries with an
        attentional pool, all tokens for ``none``), as OpenCLIP's tower returns them."""
        if self.cfg.pool_type == "tok" and self.attn_pool is None and not self.cfg.output_tokens:
            # only the class token leaves the trunk: the last block runs for it alone (exact)
            pooled = self.ln_post(self.transformer(self.embed(x), keep=0)[:, 0])
            return self.project(pooled)
        pooled, tokens = self.pool(self.forward_features(x))
        pooled = self.project(pooled)
        return (pooled, tokens) if self.cfg.output_tokens else pooled

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              stop_early: bool = False, normalize_intermediates: bool = False,
                              intermediates_only: bool = False, output_fmt: str = "NCHW",
                              output_extra_tokens: bool = False) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
        """Per-block features, as OpenCLIP's ``VisionTransformer.forward_intermediates``.

        Args:
            x: images [B, 3, H, W].
            indices: which blocks: None all, an int the last n, a list those (negative from the end).
            stop_early: do not run the blocks after the last selected one; the returned
                ``image_features`` then pool that block's output (as OpenCLIP and timm do).
            normalize_intermediates: apply ``ln_post`` to every intermediate.
            intermediates_only: return only the intermediates.
            output_fmt: "NCHW" (patch tokens as a [B, D, gh, gw] map) or "NLC" ([B, gh*gw, D]).
            output_extra_tokens: also return the class token of each block, [B, 1, D].

        Returns a dict: ``image_intermediates`` (list, block order), ``image_intermediates_prefix``
        (with ``output_extra_tokens``) and ``image_features`` [B, output_dim] (unless
        ``intermediates_only``; not L2-normalised).
        """
        if output_fmt not in OUTPUT_FMTS:
            raise ValueError(f"Output format must be one of NCHW or NLC, got {output_fmt!r}")
        batch, _, height, width = x.shape
        x, intermediates = self.transformer.forward_intermediates(self.embed(x), indices=indices,
                                                                  stop_early=stop_early)
        if normalize_intermediates:
            if isinstance(self.ln_post, nn.LayerNorm) and self.ln_post.normalized_shape[-1] != x.shape[-1]:
                raise ValueError(f"normalize_intermediates applies ln_post, which normalises the attentional "
                                 f"pooler's {self.ln_post.normalized_shape[-1]} channels, not the "
                                 f"{x.shape[-1]} of the blocks' tokens")
            intermediates = [self.ln_post(t) for t in intermediates]
        prefix = [t[:, :1] for t in intermediates]  # the class token
        intermediates = [t[:, 1:] for t in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = height // self.patch_size[0], width // self.patch_size[1]
            if intermediates and intermediates[0].shape[1] != grid_h * grid_w:
                raise ValueError(f"output_fmt 'NCHW' needs all {grid_h}x{grid_w} patch tokens, got "
                                 f"{intermediates[0].shape[1]} (patch dropout while training?); use 'NLC'")
            intermediates = [t.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for t in intermediates]
        output: Dict[str, Union[torch.Tensor, List[torch.Tensor]]] = {"image_intermediates": intermediates}
        if output_extra_tokens:
            output["image_intermediates_prefix"] = prefix
        if intermediates_only:
            return output
        pooled, _ = self.pool(x)
        output["image_features"] = self.project(pooled)
        return output

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last one ``indices`` selects (and ``ln_post`` / the projection);
        returns the selected block indices. As OpenCLIP's, for a feature extractor."""
        take_indices = self.transformer.prune_intermediate_layers(indices)
        if prune_norm:
            self.ln_post = nn.Identity()
        if prune_head:
            self.proj = None
        return take_indices

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        return {"positional_embedding", "class_embedding"}

    def param_groups_for_lock(self) -> List[Iterable[nn.Parameter]]:
        """Parameter groups from input to output; locking keeps the last N groups trainable (LiT)."""
        embed = [self.conv1.weight, self.class_embedding, self.positional_embedding, *self.ln_pre.parameters()]
        blocks = [list(b.parameters()) for b in self.transformer.resblocks]
        head = [*(self.attn_pool.parameters() if self.attn_pool is not None else []), *self.ln_post.parameters()]
        return [embed, *blocks[:-1], blocks[-1] + head, [self.proj] if self.proj is not None else []]

    def lock(self, unlocked_groups: int = 0) -> None:
        lock_groups(self, self.param_groups_for_lock(), unlocked_groups)

