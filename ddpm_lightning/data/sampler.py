"""A shuffling sampler whose order is a function of (seed, epoch), so training can resume mid-epoch.

torch's RandomSampler draws its permutation from the global RNG when iteration starts, which a resumed
run reaches in a different state; here epoch ``e`` is always ``randperm(n, seed(e))`` and a resumed run
skips the batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.epoch = 0
        self.start_index = 0  # items to skip in the next iteration only (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, items_done: int) -> None:
        self.epoch = int(epoch)
        self.start_index = int(items_done)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[int]:
        start, self.start_index = self.start_index, 0
        yield from self.permutation(self.epoch)[start:].tolist()

    def __len__(self) -> int:
        return self.num_items
