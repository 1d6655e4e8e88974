"""Image-encoder throughput: OpenCLIP, transformers and clipforge's modes on the same weights."""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from clipforge import inference
from common import SHARED, count_flops, peak_rss_mb, timeit


def _photos(size: int, n: int = 8) -> torch.Tensor:
    """Real photos (coco-mini) preprocessed as clipforge's eval transform does; noise without ../shared."""
    from clipforge.config import PreprocessConfig
    from clipforge.transforms import image_transform, load_image

    files = sorted((SHARED / "data" / "coco-mini" / "val2017").glob("*.jpg"))[:n]
    if not files:
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    tf = image_transform(PreprocessConfig(image_size=size), is_train=False)
    return torch.stack([tf(load_image(f)) for f in files])


def _modes(model, ref, hf) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Mode name -> a function encoding a float image batch to (unnormalised) features."""
    modes: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "open_clip fp32": lambda x: ref.encode_image(x),
    }
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    modes["open_clip bf16 cast"] = lambda x: ref_bf16.encode_image(x.bfloat16()).float()
    if hf is not None:
        modes["transformers fp32"] = lambda x: _hf_features(hf, x)
    modes["clipforge fp32"] = lambda x: model.encode_image(x)
    fast = inference.to_bf16_inference(copy.deepcopy(model))
    modes["clipforge bf16 mode"] = lambda x: fast.encode_image(x)
    q8 = inference.quantize_int8(model)
    modes["clipforge int8 dynamic"] = lambda x: q8.encode_image(x)
    if model.cfg.vision_cfg.is_resnet:
        cl = inference.to_channels_last(copy.deepcopy(model))
        modes["clipforge fp32 channels-last"] = lambda x: cl.encode_image(x)
        cl16 = inference.to_channels_last(inference.to_bf16_inference(copy.deepcopy(model)))
        modes["clipforge bf16 mode channels-last"] = lambda x: cl16.encode_image(x)
    return modes


def _hf_features(hf, x: torch.Tensor) -> torch.Tensor:
    out = hf.get_image_features(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def run(names: List[str], batches: List[int], iters: int, peaks: Dict[str, float], build_models) -> List[dict]:
    rows = []
    for name in names:
        model, ref, hf = build_models(name)
        size = model.cfg.vision_cfg.image_size
        photos = _photos(size)
        modes = _modes(model, ref, hf)
        with torch.inference_mode():
            flops_per_img = count_flops(lambda: model.encode_image(photos[:1]))
            reference = F.normalize(model.encode_image(photos), dim=-1)
            for mode, fn in modes.items():
                feats = F.normalize(fn(photos).float(), dim=-1)
                cos = inference.cosine_to(reference, feats)
                precision = "bf16" if "bf16" in mode else ("int8" if "int8" in mode else "fp32")
                for batch in batches:
                    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
                    t = timeit(lambda: fn(x), iters=iters if batch > 1 else 3 * iters,
                               warmup=1, min_seconds=1.0 if batch == 1 and iters > 1 else 0.0)
                    ips = batch / t.seconds
                    peak = peaks.get(precision)
                    rows.append({
                        "model": name, "mode": mode, "batch": batch, "img_per_s": ips,
                        "gflop_per_img": flops_per_img / 1e9,
                        "utilisation": ips * flops_per_img / peak if peak else None,
                        "min_cos_vs_fp32": cos.min().item(), "mean_cos_vs_fp32": cos.mean().item(),
                        "peak_rss_mb": peak_rss_mb(),
                    })
                    print(f"  image {name:9s} {mode:34s} b={batch:<3d} {ips:8.2f} img/s  "
                          f"cos>={cos.min().item():.6f}", flush=True)
        del model, ref, hf, modes
    return rows
