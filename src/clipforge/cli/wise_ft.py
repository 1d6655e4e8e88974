"""``clipforge wise-ft``: writes what :func:`clipforge.train.wise_ft` interpolates."""
from __future__ import annotations

from ..train.wise_ft import wise_ft


def main(zero_shot: str, fine_tuned: str, *, out: str, alpha: float = 0.5) -> int:
    """Interpolate zero-shot and fine-tuned weights of one architecture (WiSE-FT): (1 - alpha) * zero_shot + alpha * fine_tuned.

    Args:
        zero_shot: the weights before fine-tuning: a checkpoint file or an OpenCLIP hub folder
        fine_tuned: the fine-tuned weights (e.g. a run's final/ folder)
        out: output file: .safetensors, else a torch state dict
        alpha: weight of the fine-tuned model, in [0, 1]
    """
    path = wise_ft(zero_shot, fine_tuned, alpha, out)
    print(f"wrote {path}")
    return 0
