"""Build the network and the diffusion process from plain config values (dicts of primitives)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any

from ..config.choices import LR_SCHEDULES
from ..config.schema import DiffusionConfig, EMAConfig, OptimConfig
from ..diffusion import GaussianDiffusion, create_diffusion
from ..models import EncoderUNet

#: the ``diffusion:`` config keys: ``create_diffusion``'s parameters
DIFFUSION_KEYS = tuple(inspect.signature(create_diffusion).parameters)
MODEL_EXTRA_KEYS = ("class_cond", "compile", "channels_last")


def learns_sigma(diffusion_cfg: Mapping[str, Any]) -> bool:
    return diffusion_cfg.get("var_type", DiffusionConfig.var_type) in ("learned", "learned_range")


def build_diffusion(cfg: Mapping[str, Any]) -> GaussianDiffusion:
    unknown = set(cfg) - set(DIFFUSION_KEYS)
    if unknown:
        raise ValueError(f"unknown diffusion keys {sorted(unknown)}; allowed: {', '.join(DIFFUSION_KEYS)}")
    return create_diffusion(**cfg)


def build_unet(model_cfg: Mapping[str, Any], *, image_size: int, channels: int, num_classes: int | None,
               learn_sigma: bool, p_uncond: float = 0.0):
    """The ADM UNet; with label dropout (p_uncond > 0) one extra class index is the null label."""
    from ..models import UNet

    kwargs = {k: (tuple(v) if isinstance(v, list | tuple) else v)
              for k, v in model_cfg.items() if k not in MODEL_EXTRA_KEYS}
    class_cond = bool(model_cfg.get("class_cond", False))
    if class_cond and not num_classes:
        raise ValueError("model.class_cond=true but the data set has no labels; set model.class_cond=false")
    if p_uncond and not class_cond:
        raise ValueError("train.p_uncond > 0 (label dropout) needs model.class_cond=true")
    return UNet(image_size=image_size, in_channels=channels, out_channels=channels * (2 if learn_sigma else 1),
                num_classes=(num_classes + (1 if p_uncond > 0 else 0)) if class_cond else None, **kwargs)




OPTIM_FIELDS = {f.name for f in dataclasses.fields(OptimConfig)}


def build_optimizer(parameters, optim: Mapping[str, Any], total_steps: int | None = None,
                    budget: TimeBudget | None = None) -> dict[str, Any]:
    """AdamW with a linear warm-up over ``optim.warmup_steps``, then ``optim.lr_schedule``: ``constant``
    (ADM), or ``cosine`` / ``linear`` decay to 0 at the run's end: ``total_steps`` (the run's
    ``trainer.max_steps``) or the end of ``budget`` (its ``trainer.max_time``), whichever comes first;
    stepped per batch."""
    import torch

    settings = OptimConfig(**{k: v for k, v in optim.items() if k in OPTIM_FIELDS})  # the schema's defaults
    factor = make_lr_factor(int(settings.warmup_steps), str(settings.lr_schedule), total_steps, budget)  # validates
    fused = settings.fused
    optimizer = torch.optim.AdamW(
        parameters, lr=float(settings.lr), betas=tuple(settings.betas), eps=float(settings.eps),
        weight_decay=float(settings.weight_decay), **({"fused": bool(fused)} if fused is not None else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TimeBudget:
    """The fraction of a run's wall-clock budget (``trainer.max_time``) spent, for an LR that decays to 0 where
    that budget stops the run (budgeted training: a time-limited run's step count is not known in advance).
    ``update`` reads Lightning's Timer (its time restored on resume) at each training batch's start; under DDP
    rank 0's value is broadcast, so every replica steps with the same LR. Holds one float: picklable."""

    def __init__(self) -> None:
        self.fraction = 0.0

    def update(self, trainer) -> None:
        timer = _timer(trainer)
        remaining = None if timer is None else timer.time_remaining("train")
        if remaining is None:
            return
        elapsed = timer.time_elapsed("train")
        total = elapsed + remaining
        fraction = min(1.0, elapsed / total) if total > 0 else 1.0
        self.fraction = float(trainer.strategy.broadcast(fraction))


class ScheduledAdamW:
    """``configure_optimizers`` for a LightningModule with ``net`` and ``hparams.optim`` (mixed in before
    ``LightningModule``): ``build_optimizer`` up to the run's end (``lr_horizon``), and the batch-start hook that keeps
    a time-budgeted decay current."""

    lr_budget: TimeBudget | None = None

    def configure_optimizers(self):
        total_steps, self.lr_budget = lr_horizon(self.trainer, self.hparams.optim)
        return build_optimizer(self.net.parameters(), self.hparams.optim, total_steps=total_steps,
                               budget=self.lr_budget)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.lr_budget is not None:  # a decaying LR under trainer.max_time: the time spent, at this step
            self.lr_budget.update(self.trainer)


def _timer(trainer):
    from lightning.pytorch.callbacks import Timer

    return next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer)), None)


