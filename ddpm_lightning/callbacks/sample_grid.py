"""SampleGridCallback: a fixed-seed EMA sample grid every N steps, saved as PNG and sent to the loggers.

In W&B each grid is ``samples/grid`` captioned with the step and the sampler settings (``grid_caption``); a
class-conditional model's grid is also ``samples/classes``, one panel per class captioned with the class's name
(``DiffusionDataModule.class_names``) or number.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from ..config.schema import SampleConfig
from ..sampling import resolve_sampler, save_grid


def grid_caption(step: int, settings: SampleConfig, guidance: str = "unguided") -> str:
    """``step 1000: ddpm, 15 steps, unguided`` (eta for DDIM, the schedule when not ADM's respacing)."""
    steps = "all" if settings.steps is None else settings.steps
    eta = f", eta {settings.eta:g}" if settings.method == "ddim" else ""
    schedule = "" if settings.schedule == "adm" else f", {settings.schedule} schedule"
    return f"step {step}: {settings.method}, {steps} steps{eta}{schedule}, {guidance}"


def class_panels(images: torch.Tensor, per_class: int, names: Sequence[str] | None) -> tuple[list, list[str]]:
    """One uint8 HWC array per class (its ``per_class`` images in a row) and its caption: the class's name and
    number, or ``class k``."""
    from torchvision.utils import make_grid

    panels, captions = [], []
    for k, start in enumerate(range(0, len(images), per_class)):
        row = make_grid(((images[start:start + per_class].clamp(-1, 1) + 1) / 2).float().cpu(), nrow=per_class,
                        padding=2, pad_value=0.5)
        panels.append((row * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        captions.append(f"{names[k]} (class {k})" if names is not None and k < len(names) else f"class {k}")
    return panels, captions


def log_image(trainer: pl.Trainer, key: str, path: Path, step: int, caption: str | None = None) -> None:
    """Send a saved image to every logger that takes images (W&B with its caption, TensorBoard)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=key, images=[str(path)], step=step, **({"caption": [caption]} if caption else {}))
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            from torchvision.io import read_image

            logger.experiment.add_image(key, read_image(str(path)), global_step=step)


class SampleGridCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), sample a grid with the EMA.

    Class-conditional models get one row per class (``per_class`` images each); the initial noise is
    fixed by ``seed`` so grids are comparable across steps. ``method``/``steps``/``eta`` override the run's own
    sampler settings (``sample:``; None keeps them, ``steps="all"``: every one of the T steps), resolved once when
    training starts (``sampling.resolve_sampler``).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 64, per_class: int = 8,
                 method: str | None = None, steps: int | str | None = None, eta: float | None = None,
                 seed: int = 0, dirname: str = "samples", on_train_end: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 disables periodic grids), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.per_class = per_class
        self.overrides = {"method": method, "steps": steps, "eta": eta}
        resolve_sampler(None, {"method": method})  # an unknown method fails here, the rest with the run's own
        self.settings: SampleConfig | None = None  # resolved against the run's own settings in on_fit_start
        self.seed = seed
        self.dirname = dirname
        self.at_train_end = on_train_end
        self.last_path: Path | None = None

    def _grid(self, trainer: pl.Trainer, module: pl.LightningModule, tag: str) -> Path:
        if self.settings is None:  # called outside fit
            self.settings = resolve_sampler(module.sample_settings, self.overrides)
        num_classes = getattr(module, "num_classes", None)
        if num_classes:
            labels = torch.arange(num_classes).repeat_interleave(self.per_class)
            n, nrow = labels.numel(), self.per_class
        else:
            labels, n = "random", self.num_samples
            nrow = max(1, int(n ** 0.5))
        with trainer.precision_plugin.forward_context():  # at the training precision, as the metrics sample
            images, _ = module.sample(n, self.settings, seed=self.seed, y=labels if num_classes else "random")
        out_dir = Path(trainer.default_root_dir) / self.dirname
        path = save_grid(images, out_dir / f"{tag}.png", nrow=nrow)
        step = trainer.global_step
        log_image(trainer, "samples/grid", path, step, caption=grid_caption(step, self.settings))
        if num_classes:
            self._log_classes(trainer, images, step)
        self.last_path = path
        return path

    def _log_classes(self, trainer: pl.Trainer, images: torch.Tensor, step: int) -> None:
        """``samples/classes``: one captioned panel per class, for the loggers that take lists of images (W&B)."""
        loggers = [logger for logger in trainer.loggers if hasattr(logger, "log_image")]
        if not loggers:
            return
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
        panels, captions = class_panels(images, self.per_class, names)
        for logger in loggers:
            logger.log_image(key="samples/classes", images=panels, step=step, caption=captions)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.settings = resolve_sampler(pl_module.sample_settings, self.overrides)

    @override
    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._grid(trainer, pl_module, f"step_{step:07d}")

    @override
    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self._grid(trainer, pl_module, "final")
