"""Text encoding and zero-shot classifier build: OpenCLIP vs transformers vs clipforge modes.

Each mode builds a classifier for a spread-out subset of ImageNet classes x all 80 templates
(tokenization included) and the time is extrapolated linearly to 1000 x 80. OpenCLIP always runs
all 77 positions, so its cost per prompt does not depend on which prompts are measured; it is
timed on fewer classes. Every mode's classifier is compared with the fp32 one (cosine of class
weights) and, on CIFAR-10 test images, by top-1 agreement of zero-shot predictions.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from clipforge import inference

from common import SHARED, cifar10_samples, peak_rss_mb, zero_shot_vocab

FULL_CLASSES, FULL_TEMPLATES = 1000, 80


def _hf_classifier(hf, tokenizer, classnames, templates, per_batch: int = 10) -> torch.Tensor:
    """OpenCLIP's recipe with transformers: per 10 classes, prompts padded to the batch's longest
    (as ``CLIPProcessor(padding=True)`` does) with an attention mask."""
    weights = []
    for start in range(0, len(classnames), per_batch):
        prompts = [t.format(c) for c in classnames[start:start + per_batch] for t in templates]
        ids = tokenizer(prompts)  # [N, 77]
        length = int(ids.argmax(dim=-1).max()) + 1
        ids = ids[:, :length]
        mask = (torch.arange(length)[None] <= ids.argmax(dim=-1)[:, None]).long()
        out = hf.get_text_features(input_ids=ids, attention_mask=mask)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        emb = F.normalize(emb, dim=-1).reshape(-1, len(templates), emb.shape[-1]).mean(dim=1)
        weights.append(F.normalize(emb, dim=-1).T)
    return torch.cat(weights, dim=1)


def _builders(model, ref, hf) -> Dict[str, Callable]:
    """Mode -> (classnames, templates) -> class weights [D, C]."""
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier as oc_build

    from clipforge import get_tokenizer
    from clipforge.evaluate.zero_shot import build_zero_shot_classifier as cf_build

    oc_tok, cf_tok = open_clip.get_tokenizer("ViT-B-32"), get_tokenizer("ViT-B-32")
    fast = inference.to_bf16_inference(copy.deepcopy(model))
    q8 = inference.quantize_int8(model)
    builders = {
        "open_clip fp32": lambda c, t: oc_build(ref, oc_tok, c, t, num_classes_per_batch=10,
                                                device="cpu", use_tqdm=False),
    }
    if hf is not None:
        builders["transformers fp32 (pad to longest)"] = lambda c, t: _hf_classifier(hf, cf_tok, c, t)
    builders.update({
        "clipforge fp32 (per-batch trim)": lambda c, t: cf_build(model, cf_tok, c, t, num_classes_per_batch=10),
        "clipforge fp32 bucketed": lambda c, t: cf_build(model, cf_tok, c, t, bucket_size=256),
        "clipforge bf16 mode bucketed": lambda c, t: cf_build(fast, cf_tok, c, t, bucket_size=256),
        "clipforge int8 bucketed": lambda c, t: cf_build(q8, cf_tok, c, t, bucket_size=256),
    })
    return builders


def _cifar_image_features(model, fast, per_class: int):
    """(fp32 features, bf16-mode features, labels, class names) for CIFAR-10 test images."""
    from clipforge.config import PreprocessConfig
    from clipforge.transforms import image_transform, load_image

    samples, classes = cifar10_samples(per_class)
    if not samples:
        return None
    tf = image_transform(PreprocessConfig(image_size=model.cfg.vision_cfg.image_size), is_train=False)
    feats32, feats16 = [], []
    for start in range(0, len(samples), 32):
        x = torch.stack([tf(load_image(p)) for p, _ in samples[start:start + 32]])
        feats32.append(model.encode_image(x, normalize=True))
        feats16.append(fast.encode_image(x, normalize=True))
    labels = torch.tensor([y for _, y in samples])
    return torch.cat(feats32), torch.cat(feats16), labels, classes


def _cifar_templates() -> List[str]:
    path = SHARED / "assets" / "cifar10_classes_templates.json"
    return json.loads(path.read_text())["templates"]


def run(model_name: str, num_classes: int, oc_classes: int, cifar_per_class: int, build_models) -> dict:
    model, ref, hf = build_models(model_name)
    classes, templates = zero_shot_vocab(num_classes)
    oc_subset = classes[:: max(1, len(classes) // oc_classes)][:oc_classes]
    builders = _builders(model, ref, hf)
    fast = inference.to_bf16_inference(copy.deepcopy(model))
    rows, weights = [], {}
    with torch.inference_mode():
        cifar = _cifar_image_features(model, fast, cifar_per_class) if cifar_per_class else None
        for mode, build in builders.items():
            subset = oc_subset if not mode.startswith("clipforge") else classes
            build(subset[:1], templates[:2])  # warm-up
            with FlopCounterMode(display=False) as counter:  # per-op overhead only: a few us per op
                start = time.perf_counter()
                build(subset, templates)
                seconds = time.perf_counter() - start
            prompts = len(subset) * len(templates)
            # Quantised int8 matmuls are not counted by FlopCounterMode, so no FLOP figure for int8.
            flops = None if "int8" in mode else counter.get_total_flops() / prompts / 1e9
            row = {"mode": mode, "prompts_measured": prompts, "prompts_per_s": prompts / seconds,
                   "classifier_1000x80_s": seconds * FULL_CLASSES * FULL_TEMPLATES / prompts,
                   "gflop_per_prompt": flops, "peak_rss_mb": peak_rss_mb()}
            if cifar is not None:
                img32, img16, labels, cnames = cifar
                w = build(cnames, _cifar_templates()).float()
                weights[mode] = w
                ref_w = weights["open_clip fp32"]  # the first mode
                pred_ref = (img32 @ ref_w).argmax(dim=1)
                row["classifier_min_cos_vs_fp32"] = F.cosine_similarity(w, ref_w, dim=0).min().item()
                row["top1_agreement_vs_fp32"] = ((img32 @ w).argmax(dim=1) == pred_ref).float().mean().item()
                if "bf16" in mode:  # images through the bf16 mode too: the whole fast pipeline
                    row["top1_agreement_vs_fp32_bf16_images"] = \
                        ((img16 @ w).argmax(dim=1) == pred_ref).float().mean().item()
                row["fp32_zero_shot_acc"] = (pred_ref == labels).float().mean().item()
                # Random-init towers give near-tied classes; compare the fp32 top-2 margin with the
                # logit change of this mode to see whether disagreements are ties or real errors.
                top2 = (img32 @ ref_w).topk(2, dim=1).values
                row["fp32_median_top2_margin"] = (top2[:, 0] - top2[:, 1]).median().item()
                row["max_abs_logit_change"] = (img32 @ w - img32 @ ref_w).abs().max().item()
            rows.append(row)
            print(f"  text  {mode:36s} {row['prompts_per_s']:9.1f} prompts/s  1000x80 in "
                  f"{row['classifier_1000x80_s']:8.1f} s  agree={row.get('top1_agreement_vs_fp32')}", flush=True)
    base = rows[0]["classifier_1000x80_s"]
    for row in rows:
        row["speedup_vs_open_clip"] = base / row["classifier_1000x80_s"]
    return {"model": model_name, "classes_measured": len(classes), "open_clip_classes_measured": len(oc_subset),
            "templates": len(templates), "cifar10_images": 0 if cifar is None else len(cifar[2]), "rows": rows}
