"""Train a small CLIP on generated shapes with ``clipforge.train``, then measure what it learned.

Some (shape, colour) pairs never occur in the training captions, so zero-shot accuracy on them can
only come from composing "colour" and "shape" learned separately; that is the number the demo
reports against chance. Nothing is downloaded: data, tokenizer vocabulary and model are all local.

Training is an ordinary trainer run (``data.kind: shapes``) in ``<out>/train``: its ``config.yaml``
reruns it with ``clipforge train``, its ``metrics.jsonl`` is the history the report plots, and its
``final/`` folder (OpenCLIP hub layout, preprocessing included) is the model the demo evaluates.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checkpoints.openclip_hub import load_openclip_dir
from ..config import CLIPConfig, PreprocessConfig, as_tuple2
from ..data.loader import DataConfig
from ..data.synthetic import ZEROSHOT_TEMPLATES, ShapesConfig, ShapesSplits, make_shapes_splits
from ..evaluate.metrics import classification_metrics, retrieval_metrics
from ..evaluate.zero_shot import build_zero_shot_classifier
from ..factory import get_tokenizer
from ..models.clip import CLIP
from ..train.config import ModelSettings, OptimSettings, TrainConfig
from ..train.logger import METRICS_FILE, read_metrics
from ..train.loop import train
from ..transforms import AugmentationConfig
from .report import TRAIN_DIR, write_report


@dataclass
class DemoConfig:
    """Everything that decides the demo's result; with the same values the run is repeatable."""

    seed: int = 0
    image_size: int = 64
    n_train: int = 20000  # fresh samples are cheap (~0.2 ms each), so the run barely repeats an image
    n_val: int = 500
    n_heldout: int = 500
    heldout_cycle: int = 4  # 2 * 4 held-out (shape, colour) pairs, see cycle_heldout
    embed_dim: int = 128
    # OpenAI's ResNet tower, slimmed. Measured on this data: a 4-layer ViT (width 128, patch 8) given the
    # same ~400 CPU steps learns colour but hardly shape; convolutions pick up shape far sooner.
    # An int here (e.g. 4, with vision_width=128, patch_size=8) trains a ViT instead.
    vision_width: int = 32
    vision_layers: Union[int, Tuple[int, int, int, int]] = (1, 1, 1, 1)
    patch_size: int = 8  # ViT only
    text_width: int = 128
    text_layers: int = 4
    context_length: int = 32  # the longest shapes caption is 15 tokens with SOT/EOT
    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    eval_batch_size: int = 250
    device: str = "cpu"  # the trainer's device; "auto" takes a GPU when there is one
    # Data-loading processes. On 2 cores a worker gains nothing measurable (a batch of 128 takes ~40 ms
    # of a ~0.5 s step) and slows the quick run by ~25%, competing with the model's threads.
    workers: int = 0
    # torch's intra-op threads while training and evaluating (None: torch's default, one per core).
    # Everything random is seeded from `seed`, so a rerun on the same machine repeats the numbers
    # exactly; but the thread count orders float sums, so another count (another machine) trains a
    # slightly different model. threads=1 repeats exactly everywhere the same torch build runs.
    threads: Optional[int] = None

    def model_dict(self) -> Dict[str, Any]:
        """Inline OpenCLIP-style model config; ``vision_layers`` as 4 block counts selects the ResNet tower."""
        vision = {"image_size": self.image_size, "width": self.vision_width, "layers": self.vision_layers,
                  "head_width": 32}
        if not isinstance(self.vision_layers, (tuple, list)):
            vision.update(patch_size=self.patch_size, mlp_ratio=2.0)
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {"context_length": self.context_length, "width": self.text_width,
                         "heads": max(1, self.text_width // 32), "layers": self.text_layers, "mlp_ratio": 2.0},
        }

    def model_config(self) -> CLIPConfig:
        """:meth:`model_dict` parsed, as the trainer builds it."""
        return CLIPConfig.from_dict(self.model_dict())


def quick_config(seed: int = 0) -> DemoConfig:
    """A seconds-long run for tests and smoke checks: tiny towers, few samples and steps."""
    return DemoConfig(seed=seed, image_size=32, n_train=1024, n_val=128, n_heldout=160, embed_dim=64,
                      vision_width=16, text_width=64, text_layers=2, context_length=24,
                      steps=40, batch_size=64, lr=2e-3, warmup_steps=5, eval_batch_size=128)


def cycle_heldout(shapes: Sequence[str], colors: Sequence[str], k: int) -> List[Tuple[str, str]]:
    """Hold out (shape i, colour i) and (shape i, colour i+1 mod k) for i < k: 2k pairs.

    Among these pairs every colour and every shape occurs twice, so telling them apart needs both
    attributes: colour alone (or shape alone) reaches only 50%, against a chance of 1 / 2k.
    """
    if not 2 <= k <= min(len(shapes), len(colors)):
        raise ValueError(f"k must be in [2, {min(len(shapes), len(colors))}], got {k}")
    return [(shapes[i], colors[(i + j) % k]) for i in range(k) for j in (0, 1)]


def shapes_config(cfg: DemoConfig) -> ShapesConfig:
    """The shapes world of the demo: the default shapes and colours with ``cycle_heldout``'s pairs held out."""
    default = ShapesConfig()
    held = cycle_heldout(default.shapes, default.colors, cfg.heldout_cycle)
    return ShapesConfig(image_size=cfg.image_size, seed=cfg.seed, heldout_pairs=held)


def make_demo_data(cfg: DemoConfig) -> Tuple[ShapesConfig, ShapesSplits]:
    """The evaluation splits (``val_seen``: fresh seen pairs, ``heldout``: only the unseen ones).

    ``train`` is left empty: the trainer draws the training split itself from the same
    :class:`ShapesConfig` (``data.kind: shapes``), which holds only seen pairs.
    """
    shapes = shapes_config(cfg)
    return shapes, make_shapes_splits(shapes, 0, cfg.n_val, cfg.n_heldout)


def train_config(cfg: DemoConfig, run_dir: Union[str, Path], progress: bool = True) -> TrainConfig:
    """The trainer's settings for the demo run, whose folder is ``run_dir``.

    Training images go through the trainer's train transform with crop scale (1, 1), which keeps
    the whole image at its native size: exactly :func:`images_to_tensor`, the eval preprocessing.
    """
    run_dir = Path(run_dir)
    return TrainConfig(
        model=ModelSettings(name=None, config=cfg.model_dict()),
        data=DataConfig(kind="shapes", num_samples=cfg.n_train, shapes=shapes_config(cfg)),
        aug=AugmentationConfig(scale=(1.0, 1.0)),
        optim=OptimSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                            schedule="cosine"),
        max_steps=cfg.steps, batch_size=cfg.batch_size, precision="fp32", device=cfg.device, seed=cfg.seed,
        workers=cfg.workers, output_dir=str(run_dir.parent), name=run_dir.name,
        save_every_n_epochs=0, log_every_n_steps=1, progress=progress,
    )


