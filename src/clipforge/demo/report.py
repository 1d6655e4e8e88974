"""Plots and the Markdown report of the demo (matplotlib's Agg backend: no display needed).

Kept apart from :mod:`clipforge.demo.run` so the run reads as train -> evaluate -> write; the
training curves come from the trainer's ``metrics.jsonl`` (per step, smoothed here).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

import numpy as np

if TYPE_CHECKING:  # run imports this module; the reverse import is for type names only
    from .run import DemoResult

TRAIN_DIR = "train"  # the trainer's run folder inside the demo's output folder
PLOTS = {
    "curves": "curves.png",
    "confusion": "confusion_heldout.png",
    "similarity": "similarity.png",
    "examples": "examples.png",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: List[float], window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what exists so far)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(result: "DemoResult", path: Path) -> None:
    """Loss (per step and smoothed), logit scale and learning rate over the trainer's logged steps."""
    plt = _pyplot()
    h = result.history
    steps = np.asarray(h.step)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, h.loss, alpha=0.3, label="per step")
    axes[0].plot(steps, _smooth(h.loss, 20), label="moving average (20)")
    axes[0].set(title="contrastive loss", xlabel="step", ylabel="loss")
    axes[0].legend()
    axes[1].plot(steps, h.logit_scale, color="tab:green")
    axes[1].set(title="logit scale exp(t)", xlabel="step")
    axes[2].plot(steps, h.lr, color="tab:orange")
    axes[2].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(result: "DemoResult", path: Path) -> None:
    """Rows: true held-out class; columns: predicted among held-out classes; cells: row fractions."""
    plt = _pyplot()
    classes = list(result.splits.heldout_labels)
    names = [result.splits.class_names[c] for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)))
    for y, p in zip(result.splits.heldout.labels, result.heldout_pred):
        cm[index[int(y)], index[int(p)]] += 1
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 * len(classes) + 2.5, 0.9 * len(classes) + 2))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="zero-shot confusion, held-out pairs")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_similarity(result: "DemoResult", path: Path) -> None:
    """Cosine similarity of the first validation images (columns) with their own captions (rows)."""
    plt = _pyplot()
    sim = result.val_similarity.numpy()
    n = len(sim)
    data = result.splits.val_seen
    fig = plt.figure(figsize=(1.0 * n + 4, 0.55 * n + 2.2))
    grid = fig.add_gridspec(2, n, height_ratios=[1, 0.55 * n], hspace=0.05)
    for j in range(n):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(data.images[j])
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    im = ax.imshow(sim.T, cmap="viridis", aspect="auto")  # [caption, image]
    ax.set_yticks(range(n), [data.captions[i] for i in range(n)], fontsize=8)
    ax.set_xticks(range(n), [str(i) for i in range(n)])
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[j, i]:.2f}", ha="center", va="center", fontsize=6, color="white")
    ax.set_xlabel("image")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.suptitle("image-text cosine similarity (validation, seen pairs)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_examples(result: "DemoResult", path: Path, n: int = 12, top_k: int = 3) -> None:
    """Held-out images with their top-k classes among ALL classes; green title = top-1 correct."""
    plt = _pyplot()
    data, names = result.splits.heldout, result.splits.class_names
    # one example per held-out class first, so every unseen pair is shown
    picks: List[int] = []
    for c in result.splits.heldout_labels:
        hits = np.flatnonzero(data.labels == c)
        if len(hits):
            picks.append(int(hits[0]))
    picks += [i for i in range(len(data.labels)) if i not in picks][: max(0, n - len(picks))]
    picks = picks[:n]
    cols = 4
    rows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), picks):
        probs = result.heldout_probs[i]
        top_p, top_i = probs.topk(min(top_k, len(probs)))
        ax.imshow(data.images[i])
        lines = [f"{names[c]}: {p:.0%}" for c, p in zip(top_i.tolist(), top_p.tolist())]
        correct = int(top_i[0]) == int(data.labels[i])
        ax.set_title(f"true: {names[int(data.labels[i])]}\n" + "\n".join(lines), fontsize=8,
                     color="tab:green" if correct else "tab:red")
    fig.suptitle("held-out pairs: top predictions among all classes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def reproducibility_lines(m: Dict) -> List[str]:
    """What decides the numbers (seed, thread count) and, when several seeds ran, how much they vary."""
    seed, threads = m.get("seed", "?"), m.get("torch_threads", "?")
    return [
        "## Reproducibility",
        "",
        f"Seed {seed}, {threads} torch threads. The seed fixes the generated data, the initial weights and the "
        f"data order, so `clipforge demo --seed {seed} --threads {threads}` repeats every number above exactly. "
        "A different thread count (the default is one per core, so another machine) sums floats in another "
        "order and trains a slightly different model; `--threads 1` repeats a result on any machine. "
        "`clipforge demo --seeds 5` trains five seeds and prints each figure's mean, spread and range: "
        "differences between single runs smaller than that spread are noise.",
    ]


def report_markdown(result: "DemoResult", config: Dict) -> str:
    """The report: what was held out, zero-shot and retrieval tables, the plots and the configuration."""
    m, s = result.metrics, result.splits
    held = ", ".join(s.class_names[c] for c in s.heldout_labels)
    n_all = len(s.class_names)
    lines = [
        "# clipforge demo: a small CLIP trained on generated shapes",
        "",
        f"Trained for {m['steps']} steps ({m['train_seconds']:.0f} s of training, {m['total_seconds']:.0f} s in all) "
        f"on {result.n_train} captioned images of the {len(s.seen_labels)} seen (colour, shape) pairs. "
        f"The held-out pairs never occur in training: **{held}**. Each of their colours and each of their "
        "shapes occurs in exactly two of them, so among the held-out classes a model that knew only colour "
        "(or only shape) would score 50%: more than that needs the two composed.",
        "",
        "## Zero-shot classification",
        "",
        "| images | candidate classes | top-1 accuracy | chance |",
        "|---|---|---|---|",
        f"| held-out pairs | {len(s.heldout_labels)} held-out | **{_pct(m['heldout_zeroshot_acc1'])}** "
        f"| {_pct(m['heldout_chance'])} |",
        f"| held-out pairs | all {n_all} | {_pct(m['heldout_zeroshot_acc1_all_classes'])} "
        f"| {_pct(m['all_classes_chance'])} |",
        f"| seen pairs (fresh images) | {len(s.seen_labels)} seen | {_pct(m['seen_zeroshot_acc1'])} "
        f"| {_pct(m['seen_chance'])} |",
        f"| seen pairs (fresh images) | all {n_all} | {_pct(m['seen_zeroshot_acc1_all_classes'])} "
        f"| {_pct(m['all_classes_chance'])} |",
        "",
        f"Among all {n_all} classes, held-out images get the right shape {_pct(m['heldout_shape_acc_all_classes'])} "
        f"and the right colour {_pct(m['heldout_color_acc_all_classes'])} of the time.",
        "",
        f"## Retrieval ({len(s.val_seen.captions)} validation images, one caption each)",
        "",
        "| direction | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
    ]
    for key, label in (("image_retrieval", "text → image"), ("text_retrieval", "image → text")):
        lines.append(f"| {label} | " + " | ".join(_pct(m[f"{key}_recall@{k}"]) for k in (1, 5, 10)) + " |")
    lines += [
        "",
        "Many captions fit several images (\"red circle\" names no size, place or background), so R@1 "
        "is limited by that ambiguity as well as by the model.",
        "",
        *reproducibility_lines(m),
        "",
        "## Plots",
        "",
        f"![training curves]({PLOTS['curves']})",
        "",
        f"![held-out confusion matrix]({PLOTS['confusion']})",
        "",
        f"![image-text similarity]({PLOTS['similarity']})",
        "",
        f"![held-out examples]({PLOTS['examples']})",
        "",
        "## Configuration",
        "",
        "```",
        *[f"{k} = {v}" for k, v in config.items()],
        "```",
        "",
        f"Training was an ordinary `clipforge train` run in `{TRAIN_DIR}/`: `{TRAIN_DIR}/config.yaml` is its "
        f"configuration, `{TRAIN_DIR}/metrics.jsonl` its per-step log. The trained model is `{TRAIN_DIR}/final/`, "
        "in OpenCLIP's hub layout with its preprocessing (clipforge's and open_clip's "
        f"`create_model(\"local-dir:<this folder>/{TRAIN_DIR}/final\")`).",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, result: "DemoResult", config: Dict) -> Path:
    """Write the four PNGs and ``report.md`` into ``out``; returns the report's path."""
    plot_curves(result, out / PLOTS["curves"])
    plot_confusion(result, out / PLOTS["confusion"])
    plot_similarity(result, out / PLOTS["similarity"])
    plot_examples(result, out / PLOTS["examples"])
    path = out / "report.md"
    path.write_text(report_markdown(result, config))
    return path
