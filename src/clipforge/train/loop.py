"""The training loop, top to bottom: set the lr, forward/backward, clip, step, log, validate, save."""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from ..atomic import write_text
from ..checkpoints.io import CheckpointError
from ..checkpoints.load import load_state_dict_into
from ..checkpoints.openclip_hub import save_openclip_dir
from ..config import CLIPConfig, PreprocessConfig
from ..data.loader import build_train_loader
from ..data.robust import DataError
from ..factory import create_model, get_tokenizer, preprocess_config
from ..loss import ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss
from ..models import build_model as build_architecture
from ..models.clip import CLIP
from ..precision import resolve_precision
from ..transforms import image_transform
from .checkpoint import (find_resume, gather_rng_states, list_checkpoints, load_optimizer_state, model_state,
                         optimizer_state, prepare_checkpoint_dir, save_checkpoint, set_rng_state)
from .config import LossSettings, ModelSettings, TeacherSettings, TrainConfig, save_config
from .distributed import (DistInfo, all_reduce_mean, barrier, clip_grad_norm, describe_sharding, init_distributed,
                          replicated_params, shutdown_distributed, sync_replicated_grads, unwrap, wrap_model)
from .logger import SKIPPED_FILE, MetricsLogger, plot_metrics
from .optim import build_optimizer, lr_at, set_lr
from .step import forward_backward
from .teacher import build_teacher
from .validate import accuracy_drops, build_val_loader, build_zeroshot_task, validate, zeroshot_metrics

MAX_LOGIT_SCALE = math.log(100)  # OpenCLIP clamps the learned temperature at 100


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_source(cfg: ModelSettings):
    """What ``create_model`` and ``get_tokenizer`` take: an inline config, a JSON file's config, or a name."""
    if cfg.config is not None:
        return CLIPConfig.from_dict(cfg.config)
    if cfg.name and cfg.name.endswith(".json") and Path(cfg.name).is_file():
        return CLIPConfig.from_dict(json.loads(Path(cfg.name).read_text()))
    if cfg.name is None:
        raise ValueError("model.name or model.config is required")
    return cfg.name


