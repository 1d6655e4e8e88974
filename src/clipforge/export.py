"""Export a CLIP model's two encoders as ONNX or ``torch.export`` programs, in a folder usable without clipforge.

Why: serving stacks (onnxruntime, TensorRT, C++/mobile runtimes, ``torch.export``-based AOT
compilers) take a graph, not a Python module. ``export`` writes, atomically (the folder is built
in a temporary sibling and swapped in, :func:`clipforge.atomic.atomic_directory`)::

    OUT/export_config.json       what a runtime needs: inputs, preprocessing, tokenizer, logit scale/bias
    OUT/image_encoder.onnx|.pt2  image [N, 3, H, W] float32 -> image_features [N, D] (unnormalised,
                                 as ``CLIP.encode_image``); N is dynamic
    OUT/text_encoder.onnx|.pt2   text [N, L] int64 -> text_features [N, D] (as ``CLIP.encode_text``)
    OUT/tokenizer/               CLIP's BPE vocabulary file, or the Hugging Face tokenizer's files

The text length L is dynamic where clipforge's own trimming is exact: a causal-mask tower pooled at
one token (its EOT, or the first) reads nothing after that token, so ``encode_text`` cuts every
batch after its longest EOT (``TextTransformer.pooled_lengths``). The exported graph does not cut
(a data-dependent length cannot be traced); :class:`OnnxCLIP` cuts before calling it, and a row
padded to any length >= its EOT gives the same feature. Towers where the cut is not exact (no
causal mask, as SigLIP's, which pools the last position; CLS-token or Hugging Face towers) get the
fixed context length, and ``export_config.json`` says so (``text_length: "fixed"``).

``int8`` applies onnxruntime's dynamic int8 weight quantisation and keeps it only when every
check-batch feature keeps cosine >= ``int8_min_cosine`` (0.999) to its fp32 one; otherwise nothing
is written and :class:`Int8AccuracyError` reports the cosines measured. Weights are quantised per
output channel to 7 bits (``reduce_range``): on CPUs without VNNI onnxruntime multiplies u8
activations by s8 weights in pairs summed into int16, which full 8-bit weights overflow. With
onnxruntime's defaults (per tensor, 8 bits) a random ViT-B-32 image tower kept min cosine 0.987 on
this AVX2 CPU; per channel at 7 bits it keeps 0.9996. Since the files run wherever they are copied,
the 7-bit weights are used on every machine, not only where the export ran. ``int8_encoders``
quantises one encoder and keeps the other fp32: text towers lose more to int8 than image towers
(random ViT-B-32: image 0.9997, text 0.998), and an image collection is embedded far more often
than queries are, so ``("image",)`` is the usual choice when the text encoder misses the bar.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .atomic import PathLike, atomic_directory, write_text
from .config import PreprocessConfig, as_tuple2

FORMATS = ("onnx", "torch.export")
CONFIG_NAME = "export_config.json"
KIND = "clipforge-export"  # export_config.json's "kind": how an existing OUT is recognised as an export
SCHEMA_VERSION = 1
DEFAULT_OPSET = 18  # the lowest opset torch's dynamo-based ONNX exporter writes
INT8_MIN_COSINE = 0.999
TEXT_TRIM_RULES = ("argmax", "eos", "first")  # pool_type values whose pooled token bounds what a row needs
SUFFIX = {"onnx": ".onnx", "torch.export": ".pt2"}
ONNX_SINGLE_FILE_LIMIT = 1800 * 2**20  # protobuf's 2 GiB cap, with a margin: larger encoders use external data
CHECK_PROMPTS = ("a photo of a cat", "a diagram of a rocket engine", "two dogs play in the snow", "",
                 "A man in a red jacket climbs a rock wall .", "a cup of coffee on a saucer, seen from above",
                 "an astronaut", "the quick brown fox jumps over the lazy dog near the river bank at dawn")
CHECK_IMAGES = 4
ENCODERS = ("image", "text")
BPE_LICENSE = "LICENSE-openai-clip-bpe.txt"


class Int8AccuracyError(ValueError):
    """int8 weights moved a check-batch feature further than ``int8_min_cosine`` allows; nothing was written."""


# ----------------------------------------------------------------------------- configuration
@dataclass
class ExportOptions:
    """How to export; validated on construction, so a CLI can check it before loading a model."""

    format: str = "onnx"  # onnx or torch.export
    opset: int = DEFAULT_OPSET  # ONNX opset (onnx format only)
    int8: bool = False  # onnxruntime dynamic int8 weights (onnx format only)
    int8_encoders: Tuple[str, ...] = ENCODERS  # which encoders int8 quantises; the others stay fp32
    int8_min_cosine: float = INT8_MIN_COSINE  # keep int8 only if every check feature keeps this cosine to fp32
    overwrite: bool = False  # replace an existing export at OUT

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.format == "onnx" and self.opset < DEFAULT_OPSET:
            raise ValueError(f"opset {self.opset} is too old: torch's ONNX exporter writes opset >= {DEFAULT_OPSET}")
        if self.int8 and self.format != "onnx":
            raise ValueError("int8 applies to the onnx format (onnxruntime's dynamic quantisation); "
                             "for torch.export use clipforge.inference.quantize_int8 on the model instead")
        self.int8_encoders = tuple(self.int8_encoders)
        unknown = [e for e in self.int8_encoders if e not in ENCODERS]
        if unknown or not self.int8_encoders or len(set(self.int8_encoders)) != len(self.int8_encoders):
            raise ValueError(f"int8_encoders must name image and/or text once each, got {list(self.int8_encoders)}")
        if not 0.0 < self.int8_min_cosine <= 1.0:
            raise ValueError(f"int8_min_cosine must be in (0, 1], got {self.int8_min_cosine}")


@dataclass
class ExportConfig:
    """``export_config.json``: everything a runtime needs to use the two encoders without clipforge."""

    format: str
    image_encoder: str  # file name inside the folder
    text_encoder: str
    embed_dim: int
    # preprocessing (clipforge.transforms / OpenCLIP eval transform): resize_mode "shortest" resizes the
    # short side to image_size then centre-crops; "longest" resizes the long side then pads with fill_color
    # to a centred square; "squash" resizes both sides. Then RGB in [0, 1], (x - mean) / std.
    image_size: Tuple[int, int]  # (height, width)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str
    resize_mode: str
    fill_color: int
    # text
    context_length: int  # tokenizer output length (the longest text input)
    # "dynamic": any L <= context_length that holds every row's pooled token; "fixed": exactly context_length
    text_length: str
    text_trim: Optional[str]  # dynamic only: how to find a row's pooled token (argmax id, first eos_id, first)
    pad_id: int
    eot_id: Optional[int]
    sot_id: Optional[int]
    tokenizer: Dict[str, Any]  # {"type": "clip_bpe", "vocab": path, "clean": ...} or {"type": "hf", "folder": ...}
    # similarity: logits = logit_scale * cos(image, text) + (logit_bias or 0)
    logit_scale: float  # already exp()-ed, as OpenCLIP's forward returns it
    logit_bias: Optional[float]
    model: Optional[str] = None
    pretrained: Optional[str] = None
    opset: Optional[int] = None
    weights: str = "fp32"  # fp32, int8 (both encoders) or mixed (see encoder_weights)
    encoder_weights: Dict[str, str] = field(default_factory=dict)  # {"image": "int8", "text": "fp32"}
    check: Dict[str, Any] = field(default_factory=dict)  # check-batch measurements at export time
    notes: List[str] = field(default_factory=list)
    kind: str = KIND
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "ExportConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{CONFIG_NAME}: unknown fields {unknown}")
        d = dict(d)
        d["image_size"] = tuple(d["image_size"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=tuple(self.image_size), mean=tuple(self.mean), std=tuple(self.std),
                                interpolation=self.interpolation, resize_mode=self.resize_mode,
                                fill_color=self.fill_color)


def read_export_config(folder: PathLike) -> ExportConfig:
    """The :class:`ExportConfig` of an export folder; a clear error when ``folder`` is not one."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a clipforge export: no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from e
    if not isinstance(data, dict) or data.get("kind") != KIND:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise ValueError(f"{path}: not a clipforge export config (kind {kind!r})")
    return ExportConfig.from_dict(data)


