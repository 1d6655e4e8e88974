"""Batched, no-grad feature extraction shared by every evaluation (bounded memory, tqdm progress)."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

Device = Union[str, torch.device]


def model_device(model: torch.nn.Module, device: Optional[Device] = None) -> torch.device:
    """The device to run on: the one asked for, else where the model's weights live."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def autocast(device: torch.device, amp: bool):
    """Mixed precision as clip_benchmark's ``--amp`` (off by default here so CPU results are exact fp32)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type)


def iter_image_features(
    model: torch.nn.Module,
    loader: Iterable,
    device: Optional[Device] = None,
    amp: bool = False,
    normalize: bool = True,
    desc: str = "images",
    use_tqdm: bool = True,
) -> Iterator[Tuple[torch.Tensor, object]]:
    """Yield ``(features [B, D] float32 on CPU, rest)`` for each ``(images, rest)`` batch of ``loader``.

    Features leave the device batch by batch, so device memory holds one batch only.
    """
    dev = model_device(model, device)
    for images, rest in tqdm(loader, desc=desc, disable=not use_tqdm):
        with torch.no_grad(), autocast(dev, amp):
            feats = model.encode_image(images.to(dev))
        feats = feats.float()
        if normalize:
            feats = F.normalize(feats, dim=-1)
        yield feats.cpu(), rest


def image_features(
    model: torch.nn.Module,
    loader: Iterable,
    device: Optional[Device] = None,
    amp: bool = False,
    normalize: bool = True,
    use_tqdm: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All image features [N, D] and labels [N] of a ``(images, labels)`` loader, on CPU."""
    feats, labels = [], []
    for f, y in iter_image_features(model, loader, device, amp, normalize, use_tqdm=use_tqdm):
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
    amp: bool = False,
    batch_size: int = 256,
) -> torch.Tensor:
    """Normalised text features [len(texts), D] float32 on CPU, encoded ``batch_size`` at a time."""
    dev = model_device(model, device)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(dev)
        with torch.no_grad(), autocast(dev, amp):
            feats = model.encode_text(tokens)
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)
