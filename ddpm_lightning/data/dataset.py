"""``ImageSubset``: a torch ``Dataset`` over a subset of an image source, fetched a batch at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm_lightning.data.sources import ImageSource


class ImageSubset(Dataset):
    """The images of ``source`` at ``indices``, as ``(uint8 [C, H, W], int64 label)`` samples.

    ``__getitems__`` lets the ``DataLoader`` fetch a whole batch with one indexing call, so in-memory
    sources cost one tensor gather per batch. Unlabelled sources yield label 0.
    """

    def __init__(self, source: ImageSource, indices: Tensor) -> None:
        self.source = source
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        labels = source.labels
        self.labels = (
            torch.zeros(len(self.indices), dtype=torch.int64) if labels is None else labels[self.indices]
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]

    def __getitems__(self, positions: Sequence[int]) -> tuple[Tensor, Tensor]:
        positions = torch.as_tensor(positions, dtype=torch.int64)
        return self.source.get(self.indices[positions]), self.labels[positions]