def is_export_folder(folder: PathLike) -> bool:
    try:
        read_export_config(folder)
        return True
    except (OSError, ValueError):
        return False


def check_destination(out: PathLike, overwrite: bool) -> None:
    """Fail before any work when ``out`` cannot be written.

    That is: a file, a folder of other files, or an existing export without ``overwrite``.
    """
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_export_folder(out):
            raise FileExistsError(f"refusing to write into {out}: it holds files that are not a clipforge export "
                                  f"({', '.join(sorted(p.name for p in out.iterdir())[:8])}); remove it or choose "
                                  f"another folder")
        if not overwrite:
            raise FileExistsError(f"{out} already holds an export; pass overwrite (--overwrite) to replace it")


# ----------------------------------------------------------------------------- what gets traced
class ImageEncoder(nn.Module):
    """``model.encode_image`` as a module of one input (what the exporters trace)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class TextEncoder(nn.Module):
    """``model.encode_text`` as a module of one input, without its data-dependent trim.

    ``TextTransformer._trim`` cuts a batch after its longest EOT, a length that depends on token
    values and cannot be traced; it is exact (see the module docstring), so the traced graph runs
    on whatever length it is given and the caller cuts (:meth:`OnnxCLIP.encode_text`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        tower = self.model.text
        if not hasattr(tower, "_trim"):
            return self.model.encode_text(text)
        tower._trim = _no_trim  # instance attribute shadows the method for this call only
        try:
            return self.model.encode_text(text)
        finally:
            del tower._trim


def _no_trim(text: torch.Tensor) -> torch.Tensor:
    return text


def text_trim_rule(model: nn.Module, tokens: torch.Tensor) -> Optional[str]:
    """The pool rule by which a text batch may be cut (dynamic length), or None when the length must stay fixed.

    Decided by the tower itself: its ``pooled_lengths`` (the rule ``encode_text`` trims by) must
    leave positions out of a short prompt, and its ``pool_type`` must be one a runtime can
    reproduce from token ids alone (:data:`TEXT_TRIM_RULES`). ``tokens`` must hold a short prompt.
    """
    tower = getattr(model, "text", None)
    pooled_lengths = getattr(tower, "pooled_lengths", None)
    rule = getattr(getattr(tower, "cfg", None), "pool_type", None)
    if pooled_lengths is None or rule not in TEXT_TRIM_RULES:
        return None
    if int(pooled_lengths(tokens).min()) >= tokens.shape[1]:  # not even the shortest prompt may be cut
        return None
    return rule


def pooled_positions(ids: np.ndarray, rule: str, eot_id: Optional[int]) -> np.ndarray:
    """[N] the position each row of ``ids`` [N, L] is pooled at, by ``export_config.json``'s ``text_trim`` rule."""
    if rule == "argmax":
        return ids.argmax(axis=-1)
    if rule == "eos":
        return (ids == eot_id).argmax(axis=-1)
    if rule == "first":
        return np.zeros(len(ids), dtype=np.int64)
    raise ValueError(f"unknown text_trim rule {rule!r}; expected one of {TEXT_TRIM_RULES}")


def trim_tokens(ids: np.ndarray, rule: Optional[str], eot_id: Optional[int]) -> np.ndarray:
    """``ids`` cut after the batch's last pooled token (``rule`` None: unchanged)."""
    if rule is None or ids.size == 0:
        return ids
    return ids[:, : int(pooled_positions(ids, rule, eot_id).max()) + 1]


# ----------------------------------------------------------------------------- tokenizer and check batch
def _tokenizer_spec(tokenizer: Any, folder: Path) -> Dict[str, Any]:
    """Copy the tokenizer's files into ``folder/tokenizer`` and describe them for export_config.json."""
    from .tokenizer import CLIPTokenizer, HFTokenizer
    from .tokenizer.bpe import VOCAB_FILE

    target = folder / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, CLIPTokenizer):
        assets = resources.files("clipforge").joinpath("assets")
        source = tokenizer.bpe_path
        with (open(source, "rb") if source else assets.joinpath(VOCAB_FILE).open("rb")) as src, \
                open(target / VOCAB_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst)
        with assets.joinpath(BPE_LICENSE).open("rb") as src, open(target / BPE_LICENSE, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return {"type": "clip_bpe", "vocab": f"tokenizer/{VOCAB_FILE}", "clean": tokenizer.clean,
                "note": "OpenAI CLIP BPE: [SOT] ids [EOT] then pad_id; a too-long text keeps EOT last"}
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_pretrained(str(target))
        return {"type": "hf", "folder": "tokenizer", "clean": tokenizer.clean,
                "strip_sep_token": tokenizer.strip_sep_token, "tokenizer_mode": tokenizer.tokenizer_mode or None,
                "note": "transformers AutoTokenizer files; pad/truncate to context_length (clipforge HFTokenizer)"}
    raise ValueError(f"cannot export a {type(tokenizer).__name__} tokenizer: expected clipforge's CLIPTokenizer "
                     f"or HFTokenizer")


def _special_ids(tokenizer: Any) -> Tuple[int, Optional[int], Optional[int]]:
    """(pad, eot, sot) ids of a clipforge tokenizer."""
    if hasattr(tokenizer, "eot_token_id"):  # CLIPTokenizer
        return tokenizer.pad_id, tokenizer.eot_token_id, tokenizer.sot_token_id
    inner = tokenizer.tokenizer
    pad = inner.pad_token_id if inner.pad_token_id is not None else 0
    return pad, inner.eos_token_id, inner.bos_token_id


def check_images(preprocess: PreprocessConfig, n: int = CHECK_IMAGES, seed: int = 0) -> torch.Tensor:
    """[n, 3, H, W] seeded uniform noise in [0, 1], normalised as ``preprocess`` says: the check batch."""
    height, width = as_tuple2(preprocess.image_size)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, height, width, generator=gen)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two [N, D] arrays, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


