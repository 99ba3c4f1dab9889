"""Sample grids: images in [-1, 1] saved as one PNG (training's periodic grids, ``ddpm-sample``'s ``grid.png``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..artifacts import atomic_write


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int) -> Path:
    """Save images in [-1, 1] as one PNG grid (``artifacts.atomic_write``: the old grid or the whole new one)."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(((images.clamp(-1, 1) + 1) / 2).float().cpu(), nrow=nrow, padding=2, pad_value=0.5)
    return atomic_write(path, lambda handle: save_image(grid, handle, format="PNG"))
