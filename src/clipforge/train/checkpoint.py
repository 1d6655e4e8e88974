"""Self-describing training checkpoints: written atomically, read without unpickling code.

A checkpoint holds the model (``state_dict``, OpenCLIP's key, so ``open_clip`` reads it too), the
optimizer and grad-scaler state, the step and data position, the run config, the model config and
every rank's RNG states: enough to continue a killed run as if it had never stopped.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoints.io import read_checkpoint, save_torch

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


def save_checkpoint(state: Dict[str, Any], run_dir: Path, keep_last: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step_N.pt``, then drop all but the newest ``keep_last``."""
    path = checkpoint_path(run_dir, state["step"])
    save_torch(state, path)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``"latest"``: the run's newest checkpoint, or None for a fresh start; else the named file."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file")
    return path


def read_training_checkpoint(path: Path) -> Dict[str, Any]:
    state = read_checkpoint(path)
    missing = [k for k in ("state_dict", "optimizer", "step", "epoch", "batch") if k not in state]
    if missing:
        raise ValueError(f"{path}: not a clipforge training checkpoint (missing {missing}); "
                         "to fine-tune from plain weights set model.pretrained instead of resume")
    return state
