"""The named diffusion processes the process, loss and sampler tests run on, and the one builder for them.

Each test file picks its names from ``PROCESSES`` (the names are its parametrize ids) and derives what it compares
against from the ORIGINAL schedule that ``build`` hands back with the process: the float64 ``Ref`` of
``reference.py``, the original alpha-bar or the kept original steps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from reference import Ref

from ddpm_lightning.diffusion import GaussianDiffusion, make_beta_schedule, space_timesteps


class Process(NamedTuple):
    schedule: str  # make_beta_schedule's name
    num_timesteps: int  # T of the original process
    respacing: str | None = None  # a space_timesteps spec; None keeps every step


PROCESSES = {
    "linear100": Process("linear", 100),
    "linear1000-25": Process("linear", 1000, "25"),
    "linear1000-ddim10": Process("linear", 1000, "ddim10"),
    "cosine1000-25": Process("cosine", 1000, "25"),
    "cosine1000-ddim10": Process("cosine", 1000, "ddim10"),
}


class Built(NamedTuple):
    diffusion: GaussianDiffusion
    betas: torch.Tensor  # the ORIGINAL schedule (float64), before respacing
    keep: set[int] | None  # the original steps kept, as given to GaussianDiffusion; None: all of them

    @property
    def kept(self) -> list[int]:
        """The kept original steps in order: respaced step k is original step ``kept[k]``."""
        return list(range(len(self.betas))) if self.keep is None else sorted(self.keep)

    @property
    def alpha_bar(self) -> torch.Tensor:
        """alpha-bar of the original process at every original step, from the betas alone (float64)."""
        return torch.tensor(np.cumprod(1 - self.betas.numpy()))

    @property
    def ref(self) -> Ref:
        """The float64 reference of the (respaced) process, written from the papers' equations."""
        return Ref(self.betas, self.keep)


def build(process: str | Process, **kwargs) -> Built:
    """``GaussianDiffusion`` of the named (or given) process with ``kwargs`` (mean/var/loss types, ...)."""
    spec = PROCESSES[process] if isinstance(process, str) else process
    betas = make_beta_schedule(spec.schedule, spec.num_timesteps)
    keep = None if spec.respacing is None else space_timesteps(spec.num_timesteps, spec.respacing)
    return Built(GaussianDiffusion(betas, use_timesteps=keep, **kwargs), betas, keep)
