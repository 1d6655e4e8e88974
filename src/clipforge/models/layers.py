"""Building blocks shared by the vision and text towers.

Parameter names follow OpenAI CLIP / OpenCLIP (``attn.in_proj_weight``, ``mlp.c_fc``, ``ls_1.gamma``)
so that their checkpoints load into these modules without renaming.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so bf16/fp16 weights or activations stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_dtype = x.dtype
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(orig_dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's original CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PatchDropout(nn.Module):
    """Randomly keeps a subset of patch tokens while training (FLIP); the class token is always kept."""

    def __init__(self, prob: float):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {prob}")
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls_token, patches = x[:, :1], x[:, 1:]  # [B, 1, D], [B, N, D]
        batch, num_patches = patches.shape[:2]
        num_keep = max(1, int(num_patches * (1.0 - self.prob)))
        keep = torch.randn(batch, num_patches, device=x.device).topk(num_keep, dim=-1).indices  # [B, K]
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # [B, K, D]
        return torch.cat([cls_token, patches], dim=1)


class KVCache:
    """Keys and values of the positions a self-attention layer has seen, for incremental decoding.

    Stored preallocated as [R, H, capacity, Dh] and filled up to ``length``; ``reorder`` follows the
    rows (beams, or the samples still decoding) as a search rearranges or drops them.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add [R, H, n, Dh] keys/values; returns all keys/values so far, [R, H, length, Dh] each."""
        rows, heads, n, head_dim = k.shape
        if self.k is None:
            self.k = k.new_empty(rows, heads, self.capacity, head_dim)
            self.v = v.new_empty(rows, heads, self.capacity, head_dim)
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {self.length + n} were given")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


Keep = Union[int, torch.Tensor]


def as_index(keep: Keep, x: torch.Tensor) -> torch.Tensor:
    """``keep`` as [B] positions into ``x`` [B, L, D]."""
    if isinstance(keep, torch.Tensor):
        return keep
    return torch.full((x.shape[0],), keep, dtype=torch.long, device=x.device)


def take(x: torch.Tensor, keep: Keep) -> torch.Tensor:
    """The kept position of each row of ``x`` [B, L, D], as [B, 1, D]."""
    if isinstance(keep, int):
        return x[:, keep:keep + 1]
    return x[torch.arange(x.shape[0], device=x.device), keep].unsqueeze(1)


class Packing:
    """The rows of a [B, L, D] batch of which only the first ``lengths[b]`` positions matter, as one
    flat [N, D] sequence of those tokens (N = the sum of lengths).

    Norms, projections and MLPs work per token, so a causal tower runs them on the N tokens alone;
    attention unpacks to [B, L, .] with zeros after each row's end. Under a causal mask a position
    sees none of the positions after it, so every kept output (and every gradient) is the padded
    batch's: exact, while the padding costs nothing in the per-token layers. Flickr8k captions fill
    about half of their batch's longest row.
    """

    def __init__(self, lengths: torch.Tensor, seq: int):
        self.batch, self.seq = lengths.shape[0], seq
        valid = torch.arange(seq, device=lengths.device) < lengths[:, None]  # [B, L]
        self.index = valid.flatten().nonzero().squeeze(1)  # [N] flat positions of the kept tokens

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [N, D]."""
        return x.reshape(self.batch * self.seq, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [B, L, D], zeros after each row's end."""
        out = x.new_zeros(self.batch * self.seq, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.batch, self.seq, x.shape[-1])


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, seq, dim = x.shape
    return x.view(batch, seq, num_heads, dim // num_heads).transpose(1, 2)  # [B, L, D] -> [B, H, L, Dh]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)  # [B, H, L, Dh] -> [B, L, D]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal)`` [B, H, Lq, Dh], except in bf16/fp16
    training on the CPU, where it runs as two batched GEMMs in that dtype around an fp32 softmax.

    Why hand-written: torch's CPU kernels are slow there. The flash kernel's bf16 backward took 47% of
    a bf16 training step on an AMX Xeon, and the math kernel upcasts q, k and v to fp32, so its GEMMs
    run at fp32 speed. On an AVX-512 BF16 EPYC (bench model, [128, 4, 65, 64], forward + backward):
    math 38.9 ms, flash 86.1 ms, these GEMMs 13.4 ms; at ViT-B/16's [32, 12, 197, 64]: 210 / 140 / 104 ms.
    In inference (no autograd) flash is as fast or faster, and fp32 keeps torch's kernels (exact).
    """
    if not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return _gemm_attention(q, k, v, attn_mask, is_causal)


def _gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    is_causal: bool) -> torch.Tensor:
    """Attention as SDPA defines it: softmax(q k^T / sqrt(Dh) + mask) v, the scores' softmax in fp32;
    a row that the mask hides entirely gives zeros, as SDPA's math kernel does."""
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).to(softmax_dtype)  # [B, H, Lq, Lk]
    if is_causal:  # top-left aligned, as SDPA's is_causal
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    hidden = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        hidden = ~attn_mask.any(-1, keepdim=True)
    elif attn_mask is not None:
        scores = scores + attn_mask.to(softmax_dtype)
        hidden = torch.isneginf(scores).all(-1, keepdim=True)
    probs = scores.softmax(-1)
    if hidden is not None:
        probs = probs.masked_fill(hidden, 0.0)
    return torch.matmul(probs.to(v.dtype), v)


class Attention(nn.Module):
    """Multi-head self-attention through :func:`attention` (``scaled_dot_product_attention``).

    Weights are stored fused as ``in_proj_weight`` [3D, D] and ``out_proj`` exactly like
    ``nn.MultiheadAttention``, which OpenAI/OpenCLIP checkpoints use. With a ``cache`` the input is
    the new positions only, attending to the cached ones as well (incremental decoding).
    """

    def __init__(self, dim: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim, device=device, dtype=dtype))
        self.out_proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, cache: Optional[KVCache] = None,
                packing: Optional[Packing] = None) -> torch.Tensor:
        """``packing``: ``x`` is the packed tokens [N, D] (see :class:`Packing`; causal only)."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D] or [N, 3D]
        if packing is not None:
            qkv = packing.unpack(qkv)  # [B, L, 3D]
        out = _merge_heads(self._attend_qkv(qkv, attn_mask, is_causal, cache))  # [B, L, D]
        return self.out_proj(packing.pack(out) if packing is not None else out)

    def _attend_qkv(self, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                    cache: Optional[KVCache]) -> torch.Tensor:
        batch, seq, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        # [B, L, 3, H, Dh] -> [3, B, H, L, Dh]
        qkv = qkv.view(batch, seq, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)  # [B, H, past + L, Dh]
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        return attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, H, L, Dh]

    def project_context(self, context: torch.Tensor):
        """(keys, values) [B, H, N, Dh] of context tokens [B, N, D]."""
        dim = context.shape[-1]
        k = F.linear(context, self.in_proj_weight[dim:2 * dim], self.in_proj_bias[dim:2 * dim])
        v = F.linear(context, self.in_proj_weight[2 * dim:], self.in_proj_bias[2 * dim:])
        return _heads(k, self.num_heads), _heads(v, self.num_heads)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        return F.linear(x, self.in_proj_weight[:dim], self.in_proj_bias[:dim])  # [B, L, D]

    def attend(self, x: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Queries from ``x`` [B, Lq, D] only, keys and values from ``context`` [B, L, D]: the same
        weights and result as ``forward`` on ``context`` restricted to those query rows."""
        k, v = self.project_context(context)
        out = attention(_heads(self.project_query(x), self.num_heads), k, v, attn_mask=attn_mask)
        return self.out_proj(_merge_heads(out))


