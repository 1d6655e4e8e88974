"""Image preprocessing built from a `PreprocessConfig`, bit-identical to OpenCLIP's transforms.

Exactness with OpenCLIP depends on doing the same PIL operations in the same order: the resize
happens *before* the RGB conversion (PIL resizes RGBA in premultiplied alpha and "P" images with
nearest neighbour), and the train-time random draws come from the same generators (torch for
crop and colour jitter parameters, Python's `random` for the apply/skip coins).
"""
from __future__ import annotations

import functools
import io
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import ColorJitter, Compose, Grayscale, InterpolationMode, RandomResizedCrop

from .config import PreprocessConfig, as_tuple2

# `load_image(draft=True)` keeps every side of a JPEG at least this many times the target side, so
# the bicubic resize that follows still downsamples and the deviation from full decoding stays small.
DRAFT_MARGIN = 2

_RESIZE_MODES = ("shortest", "longest", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear", "random")


@dataclass
class AugmentationConfig:
    """Train-time augmentation; the fields and their meaning are those of OpenCLIP's AugmentationCfg."""

    scale: Tuple[float, float] = (0.9, 1.0)
    """RandomResizedCrop area range"""
    ratio: Optional[Tuple[float, float]] = None
    """RandomResizedCrop aspect-ratio range (timm only)"""
    color_jitter: Optional[Union[float, Tuple[float, ...]]] = None
    """colour jitter strength: one value or a 4-tuple (brightness, contrast, saturation, hue) unless timm"""
    re_prob: Optional[float] = None
    """random-erasing probability (timm only)"""
    re_count: Optional[int] = None
    """random-erasing count (timm only)"""
    use_timm: bool = False
    """build the augmentation with timm's create_transform"""
    color_jitter_prob: Optional[float] = None
    """probability of applying colour jitter"""
    gray_scale_prob: Optional[float] = None
    """probability of converting to grey scale"""

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentationConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def image_transform(
    cfg: PreprocessConfig,
    is_train: bool,
    aug: Optional[AugmentationConfig] = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """Return the callable mapping a PIL image to a normalised CHW float tensor."""
    if cfg.mode != "RGB":
        raise ValueError(f"only mode 'RGB' is supported, got {cfg.mode!r}")
    if cfg.resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {cfg.resize_mode!r}")
    if cfg.interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {cfg.interpolation!r}")
    normalize = functools.partial(F.normalize, mean=_triple(cfg.mean), std=_triple(cfg.std))
    finish = [_to_rgb, _to_tensor, normalize]
    if is_train:
        aug = aug or AugmentationConfig()
        if aug.use_timm:
            return _timm_train_transform(cfg, aug)
        return ImageTransform(_train_steps(cfg, aug) + finish)
    return ImageTransform(_eval_resize_steps(cfg) + finish)


class ImageTransform(Compose):
    """clipforge's image transform: it converts to RGB after resizing, as OpenCLIP's does, so it takes
    a PIL image in any mode, and ``load_image_for`` hands it images in their file's own mode."""


def _eval_resize_steps(cfg: PreprocessConfig) -> List[Callable]:
    size = as_tuple2(cfg.image_size)  # (height, width)
    # "random" only makes sense while training; at eval OpenCLIP falls back to bicubic.
    mode = InterpolationMode.BILINEAR if cfg.interpolation == "bilinear" else InterpolationMode.BICUBIC
    if cfg.resize_mode == "squash":
        return [functools.partial(F.resize, size=list(size), interpolation=mode)]
    if cfg.resize_mode == "longest":
        return [
            functools.partial(resize_keep_ratio, size=size, longest=True, interpolation=mode),
            functools.partial(center_crop_or_pad, size=size, fill=cfg.fill_color),
        ]
    if size[0] == size[1]:
        # An int size makes torchvision scale the short side and truncate the long one.
        resize = functools.partial(F.resize, size=size[0], interpolation=mode)
    else:
        # OpenCLIP's non-square path rounds the long side and always uses bicubic, whatever
        # `interpolation` says; reproduced on purpose.
        resize = functools.partial(
            resize_keep_ratio, size=size, longest=False, interpolation=InterpolationMode.BICUBIC
        )
    return [resize, functools.partial(center_crop_or_pad, size=size, fill=0)]


def _train_steps(cfg: PreprocessConfig, aug: AugmentationConfig) -> List[Callable]:
    unused = [k for k in ("ratio", "re_prob", "re_count") if getattr(aug, k) is not None]
    if aug.color_jitter is not None and not aug.color_jitter_prob:
        unused.append("color_jitter")
    if unused:
        # OpenCLIP ignores these without timm (with a warning); we keep its behaviour to stay identical.
        warnings.warn(f"augmentation settings {unused} have no effect unless use_timm=True", stacklevel=3)
    # Bicubic regardless of `interpolation`, as OpenCLIP does; `RandomResizedCrop` draws from torch.
    crop = RandomResizedCrop(cfg.image_size, scale=tuple(aug.scale), interpolation=InterpolationMode.BICUBIC)
    steps: List[Callable] = [crop, _to_rgb]
    if aug.color_jitter_prob:
        jitter = aug.color_jitter
        if not isinstance(jitter, (tuple, list)) or len(jitter) != 4:
            raise ValueError("color_jitter_prob needs color_jitter = (brightness, contrast, saturation, hue)")
        steps.append(WithProbability(ColorJitter(*jitter), aug.color_jitter_prob))
    if aug.gray_scale_prob:
        steps.append(WithProbability(Grayscale(num_output_channels=3), aug.gray_scale_prob))
    return steps


def _timm_train_transform(cfg: PreprocessConfig, aug: AugmentationConfig) -> Callable:
    """Delegate to timm exactly as OpenCLIP does, so `use_timm` runs match it too."""
    from timm.data import create_transform

    height, width = as_tuple2(cfg.image_size)
    names = ("scale", "ratio", "re_prob", "re_count")
    extra = {k: getattr(aug, k) for k in names if getattr(aug, k) is not None}
    return create_transform(
        input_size=(3, height, width), is_training=True, hflip=0.0, re_mode="pixel",
        mean=_triple(cfg.mean), std=_triple(cfg.std), interpolation=cfg.interpolation,
        color_jitter=aug.color_jitter, **extra,
    )


class WithProbability:
    """Apply `transform` with probability `p`; the coin is Python's `random` (OpenCLIP's choice,
    not torch's as in torchvision's RandomApply), so seeded runs draw the same numbers."""

    def __init__(self, transform: Callable, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        self.transform, self.p = transform, p

    def __call__(self, img: Any) -> Any:
        return self.transform(img) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, p={self.p})"


def resize_keep_ratio(
    img: Any, size: Tuple[int, int], longest: bool, interpolation: InterpolationMode
) -> Any:
    """Scale so the longest (or shortest) side matches `size` = (h, w), rounding the other side."""
    _, h, w = F.get_dimensions(img)
    ratios = (h / size[0], w / size[1])
    ratio = max(ratios) if longest else min(ratios)
    return F.resize(img, [round(h / ratio), round(w / ratio)], interpolation=interpolation)


def center_crop_or_pad(img: Any, size: Tuple[int, int], fill: int = 0) -> Any:
    """Crop `size` = (h, w) from the centre, first padding with `fill` where the image is smaller.

    Odd padding puts the extra pixel on the right/bottom; the crop offset rounds half to even,
    matching torchvision's CenterCrop so both resize modes share this function.
    """
    _, h, w = F.get_dimensions(img)
    out_h, out_w = size
    if out_h > h or out_w > w:
        pad_w, pad_h = max(out_w - w, 0), max(out_h - h, 0)
        img = F.pad(img, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=fill)
        _, h, w = F.get_dimensions(img)
    top, left = int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0))
    return F.crop(img, top, left, out_h, out_w)


