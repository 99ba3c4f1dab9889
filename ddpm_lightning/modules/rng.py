"""RNG states saved in checkpoints so a resumed run draws the same t, noise and dropout as an uninterrupted one.

Plain tensors and ints only, so checkpoints still load with ``weights_only=True``.
"""

from __future__ import annotations

import random

import torch


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
