"""Seeds derived from a run's seed and named keys: stable across processes, ranks and versions (standard library
only, at the bottom of the layers: the data module's shuffles and flips and the training step's draws use it)."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that depends on ``seed`` and ``keys`` only (stable across processes and versions)."""
    text = "/".join(str(k) for k in (int(seed), *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
