"""Small-data recipes at equal wall-clock: open_clip_train's recipe vs clipforge recipes on Flickr8k.

    python benchmarks/recipe_sweep.py [--minutes 5] [--recipes same,fast,fast_lr2] [--context 32]

The baseline is ``open_clip_train`` for one epoch over a seeded random subset of the Flickr8k train
pairs sized so that it runs about ``--minutes`` (its speed is measured on a short calibration run
first), with OpenCLIP's recipe: AdamW lr 5e-4, wd 0.2, betas (0.9, 0.98), cosine schedule, batch
128, fp32, its default augmentation, warmup 10% of the steps (OpenCLIP's default of 10000 warm-up
steps would never finish in a run this short). Each clipforge recipe then gets the baseline's
measured wall time on the full train split: its step count is that time times its own calibrated
speed. Every final model is scored by the same code (``clipforge eval``, clip_benchmark's retrieval
metrics) on the dev split, never on test. Mean recall is the mean of R@1/5/10 in both directions.
Writes ``results/recipes.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import RESULTS, small_vit, write_model_dir  # noqa: E402
from common import SHARED, loadavg, machine  # noqa: E402

FLICKR = SHARED / "data" / "flickr8k"
# clipforge train overrides per recipe; "same" is the baseline's recipe, so it isolates trainer speed.
RECIPES: Dict[str, List[str]] = {
    "same": ["optim.lr=5e-4", "optim.weight_decay=0.2"],
    "fast": ["optim.lr=1e-3", "optim.weight_decay=0.1", "model.patch_dropout=0.5", "aug.scale=[0.8,1.0]"],
    "fast_lr2": ["optim.lr=2e-3", "optim.weight_decay=0.1", "model.patch_dropout=0.5", "aug.scale=[0.8,1.0]",
                 "optim.grad_clip_norm=1.0"],
    "dropout75": ["optim.lr=1e-3", "optim.weight_decay=0.1", "model.patch_dropout=0.75", "aug.scale=[0.8,1.0]"],
}


def _tsv(work: Path, name: str, rows: List[str]) -> Path:
    path = work / name
    path.write_text("filepath\tcaption\n" + "\n".join(rows) + "\n")
    return path


def _pairs(split: str) -> List[str]:
    src = FLICKR / split / "captions.tsv"
    return [f"{src.parent / p}\t{c}" for p, c in (line.split("\t", 1) for line in src.read_text().splitlines()[1:])]


def _run(cmd: List[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t0


def open_clip_cmd(model: str, data: Path, work: Path, name: str, steps_hint: int) -> List[str]:
    return [sys.executable, "-m", "open_clip_train.main", "--model", model, "--train-data", str(data),
            "--dataset-type", "csv", "--csv-separator", "\t", "--csv-img-key", "filepath", "--csv-caption-key",
            "caption", "--batch-size", "128", "--epochs", "1", "--lr", "5e-4", "--wd", "0.2",
            "--warmup", str(max(1, steps_hint // 10)), "--workers", "1", "--precision", "fp32",
            "--save-frequency", "1", "--logs", str(work / "oc_logs"), "--name", name, "--seed", "0",
            "--device", "cpu", "--log-every-n-steps", "10"]


def clipforge_cmd(model: str, data: Path, work: Path, name: str, steps: int, recipe: List[str]) -> List[str]:
    return [sys.executable, "-m", "clipforge", "train", f"model.name={model}", "data.kind=csv",
            f"data.train_data={data}", "data.caption_key=caption", "batch_size=128", "epochs=1000",
            f"max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}", "workers=1", "precision=fp32",
            f"output_dir={work / 'cf_runs'}", f"name={name}", "progress=false", "seed=0", "log_every_n_steps=10",
            "save_every_n_epochs=1000", *recipe]


def evaluate(model: str, weights: Path, dev: Path, out: Path) -> Dict[str, float]:
    _run([sys.executable, "-m", "clipforge", "eval", "--model", model, "--pretrained", str(weights),
          "--dataset", str(dev), "--task", "zeroshot_retrieval", "--output", str(out), "--batch_size", "128"])
    metrics = json.loads(out.read_text())["metrics"]
    recalls = [metrics[f"{d}_retrieval_recall@{k}"] for d in ("image", "text") for k in (1, 5, 10)]
    return {**{k: v for k, v in metrics.items() if "recall" in k}, "mean_recall": statistics.mean(recalls)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of every training run")
    p.add_argument("--recipes", default="same,fast")
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--calibration-steps", type=int, default=12)
    p.add_argument("--out", default="recipes")
    args = p.parse_args(argv)
    if not (FLICKR / "train" / "captions.tsv").exists():
        raise SystemExit(f"{FLICKR} is missing: this benchmark needs ../shared/data/flickr8k")
    out = {"machine": machine(), "load_start": loadavg(), "minutes": args.minutes, "context": args.context,
           "runs": {}}
    train_pairs, dev_pairs = _pairs("train"), _pairs("dev")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = write_model_dir(work, small_vit(args.context))
        model = f"local-dir:{model_dir}"
        full = _tsv(work, "train.tsv", train_pairs)
        dev = _tsv(work, "dev.tsv", dev_pairs)
        # Calibrate open_clip_train's speed on a small subset (start-up included: it is part of the wall time).
        calib_rows = random.Random(1).sample(train_pairs, args.calibration_steps * 128)
        calib = _tsv(work, "calib.tsv", calib_rows)
        t_small = _run(open_clip_cmd(model, calib, work, "oc_calib", args.calibration_steps))
        per_step = t_small / args.calibration_steps  # an upper bound: start-up is spread over few steps
        steps = max(10, int(args.minutes * 60 / per_step))
        subset = _tsv(work, "subset.tsv", random.Random(0).sample(train_pairs, min(len(train_pairs), steps * 128)))
        wall = _run(open_clip_cmd(model, subset, work, "oc_base", steps))
        ckpt = work / "oc_logs" / "oc_base" / "checkpoints" / "epoch_1.pt"
        out["runs"]["open_clip_train"] = {"steps": steps, "wall_s": wall, "samples": steps * 128,
                                          **evaluate(model, ckpt, dev, work / "oc_eval.json")}
        print(f"open_clip_train: {steps} steps in {wall:.0f} s, mean recall "
              f"{out['runs']['open_clip_train']['mean_recall']:.4f}", flush=True)
        for name in args.recipes.split(","):
            recipe = RECIPES[name]
            t_cal = _run(clipforge_cmd(model, full, work, f"cal_{name}", args.calibration_steps, recipe))
            cf_steps = max(10, int(wall / (t_cal / args.calibration_steps)))
            cf_wall = _run(clipforge_cmd(model, full, work, name, cf_steps, recipe))
            run_dir = work / "cf_runs" / name
            weights = run_dir / "final" / "open_clip_model.safetensors"
            out["runs"][name] = {"recipe": recipe, "steps": cf_steps, "wall_s": cf_wall, "samples": cf_steps * 128,
                                 **evaluate(f"local-dir:{run_dir / 'final'}", weights, dev, work / f"{name}.json")}
            r = out["runs"][name]
            r["vs_open_clip"] = r["mean_recall"] / out["runs"]["open_clip_train"]["mean_recall"]
            print(f"{name}: {cf_steps} steps in {cf_wall:.0f} s, mean recall {r['mean_recall']:.4f} "
                  f"(x{r['vs_open_clip']:.2f})", flush=True)
    out["load_end"] = loadavg()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / args.out
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Flickr8k recipes at equal wall-clock ({args.minutes} min budget, context {args.context}, fp32)", "",
             f"Machine: {out['machine'].get('cpu')}, ISA {out['machine'].get('isa')}; load {out['load_start']} / "
             f"{out['load_end']}. Scored on Flickr8k dev (1000 images, 5000 captions).", "",
             "| run | recipe | steps | wall s | T→I R@1/5/10 | I→T R@1/5/10 | mean recall | vs open_clip_train |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in out["runs"].items():
        ti = "/".join(f"{100 * r[f'image_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10))
        it = "/".join(f"{100 * r[f'text_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10))
        lines.append(f"| {name} | {' '.join(r.get('recipe', ['OpenCLIP defaults']))} | {r['steps']} | "
                     f"{r['wall_s']:.0f} | {ti} | {it} | {100 * r['mean_recall']:.2f} | {r.get('vs_open_clip', 1.0):.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
