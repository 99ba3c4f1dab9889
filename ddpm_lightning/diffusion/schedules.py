"""Beta schedules and timestep respacing (DDPM linear, Improved DDPM cosine)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..config.choices import BETA_SCHEDULES as SCHEDULES


def make_beta_schedule(name: str, num_timesteps: int, cosine_s: float = 0.008) -> torch.Tensor:
    """Float64 betas of length ``num_timesteps``.

    ``linear``: DDPM's 1e-4..0.02, scaled by 1000/T so that any T keeps the same end-to-end noise.
    ``cosine``: Improved DDPM's alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), betas clipped at 0.999.
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        if scale * 0.02 >= 1.0:  # beta_T = 1 erases x_0 in one step: alpha_bar_T = 0 and the VLB is NaN
            raise ValueError(f"the linear schedule scales DDPM's betas by 1000/T, so num_timesteps={num_timesteps} "
                             f"gives beta_T = {scale * 0.02:g} >= 1; use num_timesteps >= 21, or schedule=cosine")
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: str | int | Iterable[int]) -> set[int]:
    """Original steps to keep when respacing a T-step process.

    ``"ddimN"`` keeps ``range(0, T, stride)`` for the stride giving exactly N steps (the DDIM paper's
    choice). Otherwise the T steps are split into equal sections (the first ``T % len`` sections one
    step longer) and section i keeps ``section_counts[i]`` evenly strided steps: ``"250"`` is 250
    steps over the whole process, ``"10,15,20"`` takes 10, 15 and 20 steps from the three thirds.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN', e.g. 'ddim25'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot keep exactly {desired} steps of {num_timesteps} with a fixed stride; "
                f"use a plain count such as '{desired}' instead of 'ddim{desired}'"
            )
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected 'ddimN', 'N' or comma-separated counts 'a,b,c'"
            ) from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing counts must be positive integers, got {section_counts!r}")

    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps (T={num_timesteps})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float stride exactly as OpenAI's reference does: round(j * stride) differs from
        # it at exact halves (e.g. T=500, "25" keeps 250 instead of 249), which changes the sampled steps.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


def respace_betas(betas: torch.Tensor, use_timesteps: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Betas of the process restricted to ``use_timesteps`` and the map back to original steps.

    The new betas are chosen so that alpha_bar at every kept step equals the original alpha_bar.
    """
    num_timesteps = betas.shape[0]
    keep = sorted({int(t) for t in use_timesteps})
    if not keep:
        raise ValueError("use_timesteps is empty: keep at least one step")
    if keep[0] < 0 or keep[-1] >= num_timesteps:
        raise ValueError(f"use_timesteps must lie in [0, {num_timesteps - 1}], got {keep[0]}..{keep[-1]}")
    alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
    kept_ab = alphas_cumprod[keep]
    prev_ab = torch.cat([torch.ones(1, dtype=torch.float64), kept_ab[:-1]])
    return 1.0 - kept_ab / prev_ab, torch.tensor(keep, dtype=torch.int64)