# ----------------------------------------------------------------------------- exporters
def _export_program(module: nn.Module, example: torch.Tensor, dims: Dict[int, Any]) -> "torch.export.ExportedProgram":
    name = "image" if isinstance(module, ImageEncoder) else "text"
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes={name: dims}, strict=False)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def _write_onnx(program, path: Path, input_name: str, output_name: str, opset: int, big: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/future notes are not the user's concern
        onnx_program = torch.onnx.export(program, f=None, input_names=[input_name], output_names=[output_name],
                                         opset_version=opset, dynamo=True, verbose=False, optimize=True)
    onnx_program.save(str(path), external_data=big)


def _session(path: Path, threads: Optional[int] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_onnx(path: Path, name: str, value: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
    return _session(path, threads).run(None, {name: value})[0]


def quantize_onnx(src: PathLike, dst: PathLike) -> None:
    """onnxruntime's dynamic int8 quantisation of ``src`` into ``dst``: 7-bit weights per output channel
    (see the module docstring), activations per batch."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" hint on every call
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    finally:
        root.setLevel(level)


def _remove_onnx(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


@dataclass
class ExportResult:
    out: Path
    config: ExportConfig
    files: List[Path]


def export_model(model: nn.Module, out: PathLike, tokenizer: Any, preprocess: PreprocessConfig,
                 options: Optional[ExportOptions] = None, *, model_name: Optional[str] = None,
                 pretrained: Optional[str] = None, progress: bool = True) -> ExportResult:
    """Export a built CLIP's encoders, tokenizer and preprocessing to the folder ``out`` (see the module docstring).

    ``model`` is a clipforge CLIP (fp32, CPU); ``tokenizer`` and ``preprocess`` are what it is used
    with (``clipforge.get_tokenizer``, ``clipforge.factory.preprocess_config``).
    """
    from tqdm import tqdm

    options = options or ExportOptions()
    check_destination(out, options.overwrite)
    model = model.eval().requires_grad_(False)
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise ValueError(f"export needs an fp32 model on the CPU, got {param.dtype} on {param.device}")
    pad_id, eot_id, sot_id = _special_ids(tokenizer)
    context_length = int(model.context_length)
    text_check = tokenizer(list(CHECK_PROMPTS), context_length=context_length).long()  # [8, context_length]
    image_check = check_images(preprocess)
    height, width = as_tuple2(model.cfg.vision_cfg.image_size)
    if as_tuple2(preprocess.image_size) != (height, width):
        raise ValueError(f"preprocess image_size {preprocess.image_size} differs from the model's {(height, width)}")
    rule = text_trim_rule(model, text_check)
    notes = []
    if rule is None:
        notes.append(f"text input has the fixed length {context_length}: this text tower's feature depends on "
                     f"every position (no causal mask, a last/CLS/mean pool or a Hugging Face tower), so "
                     f"trimming the padding would change it")
    else:
        notes.append(f"text input length is dynamic (1..{context_length}): the tower is causal and pools at one "
                     f"token ({rule}), so cutting a batch after its last pooled token is exact")
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=1, max=context_length) if rule is not None else None
    text_dims = {0: batch, 1: length} if length is not None else {0: batch}
    image_encoder, text_encoder = ImageEncoder(model), TextEncoder(model)
    with torch.no_grad():
        image_ref = model.encode_image(image_check).numpy()
        text_ref = model.encode_text(text_check).numpy()  # clipforge's own (trimming) path
    suffix = SUFFIX[options.format]
    image_name, text_name = f"image_encoder{suffix}", f"text_encoder{suffix}"
    quantized_encoders = options.int8_encoders if options.int8 else ()
    steps = 2 + len(quantized_encoders)
    check: Dict[str, Any] = {"images": f"{CHECK_IMAGES} seeded uniform-noise images", "prompts": len(CHECK_PROMPTS)}
    with atomic_directory(out, replaceable=is_export_folder) as tmp, \
            tqdm(total=steps, desc="export", unit="step", disable=not progress) as bar:
        tmp = Path(tmp)
        spec = _tokenizer_spec(tokenizer, tmp)
        text_in = trim_tokens(text_check.numpy(), rule, eot_id)
        towers = (("image", image_encoder, image_check[:2], {0: batch}, image_name, image_check.numpy(), image_ref),
                  ("text", text_encoder, text_check[:2], text_dims, text_name, text_in, text_ref))
        for tower, module, example, dims, file_name, check_in, ref in towers:
            bar.set_postfix_str(f"{tower} encoder")
            program = _export_program(module, example, dims)
            path = tmp / file_name
            if options.format == "torch.export":
                torch.export.save(program, str(path))
                with torch.no_grad():
                    got = torch.export.load(str(path)).module()(torch.from_numpy(check_in)).numpy()
            else:
                big = _param_bytes(getattr(model, "visual" if tower == "image" else "text")) > ONNX_SINGLE_FILE_LIMIT
                _write_onnx(program, path, tower, f"{tower}_features", options.opset, big)
                got = _run_onnx(path, tower, check_in)
            check[f"{tower}_max_abs_diff"] = float(np.abs(got - ref).max())
            bar.update()
            if tower in quantized_encoders:
                if big:
                    raise ValueError(f"int8 of an encoder over {ONNX_SINGLE_FILE_LIMIT >> 20} MB (ONNX external "
                                     f"data) is not supported; export it without int8")
                bar.set_postfix_str(f"{tower} encoder int8")
                quantized = tmp / f"{tower}_encoder.int8.onnx"
                quantize_onnx(path, quantized)
                cos = cosine_rows(got, _run_onnx(quantized, tower, check_in))
                check[f"{tower}_int8_min_cosine"] = float(cos.min())
                if cos.min() < options.int8_min_cosine:
                    raise Int8AccuracyError(
                        f"int8 {tower} encoder refused: its check-batch features have cosine {cos.min():.6f} "
                        f"(mean {cos.mean():.6f}) to fp32, below int8_min_cosine={options.int8_min_cosine}; "
                        f"nothing was written. Export without int8, quantise only the other encoder "
                        f"(int8_encoders), or lower int8_min_cosine")
                _remove_onnx(path)
                os.replace(quantized, path)
                bar.update()
        logit_bias = getattr(model, "logit_bias", None)
        config = ExportConfig(
            format=options.format, image_encoder=image_name, text_encoder=text_name,
            embed_dim=int(image_ref.shape[-1]), image_size=(height, width), mean=tuple(preprocess.mean),
            std=tuple(preprocess.std), interpolation=preprocess.interpolation, resize_mode=preprocess.resize_mode,
            fill_color=preprocess.fill_color, context_length=context_length,
            text_length="dynamic" if rule is not None else "fixed", text_trim=rule, pad_id=pad_id, eot_id=eot_id,
            sot_id=sot_id, tokenizer=spec, logit_scale=float(model.logit_scale.exp().reshape(-1)[0]),
            logit_bias=None if logit_bias is None else float(logit_bias.reshape(-1)[0]),
            model=model_name, pretrained=pretrained, opset=options.opset if options.format == "onnx" else None,
            weights=("int8" if len(quantized_encoders) == len(ENCODERS) else "mixed" if quantized_encoders
                     else "fp32"),
            encoder_weights={e: "int8" if e in quantized_encoders else "fp32" for e in ENCODERS},
            check=check, notes=notes)
        write_text(tmp / CONFIG_NAME, config.to_json())
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    return ExportResult(Path(out), config, [Path(out) / f for f in files])


def export(model_name: str, out: PathLike, pretrained: Optional[str] = None,
           options: Optional[ExportOptions] = None, progress: bool = True) -> ExportResult:
    """Load ``model_name`` (+ ``pretrained``) as every clipforge command does, then :func:`export_model` it."""
    from .evaluate.clip_benchmark_loader import load_clipforge
    from .factory import preprocess_config

    options = options or ExportOptions()
    check_destination(out, options.overwrite)  # before the (slow) model load
    model, _, tokenizer = load_clipforge(model_name, pretrained, "cpu")
    return export_model(model, out, tokenizer, preprocess_config(model), options, model_name=model_name,
                        pretrained=pretrained, progress=progress)


# ----------------------------------------------------------------------------- the runner
ImageBatch = Union[np.ndarray, Sequence[Any]]


class OnnxCLIP:
    """An ONNX export run by onnxruntime, with the folder's own tokenizer and preprocessing.

    ``encode_image`` takes preprocessed pixels [N, 3, H, W] float32 or a list of PIL images /
    image paths (preprocessed with clipforge's eval transform from the folder's config);
    ``encode_text`` takes strings (tokenized with the folder's tokenizer files) or token ids
    [N, L]. Both return float32 numpy features, unnormalised unless ``normalize``, as OpenCLIP's.
    """

    def __init__(self, folder: PathLike, threads: Optional[int] = None):
        self.folder = Path(folder)
        self.config = read_export_config(self.folder)
        if self.config.format != "onnx":
            raise ValueError(f"{folder} holds a {self.config.format} export; OnnxCLIP runs onnx exports "
                             f"(load .pt2 files with torch.export.load)")
        self.image_session = _session(self.folder / self.config.image_encoder, threads)
        self.text_session = _session(self.folder / self.config.text_encoder, threads)
        self.tokenizer = self._tokenizer()
        from .transforms import image_transform
        self.preprocess = image_transform(self.config.preprocess_config(), is_train=False)

    def _tokenizer(self):
        from .tokenizer import CLIPTokenizer, HFTokenizer

        spec, length = self.config.tokenizer, self.config.context_length
        if spec["type"] == "clip_bpe":
            return CLIPTokenizer(context_length=length, clean=spec["clean"], bpe_path=str(self.folder / spec["vocab"]))
        if spec["type"] == "hf":
            return HFTokenizer(str(self.folder / spec["folder"]), context_length=length, clean=spec["clean"],
                               strip_sep_token=spec.get("strip_sep_token", False),
                               tokenizer_mode=spec.get("tokenizer_mode"))
        raise ValueError(f"{self.folder / CONFIG_NAME}: unknown tokenizer type {spec['type']!r}")

    @property
    def logit_scale(self) -> float:
        return self.config.logit_scale

    @property
    def logit_bias(self) -> Optional[float]:
        return self.config.logit_bias

    def tokenize(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """[N, context_length] int64 ids, as clipforge's tokenizer gives them."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts)).numpy().astype(np.int64)

    def image_pixels(self, images: ImageBatch) -> np.ndarray:
        if isinstance(images, np.ndarray):
            pixels = images
        else:
            from .transforms import load_image_for
            pixels = np.stack([self.preprocess(load_image_for(self.preprocess, im) if isinstance(im, (str, os.PathLike))
                                               else im).numpy()
                               for im in images])
        height, width = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, height, width):
            raise ValueError(f"images must be [N, 3, {height}, {width}] preprocessed pixels, got shape {pixels.shape}")
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def encode_image(self, images: ImageBatch, normalize: bool = False) -> np.ndarray:
        features = self.image_session.run(None, {"image": self.image_pixels(images)})[0]
        return _normalized(features) if normalize else features

    def encode_text(self, texts: Union[str, Sequence[str], np.ndarray], normalize: bool = False) -> np.ndarray:
        ids = texts if isinstance(texts, np.ndarray) else self.tokenize(texts)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
            raise ValueError(f"token ids must be [N, L <= {self.config.context_length}], got shape {ids.shape}")
        if self.config.text_length == "fixed" and ids.shape[1] != self.config.context_length:
            raise ValueError(f"this text encoder takes exactly {self.config.context_length} tokens per row "
                             f"(text_length fixed), got {ids.shape[1]}")
        ids = trim_tokens(ids, self.config.text_trim, self.config.eot_id)
        features = self.text_session.run(None, {"text": np.ascontiguousarray(ids)})[0]
        return _normalized(features) if normalize else features

    def get_logits(self, images: ImageBatch, texts: Union[Sequence[str], np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(image->text [Ni, Nt], text->image [Nt, Ni]) logits with the folder's scale and bias, as CLIP's."""
        image, text = self.encode_image(images, normalize=True), self.encode_text(texts, normalize=True)
        logits = self.logit_scale * image @ text.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


__all__ = ["FORMATS", "ENCODERS", "CONFIG_NAME", "DEFAULT_OPSET", "INT8_MIN_COSINE", "ExportOptions", "ExportConfig",
           "ExportResult", "Int8AccuracyError", "ImageEncoder", "TextEncoder", "OnnxCLIP", "export", "export_model",
           "read_export_config", "is_export_folder", "check_destination", "text_trim_rule", "trim_tokens",
           "pooled_positions", "check_images", "cosine_rows", "quantize_onnx"]
