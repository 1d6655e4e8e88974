"""Self-describing training checkpoints: written atomically, read without unpickling code.

A checkpoint holds the model (``state_dict``, OpenCLIP's key, so ``open_clip`` reads it too), the
optimizer and grad-scaler state, the step and data position, the run config, the model config and
every rank's RNG states: enough to continue a killed run as if it had never stopped.

A kill at any moment leaves at most ``keep_last`` complete checkpoints (the oldest is dropped just
before the new one is renamed into place) plus, perhaps, a temporary that the next run removes
(:func:`prepare_checkpoint_dir`). ``resume="latest"`` falls back from a corrupt newest checkpoint
to the newest one that loads, and says which it skipped and why.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_write, cleanup_stale
from ..checkpoints.io import CheckpointError, read_checkpoint, tensor_bytes

CHECKPOINT_DIR = "checkpoints"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _full(t: Any) -> Any:
    """A plain tensor from a (possibly sharded) DTensor; a collective under FSDP2, so every rank calls it."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: _full(v).detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    sd = optimizer.state_dict()
    state = {idx: {k: (_full(v).detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
             for idx, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: Dict[str, Any]) -> None:
    """Load full (gathered) optimizer state, re-sharding it where the parameters are FSDP2 DTensors."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, s in sd["state"].items():
        p = params[int(idx)]
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.tensor import distribute_tensor

            s = {k: distribute_tensor(v.to(p.device), mesh, p.placements) if torch.is_tensor(v) and v.shape == p.shape
                 else v for k, v in s.items()}
        state[idx] = s
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only`` loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world_size: int) -> List[Dict[str, Any]]:
    """Every rank's RNG states, in rank order (collective when distributed)."""
    mine = rng_state()
    if world_size == 1:
        return [mine]
    states: List[Any] = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of an interrupted save are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(run_dir: Path, keep: int, besides: Optional[Path] = None) -> None:
    """Delete all but the newest ``keep`` checkpoints (not counting ``besides``)."""
    found = [p for p in list_checkpoints(run_dir) if p != besides]
    for old in found[:max(len(found) - keep, 0)]:
        old.unlink(missing_ok=True)


def prepare_checkpoint_dir(run_dir: Path, keep_last: int) -> List[Path]:
    """At the start of a run: remove temporaries a killed run left, and checkpoints beyond ``keep_last``.

    Returns the temporaries removed (only clipforge's own, by name, and only unlocked ones).
    """
    removed = cleanup_stale(Path(run_dir) / CHECKPOINT_DIR) + cleanup_stale(run_dir)
    _prune(run_dir, keep_last)
    return removed


def save_checkpoint(state: Dict[str, Any], run_dir: Path, keep_last: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step_N.pt``, keeping the newest ``keep_last``.

    The oldest checkpoints are deleted once the new file is complete and fsynced but before it is
    renamed into place, so no moment (and no kill) sees more than ``keep_last``, and at least one
    complete checkpoint is always on disk: with ``keep_last=1`` the old one goes just after the
    rename instead (a kill in between leaves two; the next run prunes one). A failed write (a full
    disk: :class:`~clipforge.atomic.NoSpaceError`) deletes nothing.
    """
    path = checkpoint_path(run_dir, state["step"])

    def write(tmp: str) -> None:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _prune(run_dir, max(keep_last - 1, 1), besides=path)

    atomic_write(path, write, size_hint=tensor_bytes(state))
    _prune(run_dir, keep_last)
    return path


@dataclass
class ResumePoint:
    """Where a run continues from: the checkpoint read (None: a fresh start) and what was passed over."""

    path: Optional[Path] = None
    state: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)  # skipped checkpoints and why, a fresh start, ...


RESUME_LATEST, RESUME_MUST = "latest", "must"


def find_resume(resume: Optional[str], run_dir: Path) -> ResumePoint:
    """The checkpoint to continue from, read; warns about everything it had to decide.

    ``"latest"``: the newest checkpoint of the run that loads, trying newest to oldest (a corrupt or
    truncated one is skipped, with a warning saying which and why); none at all starts fresh, with a
    warning. ``"must"``: the same, but no checkpoint is an error. Anything else is a checkpoint path.
    All checkpoints present but unreadable is an error either way (a fresh start would discard the run).
    """
    if resume is None:
        return ResumePoint()
    if resume not in (RESUME_LATEST, RESUME_MUST):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file")
        return ResumePoint(path, read_training_checkpoint(path))
    found = list_checkpoints(run_dir)
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not found:
        if resume == RESUME_MUST:
            raise FileNotFoundError(f"resume=must: no checkpoint in {folder} (step_*.pt); use resume=latest "
                                    f"to start fresh when there is none")
        note = f"resume=latest: no checkpoint in {folder}; starting a fresh run"
        warnings.warn(note, stacklevel=2)
        return ResumePoint(notes=[note])
    notes = []
    for path in reversed(found):
        try:
            state = read_training_checkpoint(path)
        except (CheckpointError, ValueError, RuntimeError, EOFError, OSError) as e:
            note = f"resume={resume}: skipped {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            warnings.warn(note, stacklevel=2)
            notes.append(note)
            continue
        if notes:
            notes.append(f"resume={resume}: continuing from {path}")
        return ResumePoint(path, state, notes)
    raise CheckpointError(f"resume={resume}: none of the {len(found)} checkpoints in {folder} loads: "
                          + "; ".join(notes))


def read_training_checkpoint(path: Path) -> Dict[str, Any]:
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a clipforge training checkpoint (a {type(state).__name__})")
    missing = [k for k in ("state_dict", "optimizer", "step", "epoch", "batch") if k not in state]
    if missing:
        raise ValueError(f"{path}: not a clipforge training checkpoint (missing {missing}); "
                         "to fine-tune from plain weights set model.pretrained instead of resume")
    return state
