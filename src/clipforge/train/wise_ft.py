"""WiSE-FT (Wortsman et al. 2022): interpolate zero-shot and fine-tuned weights of one architecture.

``theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned``. A fixed alpha
(:func:`wise_ft`; 0.5 is the paper's default) needs nothing but the two files. :func:`wise_ft_sweep`
chooses alpha instead: it scores every alpha of a grid (0, 0.1, ..., 1 by default) by zero-shot
accuracy on a held-out ImageFolder (the distribution the fine-tune should not forget) and,
optionally, on the fine-tune task's own validation data (retrieval recall, or zero-shot accuracy
on a labelled folder), and keeps the alpha with the best score: the held-out metric, the task
metric, or their mean. The mean is what the paper's Figure 1 trades off (average of in-distribution
and distribution-shift accuracy); its endpoints are the zero-shot model (alpha=0) and the fine-tuned
one (alpha=1), bit for bit. Ties go to the smaller alpha, the one closer to the zero-shot model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..atomic import atomic_write, write_text
from ..checkpoints import read_checkpoint, save_safetensors, save_torch, unwrap_state_dict

PathLike = Union[str, Path]


def interpolate_weights(zero_shot: Dict[str, torch.Tensor], fine_tuned: Dict[str, torch.Tensor],
                        alpha: float) -> Dict[str, torch.Tensor]:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` per tensor; integer buffers are taken from fine_tuned."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    missing, extra = sorted(set(fine_tuned) - set(zero_shot)), sorted(set(zero_shot) - set(fine_tuned))
    if missing or extra:
        raise ValueError(f"the checkpoints hold different tensors: only fine-tuned {missing[:5]}, "
                         f"only zero-shot {extra[:5]}")
    out = {}
    for key, ft in fine_tuned.items():
        zs = zero_shot[key]
        if zs.shape != ft.shape:
            raise ValueError(f"{key}: zero-shot shape {tuple(zs.shape)} vs fine-tuned {tuple(ft.shape)}")
        if ft.is_floating_point():
            mixed = (1.0 - alpha) * zs.double() + alpha * ft.double()
            out[key] = mixed.to(ft.dtype)
        else:
            out[key] = ft.clone()
    return out


def _read_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        from ..checkpoints.openclip_hub import find_weights
        path = find_weights(path)
    return unwrap_state_dict(read_checkpoint(path))


def _write_weights(weights: Dict[str, torch.Tensor], out: Path) -> Path:
    if out.suffix == ".safetensors":
        save_safetensors(weights, out)
    else:
        save_torch(weights, out)
    return out


def wise_ft(zero_shot: PathLike, fine_tuned: PathLike, alpha: float, out: PathLike) -> Path:
    """Write the interpolated weights to ``out`` (``.safetensors``, else a torch state dict), atomically."""
    mixed = interpolate_weights(_read_weights(zero_shot), _read_weights(fine_tuned), alpha)
    return _write_weights(mixed, Path(out))


# -- choosing alpha ------------------------------------------------------------------------------------
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0; i / 10 makes 0 and 1 exact
SELECT = ("held_out", "task", "average")
TASK_KINDS = ("csv", "coco", "jsonl", "classification")


def sweep_paths(out: PathLike) -> Dict[str, Path]:
    """Where a sweep writes: the merged weights ``out``, ``<stem>_sweep.json`` and ``<stem>_sweep.png`` beside it."""
    out = Path(out)
    stem = out.name[:-len(out.suffix)] if out.suffix else out.name
    return {"model": out, "table": out.with_name(f"{stem}_sweep.json"), "plot": out.with_name(f"{stem}_sweep.png")}


def pick_alpha(table: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The row with the highest ``score``; the first (smallest alpha) among equals."""
    if not table:
        raise ValueError("empty sweep table")
    return max(table, key=lambda row: (row["score"], -row["alpha"]))


def _model_source(model: Optional[str], zero_shot: PathLike, fine_tuned: PathLike):
    """What to build for scoring: ``model`` (a name, JSON file or local-dir:), else a hub folder's own config."""
    if model is not None:
        if model.endswith(".json") and Path(model).is_file():
            from ..config import CLIPConfig

            return CLIPConfig.from_dict(json.loads(Path(model).read_text()))
        return model
    for path in (fine_tuned, zero_shot):
        if Path(path).is_dir():
            return f"local-dir:{path}"
    raise ValueError("neither checkpoint is an OpenCLIP hub folder (with open_clip_config.json), so the "
                     "architecture is unknown: pass model (a name, a model JSON file or local-dir:PATH)")


