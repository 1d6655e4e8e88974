"""``clipforge eval``: loads a model, runs :func:`clipforge.evaluate.run_eval`, prints its metrics."""
from __future__ import annotations

import sys
from typing import Literal, Optional, Sequence

from ..evaluate.captioning import generate_options, require_captioner
from ..evaluate.clip_benchmark_loader import load_clipforge
from ..evaluate.runner import DEFAULT_OUTPUT, run_eval


def main(*, model: str, dataset: str, task: str = "zeroshot_classification", pretrained: Optional[str] = None,
         output: Optional[str] = DEFAULT_OUTPUT, split: str = "test", batch_size: int = 64, num_workers: int = 0,
         device: str = "cpu", precision: str = "fp32", amp: bool = False, recall_k: Sequence[int] = (1, 5, 10),
         templates: Optional[str] = None, image_root: Optional[str] = None, beams: Optional[int] = None,
         beam_groups: Optional[int] = None, generation_type: Optional[Literal["beam_search", "top_k", "top_p"]] = None,
         seq_len: Optional[int] = None) -> int:
    """Zero-shot classification, zero-shot retrieval, a linear probe or captioning, with clip_benchmark's metrics.

    The dataset is an image folder, a CSV/TSV table, a COCO captions JSON or WebDataset shards in
    clip_benchmark's layout (see clipforge.evaluate.datasets.open_eval_dataset). The result is
    written as clip_benchmark's JSON. Captioning (CoCa models) reads the retrieval layouts (a COCO
    captions JSON or a filepath,caption table) and reports BLEU-1..4, METEOR, ROUGE-L and CIDEr.

    Args:
        model: architecture name, hf-hub:ORG/REPO or local-dir:PATH
        dataset: path of the evaluation set
        task: zeroshot_classification, zeroshot_retrieval, linear_probe or captioning
        pretrained: weights: a pretrained tag or a checkpoint file (none: random weights)
        output: result JSON path; may hold {dataset} {model} {pretrained} {task} {language}
        split: split (subfolder) evaluated; linear_probe also reads the train split
        batch_size: images per batch
        num_workers: data loader worker processes
        device: torch device, e.g. cpu or cuda
        precision: weight dtype: fp32, bf16 or fp16
        amp: autocast, as clip_benchmark's --amp (fp16 on CUDA, bf16 elsewhere)
        recall_k: retrieval recall@k values
        templates: prompt template set by name (default: the dataset's own, else ImageNet's)
        image_root: folder COCO image paths are relative to
        beams: captioning: beams of beam search (default 6, OpenCLIP's); a multiple of beam_groups
        beam_groups: captioning: groups of diverse beam search (default 3)
        generation_type: captioning: beam_search, top_k or top_p (default: beam_search)
        seq_len: captioning: longest caption in tokens (default 30), start token included
    """
    net, transform, tokenizer = load_clipforge(model, pretrained, device, precision=precision)
    if task == "captioning":
        try:
            require_captioner(net, model)
        except ValueError as e:
            print(f"clipforge eval: error: {e}", file=sys.stderr)
            return 2
    result = run_eval(task, net, tokenizer, transform, dataset, model_name=model, pretrained=pretrained or "",
                      output=output, split=split, batch_size=batch_size, num_workers=num_workers, device=device,
                      amp=amp, recall_k=recall_k, templates=templates, image_root=image_root,
                      generate_kwargs=generate_options(beams, generation_type, seq_len, beam_groups))
    for name, value in result["metrics"].items():
        print(f"{name:>32}: {value:.4f}" if isinstance(value, float) else f"{name:>32}: {value}")
    return 0
