"""Typed training settings: small documented dataclasses, read by jsonargparse from YAML and options.

A run is fully described by one :class:`TrainConfig`; it is saved as ``config.yaml`` in the run
folder and inside every checkpoint, so a resumed run rebuilds exactly what it was. jsonargparse
(what litgpt uses) does the typing: one parser, :func:`config_parser`, reads a YAML file
(``--config run.yaml``), ``--section.key value`` options on top of it and, as ``clipforge train``
always has, ``section.key=value`` overrides; the attribute docstrings below are its help. What is
ours is the error quality: an unknown key names its dotted path and the known keys, a mistyped value
its path and the expected type, and a ``__post_init__`` check the section it failed in.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from ..atomic import write_text
from ..data.loader import DataConfig
from ..data.synthetic import ShapesConfig
from ..precision import AUTO, PRECISIONS
from ..transforms import AugmentationConfig

SCHEDULES = ("cosine", "const", "const-cooldown")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
LOSSES = ("auto", "clip", "siglip", "coca", "distill")


@dataclass
class ModelSettings:
    """The model to train and what of it is trained."""

    name: Optional[str] = "ViT-B-32"
    """registered architecture, hf-hub:/local-dir: name, or a model JSON file"""
    config: Optional[Dict[str, Any]] = None
    """inline OpenCLIP-style model config; replaces name's"""
    pretrained: Optional[str] = None
    """tag or checkpoint file to fine-tune from; null trains from scratch"""
    grad_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute"""
    patch_dropout: Optional[float] = None
    """FLIP-style image-token dropout while training (ViT towers); null keeps the model config's"""
    lock_image: bool = False
    """LiT: freeze the image tower ..."""
    lock_image_unlocked_groups: int = 0
    """... except its last N layer groups"""
    lock_text: bool = False
    """freeze the text tower ..."""
    lock_text_unlocked_layers: int = 0
    """... except its last N layers"""


