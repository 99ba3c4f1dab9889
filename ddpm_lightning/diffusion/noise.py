"""Per-sample random streams: image ``i`` depends on (seed, i) only, never on the batch or the device count.

The idea is EDM's ``StackedRandomGenerator``: a batch of samples with global indices ``i0 .. i0 + n - 1``
holds one ``torch.Generator`` per sample, and every draw (the class label, the initial noise x_T, each
ancestral or SDE noise) is made row by row, sample ``i``'s row from sample ``i``'s generator. Generating
indices [0, 8) in one batch, in batches of 3, or on two devices as [0, 5) and [5, 8) gives the same rows.

Seed formula (documented, stable across releases)::

    sample_seed(seed, index, stream) = (splitmix64(seed) + 2 * index + stream) mod 2**32

with ``index`` in [0, 2**31) and ``stream`` 0 for the noise and 1 for the labels (separate streams, so a
label draw never shifts the noise). 32 bits because torch's CPU generator (mt19937) only uses the low 32
bits of its seed; within one seed, distinct (index, stream) pairs always get distinct generator seeds, and
``splitmix64`` (Steele et al.'s 64-bit finaliser) scatters different run seeds over the 2**32 range.
Noise generators live on the sampling device: the same (seed, index) gives the same noise on any number of
devices of one kind, while CPU and CUDA generators give different numbers (labels always come from CPU
generators). Images are then identical as far as the network's rows do not depend on the batch: byte-equal
on CPU in the tests; GPU kernels chosen by batch size may change the last bits.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NoiseSampler = Callable[[torch.Tensor], torch.Tensor]

NOISE_STREAM = 0
LABEL_STREAM = 1
_MAX_INDEX = 2 ** 31


def splitmix64(value: int) -> int:
    """The splitmix64 finaliser of ``value`` (mod 2**64): a bijective 64-bit mix."""
    z = (int(value) + 0x9E3779B97F4A7C15) % 2 ** 64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return z ^ (z >> 31)


def sample_seed(seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """The seed of sample ``index``'s generator: ``(splitmix64(seed) + 2 * index + stream) mod 2**32``."""
    if not 0 <= index < _MAX_INDEX:
        raise ValueError(f"sample index must lie in [0, 2**31), got {index}")
    if stream not in (NOISE_STREAM, LABEL_STREAM):
        raise ValueError(f"stream must be {NOISE_STREAM} (noise) or {LABEL_STREAM} (labels), got {stream}")
    return (splitmix64(seed) + 2 * int(index) + stream) % 2 ** 32


class PerSampleNoise:
    """One generator per sample index; ``randn_like(x)`` / ``randn(shape)`` draw row ``j`` from index ``j``'s.

    Args:
        seed: the run's seed.
        indices: the global sample indices of the batch's rows (e.g. ``range(first, first + n)``).
        device: where the generators and the draws live.
        stream: ``NOISE_STREAM`` (0) or ``LABEL_STREAM`` (1); see ``sample_seed``.
    """

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu",
                 stream: int = NOISE_STREAM) -> None:
        self.device = torch.device(device)
        self.indices = [int(i) for i in indices]
        if not self.indices:
            raise ValueError("PerSampleNoise needs at least one sample index")
        self.generators = [torch.Generator(device=self.device).manual_seed(sample_seed(seed, i, stream))
                           for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal [n, *shape[1:]]: ``shape[0]`` must be the number of samples."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"shape {shape} must start with the number of samples {len(self)}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x`` (on ``x``'s device and dtype), one row per sample."""
        noise = self.randn(x.shape, dtype=x.dtype if x.dtype.is_floating_point else torch.float32)
        return noise.to(device=x.device, dtype=x.dtype)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample (int64 on the generators' device)."""
        return torch.cat([torch.randint(0, int(high), (1,), generator=g, device=self.device)
                          for g in self.generators])

    __call__ = randn_like  # a k-diffusion style ``noise_sampler(x)``


def generator_noise(generator: torch.Generator | None) -> NoiseSampler:
    """A ``noise_sampler(x)`` drawing the whole batch from one generator (or the global RNG when None)."""

    def noise_sampler(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    return noise_sampler
