"""DiffusionModule: wires the ADM UNet, GaussianDiffusion, a timestep sampler, AdamW and an EMA.

No formula and no timestep loop lives here: the math is ``ddpm_lightning.diffusion``, the sampler loop
is ``ddpm_lightning.sampling``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from typing_extensions import override

from ..diffusion import NUM_QUARTILES, UniformSampler, create_named_schedule_sampler, drop_labels_to_null
from ..sampling import resolve_sampler
from .builders import build_diffusion, build_unet, check_trains_variance, ema_settings, learns_sigma
from .ema import make_ema, make_posthoc_emas
from .plumbing import TrainingPlumbing
from .rng import seeded_rng
from .sample_images import SamplesImages


class DiffusionModule(TrainingPlumbing, SamplesImages, pl.LightningModule):
    """Trains a denoising network with the configured diffusion loss.

    Args (plain primitives, saved as hyperparameters so a checkpoint alone rebuilds the module):
        model: UNet constructor args (without image/channel/class sizes) + ``class_cond``, ``compile``,
            ``channels_last``.
        diffusion: ``schedule``, ``num_timesteps``, ``mean_type``, ``var_type``, ``loss_type``, ...
        optim: ``lr``, ``weight_decay``, ``betas``, ``eps``, ``warmup_steps``, ``fused``.
        ema: ``decay``, ``warmup``.
        image_size, channels, num_classes: from the data set.
        p_uncond: label-dropout probability (classifier-free guidance); the null label is ``num_classes``.
        timestep_sampler: ``uniform`` or ``loss-second-moment`` (Improved DDPM importance sampling).
            Its importance weights 1 / (K p(t)) multiply the per-example losses.
        sample: the run's own sampler settings (``SampleConfig`` fields; the missing ones keep its defaults), as
            ``sample_settings``: what ``sample()`` uses unless given other (resolved) settings.
        run_config: the whole resolved run config (plain dict), stored in checkpoints.

    Randomness: every draw of a training step (t, noise, label dropout, network dropout) comes from a stream
    seeded by (run seed, global rank, epoch, batch index) (``modules/rng.py``): each DDP rank draws its own,
    reruns and resumed runs draw the same. The run seed is ``torch.initial_seed()`` when training starts, the
    ``seed`` that ``pl.seed_everything`` set in every process.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        diffusion: Mapping[str, Any],
        optim: Mapping[str, Any],
        ema: Mapping[str, Any],
        image_size: int,
        channels: int,
        num_classes: int | None = None,
        p_uncond: float = 0.0,
        timestep_sampler: str = "uniform",
        sample: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"train.p_uncond must lie in [0, 1), got {p_uncond}")
        self.init_plumbing(optim, run_config)
        self.save_hyperparameters(ignore=["run_config"])
        self.diffusion = build_diffusion(diffusion)
        self.class_cond = bool(model.get("class_cond", False))
        self.num_classes = num_classes if self.class_cond else None
        self.null_label = num_classes if (self.class_cond and p_uncond > 0) else None
        self.net = build_unet(model, image_size=image_size, channels=channels, num_classes=num_classes,
                              learn_sigma=learns_sigma(diffusion), p_uncond=p_uncond)
        self.channels_last = bool(model.get("channels_last", False))
        if self.channels_last:  # before the EMA copy, so that both nets run NHWC
            self.net.to(memory_format=torch.channels_last)
        ema = ema_settings(ema)
        self.ema = make_ema(self.net, float(ema.decay), bool(ema.warmup))
        self.posthoc_ema = make_posthoc_emas(self.net, ema.posthoc_sigma_rels, ema.posthoc_every_n_steps)  # EDM2
        self.schedule_sampler = create_named_schedule_sampler(timestep_sampler, self.diffusion.num_timesteps)
        self.compile = bool(model.get("compile", False))
        self.init_sampling(resolve_sampler(sample))  # a bad steps/schedule combination fails before training
        # Kept out of the module tree so the compiled wrappers add no duplicate keys to the state dict.
        object.__setattr__(self, "_train_step_fn", torch.compile(self.net) if self.compile else self.net)
        self.quartile_loss = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))
        self.quartile_mse = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))

    # ------------------------------------------------------------------ helpers
    @property
    def ema_net(self) -> torch.nn.Module:
        return self.ema.module

    def averaged_models(self) -> list[torch.nn.Module]:
        return [self.ema, *self.posthoc_ema]

    def _model_kwargs(self, y: torch.Tensor, drop_labels: bool) -> dict[str, torch.Tensor]:
        if not self.class_cond:
            return {}
        if drop_labels and self.null_label is not None:  # classifier-free guidance's label dropout
            y = drop_labels_to_null(y, self.hparams.p_uncond, self.null_label)
        return {"y": y}

    # ------------------------------------------------------------------ training
    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with seeded_rng(self.step_seed(batch_idx), x.device):
            t, weights = self.schedule_sampler.sample(x.shape[0], device=x.device)
            losses = self.diffusion.training_losses(self._train_step_fn, x, t,
                                                    model_kwargs=self._model_kwargs(y, drop_labels=True))
        if not isinstance(self.schedule_sampler, UniformSampler):
            all_t = self.all_gather(t).reshape(-1)
            all_losses = self.all_gather(losses["loss"].detach()).reshape(-1)
            finite = torch.isfinite(all_losses)  # a skipped non-finite step must not poison the history
            self.schedule_sampler.update_with_all_losses(all_t[finite], all_losses[finite])
        loss = (losses["loss"] * weights).mean()

        batch_size = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/mse", losses["mse"].mean(), batch_size=batch_size)
        self.log("train/vb", losses["vb"].mean(), batch_size=batch_size)
        self.log_quartiles("train/loss", losses["loss"].detach().to(loss.dtype), t, self.quartile_loss)
        self.log_quartiles("train/mse", losses["mse"].detach().to(loss.dtype), t, self.quartile_mse)
        return loss

    # ------------------------------------------------------------------ validation
    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        """Unbiased single-step estimate of the EMA model's VLB in bits/dim: prior + K * L_t."""
        x, y = batch
        generator = torch.Generator(device=x.device).manual_seed(10_007 + batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        out = self.diffusion.vlb_estimate(self.ema_net, x, t, noise=noise,
                                          model_kwargs=self._model_kwargs(y, drop_labels=False))
        self.log("val/vlb_bpd", out["vlb_bpd"].mean(), prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log("val/mse", out["mse"].mean(), batch_size=x.shape[0], sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["timestep_sampler"] = self.schedule_sampler.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "timestep_sampler" in checkpoint:
            self.schedule_sampler.load_state_dict(checkpoint["timestep_sampler"])

    def check_fit(self) -> None:
        check_trains_variance(self.hparams.diffusion)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        # ddp_spawn pickles the module through shared memory: give each process its own sampler history.
        self.schedule_sampler.load_state_dict(self.schedule_sampler.state_dict())

    @override
    def on_fit_start(self) -> None:
        params = sum(p.numel() for p in self.net.parameters())
        rank_zero_info(f"network: {params / 1e6:.2f}M parameters; diffusion: {self.diffusion.num_timesteps} steps, "
                       f"{self.diffusion.mean_type}/{self.diffusion.var_type}/{self.diffusion.loss_type}")
