"""Reading and writing tensor files safely: no arbitrary unpickling, atomic writes."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message says why."""


def is_torchscript_archive(path: PathLike) -> bool:
    """TorchScript archives (OpenAI's original releases) carry a ``constants.pkl`` entry."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def read_checkpoint(path: PathLike) -> Any:
    """Load a checkpoint's content without executing pickled code.

    ``.safetensors`` files are read directly; torch files with ``weights_only=True``; TorchScript
    archives through ``torch.jit.load`` (which restores tensors and TorchScript modules, not
    arbitrary Python objects) and are reduced to their state dict.
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


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