class CrossAttention(Attention):
    """Multi-head attention from queries ``x`` to a ``context`` of the same width (CoCa's decoder).

    Parameters as ``nn.MultiheadAttention`` (fused ``in_proj_weight``: query rows, then key, then value).
    The context's keys/values can be projected once (``project_context``) and reused every step.
    Several query rows may share one context row (the beams of one image): ``x`` then has
    ``rows_per_context`` times the context's batch, grouped contiguously.
    """

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_kv=None,
                rows_per_context: int = 1) -> torch.Tensor:
        batch, seq, dim = x.shape
        k, v = context_kv if context_kv is not None else self.project_context(context)
        q = self.project_query(x)  # [R, L, D]
        if rows_per_context > 1:  # the rows of one context attend to it together: fold them into L
            q = q.reshape(batch // rows_per_context, rows_per_context * seq, dim)  # [B, k*L, D]
        out = attention(_heads(q, self.num_heads), k, v)  # [B, H, k*L, Dh]
        out = _merge_heads(out).reshape(batch, seq, dim)  # [R, L, D]
        return self.out_proj(out)


def mlp(width: int, hidden: int, act_layer: Callable[[], nn.Module], device=None, dtype=None) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, hidden, device=device, dtype=dtype)),
        ("gelu", act_layer()),
        ("c_proj", nn.Linear(hidden, width, device=device, dtype=dtype)),
    ]))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), with optional layer scale."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, ls_init_value: Optional[float] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        self.ln_1 = norm_layer(width, device=device, dtype=dtype)
        self.attn = Attention(width, heads, device=device, dtype=dtype)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = norm_layer(width, device=device, dtype=dtype)
        self.mlp = mlp(width, int(width * mlp_ratio), act_layer, device=device, dtype=dtype)
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, cache: Optional[KVCache] = None,
                keep: Optional[Keep] = None, packing: Optional[Packing] = None) -> torch.Tensor:
        """``keep`` (see ``Transformer.forward``): the output of that one position per row, [B, 1, D].

        ``packing``: ``x`` is packed tokens [N, D] (see :class:`Packing`), and so is the output
        unless ``keep`` asks for one position per row.
        """
        if keep is not None:
            return self._forward_kept(packing.unpack(x) if packing is not None else x, keep, attn_mask, is_causal)
        attn = self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, cache=cache, packing=packing)
        x = x + self.ls_1(attn)
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    def _forward_kept(self, x: torch.Tensor, keep: Keep, attn_mask: Optional[torch.Tensor],
                      is_causal: bool) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("keep= supports is_causal, not an explicit attention mask")
        context = self.ln_1(x)  # every position gives keys and values; only the kept ones query
        mask = None
        if is_causal:  # the kept position p sees positions <= p, as the causal mask of the full block
            positions = torch.arange(x.shape[1], device=x.device)
            mask = (positions <= as_index(keep, x)[:, None])[:, None, None, :]  # [B, 1, 1, L]
        x = take(x, keep)  # [B, 1, D]
        x = x + self.ls_1(self.attn.attend(take(context, keep), context, attn_mask=mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class CrossAttentionBlock(nn.Module):
    """Pre-LN block attending to a context: x + attn(ln_1(x), ln_1_kv(context)), then x + mlp(ln_2(x)).

    OpenCLIP's ``ResidualAttentionBlock(is_cross_attention=True)``, with the same parameter names.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, ls_init_value: Optional[float] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        self.ln_1 = norm_layer(width, device=device, dtype=dtype)
        self.attn = CrossAttention(width, heads, device=device, dtype=dtype)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_1_kv = norm_layer(width, device=device, dtype=dtype)
        self.ln_2 = norm_layer(width, device=device, dtype=dtype)
        self.mlp = mlp(width, int(width * mlp_ratio), act_layer, device=device, dtype=dtype)
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def project_context(self, context: torch.Tensor):
        """The context's keys/values for ``forward(context_kv=...)``: computed once per image."""
        return self.attn.project_context(self.ln_1_kv(context))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_kv=None,
                rows_per_context: int = 1) -> torch.Tensor:
        if context_kv is None:
            context_kv = self.project_context(context)
        x = x + self.ls_1(self.attn(self.ln_1(x), context_kv=context_kv, rows_per_context=rows_per_context))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of residual attention blocks on batch-first [B, L, D] tokens."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 ls_init_value: Optional[float] = None, act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Type[nn.Module] = LayerNorm, device=None, dtype=None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value, act_layer, norm_layer,
                                   device=device, dtype=dtype)
            for _ in range(layers)
        ])

    def init_weights(self) -> None:
        init_blocks(self.resblocks, self.width, self.layers)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, caches: Optional[List[KVCache]] = None,
                keep: Optional[Keep] = None, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``caches`` (one per block) switches to incremental decoding: ``x`` is then the new positions.

        ``keep`` (an int, or [B] positions) asks for one position per row, [B, 1, D]: the class token
        or the end-of-text token a tower pools. Only that position's output leaves the last block, so
        the last block computes its queries, attention output and MLP for that position alone (keys
        and values still for all): the same numbers as slicing the full output, for about 1/layers
        less compute in training and encoding.

        ``lengths`` [B] (causal only) says that only the first ``lengths[b]`` positions of row ``b``
        matter: the blocks run on those tokens packed (:class:`Packing`), and positions at or after a
        row's length come out as zeros.
        """
        last = len(self.resblocks) - 1
        if keep is not None and last < 0:
            return take(x, keep)
        packing = None
        if lengths is not None:
            if not is_causal or attn_mask is not None or caches is not None:
                raise ValueError("lengths= packs a causal stack without an attention mask or caches")
            packing = Packing(lengths, x.shape[1])
            x = packing.pack(x)
        for i, block in enumerate(self.resblocks):
            block_keep = keep if i == last else None
            if caches is not None:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal, cache=caches[i])
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, None, block_keep, packing, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal, keep=block_keep, packing=packing)
        return packing.unpack(x) if packing is not None and keep is None else x

    def forward_intermediates(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                              indices: Optional[Union[int, Sequence[int]]] = None, stop_early: bool = False,
                              is_causal: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(last output, outputs of the blocks ``indices`` selects, in block order), as OpenCLIP's.

        With ``stop_early`` the blocks after the last selected one are not run, so the "last output"
        is that block's output.
        """
        take_indices, max_index = feature_take_indices(len(self.resblocks), indices)
        blocks = self.resblocks[:max_index + 1] if stop_early else self.resblocks
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
            if i in take_indices:
                intermediates.append(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1) -> List[int]:
        """Drop the blocks after the last one ``indices`` selects; returns the selected block indices."""
        take_indices, max_index = feature_take_indices(len(self.resblocks), indices)
        self.resblocks = self.resblocks[:max_index + 1]
        self.layers = len(self.resblocks)
        return take_indices


