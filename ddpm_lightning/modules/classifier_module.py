"""ClassifierModule: ADM's noisy classifier p_phi(y | x_t, t) for classifier guidance.

An ``EncoderUNet`` trained with cross-entropy on ``x_t = q_sample(x_0, t)`` at uniformly drawn ``t``. The
forward process comes from the same ``diffusion`` dict a DiffusionModule gets, so the classifier sees the
T and beta schedule of the diffusion model it will guide; the checkpoint records them
(``hyper_parameters`` and ``guidance_info``) for ``check_classifier_compatible``; ``modules/guidance.py``
turns such a checkpoint into the ``cond_fn`` that guides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from typing_extensions import override

from ..config.schema import EMAConfig
from ..diffusion import NUM_QUARTILES, noisy_classifier_losses, stratified_timesteps
from .builders import build_diffusion, build_encoder_unet, guidance_info
from .ema import make_ema
from .plumbing import TrainingPlumbing
from .rng import seeded_rng


class ClassifierModule(TrainingPlumbing, pl.LightningModule):
    """Trains a noisy classifier on x_t ~ q(x_t | x_0) with t ~ U{0, ..., max_t - 1}.

    Args (plain primitives, saved as hyperparameters so a checkpoint alone rebuilds the module):
        classifier: EncoderUNet constructor args without ``image_size``/``in_channels``/``out_channels``.
        diffusion: the diffusion model's dict (``schedule``, ``num_timesteps``, ...); only q is used, on
            the original T steps (``timestep_respacing`` is ignored: the classifier must know every step).
        optim: ``lr``, ``weight_decay``, ``betas``, ``eps``, ``warmup_steps`` (AdamW, linear warm-up).
        ema: ``decay``, ``warmup``; None or decay 0 turns the EMA off.
        image_size, channels, num_classes: from the (labelled) data set.
        max_t: train only on t < max_t (None: all T steps). Quartile metrics split [0, max_t).
        run_config: the whole resolved run config (plain dict), stored in checkpoints.

    Logs ``train/loss``, ``train/acc``, ``train/{loss,acc}_q0..q3``, ``val/loss``, ``val/acc`` and
    ``val/acc_q0..q3``. Validation draws t (stratified by quartile) and noise from a seed per batch index,
    so numbers are comparable across validations.
    """

    def __init__(
        self,
        classifier: Mapping[str, Any],
        diffusion: Mapping[str, Any],
        optim: Mapping[str, Any],
        ema: Mapping[str, Any] | None,
        image_size: int,
        channels: int,
        num_classes: int | None,
        max_t: int | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(f"a noisy classifier needs a labelled data set with >= 2 classes, got "
                             f"num_classes={num_classes}; choose labelled data (e.g. data=animal_mnist)")
        self.init_plumbing(optim, run_config)
        self.save_hyperparameters(ignore=["run_config"])
        self.diffusion = build_diffusion({**diffusion, "timestep_respacing": None})
        total = self.diffusion.num_timesteps
        if max_t is not None and not 1 <= int(max_t) <= total:
            raise ValueError(f"max_t must lie in [1, {total}] (T of the diffusion process) or be null, "
                             f"got {max_t}")
        self.max_t = total if max_t is None else int(max_t)
        self.num_classes = int(num_classes)
        self.net = build_encoder_unet(classifier, image_size=image_size, channels=channels,
                                      num_classes=self.num_classes)
        if ema is not None and ema.get("posthoc_sigma_rels"):
            raise ValueError("ema.posthoc_sigma_rels (post-hoc EMA) is for diffusion training; the noisy classifier "
                             "keeps one EMA: set ema.posthoc_sigma_rels=[]")
        decay = 0.0 if ema is None else float(ema.get("decay", EMAConfig.decay))
        self.ema = make_ema(self.net, decay, bool(ema.get("warmup", EMAConfig.warmup))) if decay > 0 else None
        self.train_loss_q = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))
        self.train_acc_q = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))
        self.val_acc_q = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))

    # ------------------------------------------------------------------ helpers
    @property
    def classifier_net(self) -> torch.nn.Module:
        """The network to guide with: the EMA copy when the EMA is on, else the trained weights."""
        return self.net if self.ema is None else self.ema.module

    @property
    def guidance_info(self) -> dict[str, Any]:
        """T, schedule, image size, channels and classes this classifier was trained for."""
        return guidance_info(self.hparams)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of ``classifier_net`` for x_t at original-process steps t."""
        return self.classifier_net(x, t)

    def averaged_models(self) -> list[torch.nn.Module]:
        return [] if self.ema is None else [self.ema]

    # ------------------------------------------------------------------ training
    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        # t, the noise and dropout from this rank's stream for this batch (modules/rng.py): under DDP every rank
        # draws its own, and a resumed run repeats them exactly
        with seeded_rng(self.step_seed(batch_idx), x.device):
            t = torch.randint(0, self.max_t, (x.shape[0],), device=x.device)
            noise = torch.randn_like(x)
            out = noisy_classifier_losses(self.diffusion, self.net, x, y, t, noise=noise)
        losses, correct = out["loss"], out["correct"]
        loss = losses.mean()
        batch_size = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/acc", correct.mean(), prog_bar=True, batch_size=batch_size)
        self.log_quartiles("train/loss", losses.detach(), t, self.train_loss_q, self.max_t)
        self.log_quartiles("train/acc", correct, t, self.train_acc_q, self.max_t)
        return loss

    # ------------------------------------------------------------------ validation
    def validation_timesteps(self, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
        """Steps in [0, max_t) stratified by quartile (example i in quartile i % 4), uniform within it."""
        return stratified_timesteps(batch_size, self.max_t, generator, device)

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        generator = torch.Generator(device=x.device).manual_seed(10_007 + batch_idx)
        t = self.validation_timesteps(x.shape[0], generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        out = noisy_classifier_losses(self.diffusion, self.classifier_net, x, y, t, noise=noise)
        losses, correct = out["loss"], out["correct"]
        batch_size = x.shape[0]
        self.log("val/loss", losses.mean(), batch_size=batch_size, sync_dist=True)
        self.log("val/acc", correct.mean(), prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log_quartiles("val/acc", correct, t, self.val_acc_q, self.max_t)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["guidance_info"] = self.guidance_info

    @override
    def on_fit_start(self) -> None:
        params = sum(p.numel() for p in self.net.parameters())
        rank_zero_info(f"noisy classifier: {params / 1e6:.2f}M parameters, {self.num_classes} classes; "
                       f"t < {self.max_t} of T={self.diffusion.num_timesteps} "
                       f"({self.hparams.diffusion.get('schedule', 'linear')})")


def build_classifier_module(run_config: Mapping[str, Any], datamodule) -> ClassifierModule:
    """The ClassifierModule of a resolved run config as a plain dict (``objective: classifier``); sizes and
    classes from the data. Reads ``classifier`` (EncoderUNet args + ``max_t``), ``diffusion``, ``optim``, ``ema``.
    """
    classifier = dict(run_config.get("classifier") or {})
    if not classifier:
        raise ValueError("objective=classifier needs a classifier config group (e.g. classifier=default)")
    max_t = classifier.pop("max_t", None)
    return ClassifierModule(
        classifier=classifier, diffusion=run_config["diffusion"], optim=run_config.get("optim") or {},
        ema=run_config.get("ema"), image_size=int(datamodule.image_size), channels=int(datamodule.channels),
        num_classes=datamodule.num_classes, max_t=None if max_t is None else int(max_t),
        run_config=run_config)
