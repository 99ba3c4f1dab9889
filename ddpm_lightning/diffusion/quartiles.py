"""Statistics per quartile of the timestep: which quarter of [0, T) a step lies in and per-quarter means.

Losses, MSEs and classifier accuracies are read per quartile of t (``train/loss_q0..q3``, ``val/acc_q0..q3``):
Improved DDPM's argument for L_hybrid rests on how differently the terms behave at small and large t.
"""

from __future__ import annotations

import torch

NUM_QUARTILES = 4


def timestep_quartile(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Which quarter of [0, num_timesteps) each integer step lies in (0..3)."""
    return (t * NUM_QUARTILES) // num_timesteps


def quartile_means(values: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-quartile means of the per-example ``values`` at steps ``t`` (0 where a quartile is empty) and the
    per-quartile counts, both ``[NUM_QUARTILES]`` in ``values``' dtype (counts are the weights to average with)."""
    quartile = timestep_quartile(t, num_timesteps)
    counts = torch.bincount(quartile, minlength=NUM_QUARTILES).to(values.dtype)
    sums = torch.zeros(NUM_QUARTILES, device=values.device, dtype=values.dtype).index_add_(0, quartile, values)
    return sums / counts.clamp(min=1), counts


def stratified_timesteps(batch_size: int, num_timesteps: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Steps in [0, num_timesteps) stratified by quartile: example i in quartile i % 4, uniform within it, so a
    validation batch reads every quartile (``val/acc_q0..q3``) whatever its size."""
    q = torch.arange(batch_size, device=device) % NUM_QUARTILES
    u = torch.rand(batch_size, generator=generator, device=device)
    return ((q + u) * num_timesteps / NUM_QUARTILES).floor().long().clamp(0, num_timesteps - 1)


def vb_by_quartile(vb: torch.Tensor) -> torch.Tensor:
    """``[N, NUM_QUARTILES]``: the per-step VLB terms ``vb`` ``[N, T]`` (``calc_bpd_loop``'s, t = 0..T-1) summed over
    each quarter of the steps, so the parts add up to the bound less its prior term."""
    steps = vb.shape[1]
    bounds = [round(q * steps / NUM_QUARTILES) for q in range(NUM_QUARTILES + 1)]
    return torch.stack([vb[:, bounds[q]:bounds[q + 1]].sum(1) for q in range(NUM_QUARTILES)], 1)
