"""Embedding throughput: ``clipforge embed`` vs clip-retrieval's ``inference`` on the same weights and files.

Both tools run as command lines, one after the other in the same sitting, on the same folder of
images with a caption ``.txt`` beside each (clip-retrieval's ``files`` input format, which
clipforge also reads), with the same architecture and the same checkpoint file (an OpenCLIP-format
state dict: ``--checkpoint``, or a seeded random initialisation written once, so nothing is
downloaded). clip-retrieval is the real package, installed into a separate virtual environment
given as ``--cr-python`` (``pip install clip-retrieval 'setuptools<81'``: its OpenAI ``clip`` imports
``pkg_resources``; it pins numpy<2 and pyarrow<16, so it cannot share clipforge's environment),
run through its own CLI (``clip_retrieval.cli inference``), which loads the model with
``all_clip`` → ``open_clip.create_model_and_transforms(arch, pretrained=file)``.

Images and captions are timed separately (``--enable_text False`` / ``--enable_image False`` and
``--modalities image`` / ``--modalities text``): clip-retrieval 2.45's files reader keys images and
captions by their file names *with* the suffix, so asking it for both on a folder matches no pair.
Images are COCO photographs from ``../shared/data/coco-mini`` (cycled to ``--images`` files, as
symlinks) or, without it, generated 640x480 JPEGs; captions are COCO's (cycled), else generated.

Reported per run: wall time of the whole command (start-up and model load included) and the
embedding loop's rate (clip-retrieval: samples over the summed batch durations of its stats file;
clipforge: the ``items/s`` it prints), plus the agreement of the written embeddings (rows matched
by image path or caption): max |difference| and min cosine. Run it with nothing else on the machine::

    python benchmarks/bench_embed.py --cr-python /tmp/cr-venv/bin/python --images 5000 --captions 50000 \\
        --device cuda --modes fp32,bf16 --out benchmarks/results/embed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-mini"
MODE_FLAGS = {"fp32": [], "bf16": ["--precision", "bf16"], "fp16": ["--precision", "fp16"], "int8": ["--int8"],
              "draft": ["--draft"]}


# ---- inputs ---------------------------------------------------------------------------------------
def _coco() -> Tuple[List[Path], List[str]]:
    if not (COCO / "captions_val2017.json").is_file():
        return [], []
    data = json.loads((COCO / "captions_val2017.json").read_text())
    images = sorted(p for p in (COCO / "val2017").glob("*.jpg"))
    return images, [a["caption"].strip() for a in data["annotations"]]


def _generated_captions(n: int, seed: int = 0) -> List[str]:
    rng = np.random.default_rng(seed)
    words = ("a photo of the small red dog cat car tree house person riding next to on in with two "
             "people street table plate of food sitting standing beach mountain snow water sky").split()
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 20)))) for _ in range(n)]


def _generated_image(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)  # smooth, photo-like content compresses like a photo
    Image.fromarray(low).resize((640, 480), Image.BICUBIC).save(path, quality=90)


def make_folder(root: Path, n: int, captions: List[str], sources: List[Path], tiny_images: bool) -> Path:
    """``root/dNN/iiiiiii.jpg`` + ``.txt``: ``n`` images (symlinks to ``sources`` cycled, else generated;
    8x8 placeholders when only captions are timed) and captions cycled."""
    if (root / ".done").is_file() and int((root / ".done").read_text()) == n:
        return root
    shutil.rmtree(root, ignore_errors=True)
    from PIL import Image

    for i in range(n):
        folder = root / f"d{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:07d}.jpg"
        if tiny_images:
            Image.new("RGB", (8, 8), (i % 255, 0, 0)).save(path)
        elif sources:
            path.symlink_to(sources[i % len(sources)])
        else:
            _generated_image(path, i)
        path.with_suffix(".txt").write_text(captions[i % len(captions)])
    (root / ".done").write_text(str(n))
    return root


def make_checkpoint(arch: str, path: Path) -> Path:
    """A seeded random initialisation of ``arch`` in OpenCLIP's state-dict layout (both tools load it)."""
    if path.is_file():
        return path
    import torch

    from clipforge.checkpoints.openclip_hub import save_openclip_dir
    from clipforge.factory import create_model

    torch.manual_seed(0)
    save_openclip_dir(create_model(arch), path.parent)
    return path


# ---- runs -----------------------------------------------------------------------------------------
def run(cmd: List[str], env: Optional[dict] = None) -> Tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def clip_retrieval(cr_python: str, folder: Path, out: Path, arch: str, ckpt: Path, modality: str, batch_size: int,
                   workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [cr_python, "-m", "clip_retrieval.cli", "inference", "--input_dataset", str(folder), "--output_folder",
           str(out), "--input_format", "files", "--clip_model", f"open_clip:{arch}/{ckpt}",
           "--batch_size", str(batch_size), "--num_prepro_workers", str(workers),
           "--enable_image", str(modality == "image"), "--enable_text", str(modality == "text")]
    wall, log = run(cmd)
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("*.json")]
    samples = sum(s.get("sample_count", 0) for s in stats)
    loop = sum(s.get("total_duration", 0.0) for s in stats)
    return {"tool": "clip-retrieval", "modality": modality, "wall_s": wall, "samples": samples,
            "loop_items_per_s": samples / loop if loop else None, "out": str(out)}


