"""The frozen teacher of a distillation run (``loss.kind=distill``), kept apart from everything that trains.

OpenCLIP (``open_clip_train/main.py`` and ``train.py``, ``--distill-model/--distill-pretrained``)
builds the teacher once, puts it in eval mode and runs it under ``torch.no_grad`` on the very batch
the student sees, inside the student's autocast; its features and logit scale become the ``dist_*``
inputs of ``DistillClipLoss``. clipforge does the same, and:

* the teacher is never a submodule of the trained model, so it is in no optimizer, no checkpoint,
  no final export and no DDP/FSDP wrapping (OpenCLIP wraps it in DDP, which it does not need: it
  has no gradients); its parameters have ``requires_grad=False``. A resumed run rebuilds it from
  ``loss.teacher`` (the run refuses to resume if that setting changed).
* building it draws nothing from the run's random generators (its random initialisation is forked
  off and then overwritten by its weights), so the data order, augmentation and dropout are the
  run's own.
* it is fed the student's images and tokens, as in OpenCLIP, whose code notes in a comment that it
  "assumes the model you're distilling from has the same tokenizer & transforms". Here that is
  checked when the run starts: image size, normalisation, tokenizer, context length and vocabulary
  must fit, or the run stops naming what differs. Resize/crop details are not compared: training
  crops are random either way.
* a CoCa student is refused (OpenCLIP asserts it too: its captioning loss has no teacher target),
  and so is a CoCa teacher (OpenCLIP's loss call fails on its caption outputs).
* gradient accumulation works (OpenCLIP asserts ``accum_freq == 1``): the teacher scores every
  micro-batch once, and each re-computed student micro-batch is scored with the cached features of
  the others against all of the teacher's outputs, which is the gradient of one larger batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import PreprocessConfig
from ..factory import create_model, parse_model_name, preprocess_config
from ..loss import DistillClipLoss
from ..precision import autocast
from .config import TeacherSettings

ContrastiveLoss = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]


@dataclass
class TeacherOutput:
    """What the teacher says about one batch: normalised features and its (exponentiated) logit scale."""

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor
    logit_bias: Optional[Tensor] = None


class Teacher:
    """A frozen model run without gradient, in eval mode, under the run's autocast, on the student's device.

    A plain object, not an ``nn.Module``: nothing that collects the trainer's modules or parameters
    (optimizer, checkpoints, ``.train()``, DDP/FSDP) can reach the teacher through it.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.precision = precision
        self.model = model.requires_grad_(False).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: Tensor, texts: Tensor) -> TeacherOutput:
        with autocast(self.precision, self.device):
            out = self.model(images.to(self.device), texts.to(self.device))
        return TeacherOutput(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))

    def objective(self, loss_fn: DistillClipLoss, micro_batches: Sequence[Tuple[Tensor, Tensor]]) -> ContrastiveLoss:
        """``loss_fn`` as a loss of ``(image_features, text_features, logit_scale, logit_bias)`` alone.

        The features it is given are those of ``micro_batches`` concatenated in order (one batch, or
        GradCache's cached-plus-live features of all of them); they are scored against the teacher's
        outputs on the same batches, which are computed here once. The value is OpenCLIP's
        ``contrastive_loss + distill_loss``.
        """
        if not isinstance(loss_fn, DistillClipLoss):
            raise ValueError(f"a teacher needs DistillClipLoss (loss.kind=distill), got {type(loss_fn).__name__}")
        outputs: List[TeacherOutput] = [self(images, texts) for images, texts in micro_batches]
        image_features = torch.cat([o.image_features for o in outputs])
        text_features = torch.cat([o.text_features for o in outputs])
        scale, bias = outputs[0].logit_scale, outputs[0].logit_bias

        def distillation_loss(images: Tensor, texts: Tensor, logit_scale: Tensor,
                              logit_bias: Optional[Tensor] = None) -> Tensor:
            contrastive, distill = loss_fn(images, texts, logit_scale, image_features, text_features, scale,
                                           logit_bias=logit_bias, dist_logit_bias=bias)
            return contrastive + distill

        return distillation_loss


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def incompatibilities(teacher: nn.Module, teacher_preprocess: PreprocessConfig, student: nn.Module,
                      student_preprocess: PreprocessConfig) -> List[str]:
    """Why ``teacher`` cannot score the student's batches (images made by ``student_preprocess``,
    tokens by the student's tokenizer); empty when it can."""
    problems = []
    batch_size, teacher_size = _pair(student_preprocess.image_size), _pair(teacher.cfg.vision_cfg.image_size)
    if teacher_size != batch_size:
        problems.append(f"image size {teacher_size} (the student's images are {batch_size})")
    for key in ("mean", "std"):
        theirs = tuple(float(v) for v in getattr(teacher_preprocess, key))
        ours = tuple(float(v) for v in getattr(student_preprocess, key))
        if theirs != ours:
            problems.append(f"image {key} {theirs} (the student's images are normalised with {ours})")
    t_text, s_text = teacher.cfg.text_cfg, student.cfg.text_cfg
    if teacher.context_length != student.context_length:
        problems.append(f"context length {teacher.context_length} (the student's tokens are {student.context_length} long)")
    tokenizer = ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs")
    theirs_tok, ours_tok = ({k: getattr(t, k) for k in tokenizer} for t in (t_text, s_text))
    if theirs_tok != ours_tok:
        problems.append(f"tokenizer {theirs_tok} (the student's is {ours_tok}; null name: CLIP's BPE)")
    elif t_text.vocab_size < s_text.vocab_size:
        problems.append(f"vocabulary of {t_text.vocab_size} tokens (the student's token ids go up to {s_text.vocab_size - 1})")
    return problems


