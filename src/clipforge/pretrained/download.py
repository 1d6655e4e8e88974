"""Fetching weights: Hugging Face Hub files and plain URLs, verified, atomic, fast to fail offline."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Union

from tqdm.auto import tqdm

from ..config import PreprocessConfig
from .tags import PretrainedTag

DEFAULT_TIMEOUT_S = 10.0
# OpenAI's `clip` package and OpenCLIP keep URL downloads here: sharing it reuses their files (re-verified).
DEFAULT_URL_CACHE = Path("~/.cache/clip")


class DownloadError(RuntimeError):
    """Weights could not be fetched; the message names every source tried and how to supply the file."""


class IntegrityError(DownloadError):
    """A fetched file's sha256 differs from the published one; nothing is left in the cache."""


def _offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((f or "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_hub_file(repo_id: str, filenames: Sequence[str], revision: Optional[str] = None,
                   cache_dir: Optional[Union[str, Path]] = None, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """The first of ``filenames`` in the Hub repo, from the local cache if there, else downloaded.

    Released weights never change, so the cache is used without asking the Hub. Before a download
    one metadata request without retries checks the Hub is reachable: ``hf_hub_download`` itself
    retries network errors with back-off for ~20 s when nothing is cached.
    """
    import huggingface_hub as hub
    from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

    args = dict(revision=revision, cache_dir=None if cache_dir is None else str(cache_dir))
    for name in filenames:
        try:
            return Path(hub.hf_hub_download(repo_id, name, local_files_only=True, **args))
        except (EntryNotFoundError, FileNotFoundError):
            pass
    where = f"hf-hub:{repo_id} file {' or '.join(filenames)}"
    if _offline():
        raise DownloadError(f"{where}: not in the local cache and HF_HUB_OFFLINE is set")
    for name in filenames:
        try:
            meta = hub.get_hf_file_metadata(hub.hf_hub_url(repo_id, name, revision=revision), timeout=timeout)
        except RemoteEntryNotFoundError:
            continue
        except Exception as e:  # network, DNS, authentication, missing repo: all end the attempt
            raise DownloadError(f"hf-hub:{repo_id} file {name}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        path = Path(hub.hf_hub_download(repo_id, name, etag_timeout=timeout, **args))
        _check_hub_digest(path, meta.etag, f"hf-hub:{repo_id} file {name}")
        return path
    raise DownloadError(f"{where}: no such file in the repository")


def _check_hub_digest(path: Path, etag: Optional[str], where: str) -> None:
    """The Hub's etag of an LFS file is its sha256: check it, and drop a bad copy from the cache."""
    if not etag or not re.fullmatch(r"[0-9a-f]{64}", etag):
        return
    actual = _sha256(path)
    if actual != etag:
        blob = path.resolve()
        for p in {path, blob}:
            p.unlink(missing_ok=True)
        raise IntegrityError(f"{where}: sha256 {actual} differs from the Hub's {etag}; the download was removed")


def fetch_url(url: str, sha256: Optional[str] = None, cache_dir: Optional[Union[str, Path]] = None,
              timeout: float = DEFAULT_TIMEOUT_S, progress: bool = True) -> Path:
    """``url`` into ``cache_dir`` (default ~/.cache/clip), verified against ``sha256`` (or its prefix);
    a tqdm bar of the bytes on stderr unless ``progress`` is False (as OpenAI's ``clip.load``)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_URL_CACHE.expanduser()
    target = root / os.path.basename(urllib.parse.urlparse(url).path)
    if target.is_file():
        if sha256 is None or _sha256(target).startswith(sha256):
            return target
        target.unlink()  # other tools write in place: a torn or stale copy is replaced
    if _offline():
        raise DownloadError(f"{url}: not in {root} and HF_HUB_OFFLINE is set")
    from ..checkpoints.io import atomic_write

    def write(tmp: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as source, open(tmp, "wb") as out:
                size = int(source.headers.get("Content-Length") or 0) or None
                with tqdm.wrapattr(out, "write", total=size, desc=target.name, unit="B", unit_scale=True,
                                   unit_divisor=1024, disable=not progress) as counted:
                    shutil.copyfileobj(source, counted, 1 << 20)
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from e
        actual = _sha256(Path(tmp))
        if sha256 is not None and not actual.startswith(sha256):
            raise IntegrityError(f"{url}: sha256 {actual} does not match the published {sha256}; nothing was kept")

    atomic_write(target, write)
    return target


def download_pretrained(tag_cfg: PretrainedTag, cache_dir: Optional[Union[str, Path]] = None,
                        timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """The tag's weights file: Hub first (as OpenCLIP), then the URL; one clear error if neither works."""
    failures = []
    if tag_cfg.hub is not None:
        try:
            return fetch_hub_file(tag_cfg.hub.repo_id, tag_cfg.hub.candidates(), tag_cfg.hub.revision,
                                  cache_dir, timeout)
        except IntegrityError:
            raise
        except DownloadError as e:
            failures.append(str(e))
    if tag_cfg.url is not None:
        try:
            return fetch_url(tag_cfg.url.url, tag_cfg.url.sha256, cache_dir, timeout)
        except IntegrityError:
            raise
        except DownloadError as e:
            failures.append(str(e))
    raise DownloadError(_supply_hint(tag_cfg, failures, cache_dir))


def _supply_hint(t: PretrainedTag, failures: List[str], cache_dir) -> str:
    lines = [f"could not fetch pretrained weights {t.model!r} tag {t.tag!r}:"] + [f"  - {f}" for f in failures]
    lines.append("To supply them: download a file above on a machine with network access, then")
    if t.url is not None:
        lines.append(f"  - put {t.url.filename} into cache_dir (now {cache_dir or DEFAULT_URL_CACHE.expanduser()}), or")
    if t.hub is not None:
        lines.append(f"  - `hf download {t.hub.repo_id} {t.hub.candidates()[0]} --cache-dir DIR` and pass "
                     f"cache_dir=DIR (with HF_HUB_OFFLINE=1 to stay offline), or")
    from ..models.registry import QUICKGELU_SUFFIX, get_model_config

    cfg = get_model_config(t.model)
    # a file path carries no tag, so the activation must come from the name (the registry's alias)
    name = t.model + QUICKGELU_SUFFIX if t.quick_gelu and not cfg.quick_gelu else t.model
    size = cfg.vision_cfg.image_size
    pp = "" if t.preprocess(size) == PreprocessConfig(image_size=size) else (
        f", preprocess=get_pretrained_cfg({t.model!r}, {t.tag!r}).preprocess({size!r})")
    lines.append(f"  - create_model_and_transforms({name!r}, pretrained='/path/to/file'{pp}).")
    return "\n".join(lines)