def build_model(cfg: ModelSettings, resumed: Optional[Dict[str, Any]] = None, source: str = "checkpoint") -> CLIP:
    """The model with its starting weights, locked towers and checkpointing applied.

    Fresh runs build what the settings name (fetching ``pretrained``); a resumed run builds the
    architecture its checkpoint records (``model_config``) and loads its weights, fetching nothing;
    weights that do not fit that architecture raise naming ``source`` and the keys and shapes.
    Patch dropout is set on the config before the model is built, so it is part of ``model.cfg``.
    """
    overrides = {"vision_cfg": {"patch_dropout": cfg.patch_dropout}} if cfg.patch_dropout is not None else None
    if resumed is not None:
        if not resumed.get("model_config"):
            raise CheckpointError(f"{source}: no model_config recorded; not a clipforge training checkpoint")
        model = build_architecture(CLIPConfig.from_dict(resumed["model_config"]))
        load_state_dict_into(model, resumed["state_dict"], source=source)
        model.preprocess_cfg = PreprocessConfig.from_dict(resumed["preprocess_config"]) \
            if resumed.get("preprocess_config") else None
    else:
        model = create_model(model_source(cfg), pretrained=cfg.pretrained, cfg_overrides=overrides)
    if cfg.patch_dropout is not None and model.cfg.vision_cfg.kind != "vit":
        raise ValueError(f"model.patch_dropout needs a ViT image tower, this model's is {model.cfg.vision_cfg.kind!r}")
    if cfg.lock_image:
        model.lock_image_tower(cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        model.lock_text_tower(cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.train()


# Settings that decide which model a run trains; a resumed run must not change them.
_MODEL_DEFINING = ("name", "config", "pretrained", "patch_dropout")


def resume_mismatches(saved_config: Dict[str, Any], cfg: TrainConfig) -> List[str]:
    """``model.*`` settings where ``cfg`` disagrees with the run config saved in a checkpoint."""
    saved = (saved_config or {}).get("model", {})
    current = cfg.to_dict()["model"]
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
            for k in _MODEL_DEFINING if saved.get(k) != current.get(k)] + _teacher_mismatch(saved_config, cfg)


def _teacher_mismatch(saved_config: Dict[str, Any], cfg: TrainConfig) -> List[str]:
    """``loss.teacher`` when it differs from the checkpoint's: a resumed distillation keeps its teacher."""
    default = dataclasses.asdict(TeacherSettings())
    saved = ((saved_config or {}).get("loss") or {}).get("teacher") or default
    current = cfg.to_dict()["loss"]["teacher"]
    return [] if saved == current else [f"loss.teacher: checkpoint {saved!r}, config {current!r}"]


def resolve_loss_kind(requested: Optional[str], model: CLIP) -> Tuple[str, Optional[str]]:
    """(loss kind, a warning or None): the loss follows the model unless the settings name one.

    A model with a logit bias (``init_logit_bias``: SigLIP) trains with the sigmoid loss, any other with
    InfoNCE, a captioning model (CoCa) with the CoCa loss (InfoNCE + captioning cross-entropy). Naming
    the other contrastive loss explicitly is allowed but said loudly; SigLIP's loss without a bias
    parameter cannot work and is refused, as is any other loss for a CoCa.
    """
    if model.cfg.model_kind == "coca":
        if requested == "distill":
            raise ValueError("loss.kind=distill: distillation into a CoCa model is not supported (nor in OpenCLIP): "
                             "its captioning loss has no teacher target; use loss.kind=auto")
        if requested not in (None, "auto", "coca"):
            raise ValueError(f"loss.kind={requested}: a CoCa model trains with the CoCa loss "
                             "(contrastive + captioning); use loss.kind=auto")
        return "coca", None
    natural = "siglip" if model.logit_bias is not None else "clip"
    if requested in (None, "auto"):
        return natural, None
    if requested == "siglip" and model.logit_bias is None:
        raise ValueError("loss.kind=siglip needs a model with a logit bias (init_logit_bias in its config); "
                         "this model has none: use loss.kind=auto (InfoNCE) or a SigLIP architecture")
    if natural == "siglip" and requested != natural:
        return requested, (f"loss.kind={requested} on a model with a logit bias (SigLIP, init_logit_bias="
                           f"{model.cfg.init_logit_bias}): training with InfoNCE, which ignores the bias; "
                           f"loss.kind=auto would use the sigmoid loss this model was trained with")
    return requested, None


def build_loss(kind: str, cfg: LossSettings, info: DistInfo) -> torch.nn.Module:
    if kind == "distill":
        return DistillClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                               rank=info.rank, world_size=info.world_size)
    if kind == "coca":
        return CoCaLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                        rank=info.rank, world_size=info.world_size, chunk_size=cfg.chunk_size)
    if kind == "siglip":
        return SigLipLoss(rank=info.rank, world_size=info.world_size, dist_impl=cfg.siglip_dist_impl)
    return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                    rank=info.rank, world_size=info.world_size, chunk_size=cfg.chunk_size)


