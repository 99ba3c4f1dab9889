"""A driven clock for runs under ``trainer.max_time``: add ``+callbacks.clock._target_=clock.StepClock`` (with
``allow_any_target=true``; ``tests/`` on ``PYTHONPATH`` for a subprocess) and the time Lightning's ``Timer`` reads,
and with it the LR's ``TimeBudget``, advances by a fixed amount per training batch instead of with the wall clock:
the run stops, and a time-budgeted LR decays, at the same batch on any machine.
"""

from __future__ import annotations

import time
import types

import lightning.pytorch as pl
from lightning.pytorch.callbacks import timer as timer_module

START = 1000.0  # the driven clock's reading when training starts (any value: the Timer counts differences)


class StepClock(pl.Callback):
    """Lightning's ``Timer`` reads ``time.monotonic`` through its module; from ``setup`` to ``teardown`` that reads
    this clock instead: ``seconds_per_batch`` pass at the start of each training batch (before the LightningModule's
    own batch-start hook, where the ``TimeBudget`` reads the Timer) and none otherwise. ``rank_skew``: rank r's
    clock runs ``1 + r * rank_skew`` times as fast, as two machines' clocks never agree; only a value broadcast from
    rank 0 keeps the replicas in step."""

    def __init__(self, seconds_per_batch: float, rank_skew: float = 0.0) -> None:
        self.seconds_per_batch = float(seconds_per_batch)
        self.rank_skew = float(rank_skew)
        self.batches = 0
        self.rate = 1.0
        self._saved = None

    def now(self) -> float:
        return START + self.batches * self.seconds_per_batch * self.rate

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.rate = 1.0 + trainer.global_rank * self.rank_skew
        self._saved = timer_module.time
        driven = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
        driven.monotonic = self.now
        timer_module.time = driven

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._saved is not None:
            timer_module.time, self._saved = self._saved, None
