"""Noise-side training levers: immiscible noise assignment and input perturbation.

Pure torch (scipy's assignment solver is imported where it is used).

- Immiscible diffusion (Li et al. 2024): within a batch, give each image the noise sample closest to it by
  solving a linear assignment on the pairwise L2 distances of the flattened tensors; the set of noises is
  unchanged (a permutation), only who gets which. Deterministic: the solver has no randomness.
- Input perturbation (Ning et al. 2023, DDPM-IP): x_t = q_sample(x_0, t, eps + gamma * xi) with a fresh
  xi ~ N(0, I), while the regression target stays eps.
"""

from __future__ import annotations

import torch


def immiscible_assignment(x_start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Indices ``perm`` such that ``noise[perm]`` minimises sum_i ||x_start[i] - noise[perm[i]]||_2."""
    if x_start.shape != noise.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
    from scipy.optimize import linear_sum_assignment

    x, n = x_start.detach().flatten(1).double(), noise.detach().flatten(1).double()
    # ||x - n||^2 = |x|^2 + |n|^2 - 2 x.n in float64 (one matmul; exact enough at these norms)
    cost = ((x * x).sum(1)[:, None] + (n * n).sum(1)[None, :] - 2.0 * x @ n.T).clamp_min(0.0).sqrt()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(x_start.shape[0], dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(noise.device)


def assign_noise(x_start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The batch's noises reordered by ``immiscible_assignment``."""
    return noise[immiscible_assignment(x_start, noise)]


def perturb_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM-IP's input noise eps + gamma * xi, xi ~ N(0, I) drawn after eps from the same stream."""
    if gamma < 0:
        raise ValueError(f"input_perturbation must be >= 0, got {gamma}")
    if gamma == 0:
        return noise
    xi = (torch.randn_like(noise) if generator is None
          else torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype))
    return noise + gamma * xi
