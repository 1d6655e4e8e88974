"""Turn benchmark results into target checks and the markdown table the README embeds."""
from __future__ import annotations

from typing import List, Optional


def _find(rows, **match) -> Optional[dict]:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _target(name: str, value: Optional[float], goal: float, unit: str = "x", note: str = "") -> dict:
    return {"target": name, "value": value, "goal": goal, "unit": unit, "note": note,
            "met": value is not None and value >= goal}


def targets(res: dict) -> List[dict]:
    out = []
    if res.get("text"):
        rows = res["text"]["rows"]
        exact = _find(rows, mode="clipforge fp32 bucketed")
        out.append(_target("zero-shot classifier build, fp32 exact vs OpenCLIP",
                           exact and exact["speedup_vs_open_clip"], 5.0))
        agreeing = [r for r in rows if r["mode"].startswith("clipforge")
                    and r.get("top1_agreement_vs_fp32", 1.0) >= 0.99]
        best = max(agreeing, key=lambda r: r["speedup_vs_open_clip"], default=None)
        note = best and f"{best['mode']}, top-1 agreement {best.get('top1_agreement_vs_fp32')}"
        out.append(_target("zero-shot classifier build, fastest mode (agreement >= 99%) vs OpenCLIP",
                           best and best["speedup_vs_open_clip"], 10.0, note=note or ""))
    if res.get("image"):
        rows = res["image"]
        batch = max(r["batch"] for r in rows)
        cf = _find(rows, model="ViT-B-32", mode="clipforge fp32", batch=batch)
        oc = _find(rows, model="ViT-B-32", mode="open_clip fp32", batch=batch)
        b16 = _find(rows, model="ViT-B-32", mode="clipforge bf16 mode", batch=batch)
        oc16 = _find(rows, model="ViT-B-32", mode="open_clip bf16 cast", batch=batch)
        q8 = _find(rows, model="ViT-B-32", mode="clipforge int8 dynamic", batch=batch)
        if cf and oc:
            out.append(_target(f"ViT-B-32 image fp32 b={batch}, clipforge / OpenCLIP",
                               cf["img_per_s"] / oc["img_per_s"], 1.0))
            out.append(_target(f"ViT-B-32 image fp32 b={batch}, utilisation of fp32 matmul peak",
                               cf["utilisation"], 0.9, unit="frac"))
        if b16 and oc16:
            out.append(_target(f"ViT-B-32 bf16 mode b={batch} / OpenCLIP bf16 cast",
                               b16["img_per_s"] / oc16["img_per_s"], 1.0,
                               note=f"mean cos vs fp32 {b16['mean_cos_vs_fp32']:.6f} vs "
                                    f"{oc16['mean_cos_vs_fp32']:.6f} (OpenCLIP cast)"))
            out.append(_target("ViT-B-32 bf16 mode error / OpenCLIP bf16 cast error (1 - mean cos), inverted",
                               (1 - oc16["mean_cos_vs_fp32"]) / max(1e-12, 1 - b16["mean_cos_vs_fp32"]), 1.0))
        if q8 and cf:
            out.append(_target(f"ViT-B-32 int8 dynamic b={batch} / clipforge fp32 (report)",
                               q8["img_per_s"] / cf["img_per_s"], 0.0,
                               note=f"min cos vs fp32 {q8['min_cos_vs_fp32']:.5f}"))
    if res.get("train"):
        rows = res["train"]["rows"]
        for precision, goal in (("fp32", 1.2), ("bf16 autocast", 1.5)):
            row = _find(rows, impl="clipforge", precision=precision)
            out.append(_target(f"training step samples/s, {precision}, vs OpenCLIP",
                               row and row["speedup_vs_open_clip"], goal,
                               note=row and f"|loss diff| {row['loss_diff_vs_open_clip']:.2e}"))
    return out


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def markdown(res: dict) -> str:
    m = res["machine"]
    load = max(m["loadavg_start"][0], m.get("loadavg_end", [0])[0])
    lines = [f"# clipforge benchmarks{' (--quick smoke run)' if res['quick'] else ''}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), ISA {', '.join(m['isa'])}; "
             f"torch {m['torch']}, Python {m['python']}. Matmul peak measured in this run: "
             f"fp32 {res['matmul_peak_gflops']['fp32']:.0f} GFLOP/s, bf16 {res['matmul_peak_gflops']['bf16']:.0f} "
             f"GFLOP/s. Load average at start/end: {m['loadavg_start'][0]:.2f} / "
             f"{m.get('loadavg_end', ['?'])[0]}; wall time {res['wall_s']:.0f} s; peak RSS {res['peak_rss_mb']:.0f} MB.",
             ""]
    if load > 0.5 * max(1, m["cores"]):
        lines += ["**The machine was shared and loaded during this run** (load average above half the "
                  "core count): absolute numbers are noisy; ratios are measured in the same run.", ""]
    for name, err in res.get("errors", {}).items():
        lines += [f"**Section {name} failed:** `{err}`", ""]
    lines += ["## Targets", ""]
    lines += _table(["target", "measured", "goal", "met", "note"],
                    [[t["target"], _fmt(t["value"]), _fmt(t["goal"], 1), "yes" if t["met"] else "no", t["note"] or ""]
                     for t in res["targets"]])
    if res.get("image"):
        lines += ["", "## Image encoding (img/s)", ""]
        lines += _table(["model", "mode", "batch", "img/s", "GFLOP/img", "utilisation", "min cos vs fp32"],
                        [[r["model"], r["mode"], str(r["batch"]), _fmt(r["img_per_s"]), _fmt(r["gflop_per_img"]),
                          _fmt(r["utilisation"]), _fmt(r["min_cos_vs_fp32"], 6)] for r in res["image"]])
    if res.get("text"):
        t = res["text"]
        lines += ["", f"## Text encoding and zero-shot classifier ({t['model']}, ImageNet prompts)", "",
                  f"Measured on {t['classes_measured']} classes x {t['templates']} templates "
                  f"({t['open_clip_classes_measured']} classes for the 77-position baselines), tokenization "
                  f"included, extrapolated to 1000 x 80. Agreement: top-1 zero-shot predictions on "
                  f"{t['cifar10_images']} CIFAR-10 test images vs the fp32 classifier (random-init weights).", ""]
        lines += _table(["mode", "prompts/s", "1000x80 build (s)", "speed-up", "GFLOP/prompt",
                         "top-1 agreement", "agreement, bf16 images too", "median fp32 top-2 margin",
                         "max logit change"],
                        [[r["mode"], _fmt(r["prompts_per_s"], 1), _fmt(r["classifier_1000x80_s"], 1),
                          _fmt(r["speedup_vs_open_clip"], 1), _fmt(r["gflop_per_prompt"], 3),
                          _fmt(r.get("top1_agreement_vs_fp32"), 4),
                          _fmt(r.get("top1_agreement_vs_fp32_bf16_images"), 4),
                          _fmt(r.get("fp32_median_top2_margin"), 5), _fmt(r.get("max_abs_logit_change"), 5)]
                         for r in t["rows"]])
    if res.get("train"):
        t = res["train"]
        lines += ["", "## Training step (small ViT, 64 px, ViT 256x6 / text 256x6)", "",
                  f"Captions: Flickr8k dev, mean {t['text_tokens_mean']:.1f} tokens, batch max {t['text_tokens_max']}.", ""]
        lines += _table(["impl", "precision", "batch", "samples/s", "speed-up", "GFLOP/step", "utilisation",
                         "|loss diff|"],
                        [[r["impl"], r["precision"], str(r["batch"]), _fmt(r["samples_per_s"], 1),
                          _fmt(r["speedup_vs_open_clip"]), _fmt(r["gflop_per_step"], 1), _fmt(r["utilisation"]),
                          f"{r['loss_diff_vs_open_clip']:.1e}"] for r in t["rows"]])
    if res.get("jpeg"):
        j = res["jpeg"]
        lines += ["", "## JPEG decoding + eval preprocessing (COCO val photos -> 224 px)", "",
                  f"Full decode {j['full decode img/s']:.1f} img/s, draft decode {j['draft decode img/s']:.1f} "
                  f"img/s (x{j['speedup']:.2f}); mean |diff| {j['mean_abs_diff']:.4f}, max {j['max_abs_diff']:.3f} "
                  f"(normalised pixels) over {j['images']} images."]
    return "\n".join(lines) + "\n"