def _micro_batches(loader, accum: int, consumed: List[int]) -> Iterator[List]:
    """Groups of ``accum`` non-empty batches; ``consumed[0]`` counts raw batches taken (empty ones too)."""
    group = []
    for batch in loader.batches():
        consumed[0] += 1
        if batch.images.shape[0] == 0:
            continue  # every sample of this batch was broken; counted in loader.stats
        group.append((batch.images, batch.texts))
        if len(group) == accum:
            yield group
            group = []


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training as configured; returns the run summary (also in ``summary.json``)."""
    info = init_distributed(cfg.device)
    try:
        return Trainer(cfg, info).run()
    finally:
        shutdown_distributed()


class Trainer:
    """State of one run; :meth:`run` is the loop. Split only so saving and validation read as one line each."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.precision, self.precision_reason = resolve_precision(cfg.precision, info.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.precision == "fp16" and info.device.type != "cuda":
            raise ValueError("precision fp16 needs a GPU (a grad scaler over fp16 autocast); use bf16 on the CPU")
        self.run_dir = cfg.run_dir
        if info.is_main:  # what a killed run left: temporaries, a checkpoint beyond keep_last
            prepare_checkpoint_dir(self.run_dir, cfg.keep_last)
        barrier(info)
        with warnings.catch_warnings():
            if not info.is_main:
                warnings.simplefilter("ignore")  # rank 0 says it once
            point = find_resume(cfg.resume, self.run_dir)
        resume_path, resumed = point.path, point.state
        if resumed is not None:
            mismatches = resume_mismatches(resumed.get("config"), cfg)
            if mismatches:
                raise ValueError(f"resume from {resume_path}: the config disagrees with the checkpoint on "
                                 + "; ".join(mismatches) + ". A resumed run continues the model its checkpoint "
                                 "records: restore these settings, or start a new run (another name/output_dir)")
        seed_everything(cfg.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
        model = build_model(cfg.model, resumed, source=str(resume_path))
        seed_everything(cfg.seed + info.rank)  # then per-rank streams for augmentation and patch dropout
        self.model = model.to(info.device)
        self.tokenizer = get_tokenizer(model.cfg if resumed is not None else model_source(cfg.model))
        pp = preprocess_config(model)
        self.preprocess = pp
        data_cfg = cfg.data
        if data_cfg.kind == "synthetic":  # random tensors shaped for this model
            data_cfg = dataclasses.replace(data_cfg, image_size=model.cfg.vision_cfg.image_size,
                                           context_length=model.context_length,
                                           vocab_size=model.cfg.text_cfg.vocab_size)
        self.loader = build_train_loader(data_cfg, image_transform(pp, True, cfg.aug), self.tokenizer, cfg.batch_size,
                                         rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                                         workers=cfg.workers, pin_memory=info.device.type == "cuda")
        self.steps_per_epoch = self.loader.num_batches // cfg.accum_freq
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {self.loader.num_batches} batches of {cfg.batch_size} per rank, "
                             f"fewer than accum_freq={cfg.accum_freq}: use less data per step or more data")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        self.wrapped = wrap_model(self.model, cfg.distributed, info)
        if cfg.compile:  # the parameters stay self.model's: checkpoints, validation and export are unchanged
            self.wrapped = torch.compile(self.wrapped)
        self.replicated = replicated_params(self.model, cfg.distributed, info)
        if cfg.distributed == "fsdp" and info.distributed and info.is_main:
            tqdm.write(describe_sharding(self.model, self.replicated))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.loss_kind, loss_warning = resolve_loss_kind(cfg.loss.kind, self.model)
        self.notes: List[str] = point.notes + ([loss_warning] if loss_warning else [])
        if loss_warning and info.is_main:
            warnings.warn(loss_warning, stacklevel=2)
        self.loss_fn = build_loss(self.loss_kind, cfg.loss, info)
        # distill: the frozen teacher, outside the model, its optimizer and its checkpoints (train/teacher.py)
        self.teacher = build_teacher(cfg.loss.teacher, self.model, pp, self.precision, info.device) \
            if self.loss_kind == "distill" else None
        self.step = self.epoch = self.batch_in_epoch = 0
        if resumed is not None:
            self._restore(resumed, resume_path)
        self.val_loader = build_val_loader(cfg.val, image_transform(pp, False)) if cfg.val.data else None
        zs = cfg.val.zeroshot
        self.zeroshot = build_zeroshot_task(zs.data, image_transform(pp, False), zs.classnames, zs.templates,
                                            zs.batch_size, zs.max_images, zs.workers, "val.zeroshot") \
            if zs.data else None
        # zero-shot metrics before any update: what the forgetting guard compares with (kept in checkpoints)
        self.zeroshot_baseline: Optional[Dict[str, float]] = (resumed or {}).get("zeroshot_baseline")
        self.logger = None
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.logger = MetricsLogger(self.run_dir, cfg.tensorboard, cfg.wandb, cfg.wandb_project,
                                        cfg.to_dict(), resume_step=self.step if resumed is not None else None)
            if cfg.progress or cfg.precision != self.precision:  # also in summary.json
                tqdm.write(f"precision {self.precision} ({self.precision_reason})")
            if point.notes:
                self.logger.log({"kind": "resume", "step": self.step, "checkpoint": str(resume_path) if resume_path else None,
                                 "notes": point.notes})
            # Every skipped sample (file, row, reason), not only the first few: skipped.jsonl.
            self.loader.stats.sink = lambda samples: self.logger.log_skipped(self.step + 1, samples)
        self.last_saved_step: Optional[int] = self.step if resumed is not None else None
        self.last_val: Dict[str, float] = {}
        self.last_val_step: Optional[int] = None  # on every rank, so all ranks take the same branches
        self.last_zeroshot: Dict[str, float] = {}
        self.last_zeroshot_step: Optional[int] = None
        self.stop_reason: Optional[str] = None  # set by the forgetting guard (val.zeroshot.stop_drop)

    def _restore(self, state: Dict[str, Any], path: Path) -> None:
        try:
            load_optimizer_state(self.optimizer, state["optimizer"])
        except (ValueError, RuntimeError, KeyError, IndexError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer ({e}); were "
                                  f"model.lock_* or optim settings changed since it was written?") from e
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch"]
        rng = state.get("rng") or []
        if len(rng) == self.info.world_size:
            set_rng_state(rng[self.info.rank])
        stats = state.get("data_stats") or {}
        self.loader.stats.seen = stats.get("seen", 0)
        self.loader.stats.skipped = stats.get("skipped", 0)
        self.loader.stats.reasons = dict(stats.get("reasons", {}))

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        accum = cfg.accum_freq
        start_time, start_step = time.perf_counter(), self.step
        samples_done = 0
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and info.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        if self.zeroshot is not None and self.zeroshot_baseline is None:
            self._zero_shot()  # step 0 (or the first step of a resumed run that had no baseline)
        while self.step < self.total_steps and self.stop_reason is None:
            self.loader.set_epoch(self.epoch, self.batch_in_epoch)
            consumed = [self.batch_in_epoch]
            epoch_end = self.steps_per_epoch * accum
            window_start, window_samples = time.perf_counter(), 0
            reached_total, epoch_start_step = False, self.step
            for micro in _micro_batches(self.loader, accum, consumed):
                lr = lr_at(self.step, cfg.optim, self.total_steps)
                set_lr(self.optimizer, lr)
                self.optimizer.zero_grad(set_to_none=True)
                loss = forward_backward(self.wrapped, self.loss_fn, micro, self.precision, info.device, self._backward,
                                        teacher=self.teacher)
                loss = all_reduce_mean(loss.float(), info)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {self.step + 1} (epoch {self.epoch}, lr {lr:.3g}); stopped "
                        f"before the optimizer step. Last good checkpoint: "
                        f"{self._last_checkpoint_text()}. Lower optim.lr, add optim.grad_clip_norm, or use fp32.")
                self._optimizer_step()
                self.step += 1
                self.batch_in_epoch = consumed[0]
                n = sum(img.shape[0] for img, _ in micro) * info.world_size
                samples_done += n
                window_samples += n
                bar.update(1)
                if self.step % cfg.log_every_n_steps == 0 or self.step == self.total_steps:
                    rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    self._log_train(loss.item(), lr, rate)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                    window_start, window_samples = time.perf_counter(), 0
                if cfg.val.every_n_steps and self.step % cfg.val.every_n_steps == 0:
                    self._validate()
                if cfg.val.zeroshot.every_n_steps and self.step % cfg.val.zeroshot.every_n_steps == 0:
                    self._zero_shot()
                if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0:
                    self._save()
                if consumed[0] >= epoch_end:
                    break  # the ragged tail of fewer than accum_freq batches is dropped
                if self.step >= self.total_steps or self.stop_reason is not None:
                    reached_total = True  # (a guard's stop, too, leaves the epoch open: it resumes mid-epoch)
                    break
            if self.step == epoch_start_step and not reached_total:
                raise DataError(f"epoch {self.epoch} gave no training batch: {self.loader.stats.summary()}")
            if not reached_total:  # the epoch ran to its end (or its data ran out)
                self.epoch += 1
                self.batch_in_epoch = 0
                if cfg.val.every_n_epochs and self.epoch % cfg.val.every_n_epochs == 0:
                    self._validate()
                if cfg.val.zeroshot.every_n_epochs and self.epoch % cfg.val.zeroshot.every_n_epochs == 0:
                    self._zero_shot()
                if cfg.save_every_n_epochs and self.epoch % cfg.save_every_n_epochs == 0:
                    self._save()
        bar.close()
        if self.last_saved_step != self.step:
            self._save()
        if cfg.val.data and self.last_val_step != self.step:
            self._validate()
        if self.zeroshot is not None and self.last_zeroshot_step != self.step:
            self._zero_shot()
        wall = time.perf_counter() - start_time
        return self._finish(wall, samples_done, self.step - start_step)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        sync_replicated_grads(self.replicated, self.info)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.optim.grad_clip_norm is not None:
            clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            unwrap(self.model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # -- side work: logging, validation, checkpoints ---------------------------------------------------
    def _log_train(self, loss: float, lr: float, samples_per_s: float) -> None:
        if self.logger is None:
            return
        stats = self.loader.stats
        self.logger.log({"kind": "train", "step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                         "logit_scale": unwrap(self.model).logit_scale.exp().item(),
                         "samples_per_s": samples_per_s, "samples_seen": stats.seen,
                         "samples_skipped": stats.skipped})

    def _validate(self) -> None:
        if self.val_loader is None:
            return
        self.last_val_step = self.step
        sharded = self.cfg.distributed == "fsdp" and self.info.distributed
        if self.info.is_main or sharded:  # FSDP2 forward needs every rank; DDP evaluates on rank 0 only
            metrics = validate(unwrap(self.model), self.tokenizer, self.val_loader, self.cfg.val.batch_size,
                               self.loss_kind, self.info.device, progress=False)
            self.last_val = {"step": self.step, **metrics}
            if self.logger is not None:
                self.logger.log({"kind": "val", "step": self.step, "epoch": self.epoch, **metrics})
                tqdm.write(f"step {self.step}: val loss {metrics['val_loss']:.4f}, text→image R@1/5/10 "
                           + "/".join(f"{metrics[f'image_retrieval_recall@{k}']:.3f}" for k in (1, 5, 10)))
                plot_metrics(self.run_dir)  # plots follow validation and the end of the run, not each save
        barrier(self.info)

    def _zero_shot(self) -> None:
        """Zero-shot accuracy now, its drop since step 0, and the forgetting guard's warning or stop."""
        if self.zeroshot is None:
            return
        self.last_zeroshot_step = self.step
        zs = self.cfg.val.zeroshot
        sharded = self.cfg.distributed == "fsdp" and self.info.distributed
        stop = None
        if self.info.is_main or sharded:  # as _validate: FSDP2 forward needs every rank
            metrics = zeroshot_metrics(unwrap(self.model), self.tokenizer, self.zeroshot, self.info.device)
            if self.zeroshot_baseline is None:
                self.zeroshot_baseline = {"step": self.step, **metrics}
            drops = accuracy_drops(self.zeroshot_baseline, metrics)
            self.last_zeroshot = {"step": self.step, **metrics, **drops}
            drop = drops["zeroshot_acc1_drop"]
            since = f"step {self.zeroshot_baseline['step']}"
            text = (f"zero-shot acc1 {metrics['zeroshot_acc1']:.4f} at step {self.step}, "
                    f"{self.zeroshot_baseline['zeroshot_acc1']:.4f} at {since} (drop {drop:+.4f})")
            if zs.stop_drop is not None and drop > zs.stop_drop:
                stop = (f"stopped by the forgetting guard: {text} is more than val.zeroshot.stop_drop="
                        f"{zs.stop_drop}; the checkpoint and final/ hold step {self.step}")
            elif zs.warn_drop is not None and drop > zs.warn_drop and self.info.is_main:
                warnings.warn(f"forgetting: {text} is more than val.zeroshot.warn_drop={zs.warn_drop}", stacklevel=2)
            if self.logger is not None:
                self.logger.log({"kind": "zeroshot", "step": self.step, "epoch": self.epoch, **metrics, **drops,
                                 "baseline_step": self.zeroshot_baseline["step"]})
                tqdm.write(f"step {self.step}: {text}")
                plot_metrics(self.run_dir)
        # every rank stops together: rank 0's decision, shared
        flag = all_reduce_mean(torch.tensor(1.0 if stop else 0.0, device=self.info.device), self.info)
        if flag.item() > 0:
            self.stop_reason = stop or "stopped by the forgetting guard on rank 0 (val.zeroshot.stop_drop)"
            self.notes.append(self.stop_reason)
            if self.logger is not None:
                self.logger.log({"kind": "stop", "step": self.step, "reason": self.stop_reason})
                tqdm.write(self.stop_reason)
        barrier(self.info)

    def _save(self) -> None:
        state = {"state_dict": model_state(self.model), "optimizer": optimizer_state(self.optimizer),
                 "rng": gather_rng_states(self.info.world_size)}
        if self.info.is_main:
            state.update(step=self.step, epoch=self.epoch, batch=self.batch_in_epoch,
                         scaler=self.scaler.state_dict() if self.scaler is not None else None,
                         config=self.cfg.to_dict(), model_config=unwrap(self.model).cfg.to_dict(),
                         preprocess_config=self.preprocess.to_dict(), zeroshot_baseline=self.zeroshot_baseline,
                         world_size=self.info.world_size, data_stats=self.loader.stats.state_dict())
            save_checkpoint(state, self.run_dir, self.cfg.keep_last)
        self.last_saved_step = self.step
        barrier(self.info)

    def _last_checkpoint_text(self) -> str:
        found = list_checkpoints(self.run_dir)
        return str(found[-1]) if found else "none yet"

    def _finish(self, wall: float, samples: int, steps: int) -> Dict[str, Any]:
        summary: Dict[str, Any] = {"steps": self.step, "epochs_completed": self.epoch, "wall_seconds": wall,
                                   "samples_per_s": samples / max(wall, 1e-9), "steps_this_run": steps,
                                   "data": self.loader.stats.state_dict(), "val": self.last_val,
                                   "loss_kind": self.loss_kind, "precision": self.precision,
                                   "precision_reason": self.precision_reason, "notes": self.notes,
                                   "zeroshot": self.last_zeroshot, "stopped": self.stop_reason,
                                   "data_summary": self.loader.stats.summary(), "final": str(self.run_dir / "final")}
        if self.loader.stats.skipped:
            summary["data_summary"] += f" (every skipped sample of rank 0: {self.run_dir / SKIPPED_FILE})"
        state = model_state(self.model) if self.cfg.distributed == "fsdp" and self.info.distributed else None
        if self.info.is_main:
            export = unwrap(self.model)
            if state is not None:
                export = build_architecture(self.model.cfg)
                export.load_state_dict(state)
            save_openclip_dir(export, self.run_dir / "final", preprocess_cfg=self.preprocess)
            plot_metrics(self.run_dir)
            write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if self.logger is not None:
                self.logger.close()
        barrier(self.info)
        return summary

