"""Atomic writes of files and whole folders, shared by every writer in the package.

Why here: checkpoints, tokenizer files, configs, shard sets and converted model folders all need
the same guarantee (a reader sees the old output or the new one, never a mix) and ``tokenizer/``,
``checkpoints/``, ``data/`` and ``train/`` can all import this package-root module.

* :func:`atomic_write` writes one file through a temporary sibling, fsyncs it and renames it over
  the target. Files get the permissions the umask gives (``mkstemp``'s 0600 is not kept).
* :func:`atomic_directory` builds a multi-file output in a temporary sibling folder and swaps it in
  with two renames: ``dst`` -> ``.<dst>.clipforge-<random>.old``, then the new folder -> ``dst``.
  Between those two renames (microseconds) ``dst`` is absent; a process killed exactly there
  leaves the complete old folder under the ``.old`` name, and :func:`recover_directory` (run by the
  next writer of ``dst`` and by :func:`cleanup_stale`) renames it back.
* :func:`cleanup_stale` removes the temporaries a killed clipforge left behind, recognised by
  name (``.<name>.clipforge-<random>.tmp`` / ``.old``) and only when no live process holds their
  lock (a writer ``flock``s its temporary while it works; the kernel drops the lock when it dies).
* A full disk becomes :class:`NoSpaceError` naming the device, the path and the sizes, whatever
  the underlying writer raised (``OSError(ENOSPC)``, torch's ``basic_ios::clear`` / ``unexpected pos``
  ``RuntimeError``, safetensors' ``StorageFull``); the previous file is left untouched.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; cleanup then relies on names alone
    fcntl = None

PathLike = Union[str, os.PathLike]

TAG = "clipforge-"  # in every temporary's name, so cleanup removes only this program's own
_TEMP = re.compile(r"^\.(?P<name>.+)\." + TAG + r"[a-z0-9_]{8}\.(?P<kind>tmp|old)$")
# What torch's and safetensors' writers say when the disk fills (their errors carry no errno).
_FULL_DISK_TEXT = ("no space left", "storagefull", "os error 28", "disk quota")
_TORCH_WRITE_FAILED = ("basic_ios::clear", "unexpected pos", "file write failed", "pytorchstreamwriter failed")


class NoSpaceError(OSError):
    """The disk (or quota) filled while writing; the message names the device, the path and the sizes."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _lock(fd: int) -> None:
    """``flock`` ``fd``; already locked (an enclosing writer holds it) protects it just as well."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _is_locked(path: Path) -> bool:
    """Whether a live process holds the ``flock`` of ``path`` (False where locks do not exist)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # vanished or unreadable: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- a full disk, explained
