"""Image loading + eval preprocessing: full JPEG decode vs reduced-size (DCT-scaled) draft decode."""
from __future__ import annotations

import time
from typing import Optional

import torch

from common import SHARED


def run(limit: int, image_size: int = 224) -> Optional[dict]:
    from clipforge.config import PreprocessConfig
    from clipforge.transforms import image_transform, load_image

    files = sorted((SHARED / "data" / "coco-mini" / "val2017").glob("*.jpg"))[:limit]
    if not files:
        print("  jpeg  skipped: ../shared/data/coco-mini is absent")
        return None
    tf = image_transform(PreprocessConfig(image_size=image_size), is_train=False)
    out = {"images": len(files), "image_size": image_size}
    tensors = {}
    for mode, draft in (("full decode", False), ("draft decode", True)):
        load_image(files[0], image_size, draft=draft)  # warm the codec
        start = time.perf_counter()
        tensors[mode] = torch.stack([tf(load_image(f, image_size, draft=draft)) for f in files])
        out[f"{mode} img/s"] = len(files) / (time.perf_counter() - start)
    diff = (tensors["draft decode"] - tensors["full decode"]).abs()
    out["speedup"] = out["draft decode img/s"] / out["full decode img/s"]
    out["max_abs_diff"] = diff.max().item()
    out["mean_abs_diff"] = diff.mean().item()  # in normalised-pixel units (std ~ 0.27 of [0, 1])
    print(f"  jpeg  full {out['full decode img/s']:.1f} img/s, draft {out['draft decode img/s']:.1f} img/s "
          f"(x{out['speedup']:.2f}), mean |diff| {out['mean_abs_diff']:.4f}", flush=True)
    return out
