"""One entry point from a :class:`DataConfig` to an epoch-aware, resumable training loader.

:class:`TrainLoader` yields plain ``(images, texts)`` pairs, as OpenCLIP's loaders do, while it
folds the per-batch skip records into ``loader.stats`` in the main process, which is where the
``max_bad_fraction`` limit can see all workers together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .captions import CaptionDataset, CaptionGroups, CaptionRecord, read_caption_file
from .robust import Batch, SkipStats, collate_skipping
from .sampler import ResumableDistributedSampler
from .synthetic import RandomCaptionDataset, ShapesConfig, ShapesDataset, make_shapes_splits
from .webdataset import WdsCaptionStream, epoch_batches, expand_urls, read_shard_sizes

KINDS = ("csv", "coco", "jsonl", "webdataset", "synthetic", "shapes")


@dataclass
class DataConfig:
    """Where the training data comes from and how broken samples are treated."""

    kind: str = "csv"
    """one of csv | coco | jsonl | webdataset | synthetic | shapes"""
    train_data: Optional[str] = None
    """caption file path, or WebDataset shard urls ("a/{0..9}.tar::pipe:cat b.tar")"""
    image_root: Optional[str] = None
    """folder image paths are relative to; default: the caption file's folder (COCO: its image folder)"""
    img_key: str = "filepath"
    """column (csv/jsonl) holding the image path"""
    caption_key: str = "title"
    """column (csv/jsonl) holding the caption"""
    sep: Optional[str] = None
    """column separator; default: tab for .tsv/.tab, comma for .csv, else told by the header line"""
    num_samples: Optional[int] = None
    """samples per epoch: WebDataset epoch size (default: sizes.json); shapes/synthetic count"""
    resampled: bool = False
    """webdataset: draw shards with replacement"""
    upsampling_factors: Optional[str] = None
    """webdataset, resampled: "1::2" weights per source"""
    shuffle_buffer: int = 1000
    """webdataset: samples held in the shuffle buffer"""
    drop_last: bool = True
    """drop each epoch's ragged last batch"""
    max_bad_fraction: float = 0.1
    """stop when more than this fraction of samples is broken (missing/unreadable images)"""
    min_seen: int = 100
    """samples seen before max_bad_fraction is enforced"""
    image_size: int = 224
    """synthetic: side of the random image tensors"""
    context_length: int = 77
    """synthetic: length of the random token rows"""
    vocab_size: int = 49408
    """synthetic: token ids are drawn below this"""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    """shapes: the generated coloured-shape data"""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; expected one of {KINDS}")
        if self.kind not in ("synthetic", "shapes") and not self.train_data:
            raise ValueError(f"data kind {self.kind!r} needs train_data")


def read_records(cfg: DataConfig) -> List[CaptionRecord]:
    """The caption records of csv/coco/jsonl data."""
    if cfg.kind not in ("csv", "coco", "jsonl"):
        raise ValueError(f"data kind {cfg.kind!r} has no caption records")
    assert cfg.train_data is not None
    return read_caption_file(cfg.train_data, cfg.kind, cfg.img_key, cfg.caption_key, cfg.sep, cfg.image_root)


def build_dataset(cfg: DataConfig, transform: Callable, tokenize: Callable) -> Dataset:
    """The map-style dataset for every kind but webdataset."""
    if cfg.kind == "synthetic":
        return RandomCaptionDataset(cfg.num_samples or 1000, cfg.image_size, cfg.context_length, cfg.vocab_size)
    if cfg.kind == "shapes":
        splits = make_shapes_splits(cfg.shapes, n_train=cfg.num_samples or 5000, n_val=0, n_heldout=0)
        return ShapesDataset(splits.train, transform, tokenize)
    return CaptionDataset(read_records(cfg), transform, tokenize)


def caption_groups(cfg: DataConfig) -> CaptionGroups:
    """Image -> all its captions, for retrieval evaluation of csv/coco/jsonl data."""
    return CaptionGroups.from_records(read_records(cfg))


