"""Reading and writing tensor files safely: no arbitrary unpickling, atomic writes."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..atomic import NoSpaceError, PathLike, atomic_write, write_text  # noqa: F401  (re-exported)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message says why."""


def is_torchscript_archive(path: PathLike) -> bool:
    """TorchScript archives (OpenAI's original releases) carry a ``constants.pkl`` entry."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


# Leading bytes of files people pass by mistake -> what they are.
_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
          b"RIFF": "a RIFF (WebP/WAV) file", b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip file",
          b"ustar": "a tar archive"}


def non_checkpoint_kind(path: PathLike) -> Optional[str]:
    """What ``path`` is when its first bytes show it cannot be a checkpoint (an image, a text file...), else None.

    Torch files are zip archives or pickles (first byte 0x80); safetensors begin with a little-endian
    header length. Anything else would otherwise reach the unpickler, whose error reads as a security refusal.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head[:1] == b"\x80":  # pickle protocol 2+: torch's legacy (non-zip) format
        return None
    for magic, kind in _MAGIC.items():
        if head.startswith(magic) or (magic == b"ustar" and head[257:262] == magic):
            return kind
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a torch file (neither a zip archive nor a pickle)"


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
    if path.is_file() and (kind := non_checkpoint_kind(path)):
        raise CheckpointError(f"{path}: not a checkpoint: {kind} (checkpoints are torch files, TorchScript "
                              f"archives, .safetensors files or model folders)")
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


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in nested dicts/lists/tuples (what a file of ``obj`` will at least take)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save`` atomically; a full disk raises :class:`NoSpaceError` naming the device and path."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), size_hint=tensor_bytes(obj))


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), size_hint=tensor_bytes(tensors))
