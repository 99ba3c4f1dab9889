"""Randomness of training: per-rank, per-step streams, and the global RNG states saved in checkpoints.

Every random draw of a training step (t, the noise, the label-dropout mask, network dropout, the data flips)
comes from a stream seeded by ``derive_seed(seed, rank, epoch, batch_idx)``: a pure function of the run's seed,
the process's global rank and the position in training. So under DDP every rank draws its own t and noise
(a global batch of B x world images sees B x world distinct draws), a rerun with the same seed and world size
repeats them exactly, and a resumed run needs no RNG state to continue exactly. The initial weights come
from the global RNG, seeded identically on every rank (``pl.seed_everything``), so they are the same everywhere.

Plain tensors and ints only in checkpoints, so they still load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..seeding import derive_seed


def training_step_seed(seed: int, trainer, batch_idx: int) -> int:
    """The seed of this process's draws for batch ``batch_idx`` of the trainer's current epoch: (run seed, global
    rank, epoch, batch index); rank 0, epoch 0 without a trainer."""
    rank, epoch = (trainer.global_rank, trainer.current_epoch) if trainer is not None else (0, 0)
    return derive_seed(seed, "train", rank, epoch, batch_idx)


@contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with the global torch RNG (CPU, and ``device`` if it is a CUDA device) seeded with ``seed``;
    the global streams outside the block are left as they were."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def collect_rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "python" in states:
        random.setstate((3, tuple(states["python"]), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
