"""Command-line entry points of training; argument parsing itself lives in ``clipforge.cli``."""
from __future__ import annotations

from typing import Optional

from .config import load_config
from .loop import train
from .wise_ft import wise_ft


def train_main_cli(*overrides: str, config: Optional[str] = None) -> int:
    """Train or fine-tune CLIP: settings from a YAML file, then ``key.path=value`` overrides.

    Example: clipforge train --config run.yaml optim.lr=1e-4 data.train_data=train.tsv.
    Under torchrun (or SLURM) every rank runs this; DDP or FSDP is set by ``distributed``.
    """
    cfg = load_config(config, overrides)
    summary = train(cfg)
    val = summary.get("val") or {}
    if val:
        print("validation: " + ", ".join(f"{k} {val[k]:.4f}" for k in
                                          ("val_loss", "image_retrieval_recall@1", "image_retrieval_recall@5",
                                           "image_retrieval_recall@10", "text_retrieval_recall@1") if k in val))
    return 0


def wise_ft_main(zero_shot: str, fine_tuned: str, *, out: str, alpha: float = 0.5) -> int:
    """Interpolate zero-shot and fine-tuned weights: (1 - alpha) * zero_shot + alpha * fine_tuned."""
    path = wise_ft(zero_shot, fine_tuned, alpha, out)
    print(f"wrote {path}")
    return 0
