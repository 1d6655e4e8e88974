"""Synthetic data: random tensors for smoke tests, and procedural captioned shapes for the demo.

The shapes world is small enough for a tiny CLIP to learn in minutes on a CPU, yet has held-out
attribute combinations (e.g. "purple star" never appears in training), so zero-shot accuracy on
them measures compositional generalisation rather than memorisation. Every sample is a pure
function of (seed, index), so splits are reproducible regardless of how many are generated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 180), "orange": (250, 140, 20), "cyan": (30, 210, 220), "pink": (250, 120, 190),
}
SIZES = {"small": 0.13, "large": 0.26}  # radius as a fraction of the image side
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
CAPTION_TEMPLATES = (
    "a photo of a {size} {color} {shape} {where}",
    "a {color} {shape}, {size}, {pos} side",
    "a {size} {color} {shape} on a {bg} background",
    "{color} {shape}",
    "there is a {color} {shape} {where} of the image",
    "a picture showing a {size} {color} {shape}",
    "{size} {color} {shape} {where}, {bg} background",
    "an image of a {color} {shape} {where}",
)
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture showing a {}.")


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    if shape == "square":
        k, start, radii = 4, np.pi / 4, [r * 1.2]
    elif shape == "diamond":
        k, start, radii = 4, 0.0, [r * 1.2]
    elif shape == "triangle":
        k, start, radii = 3, -np.pi / 2, [r * 1.15]
    elif shape == "hexagon":
        k, start, radii = 6, 0.0, [r]
    elif shape == "star":
        k, start, radii = 10, -np.pi / 2, [r * 1.15, r * 0.48]
    else:
        raise ValueError(shape)
    pts = []
    for i in range(k):
        a = start + rot + 2 * np.pi * i / k
        rad = radii[i % len(radii)]
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def render_shape(shape: str, color: str, size: str, position: str, background: str,
                 image_size: int = 64, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Draw one shape into an ``image_size``² RGB uint8 array (small jitter when ``rng`` given)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    s = image_size
    jit = rng.uniform(-1, 1, size=6)
    bg = tuple(int(np.clip(c + 10 * jit[0], 0, 255)) for c in BACKGROUNDS[background])
    fg = tuple(int(np.clip(c + 15 * j, 0, 255)) for c, j in zip(COLORS[color], jit[1:4]))
    px, py = POSITIONS[position]
    cx, cy = (px + 0.04 * jit[4]) * s, (py + 0.04 * jit[5]) * s
    r = SIZES[size] * s * rng.uniform(0.9, 1.1)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "cross":
        w = r * 0.4
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    else:
        d.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.12, 0.12)), fill=fg)
    return np.asarray(img, dtype=np.uint8)


@dataclass
class ShapesConfig:
    """Generated coloured-shape images with captions (the demo's data; no download)."""

    image_size: int = 64
    """side of the rendered images"""
    shapes: Tuple[str, ...] = SHAPES
    """shape names drawn"""
    colors: Tuple[str, ...] = tuple(COLORS)
    """colour names drawn"""
    heldout_pairs: Optional[Sequence[Tuple[str, str]]] = None
    """(shape, colour) pairs never shown in training; null picks one colour per shape, spread out"""
    seed: int = 0
    """seed of the generator"""

    def class_names(self) -> List[str]:
        """Class = shape + colour; label = shape_index * n_colors + colour_index."""
        return [f"{c} {s}" for s in self.shapes for c in self.colors]

    def resolved_heldout(self) -> List[Tuple[str, str]]:
        if self.heldout_pairs is not None:
            return [tuple(p) for p in self.heldout_pairs]
        n = len(self.colors)
        step = 3 if n % 3 else 1
        return [(s, self.colors[(i * step + 1) % n]) for i, s in enumerate(self.shapes)]


@dataclass
class ShapesData:
    """Pre-rendered samples: ``images`` is uint8 [N, H, W, 3]."""

    images: np.ndarray
    captions: List[str]
    labels: np.ndarray
    attributes: List[Dict[str, str]] = field(default_factory=list)


def generate_shapes(cfg: ShapesConfig, n: int, pairs: Sequence[Tuple[str, str]], stream: int,
                    start: int = 0) -> ShapesData:
    """Samples ``start..start+n`` of stream ``stream``, drawing (shape, colour) from ``pairs``."""
    pairs = list(pairs)
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    captions, labels, attrs = [], np.empty(n, dtype=np.int64), []
    sizes, positions, bgs = list(SIZES), list(POSITIONS), list(BACKGROUNDS)
    for j in range(n):
        rng = np.random.default_rng([cfg.seed, stream, start + j])
        shape, color = pairs[rng.integers(len(pairs))]
        a = {"shape": shape, "color": color, "size": sizes[rng.integers(2)],
             "position": positions[rng.integers(len(positions))], "background": bgs[rng.integers(len(bgs))]}
        images[j] = render_shape(shape, color, a["size"], a["position"], a["background"], cfg.image_size, rng)
        tpl = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        captions.append(tpl.format(size=a["size"], color=color, shape=shape, pos=a["position"],
                                   where=POSITION_PHRASES[a["position"]], bg=a["background"]))
        labels[j] = cfg.shapes.index(shape) * len(cfg.colors) + cfg.colors.index(color)
        attrs.append(a)
    return ShapesData(images, captions, labels, attrs)


class ShapesDataset(Dataset):
    """Yields ``(image, tokens)`` for training, or ``(image, label)`` with ``return_label=True``.

    Without a ``transform`` images come out as float tensors in [0, 1], CHW.
    """

    def __init__(self, data: ShapesData, transform: Optional[Callable[[Any], Tensor]] = None,
                 tokenize: Optional[Callable[[List[str]], Tensor]] = None, return_label: bool = False):
        if not return_label and tokenize is None:
            raise ValueError("tokenize is required unless return_label=True")
        self.data, self.transform, self.tokenize, self.return_label = data, transform, tokenize, return_label

    def __len__(self) -> int:
        return len(self.data.captions)

    def image(self, idx: int) -> Tensor:
        arr = self.data.images[idx]
        if self.transform is not None:
            return self.transform(Image.fromarray(arr))
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, idx: int):
        if self.return_label:
            return self.image(idx), int(self.data.labels[idx])
        return self.image(idx), self.tokenize([self.data.captions[idx]])[0]


