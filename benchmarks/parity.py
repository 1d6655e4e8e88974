"""Numerical parity of clipforge with OpenCLIP and transformers: max |difference| of fp32 features.

    python benchmarks/parity.py            # every path -> benchmarks/results/parity.{json,md}
    python benchmarks/parity.py --quick    # ViT-B-32 only for the checkpoint formats, no ViT-B-16 HF config

Every model comes from a seeded random initialisation (``torch.manual_seed(0)``) with LayerNorm /
BatchNorm parameters and all biases randomised as well, so that every weight moves the output. The
inputs are real: 4 photos from scikit-image's sample data, preprocessed by clipforge's eval
transform at the model's image size, and 8 captions tokenized by clipforge's tokenizer. For each
path the reference library computes features from one copy of the weights and clipforge from the
file or directory that path produces; the script reports max |clipforge - reference| over all
feature entries (unnormalised image and text embeddings). It measures, it does not assert: rows over
the tolerance are listed and make the exit status 1.

Paths:
  1. OpenCLIP RN50 / ViT-B-32 / ViT-B-16 -> clipforge: bare state dict .pt, ``{"state_dict": ...}``
     with ``module.`` prefixes, .safetensors, OpenAI-style TorchScript archive (``torch.jit.trace_module``
     of encode_image/encode_text), and the OpenAI-layout fp16 state dict (QuickGELU variant, metadata
     scalars) loaded by shape inference, ``create_model(None, pretrained=path)``, against the
     fp16-rounded reference.
  2. transformers CLIPModel <-> clipforge at ViT-B-32 / ViT-B-16 sizes (full depth).
  3. OpenCLIP hub layout (``local-dir:``) both ways, ViT-B-32.
  4. Small configs: SigLIP (timm SigLIP ViT + bidirectional text) against OpenCLIP and transformers
     SiglipModel; timm ConvNeXt image towers and a Hugging Face RoBERTa text tower against OpenCLIP.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import loadavg, machine, randomize_norms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOL = 1e-5
SEED = 0
CAPTIONS = [
    "a photo of an astronaut",
    "a cat lying on a sofa",
    "a cup of coffee on a saucer",
    "a rocket on the launch pad",
    "Two dogs play in the snow.",
    "A man in a red jacket climbs a rock wall .",
    "a woman riding a bicycle down a city street",
    "a diagram",
]
SIGLIP_MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

Features = Tuple[torch.Tensor, torch.Tensor]


# ---- inputs and helpers ------------------------------------------------------------------------


def photos():
    """scikit-image's astronaut, chelsea, coffee and rocket as PIL images."""
    from PIL import Image
    from skimage import data

    return [Image.fromarray(np.asarray(f())) for f in (data.astronaut, data.chelsea, data.coffee, data.rocket)]


_PIXELS: Dict[object, torch.Tensor] = {}


def pixels(pp) -> torch.Tensor:
    """The photos through clipforge's eval transform for ``pp`` (a PreprocessConfig): [4, 3, H, W]."""
    from clipforge.transforms import image_transform

    key = repr(pp)
    if key not in _PIXELS:
        tf = image_transform(pp, is_train=False)
        _PIXELS[key] = torch.stack([tf(p) for p in photos()])
    return _PIXELS[key]


def clip_pixels(size) -> torch.Tensor:
    from clipforge.config import PreprocessConfig

    return pixels(PreprocessConfig(image_size=size))


