"""Deterministic, resumable distributed sampler for map-style datasets.

The order depends only on (seed, epoch), so every rank computes the same permutation and takes
its own strided slice; resuming mid-epoch just starts the slice at ``start_batch * batch_size``
instead of replaying (and decoding) the batches already trained on.
"""
from __future__ import annotations

import math
from typing import Iterator, List

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.n = num_samples
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.start_index = 0
        if drop_last:
            self.per_rank = num_samples // world_size
        else:
            self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's order; ``start_index`` skips that many of this rank's samples."""
        self.epoch = epoch
        self.start_index = start_index

    def epoch_indices(self, epoch: int) -> List[int]:
        """This rank's full index list for ``epoch`` (ignores the resume offset)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        if total > len(order):  # pad by wrapping so every rank gets the same count
            order += (order * math.ceil(total / max(len(order), 1)))[: total - len(order)]
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start_index:])

    def __len__(self) -> int:
        return max(self.per_rank - self.start_index, 0)