def lr_horizon(trainer, optim: Mapping[str, Any]) -> tuple[int | None, TimeBudget | None]:
    """Where a decaying LR schedule ends: the trainer's ``max_steps`` (None when the run has none) and, when a
    wall-clock limit (``trainer.max_time``) may stop the run first, a ``TimeBudget`` to decay by as well
    (None for ``lr_schedule=constant`` or a run without one)."""
    steps = getattr(trainer, "max_steps", None)
    steps = int(steps) if steps is not None and int(steps) > 0 else None
    timed = str(optim.get("lr_schedule", OptimConfig.lr_schedule)) != "constant" and _timer(trainer) is not None
    return steps, (TimeBudget() if timed else None)


def lr_factor(step: int, *, warmup_steps: int, schedule: str, total_steps: int | None,
              budget: TimeBudget | None = None) -> float:
    """The LR multiplier at ``step``: a linear warm-up over ``warmup_steps``, then ``schedule``
    (constant | cosine | linear) from 1 down to 0 at the run's end: ``total_steps`` or the end of the time
    ``budget``, whichever is nearer (the time fraction counts from the run's start)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        progress = 0.0
    elif total_steps <= warmup_steps:  # a run that ends inside its warm-up (a short smoke run of a decaying default)
        progress = 1.0
    else:
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if budget is not None:
        progress = max(progress, budget.fraction)
    progress = min(1.0, progress)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_factor(warmup_steps: int, schedule: str = "constant", total_steps: int | None = None,
                   budget: TimeBudget | None = None):
    """``lr_factor`` with its settings bound, validated. A ``functools.partial``: picklable (DDP spawn pickles
    the trainer state), and with an empty ``__dict__``, so LambdaLR's state in a checkpoint carries none of the
    settings and a resumed run follows its own config (e.g. a longer ``trainer.max_steps``)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown optim.lr_schedule {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant" and (total_steps is None or total_steps <= 0) and budget is None:
        raise ValueError(f"optim.lr_schedule={schedule} decays to the run's end, but the run has neither "
                         f"trainer.max_steps nor trainer.max_time; set one of them or optim.lr_schedule=constant")
    return functools.partial(lr_factor, warmup_steps=int(warmup_steps), schedule=schedule,
                             total_steps=None if total_steps is None else int(total_steps), budget=budget)


def guidance_info(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The compatibility info (``diffusion.GUIDANCE_INFO_KEYS``) of a DiffusionModule's or ClassifierModule's
    hyperparameters: ``diffusion.num_timesteps`` / ``diffusion.schedule`` (defaults 1000 / linear, as
    ``build_diffusion``), ``image_size``, ``channels`` and ``num_classes``."""
    diffusion = hparams.get("diffusion") or {}
    num_classes = hparams.get("num_classes")
    return {"num_timesteps": int(diffusion.get("num_timesteps", 1000)),
            "schedule": str(diffusion.get("schedule", "linear")),
            "image_size": int(hparams["image_size"]), "channels": int(hparams["channels"]),
            "num_classes": None if num_classes is None else int(num_classes)}


def check_trains_variance(diffusion: Mapping[str, Any]) -> None:
    """Refuse training a learned variance with L_simple, which has no variance term (the head would stay at its
    initial values). OpenAI's reference adds the VB term in that case: that is ``loss_type=hybrid`` here."""
    if learns_sigma(diffusion) and diffusion.get("loss_type", DiffusionConfig.loss_type) == "simple":
        raise ValueError(f"diffusion.loss_type=simple trains no variance head, but diffusion.var_type="
                         f"{diffusion.get('var_type')} learns one: use diffusion.loss_type=hybrid (L_simple + "
                         f"lambda * L_vlb, as ADM) or vlb, or a fixed diffusion.var_type (fixed_small, fixed_large)")


EMA_FIELDS = {f.name for f in dataclasses.fields(EMAConfig)}


def ema_settings(ema: Mapping[str, Any] | None) -> EMAConfig:
    """The ``ema:`` keys over the schema's defaults (the one set of defaults)."""
    return EMAConfig(**{k: v for k, v in (ema or {}).items() if k in EMA_FIELDS})


ENCODER_DATA_KEYS = ("image_size", "in_channels", "out_channels")  # come from the data set, not the config
# EncoderUNet's arguments that a classifier config may set (the sizes come from the data set)
CLASSIFIER_KEYS = tuple(name for name in inspect.signature(EncoderUNet).parameters if name not in ENCODER_DATA_KEYS)


def build_encoder_unet(classifier_cfg: Mapping[str, Any], *, image_size: int, channels: int,
                       num_classes: int) -> EncoderUNet:
    """The EncoderUNet for these config values (EncoderUNet arguments minus the data sizes)."""
    unknown = set(classifier_cfg) - set(CLASSIFIER_KEYS)
    if unknown:
        raise ValueError(f"unknown classifier keys {sorted(unknown)}; allowed: {', '.join(CLASSIFIER_KEYS)}")
    kwargs = {k: (tuple(v) if isinstance(v, list | tuple) else v) for k, v in classifier_cfg.items()}
    return EncoderUNet(image_size=image_size, in_channels=channels, out_channels=num_classes, **kwargs)