class TrainLoader:
    """Iterates ``(images, texts)``; ``num_batches``/``num_samples`` describe one full epoch."""

    def __init__(self, dataloader: DataLoader, num_batches: int, num_samples: int, batch_size: int,
                 stats: SkipStats, sampler: Optional[ResumableDistributedSampler] = None,
                 stream: Optional[WdsCaptionStream] = None, limit: bool = True):
        self.limit = limit  # stop after num_batches (False: until the data runs out)
        self.dataloader, self.num_batches, self.num_samples = dataloader, num_batches, num_samples
        self.batch_size, self.stats, self.sampler, self.stream = batch_size, stats, sampler, stream
        self.epoch, self.start_batch = 0, 0
        self.seed = 0  # worker seeds derive from (seed, epoch), never from the global RNG

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` resumes after that many batches of it.

        Map-style data resumes exactly (the sampler starts at an offset). Webdataset streams
        only shorten the epoch: the samples seen are a fresh draw, not the exact remainder.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")
        self.epoch, self.start_batch = epoch, start_batch
        # DataLoader draws its workers' base seed from this generator (else from the global RNG,
        # which would shift every later random draw by one on resume).
        self.dataloader.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_batch * self.batch_size)
        if self.stream is not None:
            self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def batches(self) -> Iterator[Batch]:
        """Raw :class:`Batch` es (with their skip lists), after updating ``stats``."""
        remaining = len(self)
        for batch in self.dataloader:
            if self.limit and remaining <= 0:
                break
            remaining -= 1
            self.stats.update_batch(batch)
            yield batch

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        for batch in self.batches():
            if batch.images.shape[0]:
                yield batch.images, batch.texts


def _identity(x: Any) -> Any:
    return x  # streams yield ready batches; module level so it pickles to workers


def _loader_kwargs(workers: int, pin_memory: bool) -> dict:
    return dict(num_workers=workers, pin_memory=pin_memory, collate_fn=None, persistent_workers=False)


def build_train_loader(cfg: DataConfig, transform: Callable, tokenize: Callable, batch_size: int,
                       rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 2,
                       pin_memory: bool = False) -> TrainLoader:
    """Training loader; call ``set_epoch(epoch[, start_batch])`` before iterating each epoch."""
    stats = SkipStats(max_bad_fraction=cfg.max_bad_fraction, min_seen=cfg.min_seen)
    kw = _loader_kwargs(workers, pin_memory)
    if cfg.kind == "webdataset":
        urls, weights = expand_urls(cfg.train_data, cfg.upsampling_factors)
        num_samples = cfg.num_samples or read_shard_sizes(urls)
        if not num_samples:
            raise ValueError("webdataset: give num_samples, or put sizes.json next to the shards")
        if not cfg.resampled and len(urls) < world_size * max(1, workers):
            raise ValueError(f"{len(urls)} shards < {world_size} ranks x {max(1, workers)} workers; "
                             "write more shards, use fewer workers, or set resampled=True")
        per_worker, num_batches, num_samples = epoch_batches(num_samples, batch_size, world_size, workers)
        stream = WdsCaptionStream(urls, transform, tokenize, batch_size, weights=weights,
                                  resampled=cfg.resampled, rank=rank, world_size=world_size, seed=seed,
                                  shuffle_buffer=cfg.shuffle_buffer, worker_batches=per_worker)
        kw["collate_fn"] = _identity
        dl = DataLoader(stream, batch_size=None, **kw)
        loader = TrainLoader(dl, num_batches, num_samples, batch_size, stats, stream=stream)
    else:
        ds = build_dataset(cfg, transform, tokenize)
        sampler = ResumableDistributedSampler(len(ds), rank, world_size, seed, shuffle=True)
        kw["collate_fn"] = collate_skipping
        dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=cfg.drop_last, **kw)
        num_batches = len(dl)
        if num_batches == 0:
            where = cfg.train_data if cfg.kind not in ("synthetic", "shapes") else f"{cfg.kind} data"
            raise ValueError(f"{where}: {len(ds)} samples for {world_size} rank(s) make no full batch of "
                             f"{batch_size}: use a smaller batch_size, more data, or data.drop_last=false")
        loader = TrainLoader(dl, num_batches, len(ds), batch_size, stats, sampler=sampler)
    loader.seed = seed
    loader.set_epoch(0)
    return loader


def build_eval_loader(cfg: DataConfig, transform: Callable, tokenize: Callable, batch_size: int,
                      workers: int = 0, max_bad_fraction: Optional[float] = None) -> TrainLoader:
    """One ordered pass over all of the data on this process (last batch partial)."""
    stats = SkipStats(max_bad_fraction=cfg.max_bad_fraction if max_bad_fraction is None else max_bad_fraction,
                      min_seen=cfg.min_seen)
    kw = _loader_kwargs(workers, False)
    if cfg.kind == "webdataset":
        urls, _ = expand_urls(cfg.train_data)
        stream = WdsCaptionStream(urls, transform, tokenize, batch_size, shuffle=False, split_by_node=False)
        n = cfg.num_samples or read_shard_sizes(urls) or 0
        kw["collate_fn"] = _identity
        dl = DataLoader(stream, batch_size=None, **kw)
        return TrainLoader(dl, -(-n // batch_size), n, batch_size, stats, stream=stream, limit=False)
    ds = build_dataset(cfg, transform, tokenize)
    kw["collate_fn"] = collate_skipping
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False, **kw)
    return TrainLoader(dl, len(dl), len(ds), batch_size, stats)

