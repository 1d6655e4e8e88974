"""Batched, no-grad feature extraction shared by every evaluation (bounded memory, tqdm progress).

``precision`` is an autocast precision (:data:`clipforge.precision.PRECISIONS`); the default ``fp32``
runs without autocast, so CPU results are exact. Only duck-typed model methods are used here
(``encode_image``, ``encode_text``, ``text.pooled_lengths``), so OpenCLIP models work too.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..precision import autocast

Device = Union[str, torch.device]


def model_device(model: torch.nn.Module, device: Optional[Device] = None) -> torch.device:
    """The device to run on: the one asked for, else where the model's weights live."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def iter_image_features(
    model: torch.nn.Module,
    loader: Iterable,
    device: Optional[Device] = None,
    precision: str = "fp32",
    normalize: bool = True,
    desc: str = "images",
    use_tqdm: bool = True,
) -> Iterator[Tuple[torch.Tensor, object]]:
    """Yield ``(features [B, D] float32 on CPU, rest)`` for each ``(images, rest)`` batch of ``loader``.

    Features leave the device batch by batch, so device memory holds one batch only.
    """
    dev = model_device(model, device)
    for images, rest in tqdm(loader, desc=desc, disable=not use_tqdm):
        with torch.no_grad(), autocast(precision, dev):
            feats = model.encode_image(images.to(dev))
        feats = feats.float()
        if normalize:
            feats = F.normalize(feats, dim=-1)
        yield feats.cpu(), rest


def image_features(
    model: torch.nn.Module,
    loader: Iterable,
    device: Optional[Device] = None,
    precision: str = "fp32",
    normalize: bool = True,
    use_tqdm: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All image features [N, D] and labels [N] of a ``(images, labels)`` loader, on CPU."""
    feats, labels = [], []
    for f, y in iter_image_features(model, loader, device, precision, normalize, use_tqdm=use_tqdm):
        feats.append(f)
        labels.append(torch.as_tensor(y))
    if not feats:
        raise ValueError("the data loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def text_features(
    model: torch.nn.Module,
    tokenizer,
    texts: list,
    device: Optional[Device] = None,
    precision: str = "fp32",
    batch_size: int = 256,
) -> torch.Tensor:
    """Normalised text features [len(texts), D] float32 on CPU, encoded ``batch_size`` at a time."""
    dev = model_device(model, device)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(dev)
        with torch.no_grad(), autocast(precision, dev):
            feats = model.encode_text(tokens)
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


def text_lengths(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per prompt, the number of leading positions its pooled text feature depends on: [B] int64.

    The text tower knows (``model.text.pooled_lengths``: the end-of-text rule its own trimming
    uses); a tower without that method, or a model without ``.text``, needs every position.
    """
    pooled_lengths = getattr(getattr(model, "text", None), "pooled_lengths", None)
    if pooled_lengths is not None:
        return pooled_lengths(tokens)
    return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)


def encode_text_batched(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 256,
                        normalize: bool = False, use_tqdm: bool = False) -> torch.Tensor:
    """``model.encode_text`` over many prompts, grouped by length; rows come back in input order.

    ``encode_text`` already drops positions after the longest end-of-text token of its batch.
    Sorting by :func:`text_lengths` first makes each batch's longest prompt close to its shortest,
    so a set of mixed prompts (templates x class names) runs ~L_mean instead of ~L_max positions.
    Each row's result is the one ``encode_text`` gives it alone, so this is exact up to matmul
    blocking (<= 1e-6).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokens.shape[0] == 0:
        return model.encode_text(tokens, normalize=normalize)
    order = torch.argsort(text_lengths(model, tokens), stable=True)  # [B], shortest first
    starts = range(0, tokens.shape[0], batch_size)
    chunks = [model.encode_text(tokens[order[start:start + batch_size]], normalize=normalize)
              for start in tqdm(starts, desc="prompts", disable=not use_tqdm, unit_scale=batch_size)]
    sorted_feats = torch.cat(chunks)  # [B, D] in length order
    out = torch.empty_like(sorted_feats)
    out[order] = sorted_feats
    return out