def exercise(model: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """Random norm affines/statistics (benchmarks.common) and random biases: no weight sits at 0 or 1."""
    randomize_norms(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.is_floating_point() and name not in ("logit_bias",):
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def encode(model, images, tokens) -> Features:
    """encode_image / encode_text of an OpenCLIP or clipforge model (unnormalised)."""
    with torch.inference_mode():
        return model.encode_image(images), model.encode_text(tokens)


def hf_encode(model, images, tokens) -> Features:
    """get_image_features / get_text_features of a transformers CLIPModel or SiglipModel."""
    with torch.inference_mode():
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(input_ids=tokens)
    # transformers 5 returns an output object with the projected embedding as pooler_output.
    return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)


def clip_tokens(name: str = "ViT-B-32") -> torch.Tensor:
    import clipforge

    return clipforge.get_tokenizer(name)(CAPTIONS)


class Recorder:
    def __init__(self) -> None:
        self.rows: List[dict] = []

    def add(self, model: str, path: str, ours: Features, ref: Features, **extra) -> None:
        img = (ours[0].float() - ref[0].float()).abs().max().item()
        txt = (ours[1].float() - ref[1].float()).abs().max().item()
        row = dict(model=model, path=path, image=img, text=txt,
                   ref_max_abs_image=ref[0].abs().max().item(), ref_max_abs_text=ref[1].abs().max().item(),
                   image_shape=list(ours[0].shape), text_shape=list(ours[1].shape),
                   ok=img <= TOL and txt <= TOL, **extra)
        self.rows.append(row)
        flag = "" if row["ok"] else f"   <-- above {TOL:g}"
        print(f"{model:<44} {path:<58} image {img:.2e}  text {txt:.2e}{flag}", flush=True)

    def error(self, model: str, path: str, err: BaseException) -> None:
        traceback.print_exc()
        self.rows.append(dict(model=model, path=path, image=None, text=None, ok=False, error=repr(err)))
        print(f"{model:<44} {path:<58} ERROR {err!r}", flush=True)

    def run(self, model: str, path: str, fn: Callable[[], Tuple[Features, Features]], **extra) -> None:
        try:
            ours, ref = fn()
        except Exception as err:  # keep measuring the other paths; the failure is reported
            self.error(model, path, err)
        else:
            self.add(model, path, ours, ref, **extra)


# ---- 1. OpenCLIP checkpoint formats --------------------------------------------------------------


def openclip_model(name: str, seed: int = SEED):
    import open_clip

    torch.manual_seed(seed)
    return exercise(open_clip.create_model(name), seed)


def write_format(ref, fmt: str, path: Path) -> None:
    from safetensors.torch import save_file

    sd = ref.state_dict()
    if fmt == "state_dict":
        torch.save(sd, path)
    elif fmt == "ddp":
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "torchscript":
        # A TorchScript archive as OpenAI released them: traced encode_image / encode_text.
        size = ref.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        example = {"encode_image": (torch.ones(1, 3, *size),),
                   "encode_text": (torch.zeros(1, 77, dtype=torch.int),)}
        with torch.no_grad():
            traced = torch.jit.trace_module(ref, example, check_trace=False)
        torch.jit.save(traced, str(path))
    else:
        raise ValueError(fmt)


FORMATS = [("state_dict", "pt", "bare state dict .pt"),
           ("ddp", "pt", '{"state_dict": ...} with module. prefixes'),
           ("safetensors", "safetensors", ".safetensors"),
           ("torchscript", "pt", "OpenAI TorchScript archive (jit.trace_module)")]


def checkpoint_formats(rec: Recorder, name: str, tmp: Path) -> None:
    import open_clip

    import clipforge

    images, tokens = clip_pixels(clipforge.get_model_config(name).vision_cfg.image_size), clip_tokens(name)
    ref = openclip_model(name)
    expected = encode(ref, images, tokens)
    for fmt, ext, label in FORMATS:
        def one(fmt=fmt, ext=ext):
            path = tmp / f"{name}-{fmt}.{ext}"
            write_format(ref, fmt, path)
            model = clipforge.create_model(name, pretrained=path)
            try:
                return encode(model, images, tokens), expected
            finally:
                path.unlink()
        rec.run(name, f"OpenCLIP -> {label}", one)
    del ref

    qname = name + "-quickgelu"

    def fp16():
        ref = openclip_model(qname)
        open_clip.model.convert_weights_to_lp(ref, torch.float16)
        sd = ref.state_dict()
        size = clipforge.get_model_config(qname).vision_cfg.image_size
        sd.update(input_resolution=torch.tensor(size), context_length=torch.tensor(77),
                  vocab_size=torch.tensor(49408))
        path = tmp / f"{qname}-openai-fp16.pt"
        torch.save(sd, path)
        ref = ref.float()  # the reference: fp16-rounded weights computed in fp32
        model = clipforge.create_model(None, pretrained=path)
        path.unlink()
        same_arch = model.cfg.to_dict()["vision_cfg"] == clipforge.get_model_config(qname).to_dict()["vision_cfg"]
        if not (model.cfg.quick_gelu and same_arch):
            raise AssertionError(f"shape inference gave another architecture: {model.cfg}")
        return encode(model, images, tokens), encode(ref, images, tokens)

    rec.run(qname, "OpenAI-layout fp16 .pt, create_model(None, pretrained=path)", fp16,
            note="reference: fp16-rounded weights in fp32")


# ---- 2. transformers CLIPModel -------------------------------------------------------------------


def hf_clip_config(name: str):
    """transformers CLIPConfig with the sizes of OpenCLIP's ``name`` (ViT-B-32 / ViT-B-16)."""
    import transformers

    import clipforge

    cfg = clipforge.get_model_config(name)
    v, t = cfg.vision_cfg, cfg.text_cfg
    vision = dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                  num_attention_heads=v.width // v.head_width, num_hidden_layers=v.layers,
                  image_size=v.image_size, patch_size=v.patch_size)
    text = dict(hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio), num_attention_heads=t.heads,
                num_hidden_layers=t.layers, max_position_embeddings=t.context_length, vocab_size=t.vocab_size)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)


