"""Small real-image caption data and tiny model configs for the training tests."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List

import numpy as np
import yaml
from PIL import Image

TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_SIGLIP = {**copy.deepcopy(TINY_MODEL), "init_logit_bias": -10.0, "init_logit_scale": float(np.log(10.0))}


def tiny_coca_config() -> Dict:
    """tests/golden's tiny CoCa with CLIP's vocabulary (the training tokenizer's) and widths of 8."""
    import torch

    g = torch.load(Path(__file__).parent / "golden" / "coca_tiny.pt", weights_only=True)["config"]
    return {**g, "embed_dim": 8, "text_cfg": {**g["text_cfg"], "vocab_size": 49408, "width": 8, "layers": 1},
            "multimodal_cfg": {**g["multimodal_cfg"], "width": 8, "layers": 1}}

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "stripe")


def write_caption_tsv(root: Path, n_images: int = 32, captions_per_image: int = 2, size: int = 40,
                      name: str = "captions.tsv") -> Path:
    """Coloured-shape JPEGs with two wordings each; returns the TSV (``filepath<TAB>title``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows: List[str] = ["filepath\ttitle"]
    colors = list(COLORS)
    for i in range(n_images):
        color, shape = colors[i % len(colors)], SHAPES[(i // len(colors)) % len(SHAPES)]
        img = (rng.integers(0, 40, (size, size, 3))).astype(np.uint8)
        lo, hi = size // 4, 3 * size // 4
        if shape == "square":
            img[lo:hi, lo:hi] = COLORS[color]
        else:
            img[:, lo:hi] = COLORS[color]
        rel = f"images/{i:03d}.jpg"
        Image.fromarray(img).save(root / rel, quality=90)
        wordings = [f"a {color} {shape}", f"a picture of a {shape} in {color}", f"{color} {shape} on dark noise"]
        rows += [f"{rel}\t{wordings[j % len(wordings)]}" for j in range(captions_per_image)]
    path = root / name
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_config(tmp_path: Path, train_tsv: Path, **top) -> Dict:
    """A config dict for a seconds-long CPU run on ``train_tsv``; ``top`` overrides top-level keys.

    fp32, not the trainer's ``auto``: these runs check exact equalities (resume, ranks, teachers), and
    ``auto`` picks bf16 on CPUs with bf16 instructions (tests/test_train_speed.py covers ``auto``)."""
    cfg = {
        "model": {"name": None, "config": copy.deepcopy(TINY_MODEL)},
        "data": {"kind": "csv", "train_data": str(train_tsv), "min_seen": 1000},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.1},
        "batch_size": 8,
        "epochs": 1,
        "workers": 0,
        "output_dir": str(tmp_path / "runs"),
        "name": "run",
        "log_every_n_steps": 1,
        "progress": False,
        "precision": "fp32",
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def write_yaml(path: Path, cfg: Dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