@dataclass
class OptimSettings:
    """AdamW and the learning-rate schedule (OpenCLIP's defaults)."""

    lr: float = 5e-4
    """peak learning rate, reached after warmup"""
    weight_decay: float = 0.2
    """matrices only: never biases, norms, embeddings or the logit scale/bias"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.98
    """AdamW beta2"""
    eps: float = 1e-6
    """AdamW epsilon"""
    warmup_steps: int = 1000
    """linear warmup from 0 to lr over this many optimizer steps"""
    schedule: str = "cosine"
    """cosine | const | const-cooldown"""
    cooldown_steps: int = 0
    """const-cooldown: final steps decaying to lr_end"""
    cooldown_power: float = 1.0
    """const-cooldown: shape of the decay; 1 is linear"""
    lr_end: float = 0.0
    """learning rate at the end of the cooldown"""
    grad_clip_norm: Optional[float] = None
    """clip the global gradient norm to this; null: no clipping"""
    implementation: str = "auto"
    """AdamW kernel: auto (fused on CUDA and, from torch 2.4, on the CPU; foreach elsewhere and for FSDP2's sharded parameters) | fused | foreach | for-loop"""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.implementation not in OPTIMIZER_IMPLEMENTATIONS:
            raise ValueError(f"optim.implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, "
                             f"got {self.implementation!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError("optim.lr must be > 0, warmup_steps and cooldown_steps >= 0")


@dataclass
class TeacherSettings:
    """The frozen model a ``loss.kind=distill`` run learns from (OpenCLIP's --distill-model/--distill-pretrained).

    Named as ``model`` is: an architecture with a tag or a weights file, a ``local-dir:`` / ``hf-hub:``
    directory (e.g. another run's ``final``), or just a checkpoint file whose architecture is inferred.
    As in OpenCLIP the teacher sees the student's batches, so it must share their image size,
    normalisation, tokenizer and context length (checked when the run starts).
    """

    name: Optional[str] = None
    """registered architecture, hf-hub:/local-dir: name, or a model JSON file; null: inferred from pretrained"""
    config: Optional[Dict[str, Any]] = None
    """inline OpenCLIP-style model config; replaces name's"""
    pretrained: Optional[str] = None
    """tag or checkpoint file of the teacher's weights"""

    def given(self) -> bool:
        return self.name is not None or self.config is not None or self.pretrained is not None


@dataclass
class LossSettings:
    """The contrastive loss; by default the one the model was made for.

    Each rank scores its own rows against gathered features, with gradients through the gather:
    the same gradient as one big batch, with O(B_local * B_global) memory (OpenCLIP's recommended flags).
    """

    kind: str = "auto"
    """auto: the loss follows the model (CoCa loss for a CoCa, sigmoid for a model with a logit bias, i.e. SigLIP, else InfoNCE) | coca | clip (InfoNCE) | siglip (sigmoid; the model needs init_logit_bias)"""
    local_loss: bool = True
    """InfoNCE: score this rank's rows only, against the gathered features"""
    gather_with_grad: bool = True
    """InfoNCE: gradients flow through the feature gather"""
    chunk_size: Optional[int] = None
    """memory-bounded exact InfoNCE in row blocks of this size; null: one block"""
    siglip_dist_impl: str = "bidir"
    """sigmoid loss across ranks: how features travel between them (OpenCLIP's dist_impl)"""
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    """distill: the frozen teacher whose logits are the student's soft targets"""

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"loss.kind must be one of {LOSSES}, got {self.kind!r}")
        if self.kind == "distill":
            if not self.teacher.given():
                raise ValueError("loss.kind=distill needs a teacher: set loss.teacher.name and loss.teacher.pretrained "
                                 "(e.g. ViT-B-32 and openai), or loss.teacher.pretrained to a checkpoint file")
            if self.chunk_size is not None:
                raise ValueError("loss.chunk_size does not apply to loss.kind=distill: the teacher's soft targets "
                                 "need whole rows of logits; unset chunk_size")
        elif self.teacher.given():
            raise ValueError(f"loss.teacher is set but loss.kind={self.kind}: a teacher is only used by "
                             "loss.kind=distill")


@dataclass
class ZeroShotSettings:
    """Zero-shot classification during training (OpenCLIP's --imagenet-val), and a guard against forgetting.

    Accuracy is measured before the first update (step 0) and then on this schedule; each row also
    logs the drop since step 0 (``zeroshot_acc1_drop``: step-0 acc1 minus now, in accuracy units).
    """

    data: Optional[str] = None
    """ImageFolder (root/<class>/<image>) or a filepath,label CSV/TSV; null: no zero-shot validation"""
    classnames: Optional[Union[str, List[str]]] = None
    """a list, a JSON file ({"classes": [...], "templates": [...]}) or a text file (one per line); null: folder names"""
    templates: Optional[Union[str, List[str]]] = None
    """a list, a JSON/text file, or a built-in set (imagenet1k, imagenet1k_simple, cifar10, cifar100); null: the classnames JSON's, else OpenAI's 80 ImageNet templates"""
    batch_size: int = 256
    """images per zero-shot batch"""
    max_images: Optional[int] = None
    """evaluate a fixed random subset of this many images (the same at every validation); null: all"""
    every_n_steps: Optional[int] = None
    """zero-shot every N optimizer steps; null: only by epochs"""
    every_n_epochs: Optional[int] = 1
    """zero-shot every N epochs; null: only by steps"""
    warn_drop: Optional[float] = None
    """warn when acc1 has fallen this much below step 0 (0.05: five points); null: never"""
    stop_drop: Optional[float] = None
    """stop cleanly (checkpoint and final model saved) when acc1 has fallen this much below step 0; null: never"""
    workers: int = 0
    """data-loading processes for zero-shot validation"""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.max_images is not None and self.max_images < 1):
            raise ValueError(f"batch_size and max_images must be >= 1, got {self.batch_size} and {self.max_images}")
        for name in ("every_n_steps", "every_n_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("warn_drop", "stop_drop"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is an accuracy drop in [0, 1] (0.05 = five points), got {value}")
            if value is not None and self.data is None:
                raise ValueError(f"{name} needs data (the ImageFolder to measure zero-shot accuracy on)")


@dataclass
class ValSettings:
    """Retrieval validation during training, and zero-shot classification (``zeroshot``)."""

    data: Optional[str] = None
    """CSV/TSV, COCO captions JSON or JSONL with several captions per image; null: no validation"""
    kind: str = "csv"
    """csv | coco | jsonl"""
    img_key: str = "filepath"
    """csv: the image path column"""
    caption_key: str = "title"
    """csv: the caption column"""
    batch_size: int = 256
    """images per validation batch"""
    every_n_steps: Optional[int] = None
    """validate every N optimizer steps; null: only by epochs"""
    every_n_epochs: Optional[int] = 1
    """validate every N epochs; null: only by steps"""
    workers: int = 0
    """data-loading processes for validation"""
    zeroshot: ZeroShotSettings = field(default_factory=ZeroShotSettings)
    """zero-shot classification on an ImageFolder, with its own schedule, and the forgetting guard"""


