"""A callback that times a real ``ddpm-train`` run's optimizer steps, for ``benchmarks.gpu_check``.

Added to a run from the command line (outside ``ddpm_lightning``, so the run needs ``allow_any_target=true``)::

    ddpm-train ... allow_any_target=true +callbacks.step_timer._target_=benchmarks.step_timer.StepTimer \\
        +callbacks.step_timer.path=<file.json>

At the end of training rank 0 writes ``path``:

- ``steps``, ``seconds``, ``steps_per_s``: the training batches after the first ``skip`` (start-up, cuDNN
  autotuning, compilation), each timed from its start to its end (forward, backward, optimizer step), the
  device synchronised at both ends: the training loop's own speed;
- ``loop_steps``, ``loop_seconds``, ``loop_steps_per_s``: every optimizer step of this run over the wall time from
  the start of training to the end of its last batch, validation and in-loop scoring included;
- ``first_step_s``: the first batch alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from typing_extensions import override


def _sync(module: pl.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class StepTimer(pl.Callback):
    def __init__(self, path: str, skip: int = 1) -> None:
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.path = Path(path)
        self.skip = int(skip)
        self._batches = 0
        self._seconds = 0.0
        self._timed = 0
        self._first: float | None = None
        self._train_start = 0.0
        self._last_end = 0.0
        self._start_step = 0
        self._batch_start = 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module)
        self._train_start = self._last_end = time.perf_counter()
        self._start_step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module)
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module)
        self._last_end = time.perf_counter()
        seconds = self._last_end - self._batch_start
        self._batches += 1
        if self._first is None:
            self._first = seconds
        if self._batches > self.skip:
            self._seconds += seconds
            self._timed += 1

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loop_steps = trainer.global_step - self._start_step
        loop_seconds = self._last_end - self._train_start
        record = {
            "steps": self._timed, "seconds": self._seconds,
            "steps_per_s": self._timed / self._seconds if self._seconds > 0 else None,
            "loop_steps": loop_steps, "loop_seconds": loop_seconds,
            "loop_steps_per_s": loop_steps / loop_seconds if loop_seconds > 0 else None,
            "first_step_s": self._first,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=2) + "\n")