def _describe(settings: TeacherSettings) -> str:
    given = {k: v for k, v in (("name", settings.name), ("pretrained", settings.pretrained)) if v is not None}
    if settings.config is not None:
        given["config"] = "{...}"
    return ", ".join(f"{k}={v}" for k, v in given.items())


def build_teacher(settings: TeacherSettings, student: nn.Module, student_preprocess: PreprocessConfig,
                  precision: str = "fp32", device: Union[str, torch.device] = "cpu") -> Teacher:
    """The teacher ``settings`` name, checked against the student and frozen on ``device``.

    Names resolve as ``model.*`` does (:func:`clipforge.train.loop.model_source`: registered names,
    JSON files, inline configs, ``hf-hub:``/``local-dir:``); with neither name nor config the
    architecture is inferred from the ``pretrained`` checkpoint file. Any problem is a ValueError
    that starts with ``loss.teacher``.
    """
    from .loop import model_source  # the student's resolver (loop imports this module, so not at the top)

    where = f"loss.teacher ({_describe(settings)})"
    if student.cfg.model_kind == "coca":
        raise ValueError(f"{where}: distillation into a CoCa model is not supported (nor in OpenCLIP): its "
                         "captioning loss has no teacher target; use loss.kind=auto")
    source = model_source(settings) if settings.name is not None or settings.config is not None else None
    carries_weights = isinstance(source, str) and parse_model_name(source)[0] is not None
    if settings.pretrained is None and not carries_weights:
        raise ValueError(f"{where}: loss.teacher.pretrained is required (a tag such as openai, or a checkpoint "
                         "file): a teacher without weights has nothing to teach")
    with torch.random.fork_rng(devices=[]):  # the teacher's throwaway random init leaves the run's streams alone
        try:
            model = create_model(source, pretrained=settings.pretrained)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: {e}") from e
    if model.cfg.model_kind == "coca":
        raise ValueError(f"{where}: a CoCa teacher is not supported (nor in OpenCLIP); distill from a CLIP model")
    problems = incompatibilities(model, preprocess_config(model), student, student_preprocess)
    if problems:
        raise ValueError(f"{where} cannot score the student's batches, which it is fed as in OpenCLIP: it has "
                         + "; ".join(problems) + ". Pick a teacher made for the student's preprocessing and "
                         "tokenizer (or a student made for the teacher's)")
    return Teacher(model, precision, device)


__all__ = ["Teacher", "TeacherOutput", "build_teacher", "incompatibilities"]
