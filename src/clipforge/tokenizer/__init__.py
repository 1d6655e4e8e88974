"""Tokenizers: CLIP's BPE (OpenAI/OpenCLIP ids) and a wrapper for Hugging Face tokenizers."""
from __future__ import annotations

from functools import lru_cache

import torch

from .bpe import DEFAULT_CONTEXT_LENGTH, CLIPTokenizer, TextInput, canonicalize_text, get_clean_fn
from .hf import HFTokenizer

__all__ = [
    "CLIPTokenizer", "HFTokenizer", "DEFAULT_CONTEXT_LENGTH", "tokenize", "default_tokenizer",
    "canonicalize_text", "get_clean_fn", "decode",
]


@lru_cache(maxsize=None)
def default_tokenizer() -> CLIPTokenizer:
    """One shared CLIPTokenizer, built on first use (reading the vocabulary takes ~0.1 s)."""
    return CLIPTokenizer()


def tokenize(texts: TextInput, context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """``open_clip.tokenize`` equivalent: LongTensor [N, context_length] of CLIP BPE ids."""
    return default_tokenizer()(texts, context_length=context_length)


def decode(tokens, skip_special_tokens: bool = True) -> str:
    """``open_clip.decode`` equivalent for one row of CLIP BPE ids (e.g. a caption from ``generate``),
    cleaned of the special tokens and of what follows the end of text unless ``skip_special_tokens=False``."""
    return default_tokenizer().decode(tokens, skip_special_tokens=skip_special_tokens)