@dataclass
class TrainConfig:
    """Everything a training run does; saved as config.yaml in the run folder and in every checkpoint."""

    model: ModelSettings = field(default_factory=ModelSettings)
    """the architecture, its starting weights and what of it is trained"""
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="synthetic"))
    """the training data"""
    aug: AugmentationConfig = field(default_factory=AugmentationConfig)
    """train-time image augmentation (OpenCLIP's AugmentationCfg)"""
    optim: OptimSettings = field(default_factory=OptimSettings)
    """AdamW and the learning-rate schedule"""
    loss: LossSettings = field(default_factory=LossSettings)
    """the contrastive loss"""
    val: ValSettings = field(default_factory=ValSettings)
    """retrieval validation during training"""

    epochs: int = 1
    """passes over the training data"""
    max_steps: Optional[int] = None
    """stop after this many optimizer steps (the schedule ends here too)"""
    batch_size: int = 64
    """per rank and per micro-batch"""
    accum_freq: int = 1
    """GradCache: one optimizer step on accum_freq micro-batches = one batch that large"""
    precision: str = "auto"
    """auto (bf16 where the device computes bf16 in hardware, else fp32; the log says which and why) | fp32 |
    bf16 (autocast, CPU or GPU) | fp16 (autocast + grad scaler, GPU)"""
    device: str = "auto"
    """auto: this rank's GPU if there is one, else CPU"""
    distributed: str = "ddp"
    """ddp | fsdp (FSDP2 fully_shard per residual block), used when WORLD_SIZE > 1"""
    seed: int = 0
    """seed of the initial weights, the data order and the augmentation"""
    workers: int = 2
    """data-loading processes per rank"""
    threads: Optional[int] = None
    """torch intra-op threads per rank; null leaves torch's default"""
    compile: bool = False
    """torch.compile the training forward/backward (OpenCLIP's --torchcompile); the first steps pay the compile time"""

    output_dir: str = "runs"
    """parent folder of run folders"""
    name: str = "train"
    """the run folder is output_dir/name"""
    resume: Optional[str] = None
    """latest (this run's newest checkpoint that loads; none: start fresh, with a warning), must (the same,
    but none is an error) or a checkpoint path"""
    save_every_n_steps: Optional[int] = None
    """also checkpoint every N optimizer steps"""
    save_every_n_epochs: int = 1
    """checkpoint every N epochs"""
    keep_last: int = 2
    """checkpoints kept (the newest; a kill never leaves more); the final model is always kept"""
    log_every_n_steps: int = 10
    """metrics.jsonl row every N optimizer steps"""
    tensorboard: bool = False
    """also log to TensorBoard in the run folder"""
    wandb: bool = False
    """also log to Weights & Biases"""
    wandb_project: str = "clipforge"
    """Weights & Biases project"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        if self.precision != AUTO and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {[AUTO, *PRECISIONS]}, got {self.precision!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        for name in ("epochs", "batch_size", "accum_freq", "keep_last", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """A config from a nested dict (what :meth:`to_dict` wrote); missing keys take their defaults."""
        given: Dict[str, Any] = {}
        _check_keys(d, TrainConfig, "config", given)
        parser = config_parser()
        try:
            ns = parser.parse_object(d)
        except ArgumentError as e:
            raise _typed_error(e, given) from None
        return _build(TrainConfig, ns, "config")


def _plain(obj: Any) -> Any:
    """Tuples as lists, so the dict round-trips through YAML and ``torch.load(weights_only=True)``."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_parser(prog: Optional[str] = None, description: Optional[str] = None) -> ArgumentParser:
    """The jsonargparse parser of a :class:`TrainConfig`: ``--config FILE``, ``--section.key VALUE``, ``--print_config``.

    Errors raise (``exit_on_error=False``); :func:`parse_config` turns them into ValueErrors naming the key.
    """
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML file of settings; options after it override it")
    parser.add_class_arguments(TrainConfig, nested_key=None)
    return parser


_OVERRIDE = re.compile(r"([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)=(.*)", re.DOTALL)
_OPTION = re.compile(r"--([A-Za-z_][\w.-]*)(=.*)?", re.DOTALL)
_FLAGS = ("print_config", "help")  # the parser's own options without a separate value


def parse_config(args: Sequence[str], parser: Optional[ArgumentParser] = None) -> TrainConfig:
    """A config from command-line arguments: ``--config run.yaml``, ``--optim.lr 1e-4``, ``optim.lr=1e-4``.

    Arguments apply in order, later ones over earlier ones. ``key.path=value`` (``clipforge train``'s
    original override syntax; ``-`` in a key reads as ``_``) is ``--key.path=value``. ``--help`` and
    ``--print_config`` print and exit, as argparse does.
    """
    parser = parser or config_parser()
    tokens, given = _translate(list(args))
    try:
        ns = parser.parse_args(tokens)
    except ArgumentError as e:
        raise _typed_error(e, given) from None
    return _build(TrainConfig, ns, "config")


