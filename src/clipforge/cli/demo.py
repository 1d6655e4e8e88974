"""``clipforge demo``: prints what :func:`clipforge.demo.run_demo` measured (the library itself prints nothing)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..demo import run_demo
from ..demo.report import TRAIN_DIR
from ..demo.run import run_demo_seeds
from . import UsageError


def main(out: str = "runs/demo", quick: bool = False, steps: Optional[int] = None, seed: int = 0,
         threads: Optional[int] = None, seeds: int = 1) -> int:
    """Train a small CLIP on generated shapes with the trainer (no download), then report what it learned.

    Some (shape, colour) pairs never occur in training; zero-shot accuracy on them needs colour and
    shape composed. Writes report.md with plots and metrics.json to OUT, and the training run
    (config.yaml, metrics.jsonl, the final model in OpenCLIP's hub layout) to OUT/train.

    Args:
        out: output folder for the report, its plots, metrics.json and the training run
        quick: a seconds-long run with tiny towers and little data (a smoke test)
        steps: optimizer steps (default: 400, or 40 with --quick)
        seed: seed of the generated data, the initial weights and the data order
        threads: torch threads (default: one per core). The same seed and thread count repeat every
            number exactly; another thread count orders float sums differently and trains a slightly
            different model, so use --threads 1 to repeat a result on any machine
        seeds: run this many seeds (seed, seed+1, ...) into OUT/seed-S and print each figure's spread
    """
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    if seeds > 1:
        runs, spread = run_demo_seeds(out, range(seed, seed + seeds), steps=steps, quick=quick, threads=threads)
        print(f"{seeds} runs (seeds {seed}..{seed + seeds - 1}, {runs[0]['torch_threads']} torch threads) in {out}; "
              f"spread in {Path(out) / 'spread.json'}")
        for key, st in spread.items():
            print(f"  {key}: mean {st['mean']:.1%}, std {st['std']:.1%}, range {st['min']:.1%}..{st['max']:.1%}")
        return 0
    kwargs = {} if threads is None else {"threads": threads}
    metrics = run_demo(out_dir=out, steps=steps, seed=seed, quick=quick, **kwargs)
    print(f"seed {metrics['seed']}, {metrics['torch_threads']} torch threads (same seed and threads: same numbers)")
    print(f"report: {Path(out) / 'report.md'}; model: {Path(out) / TRAIN_DIR / 'final'}")
    print(f"seen-pair zero-shot accuracy: {metrics['seen_zeroshot_acc1']:.1%} (chance {metrics['seen_chance']:.1%})")
    print("retrieval R@1/5/10 (text->image): " + "/".join(
        f"{metrics[f'image_retrieval_recall@{k}']:.1%}" for k in (1, 5, 10)))
    print(f"held-out zero-shot accuracy: {metrics['heldout_zeroshot_acc1']:.1%} "
          f"(chance {metrics['heldout_chance']:.1%}; among all {round(1 / metrics['all_classes_chance'])} classes "
          f"{metrics['heldout_zeroshot_acc1_all_classes']:.1%}, chance {metrics['all_classes_chance']:.1%})")
    return 0
