"""CoCa (Contrastive Captioners): CLIP's two towers plus a caption decoder, as OpenCLIP builds it.

The image tower's attentional pooler gives the contrastive embedding (its first query) and the
image tokens (the others); the text tower appends a CLS token whose output is the contrastive
text embedding; ``text_decoder`` runs causal self-attention over the text tower's tokens and
cross-attention to the image tokens, then projects onto the vocabulary. State-dict names are
OpenCLIP's (``text.*``, ``visual.*``, ``text_decoder.resblocks.*``, ``text_decoder.cross_attn.*``),
so its checkpoints and hub folders load unchanged.

Unlike OpenCLIP's ``generate``, which re-runs both text networks over the whole prefix at every
step, decoding here keeps a KV cache (``CachedDecoder``); see :mod:`clipforge.models.generation`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import CLIPConfig, MultimodalConfig
from .clip import TowerMethods, build_text_tower, build_vision_tower
from .generation import generate as _generate
from .layers import CrossAttentionBlock, KVCache, ResidualAttentionBlock, activation, init_blocks, norm


class MultimodalDecoder(nn.Module):
    """OpenCLIP's ``MultimodalTransformer``: per layer a causal self-attention block over the text
    tokens, then a cross-attention block to the image tokens; ``ln_final`` and a vocabulary head."""

    def __init__(self, cfg: MultimodalConfig, vocab_size: int, quick_gelu: bool = False, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        act, norm_layer = activation(quick_gelu), norm()
        self.cfg = cfg
        self.width, self.layers = cfg.width, cfg.layers
        self.context_length = cfg.context_length
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(cfg.width, cfg.heads, 4.0, cfg.ls_init_value, act, norm_layer, **factory)
            for _ in range(cfg.layers)])
        self.cross_attn = nn.ModuleList([
            CrossAttentionBlock(cfg.width, cfg.heads, 4.0, cfg.ls_init_value, act, norm_layer, **factory)
            for _ in range(cfg.layers)])
        self.ln_final = norm_layer(cfg.width, **factory)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, vocab_size, **factory))
        self.init_weights()

    def init_weights(self) -> None:
        init_blocks(self.resblocks, self.width, self.layers)
        init_blocks(self.cross_attn, self.width, self.layers)
        nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x) @ self.text_projection  # [B, L, V]

    def forward(self, image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] for text tokens [B, L, D] given image tokens [B, N, D]."""
        seq = text_embs.shape[1]
        if seq > self.context_length:
            raise ValueError(f"the decoder takes at most {self.context_length} tokens, got {seq}")
        # the towers may run in another dtype (bf16 inference casts only them): no-ops otherwise
        x, image_embs = text_embs.to(self.text_projection.dtype), image_embs.to(self.text_projection.dtype)
        for block, cross in zip(self.resblocks, self.cross_attn):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, True, use_reentrant=False)
                x = checkpoint(cross, x, image_embs, use_reentrant=False)
            else:
                x = block(x, is_causal=True)
                x = cross(x, image_embs)
        return self._head(x)

    def project_image(self, image_embs: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every cross-attention layer's keys/values of the image tokens, computed once for decoding."""
        image_embs = image_embs.to(self.text_projection.dtype)
        return [cross.project_context(image_embs) for cross in self.cross_attn]

    def decode_step(self, text_embs: torch.Tensor, caches: List[KVCache], image_kv: list,
                    rows_per_image: int) -> torch.Tensor:
        """Logits [R, n, V] of new positions [R, n, D], attending to the cached ones and to the images."""
        past, n = caches[0].length if caches else 0, text_embs.shape[1]
        if past + n > self.context_length:
            raise ValueError(f"the decoder takes at most {self.context_length} tokens, got {past + n}")
        mask = torch.ones(n, past + n, dtype=torch.bool, device=text_embs.device).tril(past)  # [n, past + n]
        x = text_embs.to(self.text_projection.dtype)
        for block, cross, cache, kv in zip(self.resblocks, self.cross_attn, caches, image_kv):
            x = block(x, attn_mask=mask, cache=cache)
            x = cross(x, context_kv=kv, rows_per_context=rows_per_image)
        return self._head(x)


class CoCa(TowerMethods, nn.Module):
    """Image tower, text tower (with CLS) and caption decoder; outputs as ``open_clip.CoCa``."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.multimodal_cfg is None:
            raise ValueError("a CoCa config needs multimodal_cfg (the caption decoder)")
        if not cfg.custom_text:
            raise ValueError("CoCa keeps its text tower under 'text.' (custom_text=true), as OpenCLIP does")
        self.cfg = cfg
        self.text = build_text_tower(cfg)  # built in OpenCLIP's order, so state dicts list keys alike
        self.visual = build_vision_tower(cfg)
        if not (cfg.vision_cfg.output_tokens and cfg.text_cfg.output_tokens):
            raise ValueError("CoCa's towers must return their tokens (output_tokens=true in vision_cfg and text_cfg)")
        self.text_decoder = MultimodalDecoder(cfg.multimodal_cfg, cfg.text_cfg.vocab_size, cfg.quick_gelu)
        shape = [1] if cfg.nonscalar_logit_scale else []
        init_scale = cfg.init_logit_scale if cfg.init_logit_scale is not None else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.full(shape, float(init_scale)))
        self.logit_bias = (nn.Parameter(torch.full(shape, float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)
        self.pad_id = cfg.text_cfg.pad_id

    @property
    def context_length(self) -> int:
        return self.cfg.multimodal_cfg.context_length

    def _encode_image(self, images: torch.Tensor, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image embedding [B, E], image tokens [B, N, D] for the decoder)."""
        latent, tokens = self.visual(images)
        return (F.normalize(latent, dim=-1) if normalize else latent), tokens

    def _encode_text(self, text: torch.Tensor, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        latent, tokens = self.text(text)
        return (F.normalize(latent, dim=-1) if normalize else latent), tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._encode_image(images, normalize)[0]

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._encode_text(text, normalize)[0]

    def forward(self, image: Optional[torch.Tensor], text: Optional[torch.Tensor] = None,
                image_latent: Optional[torch.Tensor] = None, image_embs: Optional[torch.Tensor] = None,
                output_labels: bool = True) -> Dict[str, torch.Tensor]:
        """OpenCLIP's CoCa outputs: normalized features, caption ``logits`` [B, L-1, V] aligned with
        ``labels`` = text[:, 1:] (teacher forcing), and the logit scale (and bias)."""
        if image_latent is None or image_embs is None:
            image_latent, image_embs = self._encode_image(image)
        if text is None:
            return {"image_features": image_latent, "image_embs": image_embs}
        text_latent, token_embs = self._encode_text(text)
        labels = text[:, 1:] if output_labels else None
        if output_labels:
            token_embs = token_embs[:, :-1]  # position t predicts token t + 1
        out = {"image_features": image_latent, "text_features": text_latent,
               "logits": self.text_decoder(image_embs, token_embs), "logit_scale": self.logit_scale.exp()}
        if labels is not None:
            out["labels"] = labels
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def get_logits(self, image: torch.Tensor, text: torch.Tensor):
        """(image→text logits [Bi, Bt], text→image logits [Bt, Bi]) of the contrastive embeddings."""
        logits = self.logit_scale.exp() * self.encode_image(image) @ self.encode_text(text).T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T

    def decoder(self, image_embs: torch.Tensor, rows_per_image: int, max_len: int, use_cache: bool = True):
        """A next-token scorer for generation: cached when the text tower allows it (causal, with CLS)
        and the model is not FSDP-sharded, else recomputing the prefix (OpenCLIP's way)."""
        cached = use_cache and getattr(self.text, "cls_emb", None) is not None and self.cfg.text_cfg.causal
        # FSDP2 gathers sharded parameters around forward() only; the cached path calls other methods
        sharded = any(hasattr(p, "device_mesh") for p in self.parameters())
        cached = cached and not sharded
        return (CachedDecoder if cached else FullDecoder)(self, image_embs, rows_per_image, max_len)

    generate = _generate

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.text_decoder.grad_checkpointing = enable


class FullDecoder:
    """Next-token logits by re-running both text networks over the whole prefix (OpenCLIP's way);
    the reference for ``CachedDecoder`` and the path for text towers that see the future (HF)."""

    def __init__(self, model: CoCa, image_embs: torch.Tensor, rows_per_image: int, max_len: int):
        self.model = model
        self.image_embs = image_embs  # [B, N, D], one row per image
        self.rows = torch.arange(len(image_embs), device=image_embs.device).repeat_interleave(rows_per_image)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """[R, V] logits after the sequences ``tokens`` [R, T]."""
        _, token_embs = self.model.text(tokens)
        return self.model.text_decoder(self.image_embs[self.rows], token_embs)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """Row r continues the sequence that was row ``index[r]`` (beam reordering, finished rows dropped)."""
        self.rows = self.rows[index]


class CachedDecoder:
    """Next-token logits with a KV cache in both text networks: each call feeds only the tokens it has
    not seen. Rows are the sequences being decoded, ``rows_per_image`` consecutive rows per image."""

    def __init__(self, model: CoCa, image_embs: torch.Tensor, rows_per_image: int, max_len: int):
        self.model = model
        self.rows_per_image = rows_per_image
        self.image_kv = model.text_decoder.project_image(image_embs)  # per layer ([B, H, N, Dh], ...)
        self.text_caches = [KVCache(max_len) for _ in model.text.transformer.resblocks]
        self.decoder_caches = [KVCache(max_len) for _ in model.text_decoder.resblocks]
        rows = len(image_embs) * rows_per_image
        self.key_valid = torch.ones(rows, 0, dtype=torch.bool, device=image_embs.device)
        self.seen = 0
        self.last: Optional[torch.Tensor] = None  # [R] the last token fed

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        new = tokens[:, self.seen:]  # [R, n]
        token_embs, self.key_valid = self.model.text.decode_step(new, self.last, self.text_caches, self.key_valid)
        logits = self.model.text_decoder.decode_step(token_embs, self.decoder_caches, self.image_kv,
                                                     self.rows_per_image)
        self.seen, self.last = tokens.shape[1], tokens[:, -1]
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """As ``FullDecoder.reorder``; rows of one image stay within that image's group of rows,
        unless the group shrinks to one row per image (sampling), where the images follow the rows."""
        for cache in self.text_caches + self.decoder_caches:
            cache.reorder(index)
        self.key_valid = self.key_valid[index]
        self.last = self.last[index] if self.last is not None else None
        if self.rows_per_image == 1:
            self.image_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.image_kv]
