"""Hugging Face tokenizers behind the CLIP tokenizer interface (HF text towers, SigLIP).

Mirrors OpenCLIP's ``HFTokenizer`` so ids match it: clean, then pad/truncate to a fixed length.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, List, Optional, Union

import torch

from .bpe import DEFAULT_CONTEXT_LENGTH, TextInput, get_clean_fn

_INSTALL_HINT = "HFTokenizer needs `transformers`; install it with `pip install clipforge[hf]`."
TOKENIZER_MODES = ("", "clips")


def _load_auto_tokenizer(name_or_path: str, cache_dir: Optional[str], **kwargs: Any) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # transformers is an optional dependency
        raise ImportError(_INSTALL_HINT) from e
    return AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, **kwargs)


class HFTokenizer:
    """``tokenizer(texts) -> LongTensor [N, context_length]`` from a ``transformers`` tokenizer.

    ``tokenizer`` is a hub name, a local directory, or an already-built tokenizer object.
    ``clean``: 'whitespace' (default), 'lower' or 'canonicalize' (SigLIP's big_vision rule).
    ``strip_sep_token`` zeroes [SEP] ids, for towers that pool without it (CLIPA/BERT).
    ``tokenizer_mode='clips'`` frames ids as [BOS] text [EOS] pad... [CLS] (CLIPS models).
    """

    def __init__(
        self,
        tokenizer: Union[str, Any],
        context_length: Optional[int] = DEFAULT_CONTEXT_LENGTH,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        language: Optional[str] = None,
        cache_dir: Optional[str] = None,
        tokenizer_mode: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        mode = tokenizer_mode or ""
        if mode not in TOKENIZER_MODES:
            raise ValueError(f"unknown tokenizer_mode {tokenizer_mode!r}; expected None or 'clips'")
        self.tokenizer_mode = mode
        self.context_length = context_length
        self.clean = clean
        self._clean_fn = get_clean_fn(clean)
        self.strip_sep_token = strip_sep_token
        if isinstance(tokenizer, str):
            self.tokenizer = _load_auto_tokenizer(tokenizer, cache_dir, **kwargs)
        else:
            self.tokenizer = tokenizer
        if language is not None:
            self.set_language(language)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def save_pretrained(self, dest: str) -> None:
        self.tokenizer.save_pretrained(dest)

    def set_language(self, src_lang: str) -> None:
        """Select the source language of multilingual tokenizers (e.g. NLLB/M2M)."""
        set_lang = getattr(self.tokenizer, "set_src_lang_special_tokens", None)
        if callable(set_lang):
            set_lang(src_lang)
        else:
            warnings.warn(f"{type(self.tokenizer).__name__} has no source language to set.")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids back to text, e.g. a caption that a CoCa with this tokenizer generated.

        With ``skip_special_tokens`` (the default) the text ends at the first end token ([SEP] or
        EOS, whatever follows it is generation padding) and special tokens are dropped, the rule of
        ``CLIPTokenizer.decode``.
        """
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ends = {t for t in (self.tokenizer.eos_token_id, self.tokenizer.sep_token_id) if t is not None}
            ids = next((ids[:n] for n, i in enumerate(ids) if i in ends), ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: TextInput, context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if not length or length < 1:
            raise ValueError(f"context_length must be a positive integer, got {length!r}")
        cleaned = [self._clean_fn(t) for t in texts]
        if self.tokenizer_mode == "clips":
            return self._clips_ids(cleaned, length)
        ids = self.tokenizer(
            cleaned, return_tensors="pt", max_length=length, padding="max_length", truncation=True
        ).input_ids
        if self.strip_sep_token:
            ids = ids.masked_fill(ids == self.tokenizer.sep_token_id, 0)
        return ids

    def _clips_ids(self, texts: List[str], length: int) -> torch.Tensor:
        """[BOS] text [EOS] then pad, with [CLS] always in the last slot (CLIPS pools there)."""
        tok = self.tokenizer
        encoded = tok(texts, add_special_tokens=False, padding=False, truncation=False)["input_ids"]
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, ids in enumerate(encoded):
            framed = [tok.bos_token_id, *ids[: length - 3], tok.eos_token_id][: length - 1]
            framed += [tok.pad_token_id] * (length - 1 - len(framed))
            out[row] = torch.tensor(framed + [tok.cls_token_id], dtype=torch.long)
        return out