def hf_clip(rec: Recorder, name: str, tmp: Path) -> None:
    import transformers

    import clipforge
    from clipforge.checkpoints.hf_clip import load_hf_clip, save_hf_clip

    images, tokens = clip_pixels(clipforge.get_model_config(name).vision_cfg.image_size), clip_tokens(name)

    def hf_to_clipforge():
        torch.manual_seed(SEED)
        src = exercise(transformers.CLIPModel(hf_clip_config(name)))
        src.save_pretrained(tmp / "hf")
        del src
        ref = transformers.CLIPModel.from_pretrained(tmp / "hf").eval()  # the reference reads the same files
        model = load_hf_clip(tmp / "hf")
        return encode(model, images, tokens), hf_encode(ref, images, tokens)

    rec.run(f"{name} (transformers CLIPModel)", "transformers save_pretrained -> clipforge load_hf_clip",
            hf_to_clipforge)

    def clipforge_to_hf():
        model = clipforge.create_model(name)
        model.load_state_dict(openclip_model(name).state_dict())
        model.eval()
        save_hf_clip(model, tmp / "cf")
        ref = transformers.CLIPModel.from_pretrained(tmp / "cf").eval()
        return encode(model, images, tokens), hf_encode(ref, images, tokens)

    rec.run(f"{name} (transformers CLIPModel)", "clipforge save_hf_clip -> transformers from_pretrained",
            clipforge_to_hf)


# ---- 3. OpenCLIP hub layout ----------------------------------------------------------------------


class _TokenizerFiles:
    """What open_clip's save_for_hf calls on its tokenizer: clipforge writes CLIP's BPE files."""

    def save_pretrained(self, directory) -> None:
        from clipforge.tokenizer.hf_files import write_hf_tokenizer

        write_hf_tokenizer(directory)


def openclip_hub(rec: Recorder, name: str, tmp: Path) -> None:
    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf

    import clipforge
    from clipforge.checkpoints.openclip_hub import save_openclip_dir

    images, tokens = clip_pixels(clipforge.get_model_config(name).vision_cfg.image_size), clip_tokens(name)

    def clipforge_to_openclip():
        model = clipforge.create_model(name)
        model.load_state_dict(openclip_model(name).state_dict())
        model.eval()
        save_openclip_dir(model, tmp / "cf")
        ref, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(tmp / "cf"))
        return encode(model, images, tokens), encode(ref.eval(), images, tokens)

    rec.run(name, "clipforge save_openclip_dir -> open_clip local-dir:", clipforge_to_openclip)

    def openclip_to_clipforge():
        ref = openclip_model(name)
        save_for_hf(ref, _TokenizerFiles(), open_clip.get_model_config(name), tmp / "oc", safe_serialization=True)
        model = clipforge.create_model("local-dir:" + str(tmp / "oc"))
        return encode(model, images, tokens), encode(ref, images, tokens)

    rec.run(name, "open_clip save_for_hf -> clipforge local-dir:", openclip_to_clipforge)


# ---- 4. small configs: SigLIP, timm ConvNeXt, RoBERTa text -------------------------------------


def _register(tmp: Path, name: str, cfg: dict) -> str:
    """Register ``cfg`` under ``name`` in both libraries (a JSON file, as users add configs)."""
    import open_clip

    import clipforge

    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    clipforge.add_model_config(path)
    return name


