"""Writes the post-hoc EMA snapshots (EDM2) of a run trained with ``ema.posthoc_sigma_rels``.

Added by ``DiffusionModule.configure_callbacks`` when the module tracks power EMAs; the snapshot format and
the reconstruction live in ``modules/ema.py``.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from typing_extensions import override

from ..artifacts import POSTHOC_EMA_DIR as SNAPSHOT_DIR
from ..modules.ema import save_snapshot


class PostHocEMASnapshots(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, and at the end of training, save the module's power EMAs
    (``pl_module.posthoc_ema``) to ``dirpath`` (default: ``<trainer.default_root_dir>/posthoc_ema``)."""

    def __init__(self, every_n_steps: int, dirpath: str | None = None) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"ema.posthoc_every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.dirpath = dirpath
        self.last_step: int | None = None

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / SNAPSHOT_DIR

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step < 1 or step == self.last_step or not len(pl_module.posthoc_ema):
            return
        if trainer.is_global_zero:
            save_snapshot(self.folder(trainer), pl_module.posthoc_ema, global_step=step)
        self.last_step = step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)
