"""Small-data recipes at equal wall-clock: ``clipforge train`` recipes vs ``open_clip_train``'s defaults
on Flickr8k (train -> dev), the same model, initial weights, data order and machine, one run at a time.

    python benchmarks/recipe_sweep.py [--budget 540] [--recipes oc-default,oc-warmup,cf-base,...]

Protocol. Every run trains the issue's small model (64 px ViT 256x6 / text 256x6, context 32) from the
same seeded OpenCLIP hub-layout directory, in fp32 (what ``precision: auto`` picks on a CPU without
bf16 instructions; OpenCLIP's default ``amp`` is fp16 autocast, which no CPU user would pick) or, with
``--precision bf16`` (what ``auto`` picks on a CPU with bf16 instructions), OpenCLIP's ``amp_bf16`` and
clipforge's bf16 autocast, with one data-loader worker for both trainers. A recipe's samples/s is first measured in a calibration run
(``--calibration-steps``, logged every 5 steps; the windows of the first 10 steps are dropped, as a
first sweep found them ~30% faster than the rest of a run, which put clipforge's runs over budget); it then trains for one pass over the first ``budget x samples/s`` rows
of the Flickr8k train captions in one fixed shuffled order (whole batches; the learning-rate schedule
spans exactly that run, as a user who knows the budget would set it; a recipe that gets through the
30,000 rows goes on into a second pass in another fixed order, up to three). The wall-clock of each run
(process start to saved model, no validation) is reported beside the budget. Every final model is
then scored by the same code: ``clipforge eval --task zeroshot_retrieval`` on Flickr8k dev (1000
photos, 5000 captions); "mean recall" is the mean of R@1/5/10 in both directions. OpenCLIP's final
checkpoint is put in a hub-layout folder first; clipforge reads OpenCLIP's models within 1e-5 of
open_clip (tests/test_openclip_hub.py), so the scoring is common.

Recipes (``RECIPES``): OpenCLIP's defaults (batch 64, lr 5e-4, wd 0.2, 10000 warmup steps, crop scale
0.9-1, the ViT betas); the same with warmup at 10% of the run (a fairer baseline: 10000 warmup steps
never finish in a short run); and clipforge recipes. Writes ``results/<out>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import RESULTS, run_clipforge, run_open_clip, small_vit, write_model_dir  # noqa: E402
from common import SHARED, loadavg, machine, mean_recall  # noqa: E402

from clipforge.atomic import atomic_write, write_text  # noqa: E402

FLICKR = SHARED / "data" / "flickr8k"
OC_DEFAULTS = ["--lr", "5e-4", "--wd", "0.2", "--warmup", "10000"]
CF_BASE = ["optim.lr=1e-3", "optim.weight_decay=0.2", "aug.scale=[0.8,1.0]", "optim.grad_clip_norm=1.0"]
# name: (trainer, batch, arguments, warmup as a fraction of the run's steps or None for as given)
RECIPES: Dict[str, tuple] = {
    "oc-default": ("open_clip", 64, OC_DEFAULTS, None),
    "oc-warmup": ("open_clip", 64, OC_DEFAULTS, 0.1),
    "cf-oc-default": ("clipforge", 64, ["optim.lr=5e-4", "optim.weight_decay=0.2", "optim.warmup_steps=10000"], None),
    "cf-base": ("clipforge", 128, CF_BASE, 0.1),
    "cf-pd50": ("clipforge", 128, CF_BASE + ["model.patch_dropout=0.5"], 0.1),
    "cf-pd50-lr2e-3": ("clipforge", 128, CF_BASE + ["model.patch_dropout=0.5", "optim.lr=2e-3"], 0.1),
    "cf-pd50-b64": ("clipforge", 64, CF_BASE + ["model.patch_dropout=0.5"], 0.1),
    "cf-pd50-b64-siglip": ("clipforge", 64, CF_BASE + ["model.patch_dropout=0.5"], 0.1),
    "cf-pd50-b64-aug": ("clipforge", 64, CF_BASE + ["model.patch_dropout=0.5", "aug.scale=[0.5,1.0]",
                                                    "aug.color_jitter=[0.4,0.4,0.4,0.1]", "aug.color_jitter_prob=0.8",
                                                    "aug.gray_scale_prob=0.2"], 0.1),
}
# recipes whose model differs from the common one (same seeded towers, other config keys)
MODEL_CHANGES: Dict[str, dict] = {
    # OpenCLIP's SigLIP initialisation; loss.kind=auto then trains with the sigmoid loss
    "cf-pd50-b64-siglip": {"init_logit_scale": math.log(10), "init_logit_bias": -10.0},
}
DESCRIPTION = {
    "oc-default": "open_clip_train defaults: batch 64, lr 5e-4, wd 0.2, warmup 10000, scale 0.9-1",
    "oc-warmup": "open_clip_train defaults, warmup 10% of the run",
    "cf-oc-default": "clipforge train with OpenCLIP's defaults (batch 64, lr 5e-4, wd 0.2, warmup 10000)",
    "cf-base": "clipforge: batch 128, lr 1e-3, wd 0.2, warmup 10%, scale 0.8-1, clip 1.0",
    "cf-pd50": "cf-base + patch dropout 0.5",
    "cf-pd50-lr2e-3": "cf-base + patch dropout 0.5, lr 2e-3",
    "cf-pd50-b64": "cf-base + patch dropout 0.5, batch 64",
    "cf-pd50-b64-siglip": "cf-pd50-b64 with the sigmoid (SigLIP) loss, logit scale 10, bias -10",
    "cf-pd50-b64-aug": "cf-pd50-b64 + crop scale 0.5-1, colour jitter 0.4/0.4/0.4/0.1 (p 0.8), grey scale p 0.2",
}


def shuffled_rows(passes: int = 3) -> List[str]:
    """The Flickr8k train rows, ``passes`` times, each pass in its own fixed shuffled order (pass p with
    seed p): a recipe fast enough to finish one pass within the budget goes on to the next."""
    src = FLICKR / "train" / "captions.tsv"
    if not src.exists():
        raise SystemExit(f"{src} is missing: the sweep needs ../shared/data/flickr8k")
    rows = [f"{src.parent / p}\t{c}" for p, c in (line.split("\t", 1) for line in src.read_text().splitlines()[1:])]
    out: List[str] = []
    for seed in range(passes):
        shuffled = list(rows)
        random.Random(seed).shuffle(shuffled)
        out += shuffled
    return out


def write_rows(work: Path, rows: List[str], name: str) -> Path:
    tsv = work / f"{name}.tsv"
    tsv.write_text("filepath\tcaption\n" + "\n".join(rows) + "\n")
    return tsv


def train(recipe: str, model: str, data: Path, rows: int, work: Path, log_every: int, warmup: int,
          precision: str) -> dict:
    trainer, batch, args, _ = RECIPES[recipe]
    if trainer == "open_clip":
        extra = args + (["--warmup", str(warmup)] if warmup else []) + ["--save-frequency", "1"]
        return run_open_clip(model, data, rows, work, batch, precision, 1, log_every, "cpu", extra, tag="_" + recipe)
    extra = args + ([f"optim.warmup_steps={warmup}"] if warmup else [])
    return run_clipforge(model, data, rows, work, batch, precision, 1, log_every, "cpu", extra, tag="_" + recipe)


def final_weights(recipe: str, run: dict, model_dir: Path) -> List[str]:
    """``clipforge eval`` arguments naming the trained model. OpenCLIP's last epoch checkpoint is put
    into a hub-layout folder beside its run (its state dict with the initial folder's config)."""
    if RECIPES[recipe][0] == "open_clip":
        import shutil

        import torch
        from safetensors.torch import save_file

        state = torch.load(Path(run["run_dir"]) / "checkpoints" / "epoch_1.pt", map_location="cpu")["state_dict"]
        hub = Path(run["run_dir"]) / "final"
        hub.mkdir()
        shutil.copy(model_dir / "open_clip_config.json", hub)
        save_file({k.removeprefix("module."): v.contiguous() for k, v in state.items()},
                  str(hub / "open_clip_model.safetensors"))
        return ["--model", f"local-dir:{hub}"]
    return ["--model", f"local-dir:{Path(run['run_dir']) / 'final'}"]


def evaluate(weights: List[str], work: Path, name: str) -> Dict[str, float]:
    out = work / f"eval_{name}.json"
    cmd = [sys.executable, "-m", "clipforge", "eval", *weights, "--task", "zeroshot_retrieval", "--dataset",
           str(FLICKR / "dev" / "captions.tsv"), "--output", str(out), "--batch_size", "250"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"clipforge eval failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    metrics = json.loads(out.read_text())["metrics"]
    metrics["mean_recall"] = mean_recall(metrics)
    return metrics


def plot(results: Dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    values = [100 * results[n]["metrics"]["mean_recall"] for n in names]
    colors = ["tab:gray" if RECIPES[n][0] == "open_clip" else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v:.2f}", va="center")
    ax.set_xlabel("mean recall on Flickr8k dev, % (R@1/5/10, both directions)")
    ax.set_title("Equal wall-clock recipes (grey: open_clip_train, blue: clipforge)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=540.0, help="training seconds per recipe")
    p.add_argument("--recipes", default="oc-default,oc-warmup,cf-base,cf-pd50,cf-pd50-lr2e-3")
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="both trainers' precision (bf16: OpenCLIP's amp_bf16 and clipforge's bf16 autocast)")
    p.add_argument("--out", default="recipe_sweep")
    p.add_argument("--append", action="store_true",
                   help="keep the recipes already in results/<out>.json (same sitting) and add these")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {list(RECIPES)}")
    out = {"machine": machine(), "load_start": loadavg(), "budget_s": args.budget, "context": 32,
           "precision": args.precision,
           "model": small_vit(32), "recipes": {}}
    previous = RESULTS / f"{args.out}.json"
    if args.append and previous.exists():
        kept = json.loads(previous.read_text())
        if kept["budget_s"] != args.budget or kept.get("precision", "fp32") != args.precision:
            raise SystemExit(f"--append: {previous} has budget {kept['budget_s']} s and precision "
                             f"{kept.get('precision', 'fp32')}, not {args.budget} s and {args.precision}")
        out["recipes"], out["load_start"] = kept["recipes"], kept["load_start"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = write_model_dir(work, small_vit(32), dirname="ViT-small")
        rows = shuffled_rows()
        rates: Dict[tuple, float] = {}
        for recipe in recipes:
            trainer, batch, recipe_args, warmup_fraction = RECIPES[recipe]
            recipe_dir = model_dir
            if recipe in MODEL_CHANGES:
                recipe_dir = write_model_dir(work, {**small_vit(32), **MODEL_CHANGES[recipe]},
                                             dirname=f"ViT-small-{recipe}")
            model = f"local-dir:{recipe_dir}"
            # the learning rate does not change the speed; patch dropout, augmentation and the loss may
            speed_key = (trainer, batch, recipe in MODEL_CHANGES,
                         tuple(a for a in recipe_args if a.startswith(("model.patch_dropout", "aug."))))
            if speed_key not in rates:
                n = args.calibration_steps * batch
                calib = write_rows(work, rows[:n], f"calib_{recipe}")
                run = train(recipe, model, calib, n, work, 5, 1, args.precision)
                steady = run["window_rates"][2:] or run["window_rates"][-1:]  # after step 10
                rates[speed_key] = sum(steady) / len(steady)
            rate = rates[speed_key]
            n_rows = min(len(rows), int(args.budget * rate) // batch * batch)
            steps = n_rows // batch
            warmup = max(1, round(warmup_fraction * steps)) if warmup_fraction else 0
            data = write_rows(work, rows[:n_rows], recipe)
            t0 = time.time()
            run = train(recipe, model, data, n_rows, work, args.log_every, warmup, args.precision)
            metrics = evaluate(final_weights(recipe, run, recipe_dir), work, recipe)
            result = {"description": DESCRIPTION[recipe], "trainer": trainer, "batch": batch,
                      "calibrated_samples_per_s": rate, "rows": n_rows, "steps": steps, "warmup": warmup or None,
                      "train_wall_s": run["wall_s"], "samples_per_s": run["samples_per_s"],
                      "first_loss": run["first_loss"], "last_loss": run["last_loss"], "metrics": metrics,
                      "started": t0}
            out["recipes"][recipe] = result
            write_results(out, args)
            print(f"{recipe}: {steps} steps in {run['wall_s']:.0f} s, mean recall {100 * metrics['mean_recall']:.2f}%",
                  flush=True)
    return out


def write_results(out: dict, args) -> None:
    """``results/<out>.{json,md,png}`` for the recipes done so far (rewritten after each one, atomically)."""
    out["load_end"] = loadavg()
    base = {k: v["metrics"]["mean_recall"] for k, v in out["recipes"].items() if v["trainer"] == "open_clip"}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / args.out
    write_text(stem.with_suffix(".json"), json.dumps(out, indent=2) + "\n")
    plot(out["recipes"], stem.with_suffix(".png"))
    m = out["machine"]
    heads = [f"vs {k}" for k in base]
    lines = ["# Small-data recipes at equal wall-clock: Flickr8k train -> dev", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch CPU capability {m.get('torch_cpu_capability')}; "
             f"load average start/end {out['load_start']} / {out['load_end']}. Budget {args.budget:.0f} s of "
             f"training per recipe (the wall column is process start to saved model), {out.get('precision', 'fp32')}, "
             "1 data worker, model "
             "64 px ViT 256x6 / text 256x6, context 32, same initial weights and data order. Recall in % on "
             "Flickr8k dev (1000 photos, 5000 captions).", "",
             "| recipe | steps x batch | train wall s | t2i R@1/5/10 | i2t R@1/5/10 | mean recall | " + " | ".join(heads) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(heads)]
    for name, r in out["recipes"].items():
        mt = r["metrics"]
        t2i = "/".join(f"{100 * mt[f'image_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10))
        i2t = "/".join(f"{100 * mt[f'text_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10))
        ratios = " | ".join(f"{mt['mean_recall'] / b:.2f}x" for b in base.values())
        lines.append(f"| {name}: {r['description']} | {r['steps']} x {r['batch']} | {r['train_wall_s']:.0f} | "
                     f"{t2i} | {i2t} | {100 * mt['mean_recall']:.2f} | {ratios} |")
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
