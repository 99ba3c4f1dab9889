"""Where along the trajectory guidance acts, and how strongly: the guidance interval (Kynkaanniemi et al. 2024,
"Applying guidance in a limited interval improves sample and distribution quality"), scale schedules, and the
compatibility of an autoguidance model (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself").

Every kind of guidance has a strength g that is 0 when it is off: classifier guidance its scale s (the gradient
log p(y | x_t) is multiplied by s), classifier-free guidance its w (eps = eps_c + w (eps_c - eps_u)), autoguidance
w - 1 (eps = eps_bad + w (eps_good - eps_bad) = eps_good + (w - 1)(eps_good - eps_bad)). A ``GuidanceSchedule``
multiplies g at ORIGINAL step t (the step the network is called with; a respaced process maps its step k to t) by

    weight(t) = shape(t) if lo <= t <= hi else 0,    shape(t) = 1 (constant) or t / (T - 1) (linear),

so the interval is the special case of a schedule that is 1 inside [lo, hi] and 0 outside, and "guide only for the
first steps" is ``[k, T - 1]``. ``strength`` gives the caller None when the weight is 0 for every example of the
batch: the caller then runs the unguided computation itself (one network call; the cond_fn is not called), never
g = 0 through the guided formula, so samples outside the interval are bit for bit the unguided ones; and it gives
g itself (the same Python float) when the weight is 1 for every example, so inside a constant schedule the guided
computation is bit for bit today's. The samplers call the network with one t for the whole batch; a mixed batch
(a direct ``p_sample`` with per-example t) gets per-example strengths.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config.choices import GUIDANCE_SCALE_SCHEDULES

CondFn = Callable[..., torch.Tensor]

# what must agree between a model and the worse model that guides it (autoguidance)
AUTOGUIDANCE_INFO_KEYS = ("image_size", "channels", "num_timesteps", "schedule", "mean_type", "var_type",
                          "num_classes")


@dataclass(frozen=True)
class GuidanceSchedule:
    """The weight of a guidance strength at each original step t of a ``num_timesteps``-step process: ``kind``
    (``constant`` 1, ``linear`` t / (T - 1)) inside ``interval`` = (lo, hi) (inclusive; None: every step), 0
    outside. Checks its values (the interval within 0..T-1)."""

    num_timesteps: int
    kind: str = "constant"
    interval: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in GUIDANCE_SCALE_SCHEDULES:
            raise ValueError(f"unknown guidance scale schedule {self.kind!r}; allowed: "
                             f"{', '.join(GUIDANCE_SCALE_SCHEDULES)}")
        total = self.num_timesteps
        if isinstance(total, bool) or not isinstance(total, int) or total < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {total!r}")
        if self.interval is not None:
            lo, hi = (int(v) for v in self.interval)
            if not 0 <= lo <= hi <= total - 1:
                raise ValueError(f"guidance.interval=[{lo}, {hi}] must lie within the model's steps 0..{total - 1} "
                                 f"(T={total}) with lo <= hi")
            object.__setattr__(self, "interval", (lo, hi))

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """The weight of every example's step ``t`` (original-process steps), float64 (float32 on MPS)."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        steps = t.to(dtype)
        weight = torch.ones_like(steps) if self.kind == "constant" else steps / (self.num_timesteps - 1)
        if self.interval is not None:
            lo, hi = self.interval
            weight = torch.where((t >= lo) & (t <= hi), weight, torch.zeros_like(weight))
        return weight

    def strength(self, t: torch.Tensor, g: float, like: torch.Tensor) -> float | torch.Tensor | None:
        """Strength ``g`` at steps ``t``: None when the weight is 0 for every example (no guidance at this step),
        ``g`` itself when it is 1 for every example, else ``g * weight`` per example, shaped to broadcast against
        ``like`` in its dtype. (Reads the weights on the host: one sync per guided call on an accelerator.)"""
        weight = self.weights(t)
        if not bool((weight != 0).any()):
            return None
        if bool((weight == 1).all()):
            return g
        return (g * weight).to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def active_steps(self, timesteps: Sequence[int]) -> list[bool]:
        """Whether guidance acts at each of these original steps (a sampler's kept steps): its network calls."""
        t = torch.as_tensor(list(timesteps), dtype=torch.int64)
        return [bool(w != 0) for w in self.weights(t)]


def scheduled_strength(schedule: GuidanceSchedule | None, t: torch.Tensor, g: float,
                       like: torch.Tensor) -> float | torch.Tensor | None:
    """``schedule.strength(t, g, like)``; without a schedule ``g`` at every step (None when ``g`` is 0)."""
    if schedule is None:
        return g if g else None
    return schedule.strength(t, g, like) if g else None


def scheduled_cond_fn(cond_fn: CondFn | None, schedule: GuidanceSchedule | None) -> CondFn | None:
    """``cond_fn`` (a gradient already multiplied by its scale) under ``schedule``: None at a step where the weight is
    0 for the whole batch (the samplers then take the unguided step, and the classifier is not called), the
    gradient itself where it is 1, else the gradient times the per-example weight."""
    if cond_fn is None or schedule is None:
        return cond_fn

    def guided(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        factor = schedule.strength(t, 1.0, x)
        if factor is None:
            return None
        gradient = cond_fn(x, t, **kwargs)
        return gradient if isinstance(factor, float) else gradient * factor.to(gradient.dtype)

    return guided


def interval_from_sigma(alphas_cumprod: torch.Tensor, lo: float, hi: float) -> tuple[int, int]:
    """The original steps whose noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in [lo, hi]
    (the paper's parameterisation; sigma rises with t, so they are one band (t_lo, t_hi)). ValueError when no
    step of the process lies there, naming the process's sigma range."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    sigma = ((1.0 - ab) / ab).sqrt()
    inside = torch.nonzero((sigma >= lo) & (sigma <= hi)).flatten()
    if inside.numel() == 0:
        raise ValueError(f"guidance.interval_sigma=[{lo:g}, {hi:g}] holds no step of the model's {ab.numel()}-step "
                         f"process (its sigma runs from {float(sigma[0]):.4g} at t=0 to {float(sigma[-1]):.4g} at "
                         f"t={ab.numel() - 1})")
    return int(inside[0]), int(inside[-1])


def check_autoguidance_compatible(model_info: Mapping[str, Any], guiding_info: Mapping[str, Any],
                                  guiding_name: str = "the guiding model") -> None:
    """ValueError naming every field of ``AUTOGUIDANCE_INFO_KEYS`` in which the guiding model differs from the
    model (image size, channels, T, beta schedule, parameterisation, variance, class count): its eps must be of the
    same task, on the same process, in the same parameterisation for eps_bad + w (eps_good - eps_bad) to mean
    anything."""
    differences = [f"{key}={guiding_info.get(key)!r} (the model: {model_info.get(key)!r})"
                   for key in AUTOGUIDANCE_INFO_KEYS if guiding_info.get(key) != model_info.get(key)]
    if differences:
        raise ValueError(f"{guiding_name} is a model of another task: {', '.join(differences)}; autoguidance needs an "
                         f"earlier checkpoint, EMA snapshot or smaller model trained on the same data and process")
