"""Typed training settings: small documented dataclasses, read from YAML with ``a.b=value`` overrides.

A run is fully described by one :class:`TrainConfig`; it is saved as ``config.yaml`` in the run
folder and inside every checkpoint, so a resumed run rebuilds exactly what it was.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml

from ..data.loader import DataConfig
from ..data.synthetic import ShapesConfig
from ..transforms import AugmentationConfig

SCHEDULES = ("cosine", "const", "const-cooldown")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelSettings:
    name: Optional[str] = "ViT-B-32"  # registered architecture, hf-hub:/local-dir: name, or a model JSON file
    config: Optional[Dict[str, Any]] = None  # inline OpenCLIP-style model config; replaces `name`'s
    pretrained: Optional[str] = None  # tag or checkpoint file to fine-tune from; None trains from scratch
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    patch_dropout: Optional[float] = None  # FLIP-style token dropout while training; None keeps the config's
    lock_image: bool = False  # LiT: freeze the image tower ...
    lock_image_unlocked_groups: int = 0  # ... except its last N layer groups
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0


@dataclass
class OptimSettings:
    lr: float = 5e-4
    weight_decay: float = 0.2  # matrices only: never biases, norms, embeddings or the logit scale/bias
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 1000
    schedule: str = "cosine"  # one of SCHEDULES
    cooldown_steps: int = 0  # const-cooldown: final steps decaying to lr_end
    cooldown_power: float = 1.0  # 1: linear cooldown
    lr_end: float = 0.0
    grad_clip_norm: Optional[float] = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError("optim.lr must be > 0, warmup_steps and cooldown_steps >= 0")


@dataclass
class LossSettings:
    kind: str = "clip"  # "clip" (InfoNCE) or "siglip" (sigmoid; the model needs init_logit_bias)
    # Each rank scores its own rows against gathered features, with gradients through the gather:
    # the same gradient as one big batch, with O(B_local * B_global) memory (OpenCLIP's recommended flags).
    local_loss: bool = True
    gather_with_grad: bool = True
    chunk_size: Optional[int] = None  # memory-bounded exact InfoNCE in row blocks of this size
    siglip_dist_impl: str = "bidir"

    def __post_init__(self) -> None:
        if self.kind not in ("clip", "siglip"):
            raise ValueError(f"loss.kind must be 'clip' or 'siglip', got {self.kind!r}")


@dataclass
class ValSettings:
    data: Optional[str] = None  # CSV/TSV, COCO captions JSON or JSONL with several captions per image
    kind: str = "csv"  # csv | coco | jsonl
    img_key: str = "filepath"
    caption_key: str = "title"
    batch_size: int = 256
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = 1
    workers: int = 0


@dataclass
class TrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="synthetic"))
    aug: AugmentationConfig = field(default_factory=AugmentationConfig)
    optim: OptimSettings = field(default_factory=OptimSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    val: ValSettings = field(default_factory=ValSettings)

    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule ends here too)
    batch_size: int = 64  # per rank and per micro-batch
    accum_freq: int = 1  # GradCache: one optimizer step on accum_freq micro-batches = one batch that large
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or GPU) | fp16 (autocast + grad scaler, GPU)
    device: str = "auto"  # auto: this rank's GPU if there is one, else CPU
    distributed: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per residual block), used when WORLD_SIZE > 1
    seed: int = 0
    workers: int = 2  # data-loading processes per rank
    threads: Optional[int] = None  # torch intra-op threads per rank; None leaves torch's default

    output_dir: str = "runs"
    name: str = "train"  # the run folder is output_dir/name
    resume: Optional[str] = None  # "latest" (this run's newest checkpoint) or a checkpoint path
    save_every_n_steps: Optional[int] = None
    save_every_n_epochs: int = 1
    keep_last: int = 2  # step checkpoints kept; epoch checkpoints and the final model are always kept
    log_every_n_steps: int = 10
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "clipforge"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
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
        return build_dataclass(cls, d, "config")


def _plain(obj: Any) -> Any:
    """Tuples as lists, so the dict round-trips through YAML and ``torch.load(weights_only=True)``."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def build_dataclass(cls: type, d: Dict[str, Any], where: str) -> Any:
    """A dataclass from a nested dict; an unknown key fails naming its dotted path and the known ones."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{where}: {value!r} does not fit {annotation}")
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else build_dataclass(annotation, value, where)
    if origin in (tuple, Sequence, list, List) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args and args[0] is not Ellipsis else Any
        items = [_coerce(inner, v, where) for v in value]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin in (dict, Dict) or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} not one of {args}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(d: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``["optim.lr=1e-4", "data.train_data=x.csv"]`` into the nested dict; values are parsed as YAML."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key.path=value")
        parts = key.strip().lstrip("-").replace("-", "_").split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        value = yaml.safe_load(raw) if raw.strip() else None
        node[parts[-1]] = value
    return d


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The YAML file (if any) with overrides applied on top, validated into a :class:`TrainConfig`."""
    d: Dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: the top level must be a mapping of settings")
    d = apply_overrides(d, overrides)
    return TrainConfig.from_dict(d)


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    from ..checkpoints.io import atomic_write

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


__all__ = ["TrainConfig", "ModelSettings", "OptimSettings", "LossSettings", "ValSettings", "DataConfig",
           "AugmentationConfig", "ShapesConfig", "load_config", "save_config", "apply_overrides"]
