"""A resumed run that changed its optimiser settings continues with the new ones (``modules.checkpoint``'s
``RESUME_APPLIED``): Lightning restores the AdamW state and the LR schedule of the checkpoint, so ``optim.lr=1e-3``
on a run trained at 2e-4 would otherwise go on at 2e-4 while the run folder's config says 1e-3.

When training starts (after the restore), ``ResumeChanges`` sets the changed values on every optimiser and LR
schedule: a new peak LR rescales the schedule (its base LR, and the current LR by new / old, so the warm-up or decay
continues where it was), a new warm-up or schedule recomputes the current LR from the schedule, and betas, eps and
weight decay replace the param groups' values. The module then records the run's current config in the checkpoints
it writes from here on. The EMA's decay needs nothing: the EMA is rebuilt from the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from ..config.schema import OptimConfig


class ResumeChanges(pl.Callback):
    """``changed``: the applied keys (``optim.lr``, ``optim.betas``, ...); ``optim`` the run's ``optim`` settings;
    ``run_config`` the run's resolved config (stored in later checkpoints instead of the resumed one)."""

    def __init__(self, changed: list[str], optim: Mapping[str, Any], run_config: Mapping[str, Any]) -> None:
        self.changed = {key.split(":")[0] for key in changed}
        self.optim = {f.name: optim.get(f.name, getattr(OptimConfig, f.name, None))
                      for f in OptimConfig.__dataclass_fields__.values()}
        self.run_config = dict(run_config)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lr = float(self.optim["lr"])
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            for i, group in enumerate(scheduler.optimizer.param_groups):
                if "optim.lr" in self.changed:
                    old = scheduler.base_lrs[i]
                    scheduler.base_lrs[i] = group["initial_lr"] = lr
                    group["lr"] = group["lr"] * lr / old if old else lr
                if {"optim.warmup_steps", "optim.lr_schedule"} & self.changed and hasattr(scheduler, "lr_lambdas"):
                    group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
                self._set_group(group)
        if not trainer.lr_scheduler_configs:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    if "optim.lr" in self.changed:
                        group["lr"] = lr
                    self._set_group(group)
        if hasattr(pl_module, "run_config"):
            pl_module.run_config = self.run_config  # on_load_checkpoint put back the resumed run's config

    def _set_group(self, group: dict[str, Any]) -> None:
        for key, cast in (("betas", tuple), ("eps", float), ("weight_decay", float)):
            if f"optim.{key}" in self.changed and key in group:
                group[key] = cast(self.optim[key])
