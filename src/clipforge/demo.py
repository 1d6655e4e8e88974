"""``clipforge demo``: train a small CLIP on generated shapes on the CPU, then measure what it learned.

Some (shape, colour) pairs never occur in the training captions, so zero-shot accuracy on them can
only come from composing "colour" and "shape" learned separately; that is the number the demo
reports against chance. Nothing is downloaded: data, tokenizer vocabulary and model are all local.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from .config import OPENAI_MEAN, OPENAI_STD, CLIPConfig
from .data.synthetic import ZEROSHOT_TEMPLATES, ShapesConfig, ShapesSplits, make_shapes_splits
from .evaluate.metrics import classification_metrics, retrieval_metrics
from .evaluate.zero_shot import build_zero_shot_classifier
from .loss import ClipLoss
from .models.clip import CLIP
from .tokenizer import CLIPTokenizer
from .train.config import OptimSettings
from .train.loop import MAX_LOGIT_SCALE
from .train.optim import build_optimizer, lr_at, set_lr
from .train.step import forward_backward


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

    def model_config(self) -> CLIPConfig:
        """Inline OpenCLIP-style config; ``vision_layers`` as 4 block counts selects the ResNet tower."""
        vision = {"image_size": self.image_size, "width": self.vision_width, "layers": self.vision_layers,
                  "head_width": 32}
        if not isinstance(self.vision_layers, (tuple, list)):
            vision.update(patch_size=self.patch_size, mlp_ratio=2.0)
        return CLIPConfig.from_dict({
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {"context_length": self.context_length, "width": self.text_width,
                         "heads": max(1, self.text_width // 32), "layers": self.text_layers, "mlp_ratio": 2.0},
        })


def quick_config(seed: int = 0) -> DemoConfig:
    """A seconds-long run for tests and smoke checks: tiny towers, few samples and steps."""
    return DemoConfig(seed=seed, image_size=32, n_train=1024, n_val=128, n_heldout=160, embed_dim=64,
                      vision_width=16, text_width=64, text_layers=2, context_length=24,
                      steps=40, batch_size=64, lr=2e-3, warmup_steps=5, eval_batch_size=128)


@dataclass
class TrainHistory:
    loss: List[float]
    logit_scale: List[float]  # exp(logit_scale), the temperature's inverse, after each step
    lr: List[float]
    seconds: float


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W]; equal to the eval transform at native size."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, H, W]
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def optim_settings(cfg: DemoConfig) -> OptimSettings:
    """The demo's optimiser as the trainer's settings: AdamW + warm-up and cosine decay."""
    return OptimSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, schedule="cosine")


def train(model: CLIP, images: np.ndarray, tokens: torch.Tensor, cfg: DemoConfig,
          progress: bool = True) -> TrainHistory:
    """The trainer's optimiser, schedule and step over seeded in-memory batches.

    Images stay uint8 until batched (memory), which is why this does not go through the file-based
    loaders of ``clipforge train``.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    optim = optim_settings(cfg)
    opt = build_optimizer(model, optim)
    loss_fn = ClipLoss()
    cpu = torch.device("cpu")
    hist = TrainHistory([], [], [], 0.0)
    order, pos = torch.randperm(len(images), generator=gen), 0
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc="training", disable=not progress, unit="step")
    for step in bar:
        if pos + cfg.batch_size > len(order):  # new epoch: reshuffle, drop the ragged tail
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        lr = lr_at(step, optim, cfg.steps)
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(model, loss_fn, [(images_to_tensor(images[idx.numpy()]), tokens[idx])], "fp32", cpu)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        hist.loss.append(loss.item())
        hist.logit_scale.append(model.logit_scale.exp().item())
        hist.lr.append(lr)
        bar.set_postfix(loss=f"{hist.loss[-1]:.3f}", scale=f"{hist.logit_scale[-1]:.1f}")
    hist.seconds = time.perf_counter() - start
    model.eval()
    return hist