@dataclass
class ShapesSplits:
    train: ShapesData  # seen (shape, colour) pairs only
    val_seen: ShapesData  # fresh samples of seen pairs
    heldout: ShapesData  # only held-out pairs
    class_names: List[str]
    heldout_labels: List[int]
    seen_labels: List[int]


def make_shapes_splits(cfg: ShapesConfig, n_train: int = 5000, n_val: int = 500,
                       n_heldout: int = 500) -> ShapesSplits:
    """Train on seen pairs; evaluate zero-shot on fresh seen samples and on the held-out pairs."""
    held = cfg.resolved_heldout()
    all_pairs = [(s, c) for s in cfg.shapes for c in cfg.colors]
    for p in held:
        if p not in all_pairs:
            raise ValueError(f"held-out pair {p} is not a (shape, colour) of the config")
    seen = [p for p in all_pairs if p not in held]
    label = {p: cfg.shapes.index(p[0]) * len(cfg.colors) + cfg.colors.index(p[1]) for p in all_pairs}
    return ShapesSplits(
        train=generate_shapes(cfg, n_train, seen, stream=0),
        val_seen=generate_shapes(cfg, n_val, seen, stream=1),
        heldout=generate_shapes(cfg, n_heldout, held, stream=2) if held else generate_shapes(cfg, 0, seen, 2),
        class_names=cfg.class_names(),
        heldout_labels=sorted(label[p] for p in held),
        seen_labels=sorted(label[p] for p in seen),
    )


class RandomCaptionDataset(Dataset):
    """Random images and CLIP-shaped token rows (SOT ... EOT, zero padded), fixed per index."""

    def __init__(self, num_samples: int, image_size: int = 224, context_length: int = 77,
                 vocab_size: int = 49408, seed: int = 0):
        self.n, self.image_size, self.ctx, self.vocab, self.seed = num_samples, image_size, context_length, vocab_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> Tuple[Tensor, Tensor]:
        if not 0 <= idx < self.n:
            raise IndexError(idx)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        image = torch.randn(3, self.image_size, self.image_size, generator=g)
        length = int(torch.randint(1, self.ctx - 1, (1,), generator=g))
        tokens = torch.zeros(self.ctx, dtype=torch.long)
        tokens[0] = self.vocab - 2
        tokens[1:length + 1] = torch.randint(1, self.vocab - 2, (length,), generator=g)
        tokens[length + 1] = self.vocab - 1
        return image, tokens