def feature_take_indices(num_features: int,
                         indices: Optional[Union[int, Sequence[int]]] = None) -> Tuple[List[int], int]:
    """Which of ``num_features`` outputs to take, as absolute indices, and the largest of them.

    OpenCLIP's (and timm's) rule: None takes all, an int ``n`` the last ``n``, a sequence those
    indices (negative ones count from the end). Out-of-range values raise ``ValueError`` with
    OpenCLIP's wording (it raises ``AssertionError``).
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, bool) or not isinstance(indices, (numbers.Integral, Sequence)) or isinstance(indices, str):
        raise ValueError(f"indices must be None, an int (the last n) or a list of ints, got {indices!r}")
    if isinstance(indices, numbers.Integral):
        indices = int(indices)
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take_indices = [num_features - indices + i for i in range(indices)]
    else:
        if not len(indices):
            raise ValueError(f"indices is an empty list; give at least one of 0 to {num_features - 1}")
        take_indices = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise ValueError(f"indices must be ints, got {i!r} in {list(indices)!r}")
            idx = num_features + int(i) if i < 0 else int(i)
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_features - 1})")
            take_indices.append(idx)
    return take_indices, max(take_indices)


def init_blocks(blocks: Iterable[nn.Module], width: int, layers: int) -> None:
    """OpenAI's init: residual-branch outputs scaled down with depth."""
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class AttentionalPooler(nn.Module):
    """Cross-attention from learned queries to the tower's tokens (CoCa); keys as OpenCLIP's."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, num_queries: int = 256,
                 norm_layer: Type[nn.Module] = LayerNorm, device=None, dtype=None):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, dim, device=device, dtype=dtype))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True,
                                          device=device, dtype=dtype)
        self.ln_q = norm_layer(dim, device=device, dtype=dtype)
        self.ln_k = norm_layer(context_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, Q, D]
        return self.attn(q, x, x, need_weights=False)[0]


def activation(quick_gelu: bool, act_kwargs: Optional[dict] = None) -> Callable[[], nn.Module]:
    base = QuickGELU if quick_gelu else nn.GELU
    if act_kwargs:
        return lambda: base(**act_kwargs)
    return base


def norm(norm_kwargs: Optional[dict] = None) -> Callable[..., nn.Module]:
    if norm_kwargs:
        return lambda dim, **kw: LayerNorm(dim, **{**norm_kwargs, **kw})
    return LayerNorm


def lock_groups(module: nn.Module, groups: List[Iterable[nn.Parameter]], unlocked: int) -> None:
    """Freeze a tower, then unfreeze its last ``unlocked`` parameter groups (LiT-style locking)."""
    for p in module.parameters():
        p.requires_grad = False
    if unlocked > 0:
        for group in groups[-unlocked:]:
            for p in group:
                p.requires_grad = True
