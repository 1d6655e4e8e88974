"""onnxruntime vs torch encode speed on this CPU: ViT-B-32 images (batch 1 and 16) and text (batch 16), fp32 and int8.

The model is OpenCLIP's seeded random ViT-B-32 (norms randomised, ``common.build_models``) loaded
into clipforge and exported with :func:`clipforge.export.export_model`; int8 is onnxruntime's
dynamic quantisation of those files (``clipforge.export.quantize_onnx``) vs clipforge's torch int8
(``clipforge.inference.quantize_int8``). Inputs are COCO photos and captions from ../shared when
present, else seeded noise and built-in prompts. Every row reports its cosine to torch fp32
(random weights: trained weights usually lose less to int8). Text runs as clipforge does: both
torch and onnxruntime get the batch cut after its last EOT.

    python benchmarks/bench_onnx.py [--iters 5] [--out benchmarks/results/onnx]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from clipforge import get_tokenizer, inference
from clipforge.export import CHECK_PROMPTS, OnnxCLIP, cosine_rows, export_model, quantize_onnx, trim_tokens
from clipforge.factory import preprocess_config
from clipforge.transforms import image_transform, load_image

from common import SHARED, build_models, loadavg, machine, timeit

MODEL = "ViT-B-32"


def _inputs(model, n_images: int = 16, n_texts: int = 16):
    pp = preprocess_config(model)
    coco = SHARED / "data" / "coco-mini"
    if (coco / "captions_val2017.json").exists():
        transform = image_transform(pp, is_train=False)
        files = sorted((coco / "val2017").glob("*.jpg"))[:n_images]
        pixels = torch.stack([transform(load_image(f)) for f in files])
        captions = [a["caption"] for a in json.loads((coco / "captions_val2017.json").read_text())["annotations"]]
        return pixels, captions[:n_texts], "COCO val2017 photos and captions (../shared/data/coco-mini)"
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(n_images, 3, pp.image_size, pp.image_size, generator=gen)
    return pixels, (list(CHECK_PROMPTS) * 2)[:n_texts], "seeded noise images and built-in prompts"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx"))
    args = parser.parse_args()
    torch.manual_seed(0)
    info = machine()
    model, _, _ = build_models(MODEL, with_hf=False)
    tokenizer = get_tokenizer(MODEL)
    pixels, captions, source = _inputs(model)
    ids = tokenizer(captions)
    cut = torch.from_numpy(trim_tokens(ids.numpy(), "argmax", None))
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fp32"
        export_model(model, folder, tokenizer, preprocess_config(model), progress=True)
        fp32 = OnnxCLIP(folder, threads=threads)
        int8_folder = Path(tmp) / "int8"
        int8_folder.mkdir()
        for name in ("image_encoder.onnx", "text_encoder.onnx"):
            quantize_onnx(folder / name, int8_folder / name)
        for extra in ("export_config.json", "tokenizer"):
            (int8_folder / extra).symlink_to(folder / extra)
        int8 = OnnxCLIP(int8_folder, threads=threads)
        torch_int8 = inference.quantize_int8(model)
        with torch.no_grad():
            reference = {"image": model.encode_image(pixels).numpy(), "text": model.encode_text(ids).numpy()}
        cases = [("image", 1), ("image", 16), ("text", 16)]
        runners = {
            ("torch", "fp32"): (lambda x: model.encode_image(x).numpy(), lambda t: model.encode_text(t).numpy()),
            ("torch", "int8"): (lambda x: torch_int8.encode_image(x).numpy(),
                                lambda t: torch_int8.encode_text(t).numpy()),
            ("onnxruntime", "fp32"): (lambda x: fp32.encode_image(x.numpy()), lambda t: fp32.encode_text(t.numpy())),
            ("onnxruntime", "int8"): (lambda x: int8.encode_image(x.numpy()), lambda t: int8.encode_text(t.numpy())),
        }
        for tower, batch in cases:
            x = pixels[:batch] if tower == "image" else cut[:batch]
            base = None
            for (runtime, weights), (enc_image, enc_text) in runners.items():
                fn = enc_image if tower == "image" else enc_text
                with torch.no_grad():
                    t = timeit(lambda: fn(x), args.iters, warmup=1)
                    got = fn(x)
                base = base or t.seconds
                cos = cosine_rows(got, reference[tower][:batch])
                rows.append({"tower": tower, "batch": batch, "runtime": runtime, "weights": weights,
                             "ms_per_batch": 1000 * t.seconds, "items_per_s": batch / t.seconds,
                             "speedup_vs_torch_fp32": base / t.seconds, "iters": t.iters,
                             "min_cosine_vs_torch_fp32": float(cos.min()),
                             "max_abs_diff_vs_torch_fp32": float(np.abs(got - reference[tower][:batch]).max())})
                print(rows[-1])
    result = {"model": MODEL, "weights": "seeded random (OpenCLIP init, randomised norms)", "inputs": source,
              "text_tokens_after_cut": int(cut.shape[1]), "threads": threads, "machine": info,
              "loadavg_end": loadavg(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# onnxruntime vs torch encode speed ({MODEL}, CPU)", "",
             f"{info['cpu']}, {info['cores']} CPUs, {threads} threads, ISA {', '.join(info['isa'])}, torch CPU "
             f"capability {info['torch_cpu_capability']}, torch {info['torch']}; load average at start "
             f"{info['loadavg_start']}, at end {result['loadavg_end']} (a load above the CPU count means other "
             f"jobs shared the CPU: re-run alone for clean numbers). Inputs: {source}; text cut to {cut.shape[1]} tokens. {result['weights']}.", "",
             "| tower | batch | runtime | weights | ms/batch | items/s | vs torch fp32 | min cos vs torch fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tower']} | {r['batch']} | {r['runtime']} | {r['weights']} | {r['ms_per_batch']:.1f} | "
              f"{r['items_per_s']:.1f} | {r['speedup_vs_torch_fp32']:.2f}x | {r['min_cosine_vs_torch_fp32']:.5f} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
