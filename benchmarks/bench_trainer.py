"""Whole-trainer throughput: ``clipforge train`` vs OpenCLIP's ``open_clip_train`` on the same data,
model, batch, workers and precision, one after the other in the same sitting.

    python benchmarks/bench_trainer.py [--steps 60] [--precisions fp32,bf16] [--batch 128] [--context 32]
        [--data flickr8k|synthetic] [--cf-args optim.implementation=for-loop ...] [--device cpu]

Both train the issue's small model (64 px ViT 256x6 / text 256x6; ``--context`` 77 or 32) from the same
OpenCLIP hub-layout directory (or ``--model NAME``, an architecture both registries know, e.g.
ViT-B-32) on the first ``steps x batch`` Flickr8k train captions (or synthetic tensors), logging every
``--log-every`` steps. Throughput is the mean of the logged windows after the first (start-up and
compilation excluded), as samples/s with data loading included, which is what both trainers print.
The result records the CPU's bf16 flags and torch's CPU capability, which decide bf16 speed.
Writes ``results/<out>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED, loadavg, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}


def small_vit(context: int) -> dict:
    return {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64},
        "text_cfg": {"context_length": context, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    }


def write_model_dir(work: Path, model_cfg: dict, dirname: str = "model") -> Path:
    """A seeded random OpenCLIP model in OpenCLIP's hub layout, which both trainers start from.

    open_clip_train picks its AdamW betas/eps by whether the model name contains "vit"; a ``dirname``
    such as "ViT-small" gives it the ViT values (beta2 0.98, eps 1e-6), which are clipforge's defaults."""
    import torch
    from safetensors.torch import save_file

    import open_clip

    model_dir = work / dirname
    model_dir.mkdir()
    size = model_cfg["vision_cfg"]["image_size"]
    (model_dir / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": size, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                           "resize_mode": "shortest"}}))
    torch.manual_seed(0)
    logit_init = {k: model_cfg[k] for k in ("init_logit_scale", "init_logit_bias") if k in model_cfg}
    ref = open_clip.CLIP(model_cfg["embed_dim"], open_clip.model.CLIPVisionCfg(**model_cfg["vision_cfg"]),
                         open_clip.model.CLIPTextCfg(**model_cfg["text_cfg"]), **logit_init)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(model_dir / "open_clip_model.safetensors"))
    return model_dir


def write_flickr_tsv(work: Path, samples: int) -> Path:
    src = SHARED / "data" / "flickr8k" / "train" / "captions.tsv"
    if not src.exists():
        raise SystemExit(f"{src} is missing: use --data synthetic, or provide ../shared/data/flickr8k")
    lines = src.read_text().splitlines()
    rows = [f"{src.parent / p}\t{c}" for p, c in (line.split("\t", 1) for line in lines[1:samples + 1])]
    tsv = work / "train.tsv"
    tsv.write_text("filepath\tcaption\n" + "\n".join(rows) + "\n")
    return tsv


def _run(cmd: List[str], what: str, env: Optional[dict] = None) -> tuple:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{text[-3000:]}")
    return text, wall


def run_open_clip(model: str, data: Optional[Path], samples: int, work: Path, batch: int, precision: str,
                  workers: int, log_every: int, device: str, extra: Sequence[str] = (), tag: str = "") -> dict:
    """One open_clip_train run; ``extra`` arguments come last, so they override the ones set here."""
    name = f"oc_{precision}{tag}_{int(time.time())}"
    if data is None:
        data_args = ["--dataset-type", "synthetic", "--train-num-samples", str(samples)]
    else:
        data_args = ["--train-data", str(data), "--dataset-type", "csv", "--csv-separator", "\t",
                     "--csv-img-key", "filepath", "--csv-caption-key", "caption"]
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", model, *data_args, "--batch-size", str(batch),
           "--epochs", "1", "--lr", "5e-4", "--wd", "0.2", "--warmup", "10", "--workers", str(workers),
           "--precision", OPEN_CLIP_PRECISION[precision], "--save-frequency", "0", "--log-every-n-steps",
           str(log_every), "--logs", str(work / "oc_logs"), "--name", name, "--seed", "0", "--device", device, *extra]
    text, wall = _run(cmd, "open_clip_train")
    # "Batch (t): 2.950, 43.39/s": mean batch time over the window since the previous log line
    batch_times = [float(m.group(1)) for m in re.finditer(r"Batch \(t\): ([\d.]+)", text)]
    losses = [float(m.group(1)) for m in re.finditer(r"Contrastive_loss: ([\d.]+)", text)]
    rates = [batch / t for t in batch_times[1:]]
    return {"samples_per_s": statistics.mean(rates), "windows": len(rates), "wall_s": wall,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "run_dir": str(work / "oc_logs" / name), "window_rates": [batch / t for t in batch_times]}