def sweep_figure(table: Sequence[Dict[str, float]], picked: Dict[str, float], labels: Dict[str, str]):
    """Accuracy against alpha: one line per scored column, the score, and the chosen alpha (a Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = [row["alpha"] for row in table]
    for key, label in labels.items():
        ax.plot(alphas, [row[key] for row in table], marker="o", label=label)
    ax.axvline(picked["alpha"], color="gray", ls="--", lw=1, label=f"chosen alpha = {picked['alpha']:g}")
    ax.set_xlabel("alpha (0: zero-shot, 1: fine-tuned)")
    ax.set_ylabel("accuracy / recall")
    ax.set_title("WiSE-FT: weight-space ensembles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def wise_ft_sweep(
    zero_shot: PathLike,
    fine_tuned: PathLike,
    out: PathLike,
    held_out: PathLike,
    *,
    classnames: Union[str, Sequence[str], None] = None,
    templates: Union[str, Sequence[str], None] = None,
    model: Optional[str] = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    task_data: Optional[PathLike] = None,
    task_kind: str = "csv",
    task_img_key: str = "filepath",
    task_caption_key: str = "title",
    task_metric: str = "image_retrieval_recall@1",
    task_classnames: Union[str, Sequence[str], None] = None,
    task_templates: Union[str, Sequence[str], None] = None,
    select: Optional[str] = None,
    batch_size: int = 64,
    max_images: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Score each alpha, write the best merged model to ``out`` and the table and plot beside it.

    ``held_out`` is an ImageFolder (or ``filepath,label`` table) scored by zero-shot top-1 accuracy
    with ``classnames``/``templates`` (as ``val.zeroshot`` reads them). ``task_data`` is the fine-tune
    task's validation set: captions (``task_kind`` csv | coco | jsonl, read as ``val.data`` is) scored
    by ``task_metric``, or a labelled folder (``task_kind=classification``) scored by zero-shot top-1.
    ``select`` is held_out | task | average (default: average with task data, else held_out).
    Returns ``{"alpha", "score", "select", "table", "model", "table_file", "plot"}``; the same, less
    the paths, is the JSON file.
    """
    from ..checkpoints.load import load_state_dict_into
    from ..evaluate.retrieval import evaluate_retrieval
    from ..factory import create_model, get_tokenizer, preprocess_config
    from ..transforms import image_transform
    from .config import ValSettings
    from .validate import build_val_loader, build_zeroshot_task, zeroshot_metrics

    select = select or ("average" if task_data is not None else "held_out")
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    if select != "held_out" and task_data is None:
        raise ValueError(f"select={select} needs task_data (the fine-tune task's validation data)")
    if task_kind not in TASK_KINDS:
        raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
    alphas = [float(a) for a in alphas]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas) or len(set(alphas)) != len(alphas):
        raise ValueError(f"alphas must be distinct values in [0, 1], got {alphas}")
    alphas.sort()
    zs_weights, ft_weights = _read_weights(zero_shot), _read_weights(fine_tuned)
    interpolate_weights(zs_weights, ft_weights, 0.0)  # the two must match before any scoring is spent

    source = _model_source(model, zero_shot, fine_tuned)
    net = create_model(source)
    dev = torch.device(device) if device not in (None, "auto") else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(dev).eval()
    tokenizer = get_tokenizer(source)
    transform = image_transform(preprocess_config(net), is_train=False)
    held = build_zeroshot_task(str(held_out), transform, classnames, templates, batch_size, max_images,
                               where="held_out")
    task = task_loader = None
    if task_data is not None and task_kind == "classification":
        task = build_zeroshot_task(str(task_data), transform, task_classnames, task_templates, batch_size,
                                   max_images, where="task")
    elif task_data is not None:
        task_loader = build_val_loader(ValSettings(data=str(task_data), kind=task_kind, img_key=task_img_key,
                                                   caption_key=task_caption_key, batch_size=batch_size), transform)
    task_key = "task_acc1" if task is not None else f"task_{task_metric}"

    table: List[Dict[str, float]] = []
    for alpha in tqdm(alphas, desc="wise-ft alphas", disable=not progress):
        load_state_dict_into(net, interpolate_weights(zs_weights, ft_weights, alpha), source=f"alpha={alpha}")
        row = {"alpha": alpha, "held_out_acc1": zeroshot_metrics(net, tokenizer, held, dev)["zeroshot_acc1"]}
        if task is not None:
            row[task_key] = zeroshot_metrics(net, tokenizer, task, dev)["zeroshot_acc1"]
        elif task_loader is not None:
            metrics = evaluate_retrieval(net, tokenizer, task_loader, device=dev, use_tqdm=False)
            if task_metric not in metrics:
                raise ValueError(f"task_metric {task_metric!r} is not a retrieval metric; "
                                 f"known: {sorted(k for k in metrics if 'recall' in k)}")
            row[task_key] = metrics[task_metric]
        row["score"] = {"held_out": row["held_out_acc1"], "task": row.get(task_key),
                        "average": (row["held_out_acc1"] + row.get(task_key, 0.0)) / 2}[select]
        table.append(row)
    picked = pick_alpha(table)

    paths = sweep_paths(out)
    _write_weights(interpolate_weights(zs_weights, ft_weights, picked["alpha"]), paths["model"])
    result = {"alpha": picked["alpha"], "score": picked["score"], "select": select,
              "score_is": {"held_out": "held_out_acc1", "task": task_key,
                           "average": f"mean of held_out_acc1 and {task_key}"}[select],
              "zero_shot": str(zero_shot), "fine_tuned": str(fine_tuned), "held_out": str(held_out),
              "task_data": None if task_data is None else str(task_data), "table": table}
    write_text(paths["table"], json.dumps(result, indent=2) + "\n")
    labels = {"held_out_acc1": f"held-out zero-shot top-1 ({Path(held_out).name})"}
    if task_data is not None:
        labels[task_key] = f"task {task_key[5:]} ({Path(task_data).name})"
    if select == "average":
        labels["score"] = "average (the score)"
    fig = sweep_figure(table, picked, labels)
    atomic_write(paths["plot"], lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return {**result, "model": str(paths["model"]), "table_file": str(paths["table"]), "plot": str(paths["plot"])}