@dataclass
class TrainHistory:
    """Per-step training curves, read back from the trainer's ``metrics.jsonl``."""

    step: List[int]
    loss: List[float]
    logit_scale: List[float]  # exp(logit_scale), the temperature's inverse, after each step
    lr: List[float]
    seconds: float

    @classmethod
    def from_run(cls, run_dir: Path, seconds: float) -> "TrainHistory":
        rows = [r for r in read_metrics(Path(run_dir) / METRICS_FILE) if r.get("kind") == "train"]
        return cls([r["step"] for r in rows], [r["loss"] for r in rows], [r["logit_scale"] for r in rows],
                   [r["lr"] for r in rows], seconds)


def train_demo_model(cfg: DemoConfig, run_dir: Union[str, Path],
                     progress: bool = True) -> Tuple[CLIP, PreprocessConfig, TrainHistory]:
    """Train with ``clipforge.train`` into ``run_dir``; returns its saved final model (eval mode), preprocessing and curves."""
    run_dir = Path(run_dir)
    summary = train(train_config(cfg, run_dir, progress))
    model, preprocess = load_openclip_dir(run_dir / "final")
    return model, preprocess, TrainHistory.from_run(run_dir, summary["wall_seconds"])


def images_to_tensor(images: np.ndarray, preprocess: Optional[PreprocessConfig] = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W]; equal to the eval transform at native size.

    A batched shortcut past PIL for images already at the model's size (``preprocess`` defaults to CLIP's).
    """
    pp = preprocess or PreprocessConfig(image_size=images.shape[1])
    if tuple(images.shape[1:3]) != as_tuple2(pp.image_size):
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} px, the preprocessing wants "
                         f"{pp.image_size}: resize them with clipforge.transforms.image_transform instead")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, H, W]
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_images(model: CLIP, images: np.ndarray, batch_size: int,
                  preprocess: Optional[PreprocessConfig] = None) -> torch.Tensor:
    """L2-normalised image embeddings [N, D], a batch at a time."""
    chunks = [model.encode_image(images_to_tensor(images[i:i + batch_size], preprocess), normalize=True)
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def subset_accuracy(image_emb: torch.Tensor, classifier: torch.Tensor, labels: np.ndarray,
                    classes: Sequence[int]) -> Tuple[Dict[str, float], torch.Tensor]:
    """Zero-shot metrics when only ``classes`` are candidates; returns (metrics, predicted class ids)."""
    classes = list(classes)
    remap = {c: i for i, c in enumerate(classes)}
    logits = 100.0 * image_emb @ classifier[:, classes]  # [N, len(classes)], OpenCLIP's fixed scale
    target = torch.tensor([remap[int(y)] for y in labels])
    metrics = classification_metrics(logits, target, num_classes=len(classes))
    return metrics, torch.tensor(classes)[logits.argmax(dim=1)]


@dataclass
class DemoResult:
    """Metrics plus what the report's plots need."""

    metrics: Dict[str, float]
    history: TrainHistory
    splits: ShapesSplits
    n_train: int  # training samples (generated by the trainer, so not in ``splits``)
    heldout_pred: np.ndarray  # predicted class among held-out classes, per held-out image
    heldout_probs: torch.Tensor  # [N_heldout, n_classes] softmax over all classes
    val_similarity: torch.Tensor  # [n, n] cosine similarity of the first val images and captions


