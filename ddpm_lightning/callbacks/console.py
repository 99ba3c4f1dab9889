"""Lightning's console callbacks, shaped for step-based runs: one summary line, a progress bar counted in steps.

* ``ModelSummaryLine``: Lightning's ``ModelSummary`` printed as one line of the modules that hold parameters
  (name, type, size, eval-mode ones marked) and the totals, instead of a table whose FLOPs column is 0 without an
  ``example_input_array`` and whose rows list parameter-less containers.
* ``StepProgressBar``: Lightning's ``RichProgressBar`` for runs that stop at ``trainer.max_steps``
  (``max_epochs=-1``): one bar over the whole run, "step 120/3000", instead of "Epoch 0/-2" and a new bar every
  epoch. Epoch-based runs keep Lightning's bar as it is.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from typing_extensions import override


class ModelSummaryLine(ModelSummary):
    """One line: ``model: net UNet 1.4 M, ema AveragedModel 1.4 M (eval); 1.4 M trainable, 2.7 M in all``."""

    @staticmethod
    @override
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        rank_zero_info(summary_line(summary_data, total_parameters, trainable_parameters, total_flops))


def summary_line(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                 total_flops: int = 0) -> str:
    """The summary table (Lightning's columns) as one line: the modules with parameters, then the totals; FLOPs
    only where they were counted."""
    columns = dict(summary_data)
    modules = []
    for name, kind, params, mode in zip(columns["Name"], columns["Type"], columns["Params"], columns["Mode"],
                                        strict=True):
        if params.strip() not in ("0", ""):
            modules.append(f"{name} {kind} {params.strip()}" + (" (eval)" if mode == "eval" else ""))
    line = (f"model: {', '.join(modules) or 'no parameters'}; {get_human_readable_count(trainable_parameters)} "
            f"trainable, {get_human_readable_count(total_parameters)} in all")
    return line + (f"; {get_human_readable_count(total_flops)} FLOPs per forward" if total_flops else "")


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar counts optimizer steps up to ``trainer.max_steps`` in step-based
    runs (one bar for the run, labelled "step"); as Lightning's otherwise."""

    @staticmethod
    def by_step(trainer: pl.Trainer) -> bool:
        return trainer.max_epochs in (-1, None) and trainer.max_steps is not None and trainer.max_steps > 0

    @property
    @override
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.by_step(self.trainer) else super().total_train_batches

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if not self.by_step(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"{'step':{len(self.validation_description)}}"  # padded as Lightning pads "Epoch N"

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.by_step(trainer) and self.train_progress_bar_id is not None and self.progress is not None:
            return  # one bar over every epoch of the run
        super().on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.by_step(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:  # a mid-epoch resume
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
