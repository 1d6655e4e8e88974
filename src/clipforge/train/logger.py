"""Metrics out of the training loop: JSONL always, TensorBoard and wandb when asked, PNG plots.

``metrics.jsonl`` is the source of truth: plots are redrawn from it, and on resume the rows
written after the checkpoint's step are dropped so the file reads as one uninterrupted run.
Rows carry a ``kind``: ``train``, ``val`` (retrieval), ``zeroshot`` (accuracy and its drop since
step 0), ``stop`` (the forgetting guard's reason), ``resume``. TensorBoard and wandb get every
number of every row under its own key (``zeroshot_acc1``, ``zeroshot_acc1_drop``, ``val_loss`` ...).
``skipped.jsonl`` lists every skipped sample (step, file, source row, reason), resumed the same way.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "clipforge", config: Optional[dict] = None, resume_step: Optional[int] = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.skipped_path = Path(run_dir) / SKIPPED_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.skipped_path):
            if resume_step is None:
                path.write_text("")
            else:
                truncate_after(path, resume_step)
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard=true needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise ImportError("wandb=true needs the wandb package: pip install wandb") from e
            self._wandb = wandb_lib.init(project=wandb_project, name=Path(run_dir).name, config=config,
                                         dir=str(run_dir), resume="allow")

    def log(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row.get("step", 0)
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def log_skipped(self, step: int, samples) -> None:
        """One ``skipped.jsonl`` row per skipped sample (``BrokenSample``) met while assembling ``step``."""
        with open(self.skipped_path, "a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, "file": s.path, "source": getattr(s, "source", ""),
                                    "reason": s.reason}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_metrics(run_dir: Path) -> List[Path]:
    """``training_curves.png`` (loss, learning rate, logit scale) and ``validation.png`` if there was any
    validation: retrieval recall and loss (``kind: val`` rows), zero-shot accuracy (``kind: zeroshot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / METRICS_FILE)
    train = [r for r in rows if r.get("kind") == "train"]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(Path(run_dir) / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if train:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        steps = [r["step"] for r in train]
        for ax, key, title in zip(axes, ("loss", "lr", "logit_scale"),
                                  ("training loss", "learning rate", "logit scale (exp)")):
            ax.plot(steps, [r.get(key, math.nan) for r in train])
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        save(fig, "training_curves.png")
    fig = validation_figure(rows)
    if fig is not None:
        save(fig, "validation.png")
    return written


def validation_figure(rows: List[Dict[str, Any]]):
    """The validation figure of ``metrics.jsonl`` rows (a matplotlib Figure), or None without validation rows.

    Panels: retrieval recall and validation loss when retrieval validation ran; zero-shot top-1/top-5
    accuracy when zero-shot validation ran, with its step-0 value as a dashed line (the forgetting guard's
    reference).
    """
    import matplotlib.pyplot as plt

    val = [r for r in rows if r.get("kind") == "val"]
    zeroshot = [r for r in rows if r.get("kind") == "zeroshot"]
    if not val and not zeroshot:
        return None
    fig, axes = plt.subplots(1, 2 * bool(val) + bool(zeroshot), figsize=(5 * (2 * bool(val) + bool(zeroshot)), 3.6),
                             squeeze=False)
    axes = list(axes[0])
    if val:
        recall, loss = axes[0], axes[1]
        steps = [r["step"] for r in val]
        for k in (1, 5, 10):
            recall.plot(steps, [r[f"image_retrieval_recall@{k}"] for r in val], marker="o", label=f"text→image R@{k}")
            recall.plot(steps, [r[f"text_retrieval_recall@{k}"] for r in val], marker="x", ls="--",
                        label=f"image→text R@{k}")
        recall.set_title("validation retrieval recall")
        recall.legend(fontsize=7)
        loss.plot(steps, [r["val_loss"] for r in val], marker="o")
        loss.set_title("validation loss")
    if zeroshot:
        ax = axes[-1]
        steps = [r["step"] for r in zeroshot]
        for key, label in (("zeroshot_acc1", "top-1"), ("zeroshot_acc5", "top-5")):
            if all(key in r for r in zeroshot):
                ax.plot(steps, [r[key] for r in zeroshot], marker="o", label=label)
        baseline = [r for r in zeroshot if r["step"] == r.get("baseline_step")]
        if baseline:
            ax.axhline(baseline[0]["zeroshot_acc1"], color="gray", ls="--", lw=1,
                       label=f"top-1 at step {baseline[0]['step']}")
        ax.set_title("zero-shot accuracy")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig
