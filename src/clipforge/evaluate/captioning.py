"""Image captioning with a generative (CoCa) model, and clip_benchmark's captioning metrics.

Generation is the model's own ``generate`` (OpenCLIP's keyword arguments and defaults); this module
only batches images through it, turns the tokens into text by clip_benchmark's rule and scores the
text. The scores are COCO's caption metrics from ``pycocoevalcap``, computed step by step as
clip_benchmark 1.6.2's ``metrics/captioning.py`` does: both sides through Stanford's PTB tokenizer,
then ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` under its key names. SPICE, the last
scorer clip_benchmark runs, is left out: it downloads Stanford CoreNLP 3.6.0 (~400 MB) on first use
and needs Java 8, so it cannot run offline; every other number is the same as clip_benchmark's.
pycocoevalcap's tokenizer and METEOR run Java (``java`` on PATH; Debian: ``default-jre-headless``).
"""
from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from tqdm import tqdm

from ..precision import autocast
from ..transforms import ImageLoadError, load_image_for, rgb_for
from .features import Device, model_device

# clip_benchmark's result keys, in its order (it also reports "SPICE"; see the module docstring)
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

ImageInput = Union[str, Path, bytes, Image.Image]


def can_generate(model: torch.nn.Module) -> bool:
    """Whether ``model`` writes captions (has a ``generate`` method, as CoCa does)."""
    return callable(getattr(model, "generate", None))


def require_captioner(model: torch.nn.Module, name: str = "") -> None:
    """Raise a ValueError naming the model unless it can generate captions."""
    if not can_generate(model):
        label = f"{name!r} ({type(model).__name__})" if name else type(model).__name__
        raise ValueError(f"model {label} cannot write captions: it has no text decoder; "
                         "use a CoCa model, e.g. coca_ViT-B-32 (`clipforge models` lists them)")


def generate_options(num_beams: Optional[int] = None, generation_type: Optional[str] = None,
                     seq_len: Optional[int] = None, num_beam_groups: Optional[int] = None) -> Dict[str, Any]:
    """``model.generate`` keyword arguments for the settings given; the others keep generate's defaults."""
    given = {"num_beams": num_beams, "num_beam_groups": num_beam_groups, "generation_type": generation_type,
             "seq_len": seq_len}
    return {k: v for k, v in given.items() if v is not None}


def decode_captions(tokenizer, tokens: torch.Tensor) -> List[str]:
    """Generated token rows [B, T] -> captions, as clip_benchmark turns them into text.

    The tokenizer's ``decode`` drops the special tokens the way clip_benchmark does (the text before
    the first ``<end_of_text>``, without ``<start_of_text>``); clip_benchmark then strips white space.
    """
    return [tokenizer.decode(row).strip() for row in tokens.tolist()]


def _pixels(image: ImageInput, transform: Callable) -> torch.Tensor:
    return transform(rgb_for(transform, image) if isinstance(image, Image.Image) else load_image_for(transform, image))


def generate_captions(model: torch.nn.Module, tokenizer, images: torch.Tensor, device: Optional[Device] = None,
                      precision: str = "fp32", **generate_kwargs: Any) -> List[str]:
    """Captions of a batch of preprocessed images [B, 3, H, W] via ``model.generate(images, **generate_kwargs)``."""
    require_captioner(model)
    dev = model_device(model, device)
    with torch.no_grad(), autocast(precision, dev):
        tokens = model.generate(images.to(dev), **generate_kwargs)
    return decode_captions(tokenizer, tokens.cpu())


def caption_images(model: torch.nn.Module, images: Sequence[ImageInput], tokenizer, transform: Callable,
                   batch_size: int = 16, device: Optional[Device] = None, precision: str = "fp32",
                   **generate_kwargs: Any) -> List[str]:
    """One caption per image (paths, encoded bytes or PIL images), ``batch_size`` images per ``generate`` call.

    A file that cannot be read raises :class:`~clipforge.transforms.ImageLoadError` naming it; see
    :func:`caption_files` for per-file errors instead.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    require_captioner(model)
    model.eval()
    captions: List[str] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([_pixels(im, transform) for im in images[start:start + batch_size]])
        captions += generate_captions(model, tokenizer, batch, device, precision, **generate_kwargs)
    return captions


@dataclass
class CaptionResult:
    """One file's caption, or why it has none."""

    path: str
    caption: Optional[str] = None
    error: Optional[str] = None


def caption_files(model: torch.nn.Module, paths: Sequence[Union[str, Path]], tokenizer, transform: Callable,
                  batch_size: int = 16, device: Optional[Device] = None, precision: str = "fp32",
                  **generate_kwargs: Any) -> List[CaptionResult]:
    """:func:`caption_images` over files, in order; a file that cannot be opened gets an ``error``
    (the reason, naming the file) and the others are still captioned."""
    results = [CaptionResult(str(p)) for p in paths]
    for start in range(0, len(results), batch_size):  # at most one batch of decoded images held
        readable: List[Tuple[CaptionResult, Image.Image]] = []
        for result in results[start:start + batch_size]:
            try:
                readable.append((result, load_image_for(transform, result.path)))
            except ImageLoadError as e:
                result.error = str(e)
        captions = caption_images(model, [im for _, im in readable], tokenizer, transform, batch_size, device,
                                  precision, **generate_kwargs)
        for (result, _), caption in zip(readable, captions):
            result.caption = caption
    return results


def _pycocoevalcap():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise ImportError("caption metrics need `pip install pycocoevalcap` (clipforge[caption])") from err
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java for pycocoevalcap's PTB tokenizer and METEOR: "
                           "install a Java runtime (Debian/Ubuntu: apt-get install default-jre-headless)")
    return PTBTokenizer, Bleu, Meteor, Rouge, Cider


_METEOR: List[Any] = []  # one METEOR scorer per process


def meteor_scorer():
    """pycocoevalcap's ``Meteor()``, started once per process and reused.

    Its Java process takes seconds to load METEOR's paraphrase table (~20 s on a busy machine) and
    then scores each request independently, so one process serves every :func:`caption_metrics` call.
    """
    if not _METEOR or _METEOR[0].meteor_p.poll() is not None:  # none yet, or its process ended
        _, _, Meteor, _, _ = _pycocoevalcap()
        _METEOR[:] = [Meteor()]
    return _METEOR[0]


def caption_metrics(predictions: Mapping[Hashable, str],
                    references: Mapping[Hashable, Sequence[str]]) -> Dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one predicted caption per id against its reference captions.

    The steps and keys of clip_benchmark's ``COCOEvalCap.evaluate`` (``Bleu_1`` ... ``Bleu_4``,
    ``METEOR``, ``ROUGE_L``, ``CIDEr``), ids taken in ``predictions``' order; CIDEr's document
    frequencies come from these references only, as there. SPICE is not computed (module docstring).
    """
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        raise ValueError(f"predictions and references must have the same ids: {len(missing)} predictions "
                         f"without references (e.g. {missing[:3]}), {len(extra)} references without a "
                         f"prediction (e.g. {extra[:3]})")
    if not predictions:
        raise ValueError("no captions to score")
    empty = [k for k in predictions if not references[k]]
    if empty:
        raise ValueError(f"ids without any reference caption: {empty[:5]}")
    PTBTokenizer, Bleu, _, Rouge, Cider = _pycocoevalcap()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in predictions})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in predictions})
    metrics: Dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        bleu, _ = Bleu(4).compute_score(gts, res)
        metrics.update(zip(CAPTION_METRICS[:4], map(float, bleu)))
        metrics["METEOR"] = float(meteor_scorer().compute_score(gts, res)[0])
        metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return metrics


def loader_captions(model: torch.nn.Module, tokenizer, dataloader: Iterable, device: Optional[Device] = None,
                    precision: str = "fp32", use_tqdm: bool = True,
                    **generate_kwargs: Any) -> Tuple[Dict[int, str], Dict[int, List[str]]]:
    """(predictions, references) by image index over a loader of ``(images, [captions per image])``
    (``clipforge.evaluate.datasets.captions_collate``), one ``generate`` call per batch."""
    require_captioner(model)
    model.eval()
    predictions: Dict[int, str] = {}
    references: Dict[int, List[str]] = {}
    for images, captions in tqdm(dataloader, desc="captioning", disable=not use_tqdm):
        if len(captions) != len(images):
            raise ValueError(f"a batch has {len(images)} images but {len(captions)} caption lists; "
                             "use clipforge.evaluate.datasets.captions_collate")
        for caption, refs in zip(generate_captions(model, tokenizer, images, device, precision, **generate_kwargs),
                                 captions):
            references[len(predictions)] = list(refs)
            predictions[len(predictions)] = caption
    return predictions, references


def evaluate_captioning(model: torch.nn.Module, tokenizer, dataloader: Iterable, device: Optional[Device] = None,
                        precision: str = "fp32", use_tqdm: bool = True,
                        **generate_kwargs: Any) -> Dict[str, float]:
    """clip_benchmark's ``captioning`` task: a caption per image by ``model.generate`` (OpenCLIP's
    defaults unless ``generate_kwargs`` say otherwise), scored against all of that image's captions
    with :func:`caption_metrics`."""
    predictions, references = loader_captions(model, tokenizer, dataloader, device, precision, use_tqdm,
                                              **generate_kwargs)
    return caption_metrics(predictions, references)
