"""Preemption-safe training: SIGTERM stops a run within seconds in every phase, the scheduler's requeue
signal writes an exact-resume checkpoint first, and checkpoints of a run stopped mid-epoch resume exactly.

Signals and exit codes (every rank; ``docs/scaling.md``):

- ``SIGTERM`` (SLURM at the time limit or on preemption, ``docker stop``, Kubernetes, ``timeout``): the run
  stops at once in any phase (training, validation, in-loop or final scoring, checkpoint writing) and exits
  with ``143`` (128 + 15). No new checkpoint is written; a checkpoint being written is abandoned (its temporary
  file is removed, the previous complete file stays): ``resume=auto`` continues from the newest complete one.
  DDP ranks started by this process get the signal too. If the process is stuck in C code (a collective whose
  peer is gone), where no Python handler runs, a watchdog thread ends it after ``grace_s`` seconds.
  Lightning's own SIGTERM handler only sets a flag that the batch loop reads; it is replaced while we train.
- ``SIGUSR1`` / ``SIGUSR2`` (the signal a scheduler sends some time before the limit: ``sbatch
  --signal=USR1@120``, submitit's ``--signal=USR2@<signal_delay_s>``): at the next step boundary, agreed by all
  ranks, the run writes ``checkpoints/last.ckpt`` (an exact-resume point) and exits with ``75``
  (``EX_TEMPFAIL``: run again with ``resume=auto``). When the signal arrives after training, during the final
  scoring, a checkpoint of the final step already exists (``on_train_end`` writes one when none does) and the
  run exits with ``75`` at once. A handler installed before ours (submitit's requeue-and-exit) is called after
  the checkpoint, so submitit requeues the job as usual. Lightning's own SLURM handler (which saves an
  ``hpc_ckpt`` in the middle of whatever runs) is not installed.

Stops: when ``max_steps`` / ``max_time`` stops training in the middle of an epoch, Lightning counts that epoch
as finished in checkpoints written afterwards, and a run resumed from them starts a new epoch (other data,
other random draws); when it stops at an epoch's last batch, checkpoints written afterwards resume one epoch too
far. ``on_save_checkpoint`` records both as Lightning restores them exactly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from ..modules.checkpoint import LAST_NAME

log = logging.getLogger(__name__)

TERM_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: an exact-resume checkpoint was written; run again with resume=auto
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")


class Preemption(pl.Callback):
    """Always on in ``ddpm-train`` (``cli/train.py``). See the module docstring for the behaviour.

    Args:
        requeue_signals: signal names that mean "checkpoint and exit for requeue".
        grace_s: after SIGTERM, seconds before a process that could not stop (blocked in C code, e.g. a
            collective whose peer is gone) is ended with ``os._exit(143)``.
    """

    def __init__(self, requeue_signals: tuple[str, ...] | list[str] = REQUEUE_SIGNALS, grace_s: float = 10.0) -> None:
        unknown = [name for name in requeue_signals if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"requeue_signals: unknown signal(s) {unknown}; e.g. {list(REQUEUE_SIGNALS)}")
        self.requeue_signals = [getattr(signal, name) for name in requeue_signals]
        self.grace_s = float(grace_s)
        self.requeue_requested: int | None = None  # the signal number, once received
        self.in_batch_loop = False
        self.inside_epoch = False  # between a training batch and its epoch's end
        self.last_saved_step: int | None = None
        self.stopped_mid_epoch: int | None = None  # the epoch, when training stopped before its last batch
        self._trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int, int] | None = None  # (read fd, write fd, previous wakeup fd)
        self._forwarded = False

    # ------------------------------------------------------------------ handlers
    def _install(self, signum: int, handler) -> None:
        if signum not in self._previous:
            self._previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)

    def _forward(self, signum: int) -> None:
        """Pass the signal on to the DDP ranks this process started (``timeout`` signals only the first), once."""
        if self._forwarded:
            return
        self._forwarded = True
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)

    def _on_term(self, signum: int, frame) -> None:
        trainer = self._trainer
        self._forward(signum)  # (the watchdog thread has usually done it already)
        if trainer is None or trainer.is_global_zero:
            print(f"received {signal.Signals(signum).name}: stopping now (exit code {TERM_EXIT_CODE}); complete "
                  f"checkpoints are kept, continue with resume=auto", file=sys.stderr, flush=True)
        raise SystemExit(TERM_EXIT_CODE)

    def _on_requeue(self, signum: int, frame) -> None:
        self.requeue_requested = signum
        trainer = self._trainer
        if not self.in_batch_loop and trainer is not None and self.last_saved_step == trainer.global_step:
            self._exit_for_requeue(trainer)  # training is over and its final state is saved (final scoring)

    def _exit_for_requeue(self, trainer: pl.Trainer) -> None:
        signum = self.requeue_requested or signal.SIGUSR1
        if trainer.is_global_zero:
            print(f"received {signal.Signals(signum).name}: checkpoint of step {trainer.global_step} written, "
                  f"exiting for requeue (exit code {REQUEUE_EXIT_CODE}); continue with resume=auto",
                  file=sys.stderr, flush=True)
        previous = self._previous.get(signum)
        if callable(previous):  # e.g. submitit's requeue handler (requeues and exits on rank 0)
            previous(signum, None)
        raise SystemExit(REQUEUE_EXIT_CODE)

    def _start_watchdog(self) -> None:
        """``signal.set_wakeup_fd``: the C-level handler writes the signal number even while the main thread is
        blocked in C code, where no Python handler can run; a thread forwards it to the DDP ranks this process
        started at once and ends the process after ``grace_s``."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            os.close(read_fd)
            os.close(write_fd)
            return
        self._wakeup = (read_fd, write_fd, previous)
        grace = self.grace_s

        def watch() -> None:
            while True:
                try:
                    data = os.read(read_fd, 64)
                except OSError:
                    return
                if not data:
                    return
                if signal.SIGTERM in data:
                    self._forward(signal.SIGTERM)
                    time.sleep(grace)
                    os._exit(TERM_EXIT_CODE)

        threading.Thread(target=watch, name="sigterm-watchdog", daemon=True).start()

    def _uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        if self._wakeup is not None:
            read_fd, write_fd, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_fd)  # the watchdog reads EOF and ends
            self._wakeup = None

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        # before Lightning registers its handlers (it keeps a requeue handler that is already installed)
        for signum in self.requeue_signals:
            self._install(signum, self._on_requeue)
        self._install(signal.SIGTERM, self._on_term)
        self._start_watchdog()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trainer is not None:  # Lightning wrapped SIGTERM in its flag-only handler: ours alone again
            signal.signal(signal.SIGTERM, self._on_term)
        self.in_batch_loop = True

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requeue_requested is not None, all=False):
            return
        if self.requeue_requested is None:
            self.requeue_requested = self.requeue_signals[0]  # another rank got it
        self._save_last(trainer)
        _log_this_step(trainer)
        self._exit_for_requeue(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stopped_mid_epoch = None

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.inside_epoch = True  # until on_train_epoch_end: checkpoints written now are inside an epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs before the checkpoint callbacks' on_train_epoch_end (they come last)
        self.inside_epoch = False
        batches = trainer.fit_loop.epoch_loop.batch_progress
        if not batches.is_last_batch and batches.current.processed < trainer.num_training_batches:
            self.stopped_mid_epoch = trainer.current_epoch

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.in_batch_loop = False
        if self.last_saved_step != trainer.global_step:
            self._save_last(trainer)  # the final state, so that a requeue during the final scoring loses nothing
        if self.requeue_requested is not None and self.last_saved_step == trainer.global_step:
            self._exit_for_requeue(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()
            self._trainer = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()  # no teardown hook after an exception

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.last_saved_step = trainer.global_step
        if self.inside_epoch:
            mark_running_epoch_started(checkpoint)
        if self.stopped_mid_epoch is not None:
            mark_stopped_epoch_unfinished(checkpoint, self.stopped_mid_epoch)
        else:
            mark_finished_epoch_as_at_its_end(checkpoint, trainer.num_training_batches)

    def _save_last(self, trainer: pl.Trainer) -> None:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None)
        if not folder:
            return  # checkpointing is off (callbacks without ModelCheckpoint): nothing to save to
        trainer.save_checkpoint(str(Path(folder) / LAST_NAME), weights_only=False)  # whole: it resumes exactly


def _log_this_step(trainer: pl.Trainer) -> None:
    """Send this batch's logged metrics to the loggers now: Lightning does it after ``on_train_batch_end``, which a
    requeue exit never reaches, and the checkpoint just written holds this step (the requeued run continues after
    it): without this, its metrics would be missing from every logger (a gap in the W&B curves). Every rank calls it
    (metrics with ``sync_dist`` reduce across ranks, as Lightning's own call would)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and trainer.loggers:
        connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()


def mark_running_epoch_started(checkpoint: dict) -> None:
    """A checkpoint written inside an epoch records that epoch as started (ready = started = completed + 1).

    After a resume from a checkpoint written on an epoch's last batch, Lightning finishes that epoch and runs the
    next one without counting it as started (ready = started = completed): every checkpoint written in that next
    epoch then restores as "no epoch running" and the resumed run draws another epoch's data order and per-step
    randomness (found by the 50-kill loop: a second resume inside such an epoch diverged from step 211)."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not fit_loop or "epoch_progress" not in fit_loop:
        return
    for tracker in (fit_loop["epoch_progress"]["total"], fit_loop["epoch_progress"]["current"]):
        if tracker["ready"] == tracker["completed"]:
            tracker.update(ready=tracker["completed"] + 1, started=tracker["completed"] + 1)


def mark_stopped_epoch_unfinished(checkpoint: dict, epoch: int) -> None:
    """In a checkpoint written after ``max_steps`` / ``max_time`` stopped training in the middle of ``epoch``,
    record that epoch as started and unfinished, as any checkpoint written during the epoch does, so that a
    resumed run continues it (Lightning counts it as finished once ``on_train_epoch_end`` ran)."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not fit_loop or "epoch_progress" not in fit_loop:
        return
    for tracker in (fit_loop["epoch_progress"]["total"], fit_loop["epoch_progress"]["current"]):
        tracker.update(ready=epoch + 1, started=epoch + 1, processed=epoch, completed=epoch)


def mark_finished_epoch_as_at_its_end(checkpoint: dict, batches_per_epoch: int | float) -> None:
    """A checkpoint written after an epoch's end hooks (at the end of training, when ``max_steps`` fell on the
    last batch of an epoch) counts that epoch as completed, which Lightning restores as one epoch too many.
    Record it as the checkpoint written at the end of that last batch records it (which restores exactly)."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not fit_loop or "epoch_progress" not in fit_loop:
        return
    epochs, batches = fit_loop["epoch_progress"], fit_loop["epoch_loop.batch_progress"]
    done = batches["current"]["processed"]
    current = epochs["current"]
    if not (done > 0 and done >= batches_per_epoch and current["completed"] == current["processed"] == current["ready"]
            and batches["current"]["completed"] == done):
        return
    epoch = current["ready"] - 1
    for tracker in (epochs["total"], epochs["current"]):
        tracker.update(processed=tracker["ready"] - 1, completed=tracker["ready"] - 1)
    for tracker in (batches["total"], batches["current"]):
        tracker["completed"] = tracker["processed"] - 1
    batches["is_last_batch"] = True
    state = fit_loop.get("epoch_loop.state_dict") or {}
    if "_batches_that_stepped" in state:
        state["_batches_that_stepped"] -= 1  # Lightning adds the last batch again when it restores this stage
    checkpoint["epoch"] = epoch