def _word_tokenizer(folder: Path, specials: Dict[str, int], template: str, **named) -> None:
    """A word-level fast tokenizer over the captions' words, saved for transformers' AutoTokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for c in CAPTIONS for w in c.lower().replace(".", " ").split()})
    vocab = dict(specials)
    vocab.update({w: len(specials) + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, i) for s, i in specials.items() if s in template])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **named).save_pretrained(folder)


def _openclip_pair(tmp: Path, name: str, cfg: dict):
    """(OpenCLIP model from a seeded init, clipforge model read from its state-dict .pt)."""
    import open_clip

    import clipforge

    _register(tmp, name, cfg)
    torch.manual_seed(SEED)
    ref = exercise(open_clip.create_model(name, pretrained_text=False))
    ckpt = tmp / f"{name}.pt"
    torch.save(ref.state_dict(), ckpt)
    return ref, clipforge.create_model(name, pretrained=ckpt)


def siglip(rec: Recorder, tmp: Path) -> None:
    import timm
    import transformers
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    import clipforge
    from clipforge.checkpoints.hf_siglip import load_hf_siglip, save_hf_siglip
    from clipforge.config import PreprocessConfig

    if not timm.is_model("cf_parity_vit_siglip_64"):
        @register_model
        def cf_parity_vit_siglip_64(pretrained=False, **kwargs):
            """vit_base_patch16_siglip_224 shrunk to 2 blocks of width 64 at 64 px."""
            args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                        class_token=False, global_pool="map")
            return _create_vision_transformer("vit_base_patch16_siglip_224", pretrained=False,
                                              **dict(args, **kwargs))

    images = pixels(PreprocessConfig(image_size=64, resize_mode="squash", interpolation="bicubic",
                                     **SIGLIP_MEAN_STD))

    # transformers SiglipModel, with a word-level tokenizer that has SigLIP's special ids (pad = eos = 1).
    hf_dir = tmp / "hf-siglip"
    torch.manual_seed(SEED)
    config = transformers.SiglipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_size=64,
                         pad_token_id=1, eos_token_id=1, bos_token_id=None))
    src = exercise(transformers.SiglipModel(config))
    src.save_pretrained(hf_dir)
    _word_tokenizer(hf_dir, {"<pad>": 0, "</s>": 1, "<unk>": 2}, "$A </s>", eos_token="</s>", pad_token="</s>")
    del src
    tokens = clipforge.get_tokenizer(load_hf_siglip(hf_dir).cfg)(CAPTIONS)  # clipforge's HFTokenizer

    label = "SigLIP, small (timm ViT 64px w64, text w48, 2+2 blocks)"

    def openclip_to_clipforge():
        cfg = {"embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
               "vision_cfg": {"image_size": 64, "timm_model_name": "cf_parity_vit_siglip_64",
                              "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
               "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 48, "heads": 2, "layers": 2,
                            "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                            "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}}}
        ref, model = _openclip_pair(tmp, "cf-parity-SigLIP-small", cfg)
        return encode(model, images, tokens), encode(ref, images, tokens)

    rec.run(label, "OpenCLIP state dict .pt -> clipforge", openclip_to_clipforge)

    def hf_to_clipforge():
        ref = transformers.SiglipModel.from_pretrained(hf_dir).eval()
        return encode(load_hf_siglip(hf_dir), images, tokens), hf_encode(ref, images, tokens)

    rec.run(label, "transformers save_pretrained -> clipforge load_hf_siglip", hf_to_clipforge)

    def clipforge_to_hf():
        model = clipforge.create_model("cf-parity-SigLIP-small", pretrained=tmp / "cf-parity-SigLIP-small.pt")
        save_hf_siglip(model, tmp / "cf-siglip")
        ref = transformers.SiglipModel.from_pretrained(tmp / "cf-siglip").eval()
        return encode(model, images, tokens), hf_encode(ref, images, tokens)

    rec.run(label, "clipforge save_hf_siglip -> transformers from_pretrained", clipforge_to_hf)


def timm_convnext(rec: Recorder, tmp: Path) -> None:
    import open_clip

    # OpenCLIP's convnext_base (linear head) and convnext_large_d (mlp head) heads on timm's
    # smallest ConvNeXt trunk, with a 2-block CLIP text tower: real photos at 224 px, real BPE tokens.
    text = {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2}
    images, tokens = clip_pixels(224), clip_tokens()
    for source in ("convnext_base", "convnext_large_d"):
        vision = dict(open_clip.get_model_config(source)["vision_cfg"], timm_model_name="convnext_atto",
                      image_size=224, timm_drop_path=0.0)
        name = f"cf-parity-convnext-atto-{source}-head"

        def one(name=name, vision=vision):
            ref, model = _openclip_pair(tmp, name, {"embed_dim": 256, "vision_cfg": vision, "text_cfg": text})
            return encode(model, images, tokens), encode(ref, images, tokens)

        rec.run(f"ConvNeXt-atto (timm), {source}'s {vision['timm_proj']} head, small text",
                "OpenCLIP state dict .pt -> clipforge", one)


def hf_roberta(rec: Recorder, tmp: Path) -> None:
    import transformers

    import clipforge

    # A 2-layer RoBERTa saved locally with a word-level tokenizer (<s>=0, <pad>=1, </s>=2): both
    # libraries build the text tower from the directory, clipforge's HFTokenizer reads its tokenizer.
    folder = tmp / "tiny-roberta"
    transformers.RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=40, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2).save_pretrained(folder)
    _word_tokenizer(folder, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, "<s> $A </s>",
                    bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    images = clip_pixels(224)
    for pooler, proj in (("mean_pooler", "mlp"), ("cls_pooler", "linear")):
        name = f"cf-parity-roberta-{pooler}-{proj}"
        cfg = {"embed_dim": 64, "custom_text": True,
               # roberta-ViT-B-32's image tower, 2 blocks deep
               "vision_cfg": {"image_size": 224, "layers": 2, "width": 768, "patch_size": 32},
               "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                            "hf_model_pretrained": False, "hf_pooler_type": pooler, "hf_proj_type": proj,
                            "context_length": 16}}

        def one(name=name, cfg=cfg):
            ref, model = _openclip_pair(tmp, name, cfg)
            tokens = clipforge.get_tokenizer(name)(CAPTIONS)
            return encode(model, images, tokens), encode(ref, images, tokens)

        rec.run(f"RoBERTa text (HF, 2 layers w64), {pooler} + {proj} proj, small ViT",
                "OpenCLIP state dict .pt -> clipforge", one)


# ---- report ---------------------------------------------------------------------------------------


def _fmt(x: Optional[float]) -> str:
    return "error" if x is None else ("0" if x == 0 else f"{x:.2e}")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# clipforge numerical parity{' (--quick smoke run)' if res['quick'] else ''}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), ISA {', '.join(m['isa'])}; "
             f"torch {m['torch']}, Python {m['python']}, open_clip {res['versions']['open_clip']}, "
             f"transformers {res['versions']['transformers']}, timm {res['versions']['timm']}. "
             f"Load average at start/end: {m['loadavg_start'][0]:.2f} / {m['loadavg_end'][0]:.2f}; "
             f"wall time {res['wall_s']:.0f} s.", "",
             "Max |clipforge - reference| over all entries of the fp32 (unnormalised) image and text features. "
             "Seeded random weights (norms and biases randomised too); inputs: 4 scikit-image photos through "
             "clipforge's eval transform at the model's image size and 8 captions through clipforge's "
             "tokenizer. Rows whose model says *small* use reduced configs (fewer/narrower blocks) to keep CPU time "
             "low; the others are full-size architectures.", "",
             "| model | path | max \\|Δ\\| image | max \\|Δ\\| text |", "|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['path']} | {_fmt(r['image'])} | {_fmt(r['text'])} |")
    bad = [r for r in res["rows"] if not r["ok"]]
    lines += ["", f"Tolerance {TOL:g}: " + ("every path is within it." if not bad else
              "over it or failed: " + "; ".join(f"{r['model']} / {r['path']}"
                                                 + (f" ({r['error']})" if r.get("error") else "") for r in bad)
              + "."), ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="ViT-B-32 only for the checkpoint formats; skip the ViT-B-16 transformers config")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS / "parity", help="output stem (.json and .md are added)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import open_clip
    import timm
    import transformers

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"machine": machine(), "quick": args.quick, "tolerance": TOL,
           "versions": {"open_clip": open_clip.__version__, "transformers": transformers.__version__,
                        "timm": timm.__version__}}
    started = time.time()
    rec = Recorder()
    with tempfile.TemporaryDirectory() as tmp_root:
        tmp = Path(tmp_root)

        def section(name: str, fn: Callable[[Path], None]) -> None:
            folder = tmp / name
            folder.mkdir()
            try:
                fn(folder)
            except Exception as err:  # a setup failure: recorded, the other sections still run
                rec.error(name, "(section setup)", err)

        for name in (["ViT-B-32"] if args.quick else ["RN50", "ViT-B-32", "ViT-B-16"]):
            section(f"formats-{name}", lambda t, name=name: checkpoint_formats(rec, name, t))
        for name in (["ViT-B-32"] if args.quick else ["ViT-B-32", "ViT-B-16"]):
            section(f"hf-{name}", lambda t, name=name: hf_clip(rec, name, t))
        section("hub", lambda t: openclip_hub(rec, "ViT-B-32", t))
        section("siglip", lambda t: siglip(rec, t))
        section("convnext", lambda t: timm_convnext(rec, t))
        section("roberta", lambda t: hf_roberta(rec, t))
    res["rows"] = rec.rows
    res["wall_s"] = time.time() - started
    res["machine"]["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0 if all(r["ok"] for r in rec.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
