"""Published (model, tag) weights: where they live, how they were trained to be fed, and what they need.

The locations and digests are OpenCLIP's (``open_clip/pretrained.py``), so a tag names the same file.
Each tag also records what the weights need beyond the architecture: QuickGELU activations and the
image normalisation they were trained with; ``create_model_and_transforms`` applies both.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
HUB_TORCH_NAME = "open_clip_pytorch_model.bin"
HUB_SAFETENSORS_NAME = "open_clip_model.safetensors"


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face Hub repo (an OpenCLIP state dict: safetensors, else torch pickle)."""
    repo_id: str
    filename: str = HUB_TORCH_NAME
    revision: Optional[str] = None

    def candidates(self) -> Tuple[str, ...]:
        """Safetensors twin first, as OpenCLIP looks for it: no pickle, faster to read."""
        if self.filename == HUB_TORCH_NAME:
            return (HUB_SAFETENSORS_NAME, self.filename)
        stem, ext = os.path.splitext(self.filename)
        return (stem + ".safetensors", self.filename) if ext in (".bin", ".pth") else (self.filename,)


@dataclass(frozen=True)
class UrlFile:
    url: str
    sha256: Optional[str] = None  # full hex digest, or the prefix a release published in its file name
    format: str = "openclip"  # "openclip" (state dict) or "openai-torchscript" (OpenAI's JIT archives)

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlparse(self.url).path)


@dataclass(frozen=True)
class PretrainedTag:
    model: str
    tag: str
    hub: Optional[HubFile] = None
    url: Optional[UrlFile] = None
    quick_gelu: bool = False  # trained with QuickGELU: loading into GELU would silently degrade outputs
    mean: Tuple[float, ...] = OPENAI_MEAN
    std: Tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def preprocess(self, image_size) -> PreprocessConfig:
        return PreprocessConfig(image_size=image_size, mean=self.mean, std=self.std,
                                interpolation=self.interpolation, resize_mode=self.resize_mode)

    @property
    def sources(self) -> List[str]:
        out = [f"hf-hub:{self.hub.repo_id} ({'|'.join(self.hub.candidates())})"] if self.hub else []
        return out + ([self.url.url] if self.url else [])


_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{}/{}"
_OPENCLIP_URL = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/{}"
_METACLIP_URL = "https://dl.fbaipublicfiles.com/MMPT/metaclip/{}"
_SIGLIP = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD, resize_mode="squash")

