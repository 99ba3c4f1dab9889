"""Timestep samplers: uniform, and Improved DDPM's loss-aware importance sampler.

No torch.distributed here: under DDP the caller gathers every rank's (t, loss) pairs and passes them
to ``update_with_all_losses`` (the Lightning module does this with ``all_gather``).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..config.choices import TIMESTEP_SAMPLERS as SAMPLERS


class ScheduleSampler:
    """Draws t with probabilities ``weights() / sum`` and returns importance weights 1 / (K p(t))."""

    num_timesteps: int

    def weights(self) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights().to(torch.float64)
        p = w / w.sum()
        t = torch.multinomial(p.float(), batch_size, replacement=True, generator=generator)
        weights = (1.0 / (len(p) * p[t])).float()
        return t.to(device), weights.to(device)

    def update_with_all_losses(self, ts: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses at steps ``ts`` (no-op for samplers that do not learn)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UniformSampler(ScheduleSampler):
    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = int(num_timesteps)
        self._weights = torch.ones(self.num_timesteps, dtype=torch.float64)

    def weights(self) -> torch.Tensor:
        return self._weights


class LossSecondMomentResampler(ScheduleSampler):
    """Samples t proportionally to sqrt(E[L_t^2]) over the last ``history_per_term`` losses of each t.

    Uniform until every t has a full history; ``uniform_prob`` of the mass always stays uniform.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.num_timesteps = int(num_timesteps)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = torch.zeros(self.num_timesteps, self.history_per_term, dtype=torch.float64)
        self.loss_counts = torch.zeros(self.num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> torch.Tensor:
        if not self.warmed_up():
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        w = self.loss_history.pow(2).mean(dim=-1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts: torch.Tensor, losses: torch.Tensor) -> None:
        for t, loss in zip(ts.detach().cpu().tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"timestep {t} outside [0, {self.num_timesteps - 1}]")
            if self.loss_counts[t] == self.history_per_term:
                self.loss_history[t, :-1] = self.loss_history[t, 1:].clone()
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        history, counts = state["loss_history"], state["loss_counts"]
        if tuple(history.shape) != tuple(self.loss_history.shape):
            raise ValueError(f"sampler history has shape {tuple(history.shape)}, "
                             f"expected {tuple(self.loss_history.shape)}")
        self.loss_history = history.to(torch.float64).clone()
        self.loss_counts = counts.to(torch.int64).clone()


def create_named_schedule_sampler(name: Literal["uniform", "loss-second-moment"],
                                  num_timesteps: int) -> ScheduleSampler:
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
