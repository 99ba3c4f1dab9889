"""Say before (and as soon as it can) how long training will take: a fast, talkative start.

At the start of training one line gives the work (optimizer steps left x batch size x gradient accumulation,
``trainer.max_time``, and the scores the run will compute with their time); once ``measure_steps`` optimizer steps
after the first (which carries the warm-up) have run, one ``estimated time:`` line extrapolates them to the steps
left, says when ``trainer.max_time`` will stop the run first, and adds the scores: every callback with a
``scoring_estimate(trainer) -> (seconds, what) | None`` (``GenerativeMetricsCallback``: FID@n in the loop and at
the end, timed on a few samples when fitting starts). Validation, sample grids and checkpoints are not in it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class TrainingEstimate(pl.Callback):
    def __init__(self, measure_steps: int = 10) -> None:
        self.measure_steps = int(measure_steps)
        self._start_step: int | None = None
        self._first: tuple[int, float] | None = None  # (global step, time) after the first optimizer step
        self._done = False

    @staticmethod
    def _total_steps(trainer: pl.Trainer) -> float:
        try:
            return float(trainer.estimated_stepping_batches)  # max_steps, or max_epochs x batches / accumulation
        except Exception:  # noqa: BLE001  e.g. an iterable data set of unknown length: no estimate
            return math.inf

    @staticmethod
    def _max_time(trainer: pl.Trainer) -> tuple[float, float] | None:
        """(trainer.max_time, the seconds of it left) in seconds, or None without a time limit."""
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer._duration is None:
            return None
        return float(timer._duration), float(timer.time_remaining() or 0.0)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step
        total = self._total_steps(trainer)
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        accumulate = trainer.accumulate_grad_batches
        steps = "an unknown number of" if math.isinf(total) else f"{int(total) - trainer.global_step}"
        work = f"training: {steps} optimizer steps"
        if trainer.global_step:
            work += f" (from step {trainer.global_step} to {int(total)})" if not math.isinf(total) else ""
        if batch is not None:
            work += f" x batch {batch}" + (f" x {accumulate} accumulated" if accumulate > 1 else "")
            work += f" x {trainer.world_size} devices" if trainer.world_size > 1 else ""
        max_time = self._max_time(trainer)
        if max_time is not None:
            work += f"; trainer.max_time stops it after {max_time[0] / 60:.1f} min ({max_time[1] / 60:.1f} left)"
        scoring = self._scoring(trainer)
        if scoring is not None:
            work += f"; then scoring: {scoring[1]}, ~{scoring[0] / 60:.1f} min"
        after = self.measure_steps + 1
        if not math.isinf(total):
            after = min(after, int(total) - trainer.global_step)
        rank_zero_info(work + f"; the time estimate follows after {after} step{'' if after == 1 else 's'}")

    @staticmethod
    def _scoring(trainer: pl.Trainer) -> tuple[float, str] | None:
        """(seconds, what) of the scores the callbacks will compute, or None."""
        found = [estimate for c in trainer.callbacks if callable(getattr(c, "scoring_estimate", None))
                 if (estimate := c.scoring_estimate(trainer)) is not None]
        if not found:
            return None
        return sum(seconds for seconds, _ in found), "; ".join(what for _, what in found)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._done or self._start_step is None:
            return
        step = trainer.global_step
        if self._first is None:
            if step > self._start_step:
                self._first = (step, time.perf_counter())
            return
        total = self._total_steps(trainer)
        measured = step - self._first[0]
        if measured < self.measure_steps and step < total:
            return
        self._done = True
        if measured < 1:
            return
        per_step = (time.perf_counter() - self._first[1]) / measured
        left = total - step
        if math.isinf(total):
            rank_zero_info(f"estimated time: {per_step:.2f} s per optimizer step (the number of steps is unknown)")
            return
        estimate = per_step * (total - self._start_step)
        scoring = self._scoring(trainer)
        max_time = self._max_time(trainer)
        stopped = max_time is not None and per_step * left > max_time[1]
        if scoring is None:
            line = (f"estimated time: ~{estimate / 60:.1f} min for {int(total - self._start_step)} optimizer steps "
                    f"({per_step:.2f} s/step over steps {self._first[0]}-{step}; validation, sampling and "
                    f"checkpoints add to it)")
        else:
            training = min(estimate, (step - self._start_step) * per_step + max_time[1]) if stopped else estimate
            line = (f"estimated time: ~{(training + scoring[0]) / 60:.1f} min: {int(total - self._start_step)} "
                    f"optimizer steps ~{training / 60:.1f} min ({per_step:.2f} s/step over steps {self._first[0]}-"
                    f"{step}) + scoring ~{scoring[0] / 60:.1f} min ({scoring[1]}); validation, sample grids and "
                    f"checkpoints add to it")
        if stopped:
            line += f"; trainer.max_time ({max_time[0] / 60:.1f} min) stops it first, at about step " \
                    f"{int(step + max_time[1] / per_step)}"
        rank_zero_info(line)