def _translate(args: List[str]) -> Tuple[List[str], Dict[str, Any]]:
    """jsonargparse's arguments for ``args`` (overrides as options), and each value given by its dotted key.

    Every key is checked on the way, those in ``--config`` files too, so an unknown one fails here by name.
    """
    tokens: List[str] = []
    given: Dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-"):
            override = _OVERRIDE.fullmatch(token)
            if override is None:
                raise ValueError(f"override {token!r}: expected key.path=value")
            key, value = override.group(1).replace("-", "_"), override.group(2)
            _check_path(key)
            given[key] = value
            tokens.append(f"--{key}={value}")
            continue
        tokens.append(token)
        option = _OPTION.fullmatch(token)
        if option is None or option.group(1) in _FLAGS:  # -h, --help, --print_config[=flags]
            continue
        key, value = option.group(1), option.group(2)[1:] if option.group(2) else None
        if value is None and i < len(args):  # --key VALUE: the next argument is the value, whatever it looks like
            value = args[i]
            tokens.append(value)
            i += 1
        if key == "config":
            if value is not None:
                _check_keys(_read_yaml(value), TrainConfig, "config", given)
        else:
            _check_path(key)
            given[key] = value
    return tokens, given


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The YAML file (if any) with ``key.path=value`` overrides applied on top, validated into a :class:`TrainConfig`."""
    return parse_config((["--config", str(path)] if path is not None else []) + list(overrides))


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    """``cfg`` as YAML at ``path``, written atomically; :func:`load_config` reads it back equal."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# -- error quality: the dataclasses are the schema, jsonargparse the typing ----------------------------
@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> Dict[str, Any]:
    """Field name -> its type, for the fields of a settings dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section(annotation: Any) -> Optional[type]:
    """The dataclass of a nested section, None for a plain setting."""
    return annotation if dataclasses.is_dataclass(annotation) else None


def _read_yaml(path: str) -> Dict[str, Any]:
    try:
        d = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the top level must be a mapping of settings")
    return d


def _unknown(where: str, keys: Sequence[str], cls: type) -> ValueError:
    return ValueError(f"{where}: unknown key(s) {sorted(keys)}; known keys: {sorted(_fields(cls))}")


def _check_keys(d: Any, cls: type, where: str, given: Dict[str, Any]) -> None:
    """Every key of the nested dict ``d`` is a field of ``cls``; records leaf values in ``given`` by dotted key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = _fields(cls)
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise _unknown(where, unknown, cls)
    prefix = where.partition(".")[2]
    for key, value in d.items():
        path = f"{prefix}.{key}" if prefix else key
        sub = _section(fields[key])
        if sub is not None:
            _check_keys(value, sub, f"{where}.{key}", given)
        else:
            given[path] = value


def _check_path(key: str) -> None:
    """``key`` (``optim.lr``) names a setting or a section of :class:`TrainConfig`."""
    cls: Optional[type] = TrainConfig
    where = "config"
    for part in key.split("."):
        if cls is None:
            raise ValueError(f"{where} is a setting, not a section: no {part!r} in it")
        fields = _fields(cls)
        if part not in fields:
            raise _unknown(where, [part], cls)
        cls, where = _section(fields[part]), f"{where}.{part}"


def _type_at(key: str) -> Any:
    cls: Any = TrainConfig
    for part in key.split("."):
        cls = _fields(cls)[part]
    return cls


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(annotation: Any) -> str:
    if dataclasses.is_dataclass(annotation):
        return "a mapping of its settings"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in rest) + " (or null)"
    return _NAMES.get(annotation) or str(annotation).replace("typing.", "")


def _typed_error(error: ArgumentError, given: Dict[str, Any]) -> ValueError:
    """jsonargparse's message for a value that does not fit, as ``config.KEY: expected TYPE, got VALUE``."""
    message = str(error)
    match = re.search(r'Parser key "([^"]+)"', message)
    if match is None:
        return ValueError(f"config: {message}")
    key = match.group(1)
    try:
        expected = _describe(_type_at(key))
    except KeyError:
        return ValueError(f"config.{key}: {message}")
    got = f", got {given[key]!r}" if key in given else ""
    return ValueError(f"config.{key}: expected {expected}{got}")


def _build(cls: type, ns: Union[Namespace, Any], where: str) -> Any:
    """The dataclass from jsonargparse's typed namespace; a ``__post_init__`` error names its section."""
    if not isinstance(ns, Namespace):
        raise ValueError(f"{where}: expected a mapping, got {ns!r}")
    kwargs = {}
    for name, annotation in _fields(cls).items():
        sub = _section(annotation)
        kwargs[name] = _build(sub, ns[name], f"{where}.{name}") if sub is not None else ns[name]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


__all__ = ["TrainConfig", "ModelSettings", "OptimSettings", "LossSettings", "TeacherSettings", "ValSettings", "ZeroShotSettings", "DataConfig",
           "AugmentationConfig", "ShapesConfig", "config_parser", "parse_config", "load_config", "save_config"]
