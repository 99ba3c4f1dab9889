"""A shuffling sampler whose order is a function of (seed, epoch), split over ranks, resumable mid-epoch.

torch's RandomSampler draws its permutation from the global RNG when iteration starts, which a resumed
run reaches in a different state; here epoch ``e`` is always ``randperm(n, seed(e))`` and a resumed run
skips the items it already trained on.

Distributed layout: the epoch's permutation is cut into *global batches* of ``batch_size x num_replicas``
items; rank ``r`` takes the ``r``-th slice of ``batch_size`` items of every global batch. The position in an
epoch is therefore one number, the items consumed by all ranks together, and it means the same for any
world size with the same global batch. The last partial global batch of an epoch is dropped (every rank
runs the same number of steps). The sampler is a ``DistributedSampler`` so Lightning uses it as it is
instead of wrapping it in its ``DistributedSamplerWrapper``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class ResumableShuffleSampler(DistributedSampler):
    """Indices of rank ``rank`` out of ``num_replicas``, ``batch_size`` consecutive ones per step.

    ``len()`` is the rank's number of items in a whole epoch (also right after ``resume_at``: Lightning
    counts the batches it already ran, so the epoch ends where an uninterrupted one does).
    """

    def __init__(self, num_items: int, seed: int = 0, *, num_replicas: int = 1, rank: int = 0,
                 batch_size: int = 1) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must lie in [0, num_replicas={num_replicas})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # DistributedSampler's own attributes, for code that reads them; no call to its __init__ (it would ask
        # torch.distributed for the world size, which a sampler built before or outside DDP must not need).
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.num_replicas, self.rank, self.batch_size = int(num_replicas), int(rank), int(batch_size)
        self.shuffle, self.drop_last = True, True
        self.epoch = 0
        self.start_index = 0  # global items to skip in the next iteration only (set when resuming)
        self.global_batch = self.batch_size * self.num_replicas
        self.num_samples = (self.num_items // self.global_batch) * self.batch_size
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, items_done: int) -> None:
        """Start the next iteration in ``epoch`` after ``items_done`` items consumed by all ranks together."""
        if items_done % self.global_batch:
            raise ValueError(f"items_done={items_done} is not a multiple of the global batch {self.global_batch}")
        self.epoch = int(epoch)
        self.start_index = int(items_done)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[int]:
        start, self.start_index = self.start_index, 0
        order = self.permutation(self.epoch)[: self.total_size]
        mine = order.view(-1, self.num_replicas, self.batch_size)[start // self.global_batch:, self.rank]
        yield from mine.reshape(-1).tolist()

    def __len__(self) -> int:
        return self.num_samples