# model -> (hub repo, sha256 embedded in OpenAI's URL, URL file name)
_OPENAI = {
    "RN50": ("timm/resnet50_clip.openai", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": ("timm/resnet101_clip.openai", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": ("timm/resnet50x4_clip.openai", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": ("timm/resnet50x16_clip.openai", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": ("timm/resnet50x64_clip.openai", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B-32": ("timm/vit_base_patch32_clip_224.openai", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B-16": ("timm/vit_base_patch16_clip_224.openai", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L-14": ("timm/vit_large_patch14_clip_224.openai", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L-14-336": ("timm/vit_large_patch14_clip_336.openai", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}


def _openai(model: str) -> PretrainedTag:
    repo, sha, name = _OPENAI[model]
    return PretrainedTag(model, "openai", HubFile(repo), UrlFile(_OPENAI_URL.format(sha, name), sha, "openai-torchscript"),
                         quick_gelu=True)


def _release(file: str, url_template: str = _OPENCLIP_URL) -> UrlFile:
    # OpenCLIP's release files end in "-<sha256 prefix>.pt"; MetaCLIP publishes no digest.
    digest = re.fullmatch(r".*-([0-9a-f]{8})\.pth?", file) if url_template == _OPENCLIP_URL else None
    return UrlFile(url_template.format(file), digest.group(1) if digest else None)


def _hub(model: str, tag: str, repo: str, url: Optional[UrlFile] = None, **kw) -> PretrainedTag:
    return PretrainedTag(model, tag, HubFile(repo), url, **kw)


def _meta(model: str, tag: str, timm_name: str, file: str, quick_gelu: bool = True) -> PretrainedTag:
    return _hub(model, tag, "timm/" + timm_name, _release(file, _METACLIP_URL), quick_gelu=quick_gelu)


_TAGS: List[PretrainedTag] = [_openai(m) for m in _OPENAI] + [
    # LAION-400M and LAION-2B (OpenCLIP)
    _hub("ViT-B-32", "laion400m_e31", "timm/vit_base_patch32_clip_224.laion400m_e31",
         _release("vit_b_32-quickgelu-laion400m_e31-d867053b.pt"), quick_gelu=True),
    _hub("ViT-B-32", "laion400m_e32", "timm/vit_base_patch32_clip_224.laion400m_e32",
         _release("vit_b_32-quickgelu-laion400m_e32-46683a32.pt"), quick_gelu=True),
    _hub("ViT-B-32", "laion2b_e16", "timm/vit_base_patch32_clip_224.laion2b_e16",
         _release("vit_b_32-laion2b_e16-af8dbd0c.pth")),
    _hub("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    _hub("ViT-B-16", "laion400m_e31", "timm/vit_base_patch16_clip_224.laion400m_e31",
         _release("vit_b_16-laion400m_e31-00efa78f.pt")),
    _hub("ViT-B-16", "laion400m_e32", "timm/vit_base_patch16_clip_224.laion400m_e32",
         _release("vit_b_16-laion400m_e32-55e67d44.pt")),
    _hub("ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    _hub("ViT-B-16-plus-240", "laion400m_e31", "timm/vit_base_patch16_plus_clip_240.laion400m_e31",
         _release("vit_b_16_plus_240-laion400m_e31-8fb26589.pt")),
    _hub("ViT-L-14", "laion400m_e31", "timm/vit_large_patch14_clip_224.laion400m_e31",
         _release("vit_l_14-laion400m_e31-69988bb6.pt")),
    _hub("ViT-L-14", "laion400m_e32", "timm/vit_large_patch14_clip_224.laion400m_e32",
         _release("vit_l_14-laion400m_e32-3d133497.pt")),
    _hub("ViT-L-14", "laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", mean=INCEPTION_MEAN, std=INCEPTION_STD),
    _hub("ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    _hub("ViT-g-14", "laion2b_s12b_b42k", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"),
    _hub("ViT-g-14", "laion2b_s34b_b88k", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"),
    _hub("ViT-bigG-14", "laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
    _hub("roberta-ViT-B-32", "laion2b_s12b_b32k", "laion/CLIP-ViT-B-32-roberta-base-laion2B-s12B-b32k"),
    _hub("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k", "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k"),
    _hub("xlm-roberta-large-ViT-H-14", "frozen_laion5b_s13b_b90k",
         "laion/CLIP-ViT-H-14-frozen-xlm-roberta-large-laion5B-s13B-b90k"),
    _hub("convnext_base", "laion400m_s13b_b51k", "laion/CLIP-convnext_base-laion400M-s13B-b51K"),
    _hub("convnext_base_w", "laion2b_s13b_b82k", "laion/CLIP-convnext_base_w-laion2B-s13B-b82K"),
    _hub("convnext_base_w", "laion2b_s13b_b82k_augreg", "laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg"),
    _hub("convnext_base_w_320", "laion_aesthetic_s13b_b82k", "laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K"),
    _hub("convnext_large_d", "laion2b_s26b_b102k_augreg", "laion/CLIP-convnext_large_d.laion2B-s26B-b102K-augreg"),
    _hub("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup", "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"),
    _hub("convnext_xxlarge", "laion2b_s34b_b82k_augreg_soup", "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"),
    # DataComp
    _hub("ViT-B-32", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    _hub("ViT-B-32-256", "datacomp_s34b_b86k", "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K"),
    _hub("ViT-B-16", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    _hub("ViT-L-14", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
    # DFN (Apple)
    _hub("ViT-B-16", "dfn2b", "apple/DFN2B-CLIP-ViT-B-16", quick_gelu=True),
    _hub("ViT-L-14", "dfn2b", "apple/DFN2B-CLIP-ViT-L-14", quick_gelu=True),
    _hub("ViT-L-14", "dfn2b_s39b", "apple/DFN2B-CLIP-ViT-L-14-39B"),
    _hub("ViT-H-14", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14", quick_gelu=True, resize_mode="squash"),
    _hub("ViT-H-14-378", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14-378", quick_gelu=True, resize_mode="squash"),
    # MetaCLIP (Meta): QuickGELU except "altogether"
    _meta("ViT-B-32", "metaclip_400m", "vit_base_patch32_clip_224.metaclip_400m", "b32_400m.pt"),
    _meta("ViT-B-32", "metaclip_fullcc", "vit_base_patch32_clip_224.metaclip_2pt5b", "b32_fullcc2.5b.pt"),
    _meta("ViT-B-16", "metaclip_400m", "vit_base_patch16_clip_224.metaclip_400m", "b16_400m.pt"),
    _meta("ViT-B-16", "metaclip_fullcc", "vit_base_patch16_clip_224.metaclip_2pt5b", "b16_fullcc2.5b.pt"),
    _meta("ViT-L-14", "metaclip_400m", "vit_large_patch14_clip_224.metaclip_400m", "l14_400m.pt"),
    _meta("ViT-L-14", "metaclip_fullcc", "vit_large_patch14_clip_224.metaclip_2pt5b", "l14_fullcc2.5b.pt"),
    _meta("ViT-H-14", "metaclip_fullcc", "vit_huge_patch14_clip_224.metaclip_2pt5b", "h14_fullcc2.5b.pt"),
    _meta("ViT-H-14", "metaclip_altogether", "vit_huge_patch14_clip_224.metaclip_altogether", "h14_v1.2_altogether.pt",
          quick_gelu=False),
    _meta("ViT-bigG-14", "metaclip_fullcc", "vit_gigantic_patch14_clip_224.metaclip_2pt5b", "G14_fullcc2.5b.pt"),
]
# SigLIP / SigLIP 2 (Google, WebLI); the SO400M -378 reuses the 384 weights at its own image size.
_SIGLIP_REPOS = {"ViT-SO400M-14-SigLIP-378": "ViT-SO400M-14-SigLIP-384"}
_TAGS += [_hub(m, "webli", "timm/" + _SIGLIP_REPOS.get(m, m), **_SIGLIP) for m in """
    ViT-B-16-SigLIP ViT-B-16-SigLIP-256 ViT-B-16-SigLIP-i18n-256 ViT-B-16-SigLIP-384 ViT-B-16-SigLIP-512
    ViT-L-16-SigLIP-256 ViT-L-16-SigLIP-384 ViT-SO400M-14-SigLIP ViT-SO400M-16-SigLIP-i18n-256
    ViT-SO400M-14-SigLIP-378 ViT-SO400M-14-SigLIP-384 ViT-B-32-SigLIP2-256 ViT-B-16-SigLIP2 ViT-B-16-SigLIP2-256
    ViT-B-16-SigLIP2-384 ViT-B-16-SigLIP2-512 ViT-L-16-SigLIP2-256 ViT-L-16-SigLIP2-384 ViT-L-16-SigLIP2-512
    ViT-SO400M-14-SigLIP2 ViT-SO400M-14-SigLIP2-378 ViT-SO400M-16-SigLIP2-256 ViT-SO400M-16-SigLIP2-384
    ViT-SO400M-16-SigLIP2-512 ViT-gopt-16-SigLIP2-256 ViT-gopt-16-SigLIP2-384""".split()]

# CoCa (LAION-2B; the mscoco_finetuned tags were then fine-tuned on COCO captions): OpenAI preprocessing.
_TAGS += [_hub(m, tag, f"laion/{prefix}CoCa-{arch}-laion2B-s13B-b90k")
          for m, arch in (("coca_ViT-B-32", "ViT-B-32"), ("coca_ViT-L-14", "ViT-L-14"))
          for tag, prefix in (("laion2b_s13b_b90k", ""), ("mscoco_finetuned_laion2b_s13b_b90k", "mscoco_finetuned_"))]

# ResNets trained by OpenCLIP on YFCC-15M / CC-12M (QuickGELU, as OpenAI's).
_TAGS += [_hub(m, tag, f"timm/{timm_name}.{tag}", _release(file), quick_gelu=True) for m, tag, timm_name, file in (
    ("RN50", "yfcc15m", "resnet50_clip", "rn50-quickgelu-yfcc15m-455df137.pt"),
    ("RN50", "cc12m", "resnet50_clip", "rn50-quickgelu-cc12m-f000538c.pt"),
    ("RN101", "yfcc15m", "resnet101_clip", "rn101-quickgelu-yfcc15m-3e04b30e.pt"))]
# OpenCLIP's entry names the e31 Hub repo for the e32 release file; kept as OpenCLIP has it.
_TAGS.append(_hub("ViT-B-16-plus-240", "laion400m_e32", "timm/vit_base_patch16_plus_clip_240.laion400m_e31",
                  _release("vit_b_16_plus_240-laion400m_e32-699c4b84.pt")))

# DataComp benchmark baselines: the filtered pool ("DataComp") and CommonPool with each filter, per scale.
_DATACOMP_SCALES = {"ViT-B-32": [("S", "s13M-b4K"), ("M", "s128M-b4K")], "ViT-B-16": [("L", "s1B-b8K")]}
for _model, _scales in _DATACOMP_SCALES.items():
    for _scale, _samples in _scales:
        _TAGS.append(_hub(_model, f"datacomp_{_scale}_{_samples}".lower().replace("-", "_"),
                          f"laion/CLIP-{_model}-DataComp.{_scale}-{_samples}"))
        for _filter in ("clip", "laion", "image", "text", "basic", ""):
            _pool = f"CommonPool.{_scale}" + (f".{_filter}" if _filter else "")
            _tag = f"commonpool_{_scale}_" + (f"{_filter}_" if _filter else "") + _samples
            _TAGS.append(_hub(_model, _tag.lower().replace("-", "_"), f"laion/CLIP-{_model}-{_pool}-{_samples}"))
_TAGS += [_hub("ViT-L-14", tag, f"laion/CLIP-ViT-L-14-CommonPool.XL{pool}-s13B-b90K")
          for tag, pool in (("commonpool_xl_clip_s13b_b90k", ".clip"), ("commonpool_xl_laion_s13b_b90k", ".laion"),
                            ("commonpool_xl_s13b_b90k", ""))]

# More LAION ConvNeXt runs.
_TAGS += [_hub(m, tag, "laion/" + repo) for m, tag, repo in (
    ("convnext_base_w", "laion_aesthetic_s13b_b82k", "CLIP-convnext_base_w-laion_aesthetic-s13B-b82K"),
    ("convnext_base_w_320", "laion_aesthetic_s13b_b82k_augreg", "CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K-augreg"),
    ("convnext_large_d_320", "laion2b_s29b_b131k_ft", "CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft"),
    ("convnext_xxlarge", "laion2b_s34b_b82k_augreg", "CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg"),
    ("convnext_xxlarge", "laion2b_s34b_b82k_augreg_rewind", "CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-rewind"))]

# EVA-CLIP (BAAI), image towers from timm.
_TAGS += [_hub(m, tag, f"timm/{timm_name}.{tag}") for m, tag, timm_name in (
    ("EVA01-g-14", "laion400m_s11b_b41k", "eva_giant_patch14_clip_224"),
    ("EVA01-g-14-plus", "merged2b_s11b_b114k", "eva_giant_patch14_plus_clip_224"),
    ("EVA02-B-16", "merged2b_s8b_b131k", "eva02_base_patch16_clip_224"),
    ("EVA02-L-14", "merged2b_s4b_b131k", "eva02_large_patch14_clip_224"),
    ("EVA02-L-14-336", "merged2b_s6b_b61k", "eva02_large_patch14_clip_336"),
    ("EVA02-E-14", "laion2b_s4b_b115k", "eva02_enormous_patch14_clip_224"),
    ("EVA02-E-14-plus", "laion2b_s9b_b144k", "eva02_enormous_patch14_plus_clip_224"))]

# CLIPA (UCSC-VLAA): ImageNet normalisation, bilinear squash resize.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIPA = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", resize_mode="squash")
_TAGS += [_hub(m, tag, f"UCSC-VLAA/{m}-{data}", **_CLIPA) for m, tag, data in (
    ("ViT-L-14-CLIPA", "datacomp1b", "datacomp1B"), ("ViT-L-14-CLIPA-336", "datacomp1b", "datacomp1B"),
    ("ViT-H-14-CLIPA", "datacomp1b", "datacomp1B"), ("ViT-H-14-CLIPA-336", "laion2b", "laion2B"),
    ("ViT-H-14-CLIPA-336", "datacomp1b", "datacomp1B"), ("ViT-bigG-14-CLIPA", "datacomp1b", "datacomp1B"),
    ("ViT-bigG-14-CLIPA-336", "datacomp1b", "datacomp1B"))]

# NLLB-CLIP (multilingual NLLB text encoder); the SigLIP variants use SigLIP's preprocessing.
_TAGS += [_hub(m, tag, "visheratin/" + repo, **kw) for m, tag, repo, kw in (
    ("nllb-clip-base", "v1", "nllb-clip-base-oc", {}), ("nllb-clip-large", "v1", "nllb-clip-large-oc", {}),
    ("nllb-clip-base-siglip", "v1", "nllb-clip-base-siglip", _SIGLIP),
    ("nllb-clip-base-siglip", "mrl", "nllb-siglip-mrl-base", _SIGLIP),
    ("nllb-clip-large-siglip", "v1", "nllb-clip-large-siglip", _SIGLIP),
    ("nllb-clip-large-siglip", "mrl", "nllb-siglip-mrl-large", _SIGLIP))]

# MobileCLIP / MobileCLIP2 (Apple): most take [0, 1] pixels (mean 0, std 1), bilinear.
_UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
_TAGS += [_hub(m, tag, repo, **kw) for m, tag, repo, kw in (
    ("MobileCLIP-S1", "datacompdr", "apple/MobileCLIP-S1-OpenCLIP", _UNIT),
    ("MobileCLIP-S2", "datacompdr", "apple/MobileCLIP-S2-OpenCLIP", _UNIT),
    ("MobileCLIP-B", "datacompdr", "apple/MobileCLIP-B-OpenCLIP", _UNIT),
    ("MobileCLIP-B", "datacompdr_lt", "apple/MobileCLIP-B-LT-OpenCLIP", _UNIT),
    ("MobileCLIP2-B", "dfndr2b", "timm/MobileCLIP2-B-OpenCLIP", _UNIT),
    ("MobileCLIP2-S0", "dfndr2b", "timm/MobileCLIP2-S0-OpenCLIP", _UNIT),
    ("MobileCLIP2-S2", "dfndr2b", "timm/MobileCLIP2-S2-OpenCLIP", _UNIT),
    ("MobileCLIP2-S3", "dfndr2b", "timm/MobileCLIP2-S3-OpenCLIP", dict(interpolation="bilinear")),
    ("MobileCLIP2-S4", "dfndr2b", "timm/MobileCLIP2-S4-OpenCLIP", dict(interpolation="bilinear")),
    ("MobileCLIP2-L-14", "dfndr2b", "timm/MobileCLIP2-L-14-OpenCLIP", {}))]

# ViTamin (DataComp-1B): plain state dicts named pytorch_model.bin in the authors' repos.
_TAGS += [PretrainedTag(m, "datacomp1b", HubFile(f"jienengchen/{repo}", "pytorch_model.bin")) for m, repo in (
    ("ViTamin-S", "ViTamin-S"), ("ViTamin-S-LTT", "ViTamin-S-LTT"), ("ViTamin-B", "ViTamin-B"),
    ("ViTamin-B-LTT", "ViTamin-B-LTT"), ("ViTamin-L", "ViTamin-L-224px"), ("ViTamin-L-256", "ViTamin-L-256px"),
    ("ViTamin-L-336", "ViTamin-L-336px"), ("ViTamin-L-384", "ViTamin-L-384px"), ("ViTamin-L2", "ViTamin-L2-224px"),
    ("ViTamin-L2-256", "ViTamin-L2-256px"), ("ViTamin-L2-336", "ViTamin-L2-336px"),
    ("ViTamin-L2-384", "ViTamin-L2-384px"), ("ViTamin-XL-256", "ViTamin-XL-256px"),
    ("ViTamin-XL-336", "ViTamin-XL-336px"), ("ViTamin-XL-384", "ViTamin-XL-384px"))]

# Perception Encoder core (Meta): [-1, 1] pixels, bilinear squash resize.
_TAGS += [_hub(m, "meta", "timm/" + m, mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bilinear",
               resize_mode="squash")
          for m in ("PE-Core-T-16-384", "PE-Core-S-16-384", "PE-Core-B-16", "PE-Core-L-14-336", "PE-Core-bigG-14-448")]

# MetaCLIP 2 "worldwide" (multilingual); the ViT-H-14 224px run used QuickGELU, the others GELU.
_TAGS += [_hub(m, "metaclip2_worldwide", f"timm/{timm_name}.metaclip2_worldwide", **kw) for m, timm_name, kw in (
    ("ViT-H-14-worldwide", "vit_huge_patch14_clip_224", dict(quick_gelu=True)),
    ("ViT-H-14-worldwide-378", "vit_huge_patch14_clip_378", dict(resize_mode="squash")),
    ("ViT-bigG-14-worldwide", "vit_gigantic_patch14_clip_224", {}),
    ("ViT-bigG-14-worldwide-378", "vit_gigantic_patch14_clip_378", dict(resize_mode="squash")))]
