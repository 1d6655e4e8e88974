"""GPU readiness in under five minutes: training throughput and image encoding, clipforge vs OpenCLIP.

    python benchmarks/gpu_check.py                      # on a GPU: ViT-B-32, bf16, batch 256, synthetic data
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code path on a CPU with a tiny model (tested)

1. ``clipforge train`` vs ``open_clip_train`` on synthetic data (``bench_trainer.py``'s runners), the
   same architecture, precision, batch and steps; samples/s is the mean of the logged windows after
   the first, so start-up is excluded.
2. Image encoding: ``encode_image`` of both libraries on the same weights under the same autocast,
   images/s at the batch size, after warm-up (CUDA synchronised around the timed loop), and the max
   feature difference between the two.
Writes ``results/gpu_check.{json,md}`` (or ``--out``) with the device name and the CPU description.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import RESULTS, run_clipforge, run_open_clip, write_model_dir  # noqa: E402
from common import machine  # noqa: E402

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def encode_images(model_dir: Path, device: str, precision: str, batch: int, iters: int) -> dict:
    """images/s of clipforge's and OpenCLIP's encode_image on the same weights, and their max difference."""
    import open_clip

    import clipforge
    from clipforge.precision import autocast

    ours = clipforge.create_model(f"local-dir:{model_dir}").to(device).eval()
    ref = open_clip.create_model(f"local-dir:{model_dir}").to(device).eval()
    size = ours.cfg.vision_cfg.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    features = {}
    for name, model in (("open_clip", ref), ("clipforge", ours)):
        with torch.inference_mode(), autocast(precision, device):
            for _ in range(3):
                features[name] = model.encode_image(images).float()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                model.encode_image(images)
            _sync(device)
        out[name] = {"images_per_s": batch * iters / (time.perf_counter() - t0)}
    out["speedup"] = out["clipforge"]["images_per_s"] / out["open_clip"]["images_per_s"]
    out["max_abs_diff"] = float((features["clipforge"] - features["open_clip"]).abs().max())
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="ViT-B-32", help="architecture both registries know")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead (for a CPU check)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--encode-iters", type=int, default=20)
    p.add_argument("--out", default="gpu_check")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --tiny to check the code path")
    out = {"machine": machine(), "device": args.device, "precision": args.precision, "batch": args.batch,
           "steps": args.steps, "model": "tiny" if args.tiny else args.model}
    if torch.device(args.device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = write_model_dir(work, TINY if args.tiny else _registry_cfg(args.model))
        model = f"local-dir:{model_dir}"
        samples = args.steps * args.batch
        train = {"open_clip": run_open_clip(model, None, samples, work, args.batch, args.precision, args.workers,
                                            args.log_every, args.device),
                 "clipforge": run_clipforge(model, None, samples, work, args.batch, args.precision, args.workers,
                                            args.log_every, args.device, [])}
        train["speedup"] = train["clipforge"]["samples_per_s"] / train["open_clip"]["samples_per_s"]
        out["train"] = train
        print(f"train: open_clip_train {train['open_clip']['samples_per_s']:.1f}/s, clipforge "
              f"{train['clipforge']['samples_per_s']:.1f}/s, x{train['speedup']:.2f}", flush=True)
        out["encode"] = encode_images(model_dir, args.device, args.precision, args.batch, args.encode_iters)
        print(f"encode: x{out['encode']['speedup']:.2f}, max diff {out['encode']['max_abs_diff']:.2e}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / args.out
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    t, e = out["train"], out["encode"]
    stem.with_suffix(".md").write_text("\n".join([
        f"# GPU check: {out.get('gpu', args.device)}, {out['model']}, {args.precision}, batch {args.batch}", "",
        "| | open_clip | clipforge | ratio |", "|---|---|---|---|",
        f"| train samples/s | {t['open_clip']['samples_per_s']:.1f} | {t['clipforge']['samples_per_s']:.1f} | "
        f"{t['speedup']:.2f} |",
        f"| encode_image images/s | {e['open_clip']['images_per_s']:.1f} | {e['clipforge']['images_per_s']:.1f} | "
        f"{e['speedup']:.2f} |", "",
        f"Max |feature difference| {e['max_abs_diff']:.2e}.", ""]))
    return out


def _registry_cfg(name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise SystemExit(f"{name!r} is not an OpenCLIP architecture")
    return cfg


if __name__ == "__main__":
    main()