def _device_of(path: Path) -> str:
    """``/dev/sda1 (mounted on /data)``: the filesystem holding ``path``, from ``/proc/mounts`` where readable."""
    mount = Path(os.path.abspath(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            source, point = line.split()[:2]
            if point == str(mount):
                return f"{source} (mounted on {mount})"
    except (OSError, ValueError):
        pass
    return f"the device mounted on {mount}"


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _out_of_space(exc: BaseException, folder: Path, needed: Optional[int]) -> bool:
    """Whether ``exc`` (or what caused it) is the disk filling up."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if any(t in text for t in _FULL_DISK_TEXT):
            return True
        if any(t in text for t in _TORCH_WRITE_FAILED):  # torch's stream errors: confirm by the free space
            free = _free_bytes(folder)
            return free is not None and free < max(needed or 0, 2**20)
        seen = seen.__cause__ or seen.__context__
    return False


def no_space_error(path: PathLike, needed: Optional[int] = None, written: Optional[int] = None) -> NoSpaceError:
    """The :class:`NoSpaceError` for ``path``: device, path, the size needed (or written so far) and free space."""
    path = Path(path)
    folder = path.parent if path.parent.exists() else Path(".")
    free = _free_bytes(folder)
    sizes = []
    if needed:
        sizes.append(f"needed ~{_mb(needed)} MB")
    elif written:
        sizes.append(f"{_mb(written)} MB written when it filled")
    if free is not None:
        sizes.append(f"free {_mb(free)} MB")
    return NoSpaceError(errno.ENOSPC, f"no space left on {_device_of(folder)} writing {path}"
                        + (f" ({', '.join(sizes)})" if sizes else "")
                        + "; the previous file, if any, is unchanged. Free some space or write elsewhere")


# ----------------------------------------------------------------------------- files
def atomic_write(path: PathLike, write: Callable[[str], None], size_hint: Optional[int] = None) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never a torn one;
    a killed writer's temporary (``.<name>.clipforge-<random>.tmp``) is removed by :func:`cleanup_stale`.
    ``size_hint`` (bytes) is only used to say how much was needed when the disk fills.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TAG}", suffix=".tmp", dir=path.parent)
    try:
        _lock(fd)  # held until we close fd: cleanup_stale leaves a live writer's temporary alone
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else None
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, NoSpaceError) and _out_of_space(e, path.parent, size_hint):
            raise no_space_error(path, size_hint, written) from e
        raise
    finally:
        os.close(fd)


def write_text(path: PathLike, text: str) -> Path:
    """``text`` written atomically as UTF-8; returns the path."""
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size_hint=len(data))
    return Path(path)


# ----------------------------------------------------------------------------- folders
def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _chmod_tree(root: Path, umask: int) -> None:
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _siblings(dst: Path, kind: str) -> List[Path]:
    """This program's temporaries of ``dst`` of one kind (``tmp`` or ``old``), newest first."""
    if not dst.parent.is_dir():
        return []
    found = []
    for p in dst.parent.iterdir():
        if (m := _TEMP.match(p.name)) and m["name"] == dst.name and m["kind"] == kind:
            with contextlib.suppress(FileNotFoundError):  # another process may remove it meanwhile
                found.append((p.lstat().st_mtime, p))
    return [p for _, p in sorted(found, reverse=True)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_directory(dst: PathLike) -> Optional[Path]:
    """Put back the folder a writer killed between its two renames left as ``.<dst>.clipforge-*.old``.

    Returns the restored path, or None when there was nothing to restore (``dst`` exists, or no
    unlocked ``.old`` of it does). Leftover ``.old`` folders of an existing ``dst`` are removed.
    """
    dst = Path(dst)
    olds = [p for p in _siblings(dst, "old") if not _is_locked(p)]
    restored = None
    if olds and not os.path.lexists(dst):
        os.rename(olds.pop(0), dst)
        _fsync_dir(dst.parent)
        restored = dst
    for old in olds:
        _remove(old)
    return restored


@contextlib.contextmanager
def atomic_directory(dst: PathLike, replaceable: Optional[Callable[[Path], bool]] = None) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in for ``dst`` when the block succeeds.

    Yields the temporary folder to write into. On success its files are fsynced and given umask
    permissions, then ``dst`` (if any) is renamed away, the new folder renamed to ``dst`` and the
    old one deleted: a reader sees the old folder or the new one, never a mix. On an exception the
    temporary folder is deleted and ``dst`` is left as it was. ``replaceable(dst)`` guards an
    existing non-empty ``dst``: when it returns False nothing is written (``FileExistsError``), so a
    folder of unrelated files is never replaced by mistake. Given a clipforge temporary folder (a
    writer nested in another, as ``convert`` calls a format's ``save``), it writes there directly.
    """
    dst = Path(dst)
    if _TEMP.match(dst.name) and dst.is_dir():
        yield dst  # already inside an enclosing writer's temporary folder: that writer swaps it in
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(dst)
    if os.path.lexists(dst) and not dst.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{dst} exists and is not a directory")
    if replaceable is not None and dst.is_dir() and any(dst.iterdir()) and not replaceable(dst):
        raise FileExistsError(errno.EEXIST, f"refusing to replace {dst}: it holds files that are not an output "
                              f"of this kind ({sorted(p.name for p in dst.iterdir())[:8]}); remove it or "
                              f"choose another destination")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{TAG}", suffix=".tmp", dir=dst.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(fd)
        yield tmp
        _fsync_tree(tmp)
        _chmod_tree(tmp, current_umask())
        _swap_in(tmp, dst)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, NoSpaceError) and _out_of_space(e, dst.parent, None):
            raise no_space_error(dst) from e
        raise
    finally:
        os.close(fd)


def _swap_in(new: Path, dst: Path) -> None:
    """Rename ``new`` to ``dst``, moving an existing ``dst`` aside first and deleting it after."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{TAG}", suffix=".old", dir=dst.parent))
        os.rmdir(old)  # only the unique name is wanted; the rename below creates it
        fd = os.open(dst, os.O_RDONLY)
        try:
            _lock(fd)  # the lock follows the folder: no cleanup restores this .old while we swap
            os.rename(dst, old)
            try:
                os.rename(new, dst)  # between these two renames dst is absent (see the module docstring)
            except BaseException:
                os.rename(old, dst)  # put the old folder back; the caller deletes ``new``
                raise
        finally:
            os.close(fd)
    else:
        os.rename(new, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        _remove(old)


def cleanup_stale(folder: PathLike) -> List[Path]:
    """Remove what killed clipforge writers left in ``folder``; returns what was removed or restored.

    Only names this program makes (``.<name>.clipforge-<random>.tmp`` / ``.old``) are touched, and only
    when no live process holds their lock. An ``.old`` folder whose ``<name>`` is missing is renamed
    back (see :func:`recover_directory`) instead of deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done: List[Path] = []
    for entry in sorted(folder.iterdir()):
        m = _TEMP.match(entry.name)
        if m is None or not os.path.lexists(entry) or _is_locked(entry):
            continue
        if m["kind"] == "old" and not os.path.lexists(folder / m["name"]):
            restored = recover_directory(folder / m["name"])
            if restored is not None:
                done.append(restored)
            continue
        _remove(entry)
        done.append(entry)
    return done
