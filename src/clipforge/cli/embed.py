"""``clipforge embed``: joins the torchrun group when launched by it, runs :func:`clipforge.retrieval.embed.embed`,
prints what it returns."""
from __future__ import annotations

from typing import Optional

from ..retrieval.embed import DEFAULT_PART_SIZE, embed
from ..train.distributed import init_distributed, shutdown_distributed


def main(input: str, out: str, *, model: str, pretrained: Optional[str] = None, input_kind: str = "auto",
         modalities: str = "auto", part_size: int = DEFAULT_PART_SIZE, batch_size: int = 256,
         workers: int = 4, dtype: str = "float16", precision: str = "fp32", int8: bool = False,
         draft: bool = False, device: str = "auto", overwrite: bool = False, img_key: str = "filepath",
         caption_key: str = "title", sep: Optional[str] = None, progress: bool = True) -> int:
    """Embed an image folder, a caption file, WebDataset shards or a text file into clip-retrieval's layout.

    Writes OUT/img_emb/img_emb_N.npy, OUT/text_emb/text_emb_N.npy (L2-normalised), OUT/metadata/
    metadata_N.parquet (image_path, caption, other columns; row i is embedding row i), embed_info.json
    and failed.jsonl (inputs that could not be read). A rerun resumes: complete parts are kept and
    only unfinished ones are redone; changed settings are refused unless --overwrite. Under torchrun,
    rank r embeds parts r, r+W, ... (gloo on CPU, nccl on GPU).

    Args:
        input: an image folder (recursive), a CSV/TSV/JSONL/COCO caption file, WebDataset shards
            (a .tar, a brace pattern, '::'-joined lists, pipe:CMD) or a .txt file of captions
        out: the output folder
        model: architecture name, hf-hub:ORG/REPO or local-dir:PATH
        pretrained: weights: a pretrained tag or a checkpoint file (none: random weights)
        input_kind: auto, folder, table, webdataset or text
        modalities: what to embed: image, text, or image,text; auto: all the input has
        part_size: inputs per part (shards per part for WebDataset input)
        batch_size: images per forward pass
        workers: data loader processes decoding images
        dtype: float16 or float32 embeddings on disk
        precision: fp32, bf16 (bf16 weights, fp32 norms and outputs) or fp16 (autocast, GPU)
        int8: dynamically quantised int8 linear layers (CPU, fp32)
        draft: decode JPEGs at a reduced scale (fast on large photos; close to, not equal to, a full decode)
        device: torch device; auto: this rank's GPU when there is one, else cpu
        overwrite: discard what OUT holds and start again
        img_key: caption table column of the image paths
        caption_key: caption table column of the captions
        sep: caption table separator (default: by suffix or header)
        progress: show a progress bar
    """
    dist = init_distributed(device)
    try:
        wanted = None if modalities == "auto" else [m.strip() for m in modalities.split(",") if m.strip()]
        res = embed(input, out, model, pretrained, input_kind=input_kind, modalities=wanted,
                    part_size=part_size, batch_size=batch_size, workers=workers, dtype=dtype, precision=precision,
                    int8=int8, draft=draft, device=dist.device, overwrite=overwrite, rank=dist.rank,
                    world_size=dist.world_size, img_key=img_key, caption_key=caption_key, sep=sep,
                    progress=progress)
    finally:
        shutdown_distributed()
    if dist.is_main:
        state = "complete" if res.complete else "INCOMPLETE (rerun to resume)"
        print(f"{res.out}: {res.rows} rows in {res.parts} parts ({'+'.join(res.modalities)}), {res.failed} "
              f"inputs failed (failed.jsonl); {state}; this run: {res.new_parts} parts, {res.seconds:.1f} s, "
              f"{res.items_per_s:.1f} items/s" + (f" on rank 0 of {dist.world_size}" if dist.distributed else ""))
    return 0 if res.complete else 1
