"""Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMA profiles and their least-squares combination.

Pure torch. A power-function EMA with exponent gamma averages the weights theta(1..t) seen so far as

    theta_hat(t) = beta(t) * theta_hat(t - 1) + (1 - beta(t)) * theta(t),   beta(t) = (1 - 1/t)^(gamma + 1),

so that (unrolling the product) step k <= t carries the weight

    w_{gamma,t}(k) = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1),

which sums to 1 and approximates the continuous profile (gamma+1) tau^gamma / t^(gamma+1). That profile's
relative standard deviation (its width over t, the "EMA length") is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),

e.g. sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94. Snapshots of a few such EMAs taken every N steps span
a space of profiles; any other (t_r, gamma_r) profile is approximated by the combination x minimising
||sum_i x_i w_i - w_r||^2 (normal equations A x = b with A_ij = <w_i, w_j>, b_i = <w_i, w_r>), and the EMA
it describes is sum_i x_i theta_hat_i. The inner products here are the exact discrete ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..config.choices import MAX_SIGMA_REL


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent ``gamma``."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width ``sigma_rel`` in (0, sqrt(1/12)].

    sigma^2 (gamma + 2)^2 (gamma + 3) = gamma + 1 is a cubic; sigma_rel decreases in gamma >= 0, so the root
    is found by bisection on [0, 1 / sigma_rel^2] (no polynomial solver needed)."""
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}] (the uniform average), got {sigma_rel}")
    lo, hi = 0.0, 1.0 / sigma_rel ** 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def power_ema_weight(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """1 - beta(t) = 1 - (1 - 1/t)^(gamma + 1): the weight on theta(t) at the t-th update (t >= 1)."""
    t = t.to(torch.float32 if t.device.type == "mps" else torch.float64)
    return -torch.expm1((gamma + 1.0) * torch.log1p(-1.0 / t))


def power_profile(t: int, gamma: float, k: torch.Tensor) -> torch.Tensor:
    """w_{gamma,t}(k) for step indices ``k`` (>= 1); zero for k > t. Float64."""
    k = k.to(torch.float64)
    ratio_pow = torch.exp((gamma + 1.0) * torch.log(k / t))  # (k / t)^(gamma + 1)
    weights = ratio_pow * -torch.expm1((gamma + 1.0) * torch.log1p(-1.0 / k))  # * (1 - ((k-1)/k)^(gamma+1))
    return torch.where(k <= t, weights, torch.zeros_like(weights))


def _profile_chunks(steps: Sequence[int], gammas: Sequence[float], target_step: int, target_gamma: float,
                    horizon: int, chunk: int):
    """(snapshot profiles [count, n], target profile [n]) over the steps 1..horizon, ``chunk`` steps at a time."""
    for start in range(1, horizon + 1, chunk):
        k = torch.arange(start, min(start + chunk, horizon + 1), dtype=torch.float64)
        profiles = torch.stack([power_profile(s, float(g), k) for s, g in zip(steps, gammas, strict=True)])
        yield profiles, power_profile(int(target_step), float(target_gamma), k)


def solve_posthoc_weights(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int,
                          target_gamma: float, chunk_elements: int = 1 << 22) -> tuple[torch.Tensor, float]:
    """Coefficients x (float64, one per snapshot) with sum_i x_i w_i ~ w_r, and the fit's relative L2 error
    ||sum_i x_i w_i - w_r|| / ||w_r||.

    The Gram matrix is accumulated over steps in chunks (memory ~ ``chunk_elements`` float64 values). The error
    is summed from the residual itself in a second pass: expanding it as x'Ax - 2x'b + ||w_r||^2 cancels to a
    floor of sqrt(float64 eps) ~ 1.5e-8 relative, whatever the fit (what a perfect fit read on some CPUs).
    """
    steps = [int(s) for s in snapshot_steps]
    if not steps or len(steps) != len(snapshot_gammas):
        raise ValueError("need at least one snapshot and one gamma per snapshot")
    if min(steps) < 1 or target_step < 1:
        raise ValueError("snapshot and target steps must be >= 1")
    horizon = max(max(steps), int(target_step))
    count = len(steps)
    chunk = max(1, chunk_elements // (count + 1))
    gram = torch.zeros(count, count, dtype=torch.float64)
    rhs = torch.zeros(count, dtype=torch.float64)
    for profiles, target in _profile_chunks(steps, snapshot_gammas, target_step, target_gamma, horizon, chunk):
        gram += profiles @ profiles.T
        rhs += profiles @ target
    x = torch.linalg.lstsq(gram, rhs[:, None], rcond=1e-12, driver="gelsd").solution[:, 0]
    residual2 = target_norm2 = 0.0
    for profiles, target in _profile_chunks(steps, snapshot_gammas, target_step, target_gamma, horizon, chunk):
        residual2 += float(torch.sum((x @ profiles - target) ** 2))
        target_norm2 += float(target @ target)
    return x, math.sqrt(residual2 / target_norm2)


@torch.no_grad()
def combine_state_dicts(state_dicts, weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * state_dicts[i] for floating tensors (accumulated in float64, cast back); other
    tensors (integer buffers) are taken from the last state dict. ``state_dicts`` may be any iterable
    (e.g. a generator that loads one snapshot at a time)."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    weights = [float(w) for w in weights]
    used = 0
    for weight, state in zip(weights, state_dicts, strict=False):
        used += 1
        for key, value in state.items():
            if value.is_floating_point():
                dtypes[key] = value.dtype
                term = value.to(torch.float64) * weight
                total[key] = total[key] + term if key in total else term
            else:
                total[key] = value.clone()
    if used != len(weights):
        raise ValueError(f"{len(weights)} weights but {used} state dicts")
    return {k: (v.to(dtypes[k]) if k in dtypes else v) for k, v in total.items()}
