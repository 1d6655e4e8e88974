"""Skipping and counting broken samples.

Datasets never raise on one bad sample: they return a :class:`BrokenSample` marker (a small
picklable record, so it survives the trip back from DataLoader worker processes, unlike counters
kept inside a worker). :func:`collate_skipping` drops the markers and hands them back with the
batch; :class:`SkipStats`, living in the main process, aggregates them and raises
:class:`DataError` once too large a fraction of the data is broken (a wrong path or a bad column
should stop a run early, a handful of corrupt JPEGs should not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..transforms import ImageLoadError


class DataError(ValueError):
    """Raised when data is malformed (the message names the file and line) or too much of it is unreadable."""


class BrokenSample(NamedTuple):
    """Marker returned in place of a sample that could not be loaded."""

    path: str
    reason: str
    source: str = ""  # where it was listed ("captions.tsv:12", a shard and key), when known


def is_broken(sample: Any) -> bool:
    return sample is None or isinstance(sample, BrokenSample)


class Batch(NamedTuple):
    """A collated batch plus what was dropped from it (so counts survive worker processes)."""

    images: Tensor
    texts: Tensor
    skipped: List[BrokenSample]

    @property
    def n_seen(self) -> int:
        return int(self.images.shape[0]) + len(self.skipped)


def collate_skipping(samples: Sequence[Any]) -> Batch:
    """Stack (image, tokens) pairs, dropping broken ones; an all-broken batch has 0 rows."""
    good = [s for s in samples if not is_broken(s)]
    skipped = [s if s is not None else BrokenSample("?", "unknown") for s in samples if is_broken(s)]
    if good:
        images = torch.stack([g[0] for g in good])
        texts = torch.stack([torch.as_tensor(g[1]) for g in good])
    else:
        images = torch.empty(0)
        texts = torch.empty(0, dtype=torch.long)
    return Batch(images, texts, skipped)


@dataclass
class SkipStats:
    """Counts seen and skipped samples; enforces ``max_bad_fraction`` after ``min_seen`` samples.

    Only the first ``keep_examples`` are kept in memory; ``sink``, when set, receives every skipped
    sample (the trainer writes them all to the run folder's ``skipped.jsonl``).
    """

    max_bad_fraction: float = 0.1
    min_seen: int = 100
    keep_examples: int = 10
    seen: int = 0
    skipped: int = 0
    reasons: dict = field(default_factory=dict)  # reason category -> count
    examples: List[BrokenSample] = field(default_factory=list)
    sink: Optional[Callable[[List[BrokenSample]], None]] = field(default=None, repr=False, compare=False)

    def update(self, n_seen: int, skipped: Sequence[BrokenSample]) -> None:
        self.seen += n_seen
        self.skipped += len(skipped)
        for s in skipped:
            key = s.reason.split(":", 1)[0]
            self.reasons[key] = self.reasons.get(key, 0) + 1
            if len(self.examples) < self.keep_examples:
                self.examples.append(s)
        if self.sink is not None and skipped:
            self.sink(list(skipped))
        self.check()

    def update_batch(self, batch: Batch) -> None:
        self.update(batch.n_seen, batch.skipped)

    @property
    def bad_fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def check(self) -> None:
        if self.seen >= self.min_seen and self.bad_fraction > self.max_bad_fraction:
            raise DataError(
                f"{self.skipped} of {self.seen} samples are broken "
                f"({self.bad_fraction:.1%} > max_bad_fraction={self.max_bad_fraction:.1%}); "
                f"first ones: {self.describe_examples()}"
            )

    def describe_examples(self, n: int = 5) -> str:
        return "; ".join(f"{e.path} ({e.reason})" for e in self.examples[:n])

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.skipped, "reasons": dict(self.reasons)}

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.seen} samples, none skipped"
        return f"{self.seen} samples, {self.skipped} skipped {self.reasons}: {self.describe_examples(3)}"


def describe_exception(exc: BaseException) -> str:
    """A short reason string ``Category: message`` used as the skip reason.

    An image that failed to load is categorised by why it failed (``FileNotFoundError``,
    ``UnidentifiedImageError``, ...), not by the :class:`ImageLoadError` wrapped around that.
    """
    if isinstance(exc, ImageLoadError) and exc.__cause__ is not None:
        exc = exc.__cause__
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]
