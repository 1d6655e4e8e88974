"""Training-step micro-benchmark: forward + CLIP loss + backward + AdamW step on one fixed batch.

Both implementations start from the same weights and see the same synthetic images and real
caption tokens (Flickr8k dev when ../shared exists), so their first losses must agree.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List

import torch

from common import SHARED, count_flops, peak_rss_mb, randomize_norms, timeit

SMALL_VIT = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
}


def _captions(n: int) -> List[str]:
    path = SHARED / "data" / "flickr8k" / "dev" / "captions.tsv"
    if path.exists():
        lines = path.read_text().splitlines()[1:]
        caps = [line.split("\t", 1)[1] for line in lines[: 5 * n: 5]]  # one caption per photo
    else:
        caps = [f"a photo of {i} dogs playing with a red ball in the park near a river" for i in range(n)]
    return (caps * (n // max(1, len(caps)) + 1))[:n]


def _models(seed: int = 0):
    import open_clip

    from clipforge import CLIP
    from clipforge.config import CLIPConfig

    torch.manual_seed(seed)
    ref = open_clip.CLIP(SMALL_VIT["embed_dim"], open_clip.model.CLIPVisionCfg(**SMALL_VIT["vision_cfg"]),
                         open_clip.model.CLIPTextCfg(**SMALL_VIT["text_cfg"]), output_dict=True)
    randomize_norms(ref, seed)
    model = CLIP(CLIPConfig.from_dict(copy.deepcopy(SMALL_VIT)))
    model.load_state_dict(ref.state_dict())
    return model.train(), ref.train()


def _stepper(model, loss_fn, images, tokens, amp: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def forward_backward():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            out = model(images, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward_backward()
        opt.step()
        return loss

    return forward_backward, step


def run(batch: int, iters: int, peaks: Dict[str, float]) -> dict:
    import open_clip

    from clipforge.loss import ClipLoss
    from clipforge.tokenizer import tokenize

    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(_captions(batch))
    rows, first_loss = [], {}
    for amp in (False, True):
        precision = "bf16" if amp else "fp32"
        for impl in ("open_clip", "clipforge"):
            model, ref = _models()
            net, loss_fn = (ref, open_clip.ClipLoss()) if impl == "open_clip" else (model, ClipLoss())
            forward_backward, step = _stepper(net, loss_fn, images, tokens, amp)
            first_loss[(impl, precision)] = forward_backward().item()
            net.zero_grad(set_to_none=True)
            flops = count_flops(forward_backward)
            t = timeit(step, iters=iters, warmup=1)
            sps = batch / t.seconds
            rows.append({"impl": impl, "precision": "bf16 autocast" if amp else "fp32", "batch": batch,
                         "samples_per_s": sps, "step_s": t.seconds, "gflop_per_step": flops / 1e9,
                         "utilisation": flops / t.seconds / peaks[precision] if precision in peaks else None,
                         "first_loss": first_loss[(impl, precision)], "peak_rss_mb": peak_rss_mb()})
            print(f"  train {impl:9s} {rows[-1]['precision']:13s} b={batch} {sps:8.1f} samples/s "
                  f"({flops / 1e9:.0f} GFLOP/step, loss {rows[-1]['first_loss']:.6f})", flush=True)
            del model, ref, net
    for row in rows:
        base = next(r for r in rows if r["impl"] == "open_clip" and r["precision"] == row["precision"])
        row["speedup_vs_open_clip"] = row["samples_per_s"] / base["samples_per_s"]
        row["loss_diff_vs_open_clip"] = abs(row["first_loss"] - base["first_loss"])
    return {"config": SMALL_VIT, "text_tokens_max": int(tokens.argmax(-1).max()) + 1,
            "text_tokens_mean": float((tokens.argmax(-1) + 1).float().mean()), "rows": rows}
