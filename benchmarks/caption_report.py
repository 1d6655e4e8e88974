"""Example captions of a trained CoCa next to their images, plus the run's caption and retrieval metrics.

    python benchmarks/caption_report.py runs/flickr8k_coca --data ../shared/data/flickr8k/dev/captions.tsv

Writes ``RUN/caption_report.md`` and ``RUN/captions.png`` (a grid: each image with the generated
caption and its first human caption). The metrics are the last validation row of ``metrics.jsonl``
(clip_benchmark's caption metrics and retrieval recall on the validation data).
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import clipforge  # noqa: E402
from clipforge.data.captions import CaptionGroups, read_caption_file  # noqa: E402
from clipforge.evaluate.captioning import caption_files  # noqa: E402
from clipforge.transforms import load_image  # noqa: E402


def last_validation(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if any(k.startswith("caption_") for k in r)]
    return val[-1] if val else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a training run folder with final/ (OpenCLIP hub layout)")
    ap.add_argument("--data", required=True, help="caption file of the images to caption (e.g. Flickr8k dev)")
    ap.add_argument("--n", type=int, default=12, help="images to show")
    ap.add_argument("--beams", type=int, default=6)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, _, transform = clipforge.create_model_and_transforms(f"local-dir:{args.run / 'final'}")
    tokenizer = clipforge.get_tokenizer(f"local-dir:{args.run / 'final'}")
    groups = CaptionGroups.from_records(read_caption_file(args.data, img_key="filepath", caption_key="caption"))
    step = max(1, len(groups.image_paths) // args.n)
    picks = list(range(0, len(groups.image_paths), step))[:args.n]
    paths = [groups.image_paths[i] for i in picks]
    with torch.inference_mode():
        results = caption_files(model, paths, tokenizer, transform, num_beams=args.beams)

    cols = 4
    rows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows))
    lines = ["| image | generated | a human caption |", "|---|---|---|"]
    for ax, i, res in zip(axes.flat, picks, results):
        human = groups.captions[i][0]
        ax.imshow(load_image(res.path))
        ax.set_title("\n".join(textwrap.wrap(f"CoCa: {res.caption}", 38) + textwrap.wrap(f"human: {human}", 38)),
                     fontsize=8, loc="left")
        lines.append(f"| {Path(res.path).name} | {res.caption or res.error} | {human} |")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.run / "captions.png", dpi=80)

    metrics = last_validation(args.run)
    keep = {k: v for k, v in metrics.items() if k.startswith(("caption_", "image_retrieval", "text_retrieval", "epoch", "step"))}
    report = ["# CoCa run: example captions", "", f"Run: `{args.run}`; captions: beam search, {args.beams} beams.", "",
              "Last validation:", "", "```json", json.dumps(keep, indent=1), "```", "", "![captions](captions.png)", ""]
    (args.run / "caption_report.md").write_text("\n".join(report + lines) + "\n")
    print(json.dumps(keep, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