@torch.no_grad()
def evaluate(model: CLIP, splits: ShapesSplits, shapes: ShapesConfig, cfg: DemoConfig,
             preprocess: Optional[PreprocessConfig] = None) -> Tuple[Dict, Dict]:
    """Zero-shot on held-out and seen pairs (restricted and all-class), and retrieval on the val split."""
    tokenizer = get_tokenizer(model.cfg)
    classifier = build_zero_shot_classifier(model, tokenizer, splits.class_names, ZEROSHOT_TEMPLATES)  # [D, C]
    held_emb = encode_images(model, splits.heldout.images, cfg.eval_batch_size, preprocess)
    val_emb = encode_images(model, splits.val_seen.images, cfg.eval_batch_size, preprocess)
    all_classes = range(len(splits.class_names))
    held, held_pred = subset_accuracy(held_emb, classifier, splits.heldout.labels, splits.heldout_labels)
    held_all, held_pred_all = subset_accuracy(held_emb, classifier, splits.heldout.labels, all_classes)
    seen, _ = subset_accuracy(val_emb, classifier, splits.val_seen.labels, splits.seen_labels)
    seen_all, _ = subset_accuracy(val_emb, classifier, splits.val_seen.labels, all_classes)
    n_colors = len(shapes.colors)  # label = shape_index * n_colors + colour_index
    true = torch.from_numpy(splits.heldout.labels)
    text_emb = torch.cat([model.encode_text(tokenizer(splits.val_seen.captions[i:i + cfg.eval_batch_size]),
                                            normalize=True)
                          for i in range(0, len(splits.val_seen.captions), cfg.eval_batch_size)])
    retrieval = retrieval_metrics(val_emb, text_emb, torch.arange(len(text_emb)))
    metrics = {
        "heldout_zeroshot_acc1": held["acc1"], "heldout_chance": 1.0 / len(splits.heldout_labels),
        "heldout_zeroshot_acc1_all_classes": held_all["acc1"], "all_classes_chance": 1.0 / len(splits.class_names),
        "heldout_shape_acc_all_classes": (held_pred_all // n_colors == true // n_colors).float().mean().item(),
        "heldout_color_acc_all_classes": (held_pred_all % n_colors == true % n_colors).float().mean().item(),
        "seen_zeroshot_acc1": seen["acc1"], "seen_chance": 1.0 / len(splits.seen_labels),
        "seen_zeroshot_acc1_all_classes": seen_all["acc1"],
    }
    for key in ("image_retrieval", "text_retrieval"):
        for k in (1, 5, 10):
            metrics[f"{key}_recall@{k}"] = retrieval[f"{key}_recall@{k}"]
    n_sim = min(12, len(val_emb))
    extras = {
        "heldout_pred": held_pred.numpy(),
        "heldout_probs": (model.logit_scale.exp() * held_emb @ classifier).softmax(dim=1),
        "val_similarity": val_emb[:n_sim] @ text_emb[:n_sim].T,
    }
    return metrics, extras


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (unchanged for None), restored after."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be at least 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(out_dir: str = "runs/demo", steps: Optional[int] = None, seed: int = 0, quick: bool = False,
             progress: bool = True, config: Optional[DemoConfig] = None,
             threads: Optional[int] = None) -> Dict[str, float]:
    """Train (run folder ``out_dir/train``), evaluate, and write ``report.md``, plots and ``metrics.json``.

    Returns the metrics (also in ``metrics.json``), with the ``seed`` and ``torch_threads`` that
    decide them: the same pair repeats the numbers exactly (see ``DemoConfig.threads``).
    """
    t0 = time.perf_counter()
    cfg = config or (quick_config(seed) if quick else DemoConfig(seed=seed))
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if threads is not None:
        cfg = replace(cfg, threads=threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(cfg.threads):
        threads = torch.get_num_threads()
        model, preprocess, history = train_demo_model(cfg, out / TRAIN_DIR, progress)
        shapes, splits = make_demo_data(cfg)
        metrics, extras = evaluate(model, splits, shapes, cfg, preprocess)
    metrics.update(train_seconds=history.seconds, final_loss=float(np.mean(history.loss[-10:])),
                   steps=history.step[-1], seed=cfg.seed, torch_threads=threads)
    result = DemoResult(metrics, history, splits, cfg.n_train, extras["heldout_pred"], extras["heldout_probs"],
                        extras["val_similarity"])
    metrics["total_seconds"] = time.perf_counter() - t0  # report writing is a second or two more
    write_report(out, result, asdict(cfg))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


SPREAD_METRICS = ("heldout_zeroshot_acc1", "seen_zeroshot_acc1", "image_retrieval_recall@1",
                  "image_retrieval_recall@10")


def seed_spread(runs: Sequence[Dict[str, float]], keys: Sequence[str] = SPREAD_METRICS) -> Dict[str, Dict[str, float]]:
    """Per metric over demo runs (one per seed): mean, sample standard deviation, min and max."""
    out: Dict[str, Dict[str, float]] = {}
    for key in keys:
        v = np.asarray([r[key] for r in runs], dtype=np.float64)
        out[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max()), "n": len(v)}
    return out


def run_demo_seeds(out_dir: str, seeds: Sequence[int], **kwargs) -> Tuple[List[Dict[str, float]], Dict]:
    """:func:`run_demo` once per seed into ``out_dir/seed-S``; (each run's metrics, :func:`seed_spread`),
    the spread also written to ``out_dir/spread.json``."""
    runs = [run_demo(out_dir=str(Path(out_dir) / f"seed-{s}"), seed=s, **kwargs) for s in seeds]
    spread = seed_spread(runs)
    (Path(out_dir) / "spread.json").write_text(json.dumps({"seeds": list(seeds), "spread": spread}, indent=2) + "\n")
    return runs, spread
