"""Text towers from Hugging Face ``transformers``, keyed like OpenCLIP's ``HFTextEncoder``.

State-dict layout: ``transformer.*`` (the HF model, or its encoder for encoder-decoder models)
and ``proj.*``; the CLIP wrapper puts both under ``text.``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch
from torch import nn

from ..config import TextConfig


@dataclass(frozen=True)
class HFArch:
    """Where a transformers architecture keeps what the tower needs (looked up by ``config.model_type``)."""
    width_attr: str = "hidden_size"
    layers_attr: str = "layer"  # the list of blocks inside the encoder, for partial locking
    embeddings_attr: str = "embeddings"
    default_pooler: str = "mean_pooler"


HF_ARCHS: Dict[str, HFArch] = {
    "roberta": HFArch(),
    "xlm-roberta": HFArch(),
    "bert": HFArch(default_pooler="cls_pooler"),
    "mt5": HFArch(width_attr="d_model", layers_attr="block", embeddings_attr="embed_tokens"),
    "m2m_100": HFArch(width_attr="d_model", layers_attr="layers", embeddings_attr="embed_tokens",
                      default_pooler="cls_pooler"),
}


def import_transformers():
    try:
        import transformers
    except ImportError as e:  # optional dependency
        raise ImportError("this model's text tower comes from transformers: pip install 'clipforge[hf]'") from e
    return transformers


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the non-padding tokens: hidden [B, L, D], mask [B, L] -> [B, D]."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise max over the non-padding tokens: [B, L, D] -> [B, D]."""
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).max(dim=1).values


POOLERS = ("mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler")


class HFTextTower(nn.Module):
    """A transformers encoder, a pooler over its token outputs, and a projection to ``embed_dim``."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        transformers = import_transformers()
        self.cfg = cfg
        self.output_dim = embed_dim
        self.config = transformers.AutoConfig.from_pretrained(cfg.hf_model_name)
        self.arch = HF_ARCHS.get(self.config.model_type, HFArch())
        self.pooler_type = cfg.hf_pooler_type or self.arch.default_pooler
        if self.pooler_type not in POOLERS:
            raise ValueError(f"hf_pooler_type must be one of {POOLERS}, got {self.pooler_type!r}")
        # Only "cls_pooler" reads the model's own pooler head, so only then does it exist (as in OpenCLIP).
        kwargs = {} if getattr(self.config, "is_encoder_decoder", False) else \
            {"add_pooling_layer": self.pooler_type == "cls_pooler"}
        if cfg.hf_model_pretrained:
            model = transformers.AutoModel.from_pretrained(cfg.hf_model_name, **kwargs)
        else:
            model = transformers.AutoModel.from_config(self.config, **kwargs)
        self.transformer = model.encoder if getattr(self.config, "is_encoder_decoder", False) else model
        self.vocab_size = getattr(self.config, "vocab_size", 0)
        self.context_length = getattr(self.config, "max_position_embeddings", 0)

        width = getattr(self.config, self.arch.width_attr)
        proj = cfg.hf_proj_type
        if proj in (None, "none", ""):
            if width != embed_dim:
                raise ValueError(f"hf_proj_type {proj!r} needs the text width ({width}) to equal embed_dim "
                                 f"({embed_dim})")
            self.proj = nn.Identity()
        elif proj == "linear":
            self.proj = nn.Linear(width, embed_dim, bias=False)
        elif proj == "mlp":
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, embed_dim, bias=False))
        else:
            raise ValueError(f"hf_proj_type must be 'linear', 'mlp' or 'none', got {proj!r}")

    def pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        if self.pooler_type == "mean_pooler":
            return mean_pool(out.last_hidden_state, mask)
        if self.pooler_type == "max_pooler":
            return max_pool(out.last_hidden_state, mask)
        if self.pooler_type == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def forward(self, text: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        mask = (text != self.config.pad_token_id).long()  # [B, L]: 1 for real tokens
        out = self.transformer(input_ids=text, attention_mask=mask)
        pooled = self.proj(self.pool(out, mask))
        if not self.cfg.output_tokens:
            return pooled
        tokens = out.last_hidden_state
        if self.pooler_type == "cls_pooler":
            tokens = tokens[:, 1:]  # the CLS position is the pooled output, not a token
        return pooled, tokens

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze embeddings and all but the last ``unlocked_layers`` blocks; the projection stays trainable.

        LayerNorm weights stay trainable when ``freeze_layer_norm`` is False.
        """
        def freeze(module: nn.Module) -> None:
            for name, p in module.named_parameters():
                p.requires_grad = (not freeze_layer_norm) if "LayerNorm" in name.split(".") else False

        if not unlocked_layers:
            freeze(self.transformer)
            return
        encoder = getattr(self.transformer, "encoder", self.transformer)
        blocks = list(getattr(encoder, self.arch.layers_attr))
        embeddings = getattr(self.transformer, self.arch.embeddings_attr)
        for module in [embeddings, *blocks][:-unlocked_layers]:
            freeze(module)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_* to activation_checkpointing_*; older releases lack the new names.
        t = self.transformer
        fn = (getattr(t, "activation_checkpointing_enable", None) or t.gradient_checkpointing_enable) if enable \
            else (getattr(t, "activation_checkpointing_disable", None) or t.gradient_checkpointing_disable)
        fn()

    def no_weight_decay(self) -> set:
        return set()
