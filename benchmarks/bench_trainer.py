"""Whole-trainer throughput: ``clipforge train`` vs OpenCLIP's ``open_clip_train`` on the same data,
model, batch, workers and precision, one after the other in the same sitting.

    python benchmarks/bench_trainer.py [--steps 60] [--precisions fp32,bf16] [--batch 128]

Both train the issue's small model (64 px ViT 256x6 / text 256x6, context 77) from the same
OpenCLIP hub-layout directory on the first ``steps x batch`` Flickr8k train captions, logging every
10 steps. Throughput is the mean of the logged windows after the first (start-up excluded), as
samples/s with data loading included, which is what both trainers print. Writes
``results/trainer.{json,md}``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED, loadavg, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_VIT = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
}
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


def write_inputs(work: Path, steps: int, batch: int) -> tuple:
    """(captions TSV with absolute paths, model directory in OpenCLIP's hub layout)."""
    src = SHARED / "data" / "flickr8k" / "train" / "captions.tsv"
    if not src.exists():
        raise SystemExit(f"{src} is missing: this benchmark needs ../shared/data/flickr8k")
    lines = src.read_text().splitlines()
    rows = [f"{src.parent / p}\t{c}" for p, c in (line.split("\t", 1) for line in lines[1:steps * batch + 1])]
    tsv = work / "train.tsv"
    tsv.write_text("filepath\tcaption\n" + "\n".join(rows) + "\n")
    model_dir = work / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": SMALL_VIT,
        "preprocess_cfg": {"size": 64, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                           "resize_mode": "shortest"}}))
    import torch
    from safetensors.torch import save_file

    import open_clip

    torch.manual_seed(0)
    ref = open_clip.CLIP(SMALL_VIT["embed_dim"], open_clip.model.CLIPVisionCfg(**SMALL_VIT["vision_cfg"]),
                         open_clip.model.CLIPTextCfg(**SMALL_VIT["text_cfg"]))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(model_dir / "open_clip_model.safetensors"))
    return tsv, model_dir


def run_open_clip(tsv: Path, model_dir: Path, work: Path, batch: int, precision: str, workers: int,
                  log_every: int) -> dict:
    name = f"oc_{precision}_{int(time.time())}"
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model_dir}",
           "--train-data", str(tsv), "--dataset-type", "csv", "--csv-separator", "\t",
           "--csv-img-key", "filepath", "--csv-caption-key", "caption", "--batch-size", str(batch),
           "--epochs", "1", "--lr", "5e-4", "--wd", "0.2", "--warmup", "10", "--workers", str(workers),
           "--precision", OPEN_CLIP_PRECISION[precision], "--save-frequency", "0", "--log-every-n-steps",
           str(log_every), "--logs", str(work / "oc_logs"), "--name", name, "--seed", "0", "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{text[-3000:]}")
    # "Batch (t): 2.950, 43.39/s": mean batch time over the window since the previous log line
    batch_times = [float(m.group(1)) for m in re.finditer(r"Batch \(t\): ([\d.]+)", text)]
    losses = [float(m.group(1)) for m in re.finditer(r"Contrastive_loss: ([\d.]+)", text)]
    rates = [batch / t for t in batch_times[1:]]
    return {"samples_per_s": statistics.mean(rates), "windows": len(rates), "wall_s": wall,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def run_clipforge(tsv: Path, model_dir: Path, work: Path, batch: int, precision: str, workers: int,
                  log_every: int) -> dict:
    name = f"cf_{precision}"
    cmd = [sys.executable, "-m", "clipforge", "train", f"model.name=local-dir:{model_dir}", "data.kind=csv",
           f"data.train_data={tsv}", "data.caption_key=caption", f"batch_size={batch}", "epochs=1",
           "optim.lr=5e-4", "optim.weight_decay=0.2", "optim.warmup_steps=10", f"workers={workers}",
           f"precision={precision}", f"log_every_n_steps={log_every}", f"output_dir={work / 'cf_runs'}",
           f"name={name}", "progress=false", "seed=0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"clipforge train failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (work / "cf_runs" / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    rates = [r["samples_per_s"] for r in rows[1:]]
    return {"samples_per_s": statistics.mean(rates), "windows": len(rates), "wall_s": wall,
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--log-every", type=int, default=10, help="steps per logged window (the first is dropped)")
    p.add_argument("--out", default=None, help="results file stem under results/ (default trainer)")
    args = p.parse_args(argv)
    out = {"machine": machine(), "load_start": loadavg(), "steps": args.steps, "batch": args.batch,
           "workers": args.workers, "model": SMALL_VIT, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tsv, model_dir = write_inputs(work, args.steps, args.batch)
        for precision in args.precisions.split(","):
            oc = run_open_clip(tsv, model_dir, work, args.batch, precision, args.workers, args.log_every)
            cf = run_clipforge(tsv, model_dir, work, args.batch, precision, args.workers, args.log_every)
            out["runs"][precision] = {"open_clip": oc, "clipforge": cf,
                                      "speedup": cf["samples_per_s"] / oc["samples_per_s"]}
            print(f"{precision}: open_clip_train {oc['samples_per_s']:.1f} samples/s, clipforge "
                  f"{cf['samples_per_s']:.1f} samples/s, x{out['runs'][precision]['speedup']:.2f}", flush=True)
    out["load_end"] = loadavg()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (args.out or "trainer")
    (stem.with_suffix(".json")).write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Whole trainer: clipforge train vs open_clip_train", "",
             f"Machine: {out['machine'].get('cpu', '?')}; load average start/end {out['load_start']} / "
             f"{out['load_end']}. {args.steps} steps x batch {args.batch}, {args.workers} data workers, "
             "Flickr8k train JPEGs (128 px) -> 64 px, ViT 256x6 / text 256x6, context 77.", "",
             "| precision | open_clip_train samples/s | clipforge samples/s | speed-up | first/last loss (OpenCLIP) "
             "| first/last loss (clipforge) |", "|---|---|---|---|---|---|"]
    for precision, r in out["runs"].items():
        oc, cf = r["open_clip"], r["clipforge"]
        lines.append(f"| {precision} | {oc['samples_per_s']:.1f} | {cf['samples_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{oc['first_loss']} / {oc['last_loss']} | {cf['first_loss']:.4f} / {cf['last_loss']:.4f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