def _to_rgb(img: Any) -> Any:
    return img.convert("RGB") if isinstance(img, Image.Image) else img


def _to_tensor(img: Any) -> torch.Tensor:
    return img if isinstance(img, torch.Tensor) else F.to_tensor(img)


def _triple(v: Union[float, Sequence[float]]) -> Tuple[float, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (float(v),) * 3


class ImageLoadError(OSError, ValueError):
    """An image could not be opened or decoded; the message names the file and the reason.

    An ``OSError`` (a missing or unreadable file) and a ``ValueError`` (content that is not an image),
    so callers catching either keep working.
    """


ImageSource = Union[str, os.PathLike, bytes, bytearray]


def load_image(
    source: ImageSource,
    target_size: Optional[Union[int, Tuple[int, int]]] = None,
    draft: bool = False,
    convert_rgb: bool = True,
) -> Image.Image:
    """Open an image (a path, or the bytes of an encoded file) fully decoded, as RGB unless ``convert_rgb=False``
    (the file's own mode, for a transform that converts after resizing: see ``load_image_for``).

    This is clipforge's one image opener: training data, evaluation sets and ``classify`` all read
    images through it, so truncated files fail here (not later in a transform) with the same message.

    With `draft=True` and a `target_size` (h, w), a JPEG is decoded at a reduced DCT scale
    (1/2, 1/4 or 1/8) when every side stays at least `DRAFT_MARGIN` times the target side; other
    formats and smaller JPEGs decode in full. This is a speed/exactness trade-off: DCT scaling is
    not PIL's bicubic filter, so the final tensor is close to, but not bit-identical with, the one
    from a full decode (and OpenCLIP). It is therefore off by default. Converting to RGB before the
    resize differs from OpenCLIP's ``preprocess(Image.open(p))`` for images whose mode PIL resizes
    differently: alpha (RGBA, premultiplied), palette ("P", nearest neighbour) and 16-bit grey
    ("I;16"); ``load_image_for`` therefore keeps the mode for clipforge's transforms, which gives
    OpenCLIP's tensor exactly for every mode. EXIF orientation is not applied, as in OpenCLIP
    (tests/test_bad_inputs.py checks all of these).
    """
    is_bytes = isinstance(source, (bytes, bytearray))
    try:
        with Image.open(io.BytesIO(source) if is_bytes else source) as img:
            if draft and target_size is not None:
                height, width = as_tuple2(target_size)
                # PIL picks the largest scale whose (ceil-rounded) output is >= the requested size.
                img.draft("RGB", (DRAFT_MARGIN * width, DRAFT_MARGIN * height))
            img.load()
            return img.convert("RGB") if convert_rgb else img.copy()  # a copy outlives the closed file
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        name = f"<{len(source)} bytes>" if is_bytes else repr(os.fspath(source))
        raise ImageLoadError(f"cannot read image {name}: {type(err).__name__}: {err}") from err


def load_image_for(transform: Optional[Callable], source: ImageSource,
                   target_size: Optional[Union[int, Tuple[int, int]]] = None, draft: bool = False) -> Image.Image:
    """``load_image`` for feeding ``transform``: the file's own mode for clipforge's ``ImageTransform``
    (so alpha, palette and 16-bit images match OpenCLIP's ``preprocess(Image.open(p))``), RGB for any
    other transform (a timm one, a user's), which may expect it."""
    return load_image(source, target_size, draft, convert_rgb=not isinstance(transform, ImageTransform))


def rgb_for(transform: Optional[Callable], image: Image.Image) -> Image.Image:
    """An already opened PIL image as ``transform`` takes it (see ``load_image_for``)."""
    return image if isinstance(transform, ImageTransform) else image.convert("RGB")
