"""What both LightningModules do around their own training step, written once (as ``ScheduledAdamW`` does for the
optimiser): the LR check, the run config and the RNG states in checkpoints, the training seed of the process, the
EMAs right after each optimiser step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from typing_extensions import override

from ..config.schema import OptimConfig
from ..diffusion import NUM_QUARTILES, quartile_means
from .builders import ScheduledAdamW
from .rng import collect_rng_states, restore_rng_states, training_step_seed


class TrainingPlumbing(ScheduledAdamW):
    """Mixed in before ``LightningModule``. The module calls ``init_plumbing`` in its ``__init__``, has a ``net``
    and lists the averaged copies of it in ``averaged_models()``; it extends the checkpoint hooks with
    ``super()`` for state of its own, and may check its config at fit time in ``check_fit()``."""

    run_config: dict[str, Any]
    train_seed: int

    def init_plumbing(self, optim: Mapping[str, Any], run_config: Mapping[str, Any] | None) -> None:
        lr = optim.get("lr", OptimConfig.lr)
        if float(lr) <= 0:
            raise ValueError(f"optim.lr must be > 0, got {lr}")
        self.run_config = dict(run_config or {})
        self.train_seed = torch.initial_seed()

    def averaged_models(self) -> list[torch.nn.Module]:
        """The EMAs (``AveragedModel``) of ``net`` to update after each optimiser step."""
        return []

    def check_fit(self) -> None:
        """Config checks that apply to training only (a checkpoint loaded to sample skips them)."""

    def log_quartiles(self, name: str, values: torch.Tensor, t: torch.Tensor, metrics: torch.nn.ModuleList,
                      num_timesteps: int | None = None) -> None:
        """``<name>_q0..q3``: per-example ``values`` averaged per quartile of t in [0, num_timesteps) (default: the
        module's process), accumulated over the epoch in ``metrics`` (one MeanMetric per quartile)."""
        means, counts = quartile_means(values, t, num_timesteps or self.diffusion.num_timesteps)
        for q in range(NUM_QUARTILES):
            metrics[q].update(means[q], weight=counts[q])
            self.log(f"{name}_q{q}", metrics[q], on_step=False, on_epoch=True)

    def step_seed(self, batch_idx: int) -> int:
        """The seed of this rank's draws for batch ``batch_idx`` of the current epoch (``modules/rng.py``)."""
        return training_step_seed(self.train_seed, self._trainer, batch_idx)

    @override
    def optimizer_step(self, *args, **kwargs) -> None:
        # EMAs right after the step: checkpoints written at this batch's end already include it.
        super().optimizer_step(*args, **kwargs)
        for averaged in self.averaged_models():
            averaged.update_parameters(self.net)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = self.run_config
        checkpoint["rng_states"] = collect_rng_states()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("run_config", self.run_config)
        if "rng_states" in checkpoint:  # resuming: draw the same t and noise as an uninterrupted run
            restore_rng_states(checkpoint["rng_states"])

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_fit()
            self.train_seed = torch.initial_seed()  # pl.seed_everything ran in this process (every DDP rank)