@torch.no_grad()
def encode_images(model: CLIP, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """L2-normalised image embeddings [N, D], a batch at a time."""
    chunks = [model.encode_image(images_to_tensor(images[i:i + batch_size]), normalize=True)
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
    heldout_pred: np.ndarray  # predicted class among held-out classes, per held-out image
    heldout_probs: torch.Tensor  # [N_heldout, n_classes] softmax over all classes
    val_similarity: torch.Tensor  # [n, n] cosine similarity of the first val images and captions


def evaluate(model: CLIP, tokenizer: CLIPTokenizer, splits: ShapesSplits, shapes: ShapesConfig,
             cfg: DemoConfig) -> Tuple[Dict, Dict]:
    """Zero-shot on held-out and seen pairs (restricted and all-class), and retrieval on the val split."""
    classifier = build_zero_shot_classifier(model, tokenizer, splits.class_names, ZEROSHOT_TEMPLATES)  # [D, C]
    held_emb = encode_images(model, splits.heldout.images, cfg.eval_batch_size)
    val_emb = encode_images(model, splits.val_seen.images, cfg.eval_batch_size)
    all_classes = range(len(splits.class_names))
    held, held_pred = subset_accuracy(held_emb, classifier, splits.heldout.labels, splits.heldout_labels)
    held_all, held_pred_all = subset_accuracy(held_emb, classifier, splits.heldout.labels, all_classes)
    seen, _ = subset_accuracy(val_emb, classifier, splits.val_seen.labels, splits.seen_labels)
    seen_all, _ = subset_accuracy(val_emb, classifier, splits.val_seen.labels, all_classes)
    n_colors = len(shapes.colors)  # label = shape_index * n_colors + colour_index
    true = torch.from_numpy(splits.heldout.labels)
    with torch.no_grad():
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
        "heldout_probs": (model.logit_scale.exp() * held_emb @ classifier).softmax(dim=1).detach(),
        "val_similarity": (val_emb[:n_sim] @ text_emb[:n_sim].T).detach(),
    }
    return metrics, extras


def cycle_heldout(shapes: Sequence[str], colors: Sequence[str], k: int) -> List[Tuple[str, str]]:
    """Hold out (shape i, colour i) and (shape i, colour i+1 mod k) for i < k: 2k pairs.

    Among these pairs every colour and every shape occurs twice, so telling them apart needs both
    attributes: colour alone (or shape alone) reaches only 50%, against a chance of 1 / 2k.
    """
    if not 2 <= k <= min(len(shapes), len(colors)):
        raise ValueError(f"k must be in [2, {min(len(shapes), len(colors))}], got {k}")
    return [(shapes[i], colors[(i + j) % k]) for i in range(k) for j in (0, 1)]


def make_demo_data(cfg: DemoConfig) -> Tuple[ShapesConfig, ShapesSplits]:
    """The demo's splits: training holds only seen pairs, ``heldout`` only the unseen ones."""
    default = ShapesConfig()
    held = cycle_heldout(default.shapes, default.colors, cfg.heldout_cycle)
    shapes = ShapesConfig(image_size=cfg.image_size, seed=cfg.seed, heldout_pairs=held)
    return shapes, make_shapes_splits(shapes, cfg.n_train, cfg.n_val, cfg.n_heldout)


def run_demo(out_dir: str = "runs/demo", steps: Optional[int] = None, seed: int = 0, quick: bool = False,
             progress: bool = True, config: Optional[DemoConfig] = None) -> Dict[str, float]:
    """Generate data, train, evaluate, and write ``report.md``, plots, metrics and the model to ``out_dir``."""
    from .demo_report import write_report  # matplotlib is only needed once training is done

    t0 = time.perf_counter()
    cfg = config or (quick_config(seed) if quick else DemoConfig(seed=seed))
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    shapes, splits = make_demo_data(cfg)
    tokenizer = CLIPTokenizer(context_length=cfg.context_length)
    model_cfg = cfg.model_config()
    model = CLIP(model_cfg)
    history = train(model, splits.train.images, tokenizer(splits.train.captions), cfg, progress)
    model.eval()
    metrics, extras = evaluate(model, tokenizer, splits, shapes, cfg)
    metrics.update(train_seconds=history.seconds, final_loss=float(np.mean(history.loss[-10:])),
                   steps=cfg.steps)
    result = DemoResult(metrics, history, splits, extras["heldout_pred"], extras["heldout_probs"],
                        extras["val_similarity"])
    _save_model(model, model_cfg, out)
    metrics["total_seconds"] = time.perf_counter() - t0  # report writing is a second or two more
    write_report(out, result, asdict(cfg))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _save_model(model: CLIP, model_cfg: CLIPConfig, out: Path) -> None:
    """Weights in OpenCLIP's key layout plus its config JSON, loadable by ``create_model(cfg, pretrained=...)``."""
    from .checkpoints import save_safetensors

    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg.to_dict()}, indent=2) + "\n")


def demo_main(out: str = "runs/demo", quick: bool = False, steps: Optional[int] = None, seed: int = 0) -> int:
    """Train a small CLIP on generated shapes (no download) and write a report with plots to ``out``."""
    metrics = run_demo(out_dir=out, steps=steps, seed=seed, quick=quick)
    print(f"report: {Path(out) / 'report.md'}")
    print(f"seen-pair zero-shot accuracy: {metrics['seen_zeroshot_acc1']:.1%} (chance {metrics['seen_chance']:.1%})")
    print("retrieval R@1/5/10 (text->image): " + "/".join(
        f"{metrics[f'image_retrieval_recall@{k}']:.1%}" for k in (1, 5, 10)))
    print(f"held-out zero-shot accuracy: {metrics['heldout_zeroshot_acc1']:.1%} "
          f"(chance {metrics['heldout_chance']:.1%}; among all {round(1 / metrics['all_classes_chance'])} classes "
          f"{metrics['heldout_zeroshot_acc1_all_classes']:.1%}, chance {metrics['all_classes_chance']:.1%})")
    return 0
