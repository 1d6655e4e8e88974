"""CLIP's text tower: token + positional embedding, a transformer, final LN, pooling, projection.

With ``embed_cls`` (CoCa) a learned CLS embedding is appended after the text: the contrastive
feature is that position's output after ``ln_final``, the text tokens (without ``ln_final``) feed
CoCa's decoder, and padding keys are masked with OpenCLIP's (shifted, "legacy") pad mask.

``forward_intermediates`` returns every block's tokens with OpenCLIP's signature and output keys.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import TextConfig
from .layers import KVCache, Transformer, activation, lock_groups, norm

POOL_TYPES = ("argmax", "first", "last", "eos", "none")


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim: int, quick_gelu: bool = False, device=None, dtype=None):
        super().__init__()
        if cfg.pool_type not in POOL_TYPES:
            raise ValueError(f"text pool_type must be one of {POOL_TYPES}, got {cfg.pool_type!r}")
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.output_dim = output_dim
        factory = dict(device=device, dtype=dtype)
        norm_layer = norm(cfg.norm_kwargs)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, **factory)
        self.cls_emb = nn.Parameter(torch.empty(cfg.width, **factory)) if cfg.embed_cls else None
        num_pos = cfg.context_length + (1 if cfg.embed_cls else 0)
        self.positional_embedding = nn.Parameter(torch.empty(num_pos, cfg.width, **factory))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.ls_init_value,
                                       activation(quick_gelu, cfg.act_kwargs), norm_layer, **factory)
        self.ln_final = norm_layer(cfg.width, **factory)
        if cfg.proj_type == "none" or not output_dim:
            self.text_projection = None
        elif cfg.proj_bias:
            self.text_projection = nn.Linear(cfg.width, output_dim, **factory)
        else:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim, **factory))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        self.transformer.init_weights()
        proj_std = self.cfg.width ** -0.5
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=proj_std)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=proj_std)

    def pooled_lengths(self, text: torch.Tensor) -> torch.Tensor:
        """Per row, how many leading positions the pooled output depends on: [B] int64.

        clipforge's one end-of-text rule (``_trim`` and length bucketing in
        ``clipforge.evaluate.features.text_lengths`` both use it). With a causal mask, position i
        only attends to positions <= i, so a feature pooled at one token (the EOT for ``argmax``/
        ``eos``, or the first) depends on nothing after it; other towers need the whole row.
        """
        full = torch.full((text.shape[0],), text.shape[1], dtype=torch.long, device=text.device)
        index = self._pool_index(text)
        if not self.cfg.causal or self.cfg.output_tokens or self.cls_emb is not None or index is None:
            return full
        return index + 1

    def _pool_index(self, text: torch.Tensor) -> Optional[torch.Tensor]:
        """[B] the position each row is pooled at, for pooling at one token; None otherwise."""
        if self.cfg.pool_type == "argmax":
            return text.argmax(dim=-1)
        if self.cfg.pool_type == "eos":
            return (text == self.cfg.eos_id).int().argmax(dim=-1)
        if self.cfg.pool_type == "first":
            return torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
        return None

    def _trim(self, text: torch.Tensor) -> torch.Tensor:
        """Drop trailing positions no pooled output can see: exact (see ``pooled_lengths``), and far
        cheaper for short prompts padded to 77 tokens."""
        if text.numel() == 0:
            return text
        return text[:, : int(self.pooled_lengths(text).max())]

    def _packed_lengths(self, text: torch.Tensor, index: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-row lengths to run the causal blocks on packed tokens (``Transformer(lengths=)``), or None.

        Packing pays when rows are of unequal length (random training batches), and is skipped when
        it would save under a tenth of the tokens (batches bucketed by length, one prompt) and while
        tracing or compiling, where its data-dependent token count would break static shapes.
        """
        if not self.cfg.causal or text.numel() == 0 or _tracing():
            return None
        lengths = index + 1
        return lengths if int(lengths.sum()) < 0.9 * text.numel() else None

    def _embeds(self, text: torch.Tensor) -> torch.Tensor:
        """Token plus positional embeddings [B, L, D] (no CLS), in the blocks' dtype."""
        seq = text.shape[1]
        if seq > self.positional_embedding.shape[0]:
            raise ValueError(f"text has {seq} tokens but the model's context length is "
                             f"{self.positional_embedding.shape[0]}")
        dtype = self.transformer.resblocks[0].attn.in_proj_weight.dtype if len(self.transformer.resblocks) else None
        x = self.token_embedding(text)  # [B, L, D]
        x = x + self.positional_embedding[:seq].to(x.dtype)
        return x.to(dtype) if dtype is not None else x

    def forward_features(self, text: torch.Tensor) -> torch.Tensor:
        """Token features after ``ln_final``: [B, L', D] with L' <= context length (see ``_trim``)."""
        x = self.transformer(self._embeds(text), is_causal=self.cfg.causal)
        return self.ln_final(x)

    def pool(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        index = self._pool_index(text)
        if index is not None:
            return x[torch.arange(x.shape[0], device=x.device), index]  # [B, D]
        if self.cfg.pool_type == "last":
            return x[:, -1]
        return x

    def _cls_forward(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D] after ln_final, text tokens [B, L, D] without it) with the appended CLS."""
        x, mask = self._cls_embeds(text)
        x = self.transformer(x, attn_mask=mask)
        return self.ln_final(x[:, -1]), x[:, :-1]

    def _cls_embeds(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, L+1, D] with the CLS appended, and the attention mask [B, 1, L+1, L+1]."""
        batch, seq = text.shape
        if seq + 1 > self.positional_embedding.shape[0]:
            raise ValueError(f"text has {seq} tokens but the model's context length is {self.context_length}")
        x = self.token_embedding(text)  # [B, L, D]
        x = torch.cat([x, self.cls_emb.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)], dim=1)  # [B, L+1, D]
        x = x + self.positional_embedding[:seq + 1].to(x.dtype)
        causal = torch.ones(seq + 1, seq + 1, dtype=torch.bool, device=text.device)
        causal = causal.tril() if self.cfg.causal else causal
        return x, causal & self.key_valid(text, cls=True)[:, None, None, :]

    def key_valid(self, text: torch.Tensor, cls: bool = False,
                  previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L (+1 with ``cls``)] which positions may be attended to, as OpenCLIP's CoCa computes it.

        OpenCLIP builds the pad mask with the CLS column prepended instead of appended (its
        ``correct_cls_mask=False``, which all published CoCa weights were trained with): position
        ``p`` is masked when token ``p - 1`` is padding, position 0 never. ``previous`` [B] is the
        token before ``text`` when ``text`` continues a sequence (incremental decoding).
        """
        valid = text != self.cfg.pad_id  # [B, L]
        first = (previous != self.cfg.pad_id)[:, None] if previous is not None else valid.new_ones(len(text), 1)
        return torch.cat([first, valid] if cls else [first, valid[:, :-1]], dim=1)

    def decode_step(self, text: torch.Tensor, previous: Optional[torch.Tensor], caches: List[KVCache],
                    key_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (as ``forward``'s, without the CLS) of new positions, attending to cached ones.

        ``text`` [R, n] continues the sequences whose keys ``caches`` hold (``previous`` [R]: their
        last token, None at the start) and ``key_valid`` [R, past] says which of those may be
        attended to. Returns (tokens [R, n, D], key_valid [R, past + n]). The CLS position is left
        out: with the causal mask no text position sees it, so the tokens are exact.
        """
        if self.cls_emb is None or not self.cfg.causal:
            raise ValueError("incremental decoding needs a causal text tower with a CLS embedding (CoCa)")
        past, n = caches[0].length if caches else 0, text.shape[1]
        x = self.token_embedding(text)  # [R, n, D]
        x = x + self.positional_embedding[past:past + n].to(x.dtype)
        key_valid = torch.cat([key_valid, self.key_valid(text, previous=previous)], dim=1)  # [R, past + n]
        causal = torch.ones(n, past + n, dtype=torch.bool, device=text.device).tril(past)  # [n, past + n]
        mask = causal & key_valid[:, None, None, :]  # [R, 1, n, past + n]
        return self.transformer(x, attn_mask=mask, caches=caches), key_valid

    def forward(self, text: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.cls_emb is not None:
            pooled, tokens = self._cls_forward(text)
        else:
            index = None
            if not self.cfg.output_tokens:
                text = self._trim(text)
                index = self._pool_index(text)
            if index is not None:  # only the pooled token leaves the trunk: the last block runs for it alone
                tokens = self.transformer(self._embeds(text), is_causal=self.cfg.causal, keep=index,
                                          lengths=self._packed_lengths(text, index))
                pooled = self.ln_final(tokens[:, 0])
            else:
                tokens = self.forward_features(text)
                pooled = self.pool(tokens, text)
        pooled = self.project(pooled)
        return (pooled, tokens) if self.cfg.output_tokens else pooled

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        # Casts are no-ops in fp32; they let bf16 inference keep the projection in fp32.
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled.to(self.text_projection.weight.dtype))
        if self.text_projection is not None:
            return pooled.to(self.text_projection.dtype) @ self.text_projection
        return pooled

    def forward_intermediates(self, text: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              stop_early: bool = False, normalize_intermediates: bool = False,
                              intermediates_only: bool = False, output_fmt: str = "NLC",
                              output_extra_tokens: bool = False) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
        """Per-block token features, as OpenCLIP's ``TextTransformer.forward_intermediates``.

        Args:
            text: token ids [B, L], L <= context length (no trimming: every position is returned).
            indices: which blocks: None all, an int the last n, a list those (negative from the end).
            stop_early: do not run the blocks after the last selected one (``text_features`` then
                pool that block's output).
            normalize_intermediates: apply ``ln_final`` to every intermediate.
            intermediates_only: return only the intermediates.
            output_fmt: only "NLC" ([B, L, D]). OpenCLIP's default here is "NCHW", which it then
                rejects; clipforge defaults to the one format that works.
            output_extra_tokens: with an appended CLS (CoCa), also return its token per block.

        Returns a dict: ``text_intermediates_suffix`` (CLS tokens [B, 1, D], with
        ``output_extra_tokens`` and a CLS), ``text_intermediates`` (list, block order, CLS left out)
        and ``text_features`` [B, output_dim] (unless ``intermediates_only``; not L2-normalised).
        """
        if output_fmt != "NLC":
            raise ValueError(f"Output format must be NLC, got {output_fmt!r}")
        if self.cls_emb is not None:
            x, mask = self._cls_embeds(text)
            x, intermediates = self.transformer.forward_intermediates(x, attn_mask=mask, indices=indices,
                                                                      stop_early=stop_early)
        else:
            x, intermediates = self.transformer.forward_intermediates(self._embeds(text), indices=indices,
                                                                      stop_early=stop_early,
                                                                      is_causal=self.cfg.causal)
        if normalize_intermediates:
            intermediates = [self.ln_final(t) for t in intermediates]
        output: Dict[str, Union[torch.Tensor, List[torch.Tensor]]] = {}
        if self.cls_emb is not None:
            if output_extra_tokens:
                output["text_intermediates_suffix"] = [t[:, -1:] for t in intermediates]
            intermediates = [t[:, :-1] for t in intermediates]
        output["text_intermediates"] = intermediates
        if intermediates_only:
            return output
        pooled = self.ln_final(x[:, -1]) if self.cls_emb is not None else self.pool(self.ln_final(x), text)
        output["text_features"] = self.project(pooled)
        return output

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last one ``indices`` selects (and ``ln_final`` / the projection);
        returns the selected block indices. As OpenCLIP's."""
        take_indices = self.transformer.prune_intermediate_layers(indices)
        if prune_norm:
            self.ln_final = nn.Identity()
        if prune_head:
            self.text_projection = None
        return take_indices

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        return {"positional_embedding"} | ({"cls_emb"} if self.cls_emb is not None else set())

    def param_groups_for_lock(self) -> List[list]:
        embed = [self.token_embedding.weight, self.positional_embedding]
        embed += [self.cls_emb] if self.cls_emb is not None else []
        blocks = [list(b.parameters()) for b in self.transformer.resblocks]
        proj = self.text_projection
        head = list(self.ln_final.parameters()) + (list(proj.parameters()) if isinstance(proj, nn.Module)
                                                    else [proj] if proj is not None else [])
        return [embed, *blocks, head]

    def lock(self, unlocked_layers: int = 0) -> None:
        lock_groups(self, self.param_groups_for_lock(), unlocked_layers)
