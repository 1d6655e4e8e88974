"""clipforge speed benchmarks against OpenCLIP and transformers, in one process on the same weights.

    python benchmarks/run.py                 # full run -> benchmarks/results/latest.{json,md}
    python benchmarks/run.py --quick         # smoke test -> benchmarks/results/quick.{json,md}
    python benchmarks/run.py --only image,text

Sections: image (img/s per model/mode/batch), text (prompts/s and zero-shot classifier build time
extrapolated to ImageNet 1000 x 80, with top-1 agreement on CIFAR-10), train (samples/s of a
training step), jpeg (draft decoding). Utilisation is counted FLOP/s over the large-matmul peak
measured at the start of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_image  # noqa: E402
import bench_jpeg  # noqa: E402
import bench_text  # noqa: E402
import bench_train  # noqa: E402
import report  # noqa: E402
from common import build_models, loadavg, machine, matmul_peak, peak_rss_mb  # noqa: E402

SECTIONS = ("image", "text", "train", "jpeg")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few iterations and small sizes (smoke test)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {SECTIONS} ('zeroshot' is an alias of 'text')")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="output stem (default results/latest or quick)")
    args = p.parse_args(argv)
    only = {"text" if s.strip() == "zeroshot" else s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.only = [s for s in SECTIONS if s in only]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q = args.quick
    results = {"machine": machine(), "quick": q, "sections": args.only}
    started = time.time()
    peaks = {"fp32": matmul_peak(torch.float32, n=1024 if q else 2048),
             "bf16": matmul_peak(torch.bfloat16, n=1024 if q else 2048)}
    results["matmul_peak_gflops"] = {k: v / 1e9 for k, v in peaks.items()}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    sections = {
        "image": lambda: bench_image.run(["ViT-B-32", "RN50"] if q else ["ViT-B-32", "ViT-B-16", "RN50"],
                                         [1, 8] if q else [1, 32], 1 if q else 3, peaks, build_models),
        "text": lambda: bench_text.run("ViT-B-32", num_classes=2 if q else 20, oc_classes=1 if q else 4,
                                       cifar_per_class=5 if q else 50, build_models=build_models),
        "train": lambda: bench_train.run(batch=32 if q else 128, iters=1 if q else 3, peaks=peaks),
        "jpeg": lambda: bench_jpeg.run(limit=10 if q else 1000),
    }
    for name in args.only:
        try:
            results[name] = sections[name]()
        except Exception as err:  # keep the other sections' numbers; the error is reported
            traceback.print_exc()
            results.setdefault("errors", {})[name] = repr(err)
    results["peak_rss_mb"] = peak_rss_mb()
    results["wall_s"] = time.time() - started
    results["machine"]["loadavg_end"] = loadavg()
    results["targets"] = report.targets(results)

    stem = args.out or RESULTS / ("quick" if q else "latest")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = report.markdown(results)
    stem.with_suffix(".md").write_text(markdown)
    print()
    print(markdown)
    return results


if __name__ == "__main__":
    main()
