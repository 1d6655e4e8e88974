"""One training step in-process (no data loading): where the time goes, by precision, AdamW kernel,
torch.compile and library, on the bench model of ``bench_trainer.py`` (64 px ViT 256x6 / text 256x6).

    python benchmarks/bench_step.py [--batch 128] [--context 32] [--variants cf,cf-fused,cf-bf16,oc] [--steps 8]

Each variant runs in its own process (3 warm-up steps, then the median of ``--steps``): ``cf`` is
clipforge's forward/backward (``train.step.forward_backward``) + foreach AdamW in fp32; ``-fused`` /
``-forloop`` the other AdamW kernels; ``-bf16`` bf16 autocast (clipforge's training step: attention as bf16 GEMMs on CPU), ``-bf16-flash`` /
``-bf16-math`` the same with torch's flash / math attention kernel (the steps of earlier sessions); ``-compile`` torch.compile; ``oc`` is
OpenCLIP's model and ClipLoss with torch's default AdamW. Also records the achieved fp32 matmul
peak and the step's FLOPs, so the GEMM efficiency is visible, and the CPU's bf16 flags.
Writes ``results/step_ctx<context>.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import RESULTS, small_vit  # noqa: E402
from common import SHARED, count_flops, machine, matmul_peak  # noqa: E402


def captions(batch: int) -> list:
    """The first ``batch`` Flickr8k train captions (their lengths vary, as in training), else one
    caption repeated (all rows equally long: text packing saves nothing then)."""
    path = SHARED / "data" / "flickr8k" / "train" / "captions.tsv"
    if not path.exists():
        return ["a dog is running through the grass with a red ball in its mouth ."] * batch
    with path.open(newline="") as f:
        rows = [row["caption"] for _, row in zip(range(batch), csv.DictReader(f, delimiter="\t"))]
    return rows


def one(variant: str, batch: int, context: int, steps: int) -> dict:
    import open_clip
    import torch

    from clipforge.config import CLIPConfig
    from clipforge.loss import ClipLoss
    from clipforge.models import build_model
    from clipforge.train.step import forward_backward

    torch.manual_seed(0)
    cfg = small_vit(context)
    images = torch.randn(batch, 3, 64, 64)
    texts = open_clip.tokenize(captions(batch), context_length=context)
    precision = "bf16" if "bf16" in variant else "fp32"
    if variant.startswith("oc"):
        model = open_clip.CLIP(cfg["embed_dim"], open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]),
                               open_clip.model.CLIPTextCfg(**cfg["text_cfg"]))
        loss_fn = open_clip.ClipLoss()

        def forward_and_backward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(*model(images, texts))
            loss.backward()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model = build_model(CLIPConfig.from_dict(copy.deepcopy(cfg)))
        forward = torch.compile(model) if "compile" in variant else model

        if "flash" in variant or "math" in variant:  # torch's attention kernel instead of clipforge's bf16 GEMMs
            from torch.nn.attention import SDPBackend, sdpa_kernel

            from clipforge.models import layers
            backend = SDPBackend.FLASH_ATTENTION if "flash" in variant else SDPBackend.MATH

            def sdpa(q, k, v, attn_mask=None, is_causal=False):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                                            is_causal=is_causal)
            layers.attention = sdpa

        def forward_and_backward():
            forward_backward(forward, ClipLoss(), [(images, texts)], precision, torch.device("cpu"))
        kernel = {"fused": True} if "fused" in variant else {"foreach": "forloop" not in variant}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kernel)

    def step():
        opt.zero_grad(set_to_none=True)
        forward_and_backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    flops = count_flops(forward_and_backward)
    return {"variant": variant, "precision": precision, "median_s": median, "samples_per_s": batch / median,
            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / median / 1e9}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", default="cf,cf-fused,cf-forloop,cf-compile,oc,cf-bf16,cf-bf16-math,cf-bf16-flash,oc-bf16")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.context, args.steps)))
        return {}
    import torch

    flickr = (SHARED / "data" / "flickr8k" / "train" / "captions.tsv").exists()
    out = {"machine": machine(), "batch": args.batch, "context": args.context, "steps": args.steps,
           "captions": f"the first {args.batch} Flickr8k train captions" if flickr else "one caption repeated",
           "matmul_peak_fp32_gflops": matmul_peak(torch.float32) / 1e9,
           "matmul_peak_bf16_gflops": matmul_peak(torch.bfloat16) / 1e9, "runs": []}
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", variant, "--batch", str(args.batch),
                               "--context", str(args.context), "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        out["runs"].append(run)
        print(f"{variant}: {run['samples_per_s']:.1f} samples/s ({run['achieved_gflops']:.0f} GFLOP/s)", flush=True)
    base = next((r for r in out["runs"] if r["variant"] == "cf"), out["runs"][0])
    stem = RESULTS / (args.out or f"step_ctx{args.context}")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    m = out["machine"]
    lines = [f"# One training step in-process, batch {args.batch}, context {args.context}", "",
             f"Machine: {m.get('cpu')}, ISA {m.get('isa')}, torch CPU capability {m.get('torch_cpu_capability')}, "
             f"precision auto picks {m.get('auto_precision_cpu')}; fp32 matmul peak "
             f"{out['matmul_peak_fp32_gflops']:.1f} GFLOP/s, bf16 {out['matmul_peak_bf16_gflops']:.1f} GFLOP/s. "
             f"Text: {out['captions']}; random images.", "",
             "| variant | precision | s/step | samples/s | vs cf | GFLOP/step | achieved GFLOP/s |", "|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        lines.append(f"| {r['variant']} | {r['precision']} | {r['median_s']:.2f} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s'] / base['samples_per_s']:.2f} | {r['gflop_per_step']:.0f} | "
                     f"{r['achieved_gflops']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
