"""Tokenizers: CLIP's BPE (OpenAI/OpenCLIP ids) and a wrapper for Hugging Face tokenizers."""
from __future__ import annotations

from functools import lru_cache

import torch

from .bpe import DEFAULT_CONTEXT_LENGTH, CLIPTokenizer, TextInput, canonicalize_text, get_clean_fn
from .hf import HFTokenizer

__all__ = [
    "CLIPTokenizer", "HFTokenizer", "DEFAULT_CONTEXT_LENGTH", "tokenize", "default_tokenizer",
    "canonicalize_text", "get_clean_fn",
]


@lru_cache(maxsize=None)
def default_tokenizer() -> CLIPTokenizer:
    """One shared CLIPTokenizer, built on first use (reading the vocabulary takes ~0.1 s)."""
    return CLIPTokenizer()


def tokenize(texts: TextInput, context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """``open_clip.tokenize`` equivalent: LongTensor [N, context_length] of CLIP BPE ids."""
    return default_tokenizer()(texts, context_length=context_length)