def run_clipforge(model: str, data: Optional[Path], samples: int, work: Path, batch: int, precision: str,
                  workers: int, log_every: int, device: str, extra: List[str], tag: str = "") -> dict:
    name = f"cf_{precision}{tag}_{int(time.time())}"
    data_args = ([f"data.kind=synthetic", f"data.num_samples={samples}"] if data is None else
                 ["data.kind=csv", f"data.train_data={data}", "data.caption_key=caption"])
    cmd = [sys.executable, "-m", "clipforge", "train", f"model.name={model}", *data_args, f"batch_size={batch}",
           "epochs=1", "optim.lr=5e-4", "optim.weight_decay=0.2", "optim.warmup_steps=10", f"workers={workers}",
           f"precision={precision}", f"log_every_n_steps={log_every}", f"output_dir={work / 'cf_runs'}",
           f"name={name}", "progress=false", "seed=0", "save_every_n_epochs=1000", f"device={device}", *extra]
    _, wall = _run(cmd, "clipforge train")
    rows = [json.loads(line) for line in (work / "cf_runs" / name / "metrics.jsonl").read_text().splitlines()]
    chosen = next((r["precision"] for r in rows if r["kind"] == "precision"), precision)
    rows = [r for r in rows if r["kind"] == "train"]
    rates = [r["samples_per_s"] for r in rows[1:]]
    return {"samples_per_s": statistics.mean(rates), "windows": len(rates), "wall_s": wall, "precision": chosen,
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "args": extra,
            "run_dir": str(work / "cf_runs" / name), "window_rates": [r["samples_per_s"] for r in rows]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--context", type=int, default=77, help="text context of the small model (77 or 32)")
    p.add_argument("--model", default=None, help="an architecture name both libraries know instead of the small model")
    p.add_argument("--data", choices=("flickr8k", "synthetic"), default="flickr8k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--cf-args", nargs="*", default=[], help="extra clipforge train overrides (key=value)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="more clipforge runs, each 'label:key=value,key=value' (e.g. loop:optim.implementation=for-loop)")
    p.add_argument("--no-open-clip", action="store_true", help="clipforge runs only")
    p.add_argument("--log-every", type=int, default=10, help="steps per logged window (the first is dropped)")
    p.add_argument("--out", default=None, help="results file stem under results/ (default trainer_ctx<context>)")
    args = p.parse_args(argv)
    model_cfg = None if args.model else small_vit(args.context)
    out = {"machine": machine(), "load_start": loadavg(), "steps": args.steps, "batch": args.batch,
           "workers": args.workers, "context": args.context, "data": args.data, "device": args.device,
           "model": args.model or model_cfg, "runs": {}}
    samples = args.steps * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_flickr_tsv(work, samples) if args.data == "flickr8k" else None
        model = args.model or f"local-dir:{write_model_dir(work, model_cfg)}"
        for precision in args.precisions.split(","):
            run = {}
            if not args.no_open_clip:
                run["open_clip"] = run_open_clip(model, data, samples, work, args.batch, precision, args.workers,
                                                 args.log_every, args.device)
            run["clipforge"] = run_clipforge(model, data, samples, work, args.batch, precision, args.workers,
                                             args.log_every, args.device, args.cf_args)
            for variant in args.variants:
                label, _, overrides = variant.partition(":")
                run[f"clipforge {label}"] = run_clipforge(model, data, samples, work, args.batch, precision,
                                                          args.workers, args.log_every, args.device,
                                                          args.cf_args + overrides.split(","), tag="_" + label)
            if "open_clip" in run:
                for key in [k for k in run if k.startswith("clipforge")]:
                    run[key]["speedup_vs_open_clip"] = run[key]["samples_per_s"] / run["open_clip"]["samples_per_s"]
            out["runs"][precision] = run
            print(precision + ": " + ", ".join(f"{k} {v['samples_per_s']:.1f}/s" for k, v in run.items()), flush=True)
    out["load_end"] = loadavg()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (args.out or f"trainer_ctx{args.context}")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    m = out["machine"]
    lines = ["# Whole trainer: clipforge train vs open_clip_train", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores')} cores, ISA {m.get('isa')}, torch CPU capability "
             f"{m.get('torch_cpu_capability')} (precision auto picks {m.get('auto_precision_cpu')} here); load average "
             f"start/end {out['load_start']} / {out['load_end']}. {args.steps} steps x batch {args.batch}, "
             f"{args.workers} data workers, data {args.data}, model {args.model or 'ViT 256x6 64 px / text 256x6'}, "
             f"context {args.context}, device {args.device}.", "",
             "| precision | trainer | samples/s | vs open_clip_train | first / last loss |", "|---|---|---|---|---|"]
    for precision, run in out["runs"].items():
        for key, r in run.items():
            ratio = f"{r['speedup_vs_open_clip']:.2f}" if "speedup_vs_open_clip" in r else "1.00" if key == "open_clip" else "-"
            first = f"{r['first_loss']:.4f}" if r["first_loss"] is not None else "?"
            last = f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "?"
            label = f"{key} ({' '.join(r['args'])})" if r.get("args") else key
            lines.append(f"| {precision} | {label} | {r['samples_per_s']:.1f} | {ratio} | {first} / {last} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
