"""WebDataset tar shards -> batches of (image, tokens), with counted skipping of broken samples.

Rank and world size are arguments (not read from the environment) so the same code serves
tests, single-GPU runs and any launcher. Shard order, shard assignment and the sample shuffle
buffer are all seeded from (seed, epoch[, rank, worker]) so a run is reproducible.
``webdataset``/``braceexpand`` are imported lazily: they are an optional extra, and the rest of
``clipforge.data`` (the demo's shapes data included) must import without them.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from torch.utils.data import IterableDataset, get_worker_info

from ..transforms import load_image_for
from .robust import Batch, BrokenSample, DataError, collate_skipping, describe_exception

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"


WDS_EXTRA_HINT = "pip install 'clipforge[wds]'"


def optional_import(module: str, purpose: str):
    """``import module`` of the optional ``wds`` extra; an ImportError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the {module!r} package, part of the optional WebDataset extra: "
                          f"{WDS_EXTRA_HINT}") from e


def _split_list(spec: Union[str, Sequence, None]) -> List[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [s for s in spec.split("::") if s]
    return [str(s) for s in spec]


def expand_urls(urls: Union[str, Sequence[str]],
                weights: Union[str, Sequence[float], None] = None) -> Tuple[List[str], Optional[List[float]]]:
    """Expand ``a/{000..009}.tar::pipe:cat b/{0..3}.tar`` into shard urls, one weight per shard.

    Each ``::``-separated source gets its own weight (an upsampling factor), copied to its shards.
    """
    braceexpand = optional_import("braceexpand", "reading WebDataset shard urls").braceexpand

    sources = _split_list(urls)
    out: List[str] = []
    ws = [float(w) for w in _split_list(weights)] if weights is not None else None
    if ws is not None and len(ws) != len(sources):
        raise ValueError(f"{len(ws)} weights for {len(sources)} sources: {weights!r}")
    out_w: List[float] = []
    for i, src in enumerate(sources):
        expanded = list(braceexpand(src))
        out.extend(expanded)
        if ws is not None:
            out_w.extend([ws[i]] * len(expanded))
    return out, (out_w if ws is not None else None)


def _local_dir(url: str) -> Optional[Path]:
    if url.startswith("pipe:") or "://" in url:
        return None
    return Path(url[len("file:"):] if url.startswith("file:") else url).parent


def read_shard_sizes(urls: Sequence[str]) -> Optional[int]:
    """Total samples from ``sizes.json`` (shard basename -> count) or ``_info.json`` next to shards.

    ``_info.json`` may hold the same mapping under ``"sizes"``. Returns None when any shard's count
    is unknown (e.g. ``pipe:`` urls), so the caller must be given ``num_samples``.
    """
    cache: Dict[Path, Optional[dict]] = {}
    total = 0
    for url in urls:
        d = _local_dir(url)
        if d is None:
            return None
        if d not in cache:
            sizes = None
            if (d / "sizes.json").is_file():
                sizes = json.loads((d / "sizes.json").read_text())
            elif (d / "_info.json").is_file():
                sizes = json.loads((d / "_info.json").read_text()).get("sizes")
            cache[d] = sizes
        sizes = cache[d]
        name = Path(url).name
        if not sizes or name not in sizes:
            return None
        total += int(sizes[name])
    return total


class WdsCaptionStream(IterableDataset):
    """Iterable of :class:`Batch` es read from tar shards.

    ``worker_batches`` set: each worker yields exactly that many batches per epoch (cycling its
    shards if needed), so every rank runs the same number of steps. ``None``: one pass, the last
    batch partial (evaluation). Batches are filled with ``batch_size`` *good* samples; the broken
    ones met on the way are listed in ``Batch.skipped``.
    """

    def __init__(self, urls: Sequence[str], transform: Callable, tokenize: Callable, batch_size: int,
                 weights: Optional[Sequence[float]] = None, resampled: bool = False, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 worker_batches: Optional[int] = None, split_by_node: bool = True):
        if weights is not None and not resampled:
            raise ValueError("source weights (upsampling factors) need resampled=True")
        if not urls:
            raise ValueError("no shard urls")
        self.urls, self.weights = list(urls), (list(weights) if weights is not None else None)
        self.transform, self.tokenize, self.batch_size = transform, tokenize, batch_size
        self.resampled, self.rank, self.world_size, self.seed = resampled, rank, world_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.worker_batches, self.split_by_node = worker_batches, split_by_node
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ---- stages -------------------------------------------------------------------------
    def _passes(self, wid: int, nworkers: int) -> Iterator[List[str]]:
        """Shard lists for this worker: one per pass over the data (endless when resampled)."""
        if self.resampled:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{wid}")
            while True:
                yield rng.choices(self.urls, weights=self.weights, k=16)
        rank, world = (self.rank, self.world_size) if self.split_by_node else (0, 1)
        if len(self.urls) < world * nworkers:
            raise DataError(f"{len(self.urls)} shards cannot feed {world} ranks x {nworkers} workers; "
                            "use more shards, fewer workers, or resampled mode")
        n_pass = 0
        while True:
            shards = list(self.urls)
            if self.shuffle:  # same permutation on every rank, so the rank slices stay disjoint
                random.Random(f"{self.seed}-{self.epoch}-{n_pass}").shuffle(shards)
            yield shards[rank::world][wid::nworkers]
            n_pass += 1
            if self.worker_batches is None:
                return
            if n_pass > self.worker_batches * self.batch_size:  # passes that yield no sample at all
                raise DataError(f"shards {shards[rank::world][wid::nworkers][:3]} yield no samples")

    def _raw_samples(self, shards: Iterable[str], pending: List[BrokenSample]) -> Iterator[Dict[str, Any]]:
        def handler(exn: Exception) -> bool:
            where = next((a for a in reversed(exn.args) if isinstance(a, str) and a), "?")
            pending.append(BrokenSample(where, describe_exception(exn)))
            return True

        wds = optional_import("webdataset", "reading WebDataset shards")  # only needed once shards are read

        yield from wds.tarfile_samples(({"url": u} for u in shards), handler=handler)

    def _shuffled(self, src: Iterable[Any], rng: random.Random) -> Iterator[Any]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from src
            return
        buf: List[Any] = []
        for item in src:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            k = rng.randrange(len(buf))
            buf[k], item = item, buf[k]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _decode(self, sample: Dict[str, Any]):
        where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        img_key = next((k for k in IMAGE_EXTS if k in sample), None)
        if img_key is None:
            return BrokenSample(where, "MissingImage: no jpg/jpeg/png/webp entry")
        if TEXT_EXT not in sample:
            return BrokenSample(where, "MissingCaption: no txt entry")
        try:
            caption = sample[TEXT_EXT].decode("utf-8")
            if not caption.strip():
                return BrokenSample(where, "EmptyCaption: empty caption")
            image = self.transform(load_image_for(self.transform, sample[img_key]))
            return image, self.tokenize([caption])[0]
        except Exception as e:  # a single undecodable sample must not stop training
            return BrokenSample(where, describe_exception(e))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{wid}-samples")
        pending: List[BrokenSample] = []
        # The shuffle buffer is flushed at the end of each pass, so an epoch sees each sample once.
        raw = (x for shards in self._passes(wid, nworkers)
               for x in self._shuffled(self._raw_samples(shards, pending), rng))
        good: List[Any] = []
        skipped: List[BrokenSample] = []
        n_batches, bad_run = 0, 0
        for sample in raw:
            skipped.extend(pending)
            pending.clear()
            item = self._decode(sample)
            if isinstance(item, BrokenSample):
                skipped.append(item)
                bad_run += 1
                if bad_run > max(1000, 10 * self.batch_size):  # cycling over only-broken data
                    raise DataError(f"{bad_run} broken samples in a row; first ones: {skipped[:3]}")
                continue
            bad_run = 0
            good.append(item)
            if len(good) == self.batch_size:
                yield self._collate(good, skipped)
                good, skipped = [], []
                n_batches += 1
                if self.worker_batches is not None and n_batches >= self.worker_batches:
                    return
        skipped.extend(pending)
        if good or skipped:  # one-pass mode: the last, partial batch
            yield self._collate(good, skipped)

    @staticmethod
    def _collate(good: List[Any], skipped: List[BrokenSample]) -> Batch:
        b = collate_skipping(good)
        return Batch(b.images, b.texts, list(skipped))


def epoch_batches(num_samples: int, batch_size: int, world_size: int, workers: int) -> Tuple[int, int, int]:
    """(batches per worker, batches per rank, samples per epoch), rounded up to whole batches."""
    global_bs = batch_size * world_size
    num_batches = math.ceil(num_samples / global_bs)
    per_worker = math.ceil(num_batches / max(1, workers))
    num_batches = per_worker * max(1, workers)
    return per_worker, num_batches, num_batches * global_bs
