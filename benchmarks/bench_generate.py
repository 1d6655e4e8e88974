"""Caption generation speed: clipforge's ``CoCa.generate`` (KV cache) vs open_clip's, same weights and images.

open_clip 3.3.0's ``generate`` needs transformers < 4.56, so it runs in its own environment
(``--oc-python``, made as in tests/golden/make_coca_golden.py) as a subprocess; clipforge runs here.
Both load one state dict written once (a seeded random initialisation of ``--model``, or
``--checkpoint``: an OpenCLIP state dict), so nothing is downloaded, and both decode the same
seeded random images. For each setting (greedy = ``generation_type="top_k", top_k=1``; beam search
with 6 beams in 3 groups, open_clip's default) and batch size, each side reports the median of
``--repeats`` timed calls after one warm-up, and the tokens are compared: the speed-up only counts
if they are identical. Run it with nothing else on the machine::

    python benchmarks/bench_generate.py --oc-python /tmp/oc-venv/bin/python --model coca_ViT-B-32 \\
        --threads 2 --out benchmarks/results/generate.json

``--tiny`` swaps in a 2-layer, 32-wide CoCa (for checking the script, not for numbers).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

import clipforge
from clipforge.config import CLIPConfig

SETTINGS = {"greedy": {"generation_type": "top_k", "top_k": 1}, "beam6": {"num_beams": 6, "num_beam_groups": 3}}
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 32, "width": 32, "heads": 2, "layers": 2},
    "custom_text": True,
}

# Runs in the open_clip environment: argv = work dir; reads job.json, writes open_clip_result.pt.
_WORKER = r'''
import json, statistics, sys, time
from pathlib import Path
import open_clip, torch, transformers
work = Path(sys.argv[1])
job = json.loads((work / "job.json").read_text())
torch.set_num_threads(job["threads"])
cfg = dict(job["model_cfg"]); cfg.pop("custom_text", None)
model = open_clip.CoCa(**cfg)
model.load_state_dict(torch.load(work / "weights.pt", weights_only=True))
model.eval()
images = torch.load(work / "images.pt", weights_only=True)
out = {"versions": {"open_clip": open_clip.__version__, "transformers": transformers.__version__,
                    "torch": str(torch.__version__)}, "runs": {}}
for key, run in job["runs"].items():
    batch = images[: run["batch"]]
    with torch.no_grad():
        tokens = model.generate(batch, **run["kwargs"])  # warm-up, and the tokens compared
        times = []
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            model.generate(batch, **run["kwargs"])
            times.append(time.perf_counter() - start)
    out["runs"][key] = {"tokens": tokens, "seconds": statistics.median(times)}
torch.save(out, work / "open_clip_result.pt")
'''


def _clipforge_runs(model, images: torch.Tensor, runs: Dict[str, dict], repeats: int) -> Dict[str, dict]:
    out = {}
    for key, run in runs.items():
        batch = images[: run["batch"]]
        tokens = model.generate(batch, **run["kwargs"])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(batch, **run["kwargs"])
            times.append(time.perf_counter() - start)
        out[key] = {"tokens": tokens, "seconds": statistics.median(times)}
    return out


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oc-python", default="/tmp/oc-venv/bin/python", help="python of the open_clip 3.3 env")
    parser.add_argument("--model", default="coca_ViT-B-32")
    parser.add_argument("--checkpoint", help="OpenCLIP state dict of --model (default: seeded random weights)")
    parser.add_argument("--tiny", action="store_true", help="a tiny CoCa instead of --model (script check only)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = CLIPConfig.from_dict(TINY) if args.tiny else clipforge.get_model_config(args.model)
    torch.manual_seed(0)
    model = clipforge.create_model(cfg, pretrained=args.checkpoint).eval()
    size = cfg.vision_cfg.image_size
    batches = [int(b) for b in args.batches.split(",")]
    images = torch.randn(max(batches), 3, size, size, generator=torch.Generator().manual_seed(1))
    runs = {f"{name}_b{b}": {"batch": b, "kwargs": SETTINGS[name], "setting": name}
            for name in args.settings.split(",") for b in batches}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(model.state_dict(), work / "weights.pt")
        torch.save(images, work / "images.pt")
        (work / "job.json").write_text(json.dumps({"model_cfg": cfg.to_dict(), "runs": runs, "repeats": args.repeats,
                                                   "threads": args.threads}))
        (work / "worker.py").write_text(_WORKER)
        subprocess.run([args.oc_python, str(work / "worker.py"), str(work)], check=True)
        reference = torch.load(work / "open_clip_result.pt", weights_only=True)
    with torch.no_grad():
        ours = _clipforge_runs(model, images, runs, args.repeats)

    rows = []
    for key, run in runs.items():
        ref, mine = reference["runs"][key], ours[key]
        rows.append({"run": key, "setting": run["setting"], "batch": run["batch"],
                     "open_clip_s": ref["seconds"], "clipforge_s": mine["seconds"],
                     "speedup": ref["seconds"] / mine["seconds"],
                     "identical_tokens": bool(torch.equal(ref["tokens"], mine["tokens"]))})
    result = {"model": "tiny" if args.tiny else args.model, "threads": args.threads, "repeats": args.repeats,
              "machine": platform.processor() or platform.machine(), "reference_versions": reference["versions"],
              "clipforge_torch": str(torch.__version__), "rows": rows}
    print(f"{'run':<14}{'open_clip s':>12}{'clipforge s':>13}{'speed-up':>10}  identical")
    for r in rows:
        print(f"{r['run']:<14}{r['open_clip_s']:>12.3f}{r['clipforge_s']:>13.3f}{r['speedup']:>9.1f}x  "
              f"{r['identical_tokens']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
