"""Which samples each process trains on, step by step, reproducibly and resumably."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from snzoo.errors import TrainingError


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of one global step, sliced per process.

    Every epoch draws one permutation from (seed, epoch); step i takes `global_batch` consecutive indices of it,
    and process r trains on the r-th slice. So the run sees the same samples in the same groups on any number of
    processes: one process with ghost batches of k equals global_batch / k devices with k samples each. The last
    incomplete global batch is dropped, as the original recipes did. `start` skips the steps a resumed run did.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise TrainingError(f"global batch {global_batch} does not split over {world_size} processes")
        if num_samples < global_batch:
            raise TrainingError(f"{num_samples} training samples are fewer than one step's batch of {global_batch}; "
                                "lower --batch (DEVICESxPER_DEVICE, e.g. 1x8) or add training images")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch's permutation and the first step to yield."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        share = self.global_batch // self.world_size
        for step in range(self.start, self.steps_per_epoch):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            yield batch[self.rank * share:(self.rank + 1) * share]
