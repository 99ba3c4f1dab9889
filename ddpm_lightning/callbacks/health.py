"""Training health: gradient norm and loss scale logging, and skipping steps with a non-finite loss or gradient.

How a step is skipped. Lightning's documented way is to return None from ``training_step``; we do not, because
under DDP a rank that returns None skips ``backward`` while the others wait in its gradient all-reduce (a
hang), and because a loss can be finite while its gradient is not. Instead ``on_before_optimizer_step`` (after
backward, after DDP's all-reduce and after AMP unscaling, before gradient clipping) checks the loss and the
gradient norm; when either is non-finite it drops the gradients (``grad = None``), so clipping sees nothing
and ``optimizer.step`` leaves every parameter and its AdamW moments untouched. Under DDP the decision is
reduced over ranks, so all ranks skip together. What still advances on a skipped step: ``global_step``, the
LR schedule, and the EMA (which averages in the unchanged weights). Under ``16-mixed`` non-finite gradients
are the GradScaler's job (it skips the step and lowers the scale), so only a non-finite loss counts there.

After ``max_nonfinite_steps`` consecutive skipped steps the run stops with ``TrainingDiverged`` (one line
through the CLI) before anything else is written, so the checkpoints on disk are the last good ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class TrainingHealth(pl.Callback):
    """Logs ``train/grad_norm`` (total 2-norm before clipping), ``train/loss_scale`` (16-mixed) and
    ``train/nonfinite_steps`` (skipped so far); skips non-finite steps; stops after ``max_nonfinite_steps``
    consecutive ones (None: never stop).
    """

    def __init__(self, max_nonfinite_steps: int | None = 5, log_grad_norm: bool = True) -> None:
        if max_nonfinite_steps is not None and (isinstance(max_nonfinite_steps, bool)
                                                or int(max_nonfinite_steps) < 1):
            raise ValueError(f"train.max_nonfinite_steps must be an integer >= 1 or null, got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = None if max_nonfinite_steps is None else int(max_nonfinite_steps)
        self.log_grad_norm = bool(log_grad_norm)
        self.consecutive = 0
        self.total = 0
        self.first_bad_step: int | None = None
        self._loss_finite: torch.Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return "TrainingHealth"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.total = int(state_dict.get("total", 0))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # AND over accumulated micro-batches
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        finite = torch.ones((), dtype=torch.bool, device=pl_module.device)
        if self._loss_finite is not None:
            finite &= self._loss_finite.to(finite.device)
        if norm is not None and scaler is None:  # under a GradScaler inf gradients are the scaler's business
            finite &= torch.isfinite(norm).to(finite.device)
        finite = trainer.strategy.reduce_boolean_decision(bool(finite), all=True)  # one host sync per step
        self._loss_finite = None
        if self.log_grad_norm and norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        if scaler is not None:
            pl_module.log("train/loss_scale", float(scaler.get_scale()), on_step=True, on_epoch=False)
        if finite:
            self.consecutive = 0
            self.first_bad_step = None
        else:
            for p in params:
                p.grad = None
            self.consecutive += 1
            self.total += 1
            if self.first_bad_step is None:
                self.first_bad_step = trainer.global_step + 1
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False)
        if self.max_nonfinite_steps is not None and self.consecutive >= self.max_nonfinite_steps:
            raise TrainingDiverged(self._diverged_message(trainer))

    def _diverged_message(self, trainer: pl.Trainer) -> str:
        step = trainer.global_step + 1
        first = self.first_bad_step if self.first_bad_step is not None else step - self.consecutive + 1
        saved = [getattr(cb, "_last_checkpoint_saved", "") for cb in trainer.checkpoint_callbacks]
        last = max((p for p in saved if p and Path(p).is_file()), key=lambda p: Path(p).stat().st_mtime, default=None)
        where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
        return (f"training diverged: {self.consecutive} consecutive steps ({first}-{step}) had a non-finite loss or "
                f"gradient and were skipped ({self.total} in total); stopped, {where}. Lower optim.lr, check the "
                f"data, or raise train.max_nonfinite_steps")

