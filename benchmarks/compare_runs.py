"""Two or more finished ``clipforge train`` runs side by side: training loss and validation recall by
step (plot), and the final validation, wall-clock and samples/s of each (table), e.g. the same config
in bf16 and fp32.

    python benchmarks/compare_runs.py runs/flickr8k_bf16 runs/flickr8k_fp32 --out flickr8k_bf16_vs_fp32

Reads each run's ``metrics.jsonl`` and ``summary.json``; writes ``results/<out>.{json,md,png}``.
Mean recall is the mean of R@1/5/10 in both directions; each run after the first is compared with
the first by the relative difference of its final mean recall.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import RESULTS  # noqa: E402
from common import machine, mean_recall  # noqa: E402

from clipforge.atomic import atomic_write, write_text  # noqa: E402



def read_run(run_dir: Path) -> dict:
    """The metrics a run logged and its summary; a SystemExit naming the file when one is missing."""
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    for path in (metrics, summary):
        if not path.exists():
            raise SystemExit(f"{path} is missing: is {run_dir} a finished clipforge train run?")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    val = [r for r in rows if r["kind"] == "val"]
    if not val:
        raise SystemExit(f"{metrics} has no validation rows: the run needs a val section")
    for r in val:
        r["mean_recall"] = mean_recall(r)
    return {"name": run_dir.name, "summary": json.loads(summary.read_text()),
            "train": [r for r in rows if r["kind"] == "train"], "val": val}


def plot(runs: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label = f"{run['name']} ({run['summary'].get('precision')})"
        loss_ax.plot([r["step"] for r in run["train"]], [r["loss"] for r in run["train"]], label=label)
        recall_ax.plot([r["step"] for r in run["val"]], [100 * r["mean_recall"] for r in run["val"]], "o-", label=label)
    loss_ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    recall_ax.set(xlabel="step", ylabel="mean recall, %", title="Validation mean recall (R@1/5/10, both ways)")
    for ax in (loss_ax, recall_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> Dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="clipforge train run folders")
    p.add_argument("--out", required=True, help="results file stem under results/")
    args = p.parse_args(argv)
    runs = [read_run(r) for r in args.runs]
    base = runs[0]["val"][-1]["mean_recall"]
    out = {"machine": machine(), "runs": {}}
    lines = [f"# {' vs '.join(r['name'] for r in runs)}", "",
             f"Machine: {out['machine'].get('cpu')}, torch CPU capability {out['machine'].get('torch_cpu_capability')}. "
             "Final validation (recall in %); mean recall = mean of R@1/5/10 both ways.", "",
             "| run | precision | steps | wall s | samples/s | t2i R@1/5/10 | i2t R@1/5/10 | mean recall | vs first | val loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s, v = run["summary"], run["val"][-1]
        t2i = "/".join(f"{100 * v[f'image_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10))
        i2t = "/".join(f"{100 * v[f'text_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10))
        diff = v["mean_recall"] / base - 1
        lines.append(f"| {run['name']} | {s.get('precision')} | {s['steps']} | {s['wall_seconds']:.0f} | "
                     f"{s['samples_per_s']:.1f} | {t2i} | {i2t} | {100 * v['mean_recall']:.2f} | {diff:+.1%} | "
                     f"{v['val_loss']:.4f} |")
        out["runs"][run["name"]] = {"precision": s.get("precision"), "steps": s["steps"],
                                    "wall_seconds": s["wall_seconds"], "samples_per_s": s["samples_per_s"],
                                    "final_val": v, "mean_recall_vs_first": diff,
                                    "val": run["val"], "train_loss": [[r["step"], r["loss"]] for r in run["train"]]}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / args.out
    write_text(stem.with_suffix(".json"), json.dumps(out, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(runs, stem.with_suffix(".png"))
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
