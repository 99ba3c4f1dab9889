"""Per-timestep loss weights (Min-SNR-gamma, P2), expressed for every prediction target.

Pure torch. A weight is defined once as an *x0-weighting*: the factor on ||x0_hat - x0||^2. For a fixed
error in x0 the three targets' squared errors relate through SNR = alpha_bar / (1 - alpha_bar):

    eps-MSE = SNR * x0-MSE,    v-MSE = (SNR + 1) * x0-MSE,

so a weight ``w_x0`` on the x0-MSE is ``w_x0 / SNR`` on the eps-MSE and ``w_x0 / (SNR + 1)`` on the v-MSE.
That is how both schemes below stay the same objective whatever the network predicts (several public
Min-SNR implementations used the eps weight, or ``min(SNR, gamma) / SNR``, for v; see diffusers #5654, #9451).

- Min-SNR-gamma (Hang et al. 2023): ``w_x0 = min(SNR, gamma)``; eps: ``min(SNR, gamma) / SNR``
  (= ``min(1, gamma / SNR)``), x0: ``min(SNR, gamma)``, v: ``min(SNR, gamma) / (SNR + 1)``.
- P2 (Choi et al. 2022): ``lambda_t = 1 / (k + SNR)^gamma`` *on the eps loss* (their L_simple), i.e.
  ``w_x0 = SNR / (k + SNR)^gamma``; the paper's defaults are k = 1, gamma = 1 (gamma = 0.5 also reported).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..config.choices import LOSS_WEIGHTINGS

LossWeighting = Literal["none", "min_snr", "p2"]
TARGETS = ("eps", "x0", "v")


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def target_factor(snr: torch.Tensor, mean_type: str) -> torch.Tensor:
    """The target's MSE divided by the x0-MSE for the same x0 error: SNR (eps), 1 (x0), SNR + 1 (v)."""
    if mean_type == "eps":
        return snr
    if mean_type == "x0":
        return torch.ones_like(snr)
    if mean_type == "v":
        return snr + 1.0
    raise ValueError(f"unknown mean_type {mean_type!r}; allowed: {', '.join(TARGETS)}")


def min_snr_weight(snr: torch.Tensor, gamma: float, mean_type: str) -> torch.Tensor:
    """Min-SNR-gamma weight on the ``mean_type`` target's MSE (x0-weighting min(SNR, gamma))."""
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    if mean_type == "eps":  # min(SNR, gamma) / SNR without 0/0 at SNR = 0
        return torch.clamp(gamma / snr, max=1.0)
    return torch.clamp(snr, max=gamma) / target_factor(snr, mean_type)


def p2_weight(snr: torch.Tensor, k: float, gamma: float, mean_type: str) -> torch.Tensor:
    """P2 weight on the ``mean_type`` target's MSE: 1 / (k + SNR)^gamma relative to the eps loss."""
    if k < 0 or gamma < 0:
        raise ValueError(f"p2_k and p2_gamma must be >= 0, got k={k}, gamma={gamma}")
    eps_weight = (k + snr) ** -gamma
    if mean_type == "eps":
        return eps_weight
    return eps_weight * snr / target_factor(snr, mean_type)


def loss_weight(snr: torch.Tensor, weighting: str, mean_type: str, *, min_snr_gamma: float = 5.0,
                p2_k: float = 1.0, p2_gamma: float = 1.0) -> torch.Tensor:
    """The per-example weight of ``weighting`` (none | min_snr | p2) on the ``mean_type`` target's MSE."""
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        return min_snr_weight(snr, min_snr_gamma, mean_type)
    if weighting == "p2":
        return p2_weight(snr, p2_k, p2_gamma, mean_type)
    raise ValueError(f"unknown loss_weighting {weighting!r}; allowed: {', '.join(LOSS_WEIGHTINGS)}")