def clipforge(folder: Path, out: Path, arch: str, ckpt: Path, modality: str, batch_size: int, workers: int,
              device: str, mode: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    flags = [f for m in mode.split("+") for f in MODE_FLAGS[m]]
    cmd = [sys.executable, "-m", "clipforge", "embed", str(folder), str(out), "--model", arch, "--pretrained",
           str(ckpt), "--modalities", modality, "--batch-size", str(batch_size), "--workers", str(workers),
           "--device", device, "--no-progress", *flags]
    wall, log = run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    m = re.search(r"([\d.]+) items/s", log)
    rows = re.search(r": (\d+) rows", log)
    return {"tool": f"clipforge {mode}", "modality": modality, "wall_s": wall,
            "samples": int(rows.group(1)) if rows else None,
            "loop_items_per_s": float(m.group(1)) if m else None, "out": str(out)}


def _cr_rows(out: Path, modality: str) -> Tuple[np.ndarray, List[str]]:
    import pyarrow.parquet as pq

    sub, key = ("img_emb", "image_path") if modality == "image" else ("text_emb", "caption")
    embs = [np.load(p) for p in sorted((out / sub).glob("*.npy"))]
    meta = [pq.read_table(p).column(key).to_pylist() for p in sorted((out / "metadata").glob("*.parquet"))]
    return np.concatenate(embs).astype(np.float32), [k for m in meta for k in m]


def _cf_rows(out: Path, modality: str) -> Tuple[np.ndarray, List[str]]:
    from clipforge.retrieval import layout

    key = "image_path" if modality == "image" else "caption"
    keys = [k for p in layout.complete_parts(out) for k in layout.read_metadata(out, p).column(key).to_pylist()]
    return layout.load_embeddings(out, modality), keys


def agreement(cr_out: Path, cf_out: Path, modality: str) -> dict:
    """Max |difference| and min cosine of rows matched by image path (images) or caption text (captions)."""
    cr, cr_keys = _cr_rows(cr_out, modality)
    cf, cf_keys = _cf_rows(cf_out, modality)
    index = {os.path.realpath(k) if modality == "image" else k: i for i, k in enumerate(cr_keys)}
    rows = [index[os.path.realpath(k) if modality == "image" else k] for k in cf_keys]
    ref = cr[rows]
    return {"rows_compared": len(rows), "rows_clip_retrieval": len(cr_keys),
            "max_abs_diff": float(np.abs(ref - cf).max()),
            "min_cosine": float(((ref * cf).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(cf, axis=1)).min())}


# ---- report ---------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"# clipforge embed vs clip-retrieval inference ({result['arch']}, {result['device']})", "",
             f"{result['images']} images ({result['image_source']}), {result['captions']} captions; batch "
             f"{result['batch_size']}, {result['workers']} loader workers; {result['machine']}", "",
             "| tool | input | wall s | items/s (wall) | items/s (loop) | vs clip-retrieval (loop) | max abs diff "
             "| min cos |", "|---|---|---|---|---|---|---|---|"]
    base = {r["modality"]: r for r in result["runs"] if r["tool"] == "clip-retrieval"}
    for r in result["runs"]:
        b = base.get(r["modality"])
        speed = (f"{r['loop_items_per_s'] / b['loop_items_per_s']:.2f}x"
                 if b and r["loop_items_per_s"] and b["loop_items_per_s"] else "")
        agree = r.get("agreement", {})
        n = r["samples"] or 0
        lines.append(f"| {r['tool']} | {r['modality']} | {r['wall_s']:.1f} | {n / r['wall_s']:.1f} | "
                     f"{(r['loop_items_per_s'] or 0):.1f} | {speed} | {agree.get('max_abs_diff', float('nan')):.2e} | "
                     f"{agree.get('min_cosine', float('nan')):.5f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cr-python", default="/tmp/cr-venv/bin/python", help="python of a venv with clip-retrieval")
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--checkpoint", type=Path, help="OpenCLIP-format weights (default: seeded random, written once)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="clip-retrieval uses cuda when present")
    p.add_argument("--modes", default="fp32", help="clipforge modes, comma-separated; + combines: fp32,bf16,draft,"
                                                  "bf16+draft,int8")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_embed"))
    p.add_argument("--out", type=Path, help="write the results here (.json, and .md beside it)")
    args = p.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    sources, captions = _coco()
    image_source = f"COCO val2017 photos from {COCO} (cycled)" if sources else "generated 640x480 JPEGs"
    captions = captions or _generated_captions(5000)
    ckpt = args.checkpoint or make_checkpoint(args.arch, args.work / f"weights-{args.arch}" /
                                              "open_clip_model.safetensors")
    img_folder = make_folder(args.work / f"images-{args.images}", args.images, captions, sources, tiny_images=False)
    txt_folder = make_folder(args.work / f"captions-{args.captions}", args.captions, captions, [], tiny_images=True)

    runs: List[Dict] = []
    for modality, folder in (("image", img_folder), ("text", txt_folder)):
        base = clip_retrieval(args.cr_python, folder, args.work / f"cr-{modality}", args.arch, ckpt, modality,
                              args.batch_size, args.workers)
        runs.append(base)
        print(json.dumps(base), flush=True)
        for mode in args.modes.split(","):
            r = clipforge(folder, args.work / f"cf-{modality}-{mode}", args.arch, ckpt, modality, args.batch_size,
                          args.workers, args.device, mode)
            r["agreement"] = agreement(Path(base["out"]), Path(r["out"]), modality)
            runs.append(r)
            print(json.dumps(r), flush=True)
    result = {"arch": args.arch, "checkpoint": str(ckpt), "device": args.device, "images": args.images,
              "image_source": image_source, "captions": args.captions, "batch_size": args.batch_size,
              "workers": args.workers, "machine": f"{platform.processor() or platform.machine()}, "
                                                  f"{os.cpu_count()} CPUs", "runs": runs}
    report = markdown(result)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(report)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
