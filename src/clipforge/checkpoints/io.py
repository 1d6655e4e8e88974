"""Reading and writing tensor files safely: no arbitrary unpickling, atomic writes."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict

import torch

from ..atomic import PathLike, atomic_write, write_text  # noqa: F401  (re-exported: clipforge.checkpoints.atomic_write)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message says why."""


def is_torchscript_archive(path: PathLike) -> bool:
    """TorchScript archives (OpenAI's original releases) carry a ``constants.pkl`` entry."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def read_checkpoint(path: PathLike, mmap: bool = False) -> Any:
    """Load a checkpoint's content without executing pickled code.

    ``.safetensors`` files are read directly; torch files with ``weights_only=True``; TorchScript
    archives through ``torch.jit.load`` (which restores tensors and TorchScript modules, not
    arbitrary Python objects) and are reduced to their state dict. ``mmap`` maps the tensors of
    torch zip files instead of reading them (cheap when only the keys are looked at).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    if is_torchscript_archive(path):
        scripted = torch.jit.load(str(path), map_location="cpu")
        return {k: v for k, v in scripted.state_dict().items()}
    try:
        if mmap and zipfile.is_zipfile(path):  # torch's mmap needs the zip format (torch >= 1.6 files)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the file contains Python objects beyond tensors and plain "
            f"containers, which could run arbitrary code when unpickled ({str(e).splitlines()[0]}). "
            f"If you trust the file, convert it once with torch.load(..., weights_only=False) and save "
            f"only its state dict."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e


def save_torch(obj: Any, path: PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
