"""Make the reference tokens of tests/test_coca.py: open_clip's own CoCa.generate on a tiny seeded model.

open_clip 3.3.0's ``generate`` needs transformers < 4.56 (it imports ``BeamSearchScorer`` from the top
level), while clipforge's tests run with transformers 5, so the tokens are made once, here, in a
separate environment, and committed with the versions that made them:

    python3 -m venv /tmp/oc-venv
    /tmp/oc-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 'transformers==4.55.*'
    /tmp/oc-venv/bin/python tests/golden/make_coca_golden.py

Writes tests/golden/coca_tiny.pt: the model config, state dict, images, the generate() settings and
open_clip's tokens for each (greedy, beam search, top-k / top-p sampling under a seed, ...).
"""
import json
import platform
import sys
from pathlib import Path

import open_clip
import torch
import transformers

HERE = Path(__file__).resolve().parent
SOT, EOS = 62, 63  # a 64-token vocabulary keeps the files small; pad stays 0, as OpenCLIP's
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 32, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 32, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
    "custom_text": True,
}
# name -> generate() keyword arguments (besides the images and sot/eos ids); "seed" seeds sampling.
SETTINGS = {
    "beam_default": {},
    "beam_4_groups_1": {"num_beams": 4, "num_beam_groups": 1},
    "beam_repetition_fixed": {"repetition_penalty": 1.5, "fixed_output_length": True},
    "beam_short": {"seq_len": 12, "min_seq_len": 8, "num_beams": 4, "num_beam_groups": 2},
    "greedy": {"generation_type": "top_k"},
    "greedy_fixed": {"generation_type": "top_k", "fixed_output_length": True, "min_seq_len": 2},
    "top_k_5": {"generation_type": "top_k", "top_k": 5, "seed": 0},
    "top_p_09": {"generation_type": "top_p", "top_p": 0.9, "temperature": 0.7, "seed": 1},
    "top_p_repetition": {"generation_type": "top_p", "top_p": 0.5, "repetition_penalty": 1.3, "seed": 2},
    "top_k_prompt": {"generation_type": "top_k", "top_k": 3, "seed": 3, "prompt": [SOT, 5, 9]},
}


def main() -> None:
    torch.manual_seed(0)
    cfg = {k: v for k, v in CONFIG.items() if k != "custom_text"}
    model = open_clip.CoCa(**cfg).eval()
    with torch.no_grad():
        # OpenCLIP leaves the decoder's head uninitialised (torch.empty): give it values, and make EOS
        # likelier so that the sequences end at different lengths (per-row stopping is exercised).
        head = model.text_decoder.text_projection
        head.normal_(std=32 ** -0.5)
        head[:, EOS] *= 6.0
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = {}
    for name, kwargs in SETTINGS.items():
        kwargs = dict(kwargs)
        seed, prompt = kwargs.pop("seed", None), kwargs.pop("prompt", None)
        if seed is not None:
            torch.manual_seed(seed)
        text = torch.tensor([prompt] * len(images)) if prompt is not None else None
        tokens[name] = model.generate(images, text=text, sot_token_id=SOT, eos_token_id=EOS, **kwargs)
    versions = {"python": platform.python_version(), "torch": str(torch.__version__),
                "open_clip": open_clip.__version__, "transformers": transformers.__version__}
    torch.save({"config": CONFIG, "state_dict": model.state_dict(), "images": images, "settings": SETTINGS,
                "tokens": tokens, "sot": SOT, "eos": EOS, "versions": versions}, HERE / "coca_tiny.pt")
    (HERE / "coca_tiny_versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    for name, t in tokens.items():
        print(name, tuple(t.shape), (t == EOS).any(dim=1).tolist(), file=sys.stderr)


if __name__ == "__main__":
    main()
