"""``clipforge wise-ft``: writes what :func:`clipforge.train.wise_ft` interpolates, or chooses alpha by a sweep."""
from __future__ import annotations

from typing import List, Optional

from . import UsageError
from ..train.wise_ft import DEFAULT_ALPHAS, wise_ft, wise_ft_sweep


def main(zero_shot: str, fine_tuned: str, *, out: str, alpha: Optional[float] = None, data: Optional[str] = None,
         classnames: Optional[str] = None, templates: Optional[str] = None, alphas: Optional[List[float]] = None,
         task_data: Optional[str] = None, task_kind: str = "csv", task_img_key: str = "filepath",
         task_caption_key: str = "title", task_metric: str = "image_retrieval_recall@1",
         task_classnames: Optional[str] = None, task_templates: Optional[str] = None, select: Optional[str] = None,
         model: Optional[str] = None, batch_size: int = 64, max_images: Optional[int] = None,
         device: str = "auto") -> int:
    """Interpolate zero-shot and fine-tuned weights of one architecture (WiSE-FT): (1 - alpha) * zero_shot + alpha * fine_tuned.

    With --data the alpha is chosen: every alpha of --alphas is scored zero-shot on that held-out ImageFolder
    (and with --task_data on the fine-tune task's validation data), the best merged model is written to --out,
    and the sweep table and an accuracy-vs-alpha plot beside it (OUT_sweep.json, OUT_sweep.png).

    Args:
        zero_shot: the weights before fine-tuning: a checkpoint file or an OpenCLIP hub folder
        fine_tuned: the fine-tuned weights (e.g. a run's final/ folder)
        out: output file: .safetensors, else a torch state dict
        alpha: weight of the fine-tuned model, in [0, 1] (0.5 when not sweeping); not with --data
        data: sweep: held-out ImageFolder (root/<class>/<image>) scored by zero-shot top-1
        classnames: sweep: class names of --data, a JSON ({"classes": [...], "templates": [...]}) or text file; default the folder names
        templates: sweep: prompt templates, a JSON/text file or a built-in set (cifar10, imagenet1k, ...); default the classnames JSON's
        alphas: sweep: the alphas tried, default 0, 0.1, ..., 1
        task_data: sweep: the fine-tune task's validation data (captions as val.data, or a labelled folder)
        task_kind: csv | coco | jsonl (captions, scored by --task_metric) | classification (zero-shot top-1)
        task_img_key: csv task data: the image path column
        task_caption_key: csv task data: the caption column
        task_metric: captions task data: the retrieval metric (image_retrieval_recall@1, text_retrieval_recall@5, ...)
        task_classnames: classification task data: its class names
        task_templates: classification task data: its templates
        select: what alpha maximizes: held_out | task | average (the mean of both, as WiSE-FT trades them off); default average with --task_data, else held_out
        model: the architecture to score with (a name, model JSON or local-dir:PATH); default the hub folder's config
        batch_size: sweep: images per batch
        max_images: sweep: score a fixed random subset of this many images per data set
        device: sweep: auto (a GPU if there is one), cpu, cuda, cuda:1, ...
    """
    if data is None:
        for name, value in (("alphas", alphas), ("task_data", task_data), ("select", select),
                            ("classnames", classnames), ("templates", templates)):
            if value is not None:
                raise UsageError(f"--{name} is for a sweep, which needs --data (a held-out ImageFolder)")
        path = wise_ft(zero_shot, fine_tuned, 0.5 if alpha is None else alpha, out)
        print(f"wrote {path}")
        return 0
    if alpha is not None:
        raise UsageError("--alpha fixes alpha, --data chooses it by a sweep: give one of them")
    result = wise_ft_sweep(zero_shot, fine_tuned, out, data, classnames=classnames, templates=templates, model=model,
                           alphas=DEFAULT_ALPHAS if alphas is None else alphas, task_data=task_data,
                           task_kind=task_kind, task_img_key=task_img_key, task_caption_key=task_caption_key,
                           task_metric=task_metric, task_classnames=task_classnames, task_templates=task_templates,
                           select=select, batch_size=batch_size, max_images=max_images, device=device)
    columns = [k for k in result["table"][0] if k != "alpha"]
    print("alpha  " + "  ".join(columns))
    for row in result["table"]:
        print(f"{row['alpha']:<5g}  " + "  ".join(f"{row[k]:.4f}".ljust(len(k)) for k in columns))
    print(f"chose alpha={result['alpha']:g} ({result['select']}: {result['score_is']} = {result['score']:.4f}); "
          f"wrote {result['model']}, {result['table_file']}, {result['plot']}")
    return 0
