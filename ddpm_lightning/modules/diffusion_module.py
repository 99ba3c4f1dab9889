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

from ..config.schema import DiffusionConfig, SampleConfig
from ..diffusion import UniformSampler, create_named_schedule_sampler
from ..sampling import Guidance, resolve_sampler, sample_images, sampling_process
from .builders import ScheduledAdamW, build_diffusion, build_unet, learns_sigma
from .ema import make_ema, make_posthoc_emas
from .rng import collect_rng_states, restore_rng_states, seeded_rng, training_step_seed

NUM_QUARTILES = 4


def check_trains_variance(diffusion: Mapping[str, Any]) -> None:
    """Refuse training a learned variance with L_simple, which has no variance term (the head would stay at its
    initial values). OpenAI's reference adds the VB term in that case: that is ``loss_type=hybrid`` here."""
    if learns_sigma(diffusion) and diffusion.get("loss_type", DiffusionConfig.loss_type) == "simple":
        raise ValueError(f"diffusion.loss_type=simple trains no variance head, but diffusion.var_type="
                         f"{diffusion.get('var_type')} learns one: use diffusion.loss_type=hybrid (L_simple + "
                         f"lambda * L_vlb, as ADM) or vlb, or a fixed diffusion.var_type (fixed_small, fixed_large)")


class DiffusionModule(ScheduledAdamW, pl.LightningModule):
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
        if float(optim.get("lr", 1e-4)) <= 0:
            raise ValueError(f"optim.lr must be > 0, got {optim.get('lr')}")
        self.save_hyperparameters(ignore=["run_config"])
        self.run_config = dict(run_config or {})
        self.diffusion = build_diffusion(diffusion)
        self.class_cond = bool(model.get("class_cond", False))
        self.num_classes = num_classes if self.class_cond else None
        self.null_label = num_classes if (self.class_cond and p_uncond > 0) else None
        self.net = build_unet(model, image_size=image_size, channels=channels, num_classes=num_classes,
                              learn_sigma=learns_sigma(diffusion), p_uncond=p_uncond)
        self.channels_last = bool(model.get("channels_last", False))
        if self.channels_last:  # before the EMA copy, so that both nets run NHWC
            self.net.to(memory_format=torch.channels_last)
        self.ema = make_ema(self.net, float(ema.get("decay", 0.9999)), bool(ema.get("warmup", True)))
        self.posthoc_ema = make_posthoc_emas(self.net, ema.get("posthoc_sigma_rels"),  # EDM2 power EMAs
                                             int(ema.get("posthoc_every_n_steps", 0)))
        self.schedule_sampler = create_named_schedule_sampler(timestep_sampler, self.diffusion.num_timesteps)
        self.sample_settings: SampleConfig = resolve_sampler(sample)
        self._sampling_processes: dict[tuple[str, str, str], Any] = {}
        self.sampling_process(self.sample_settings)  # a bad steps/schedule combination fails before training
        self.compile = bool(model.get("compile", False))
        # Kept out of the module tree so the compiled wrappers add no duplicate keys to the state dict.
        object.__setattr__(self, "_train_step_fn", torch.compile(self.net) if self.compile else self.net)
        self._compiled_for_sampling: dict[int, Any] = {}
        self.quartile_loss = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))
        self.quartile_mse = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))
        self.train_seed = torch.initial_seed()

    # ------------------------------------------------------------------ helpers
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    @property
    def ema_net(self) -> torch.nn.Module:
        return self.ema.module

    def _model_kwargs(self, y: torch.Tensor, drop_labels: bool) -> dict[str, torch.Tensor]:
        if not self.class_cond:
            return {}
        if drop_labels and self.null_label is not None:
            drop = torch.rand(y.shape, device=y.device) < self.hparams.p_uncond
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        return {"y": y}

    # ------------------------------------------------------------------ training
    def step_seed(self, batch_idx: int) -> int:
        """The seed of this rank's draws for batch ``batch_idx`` of the current epoch."""
        return training_step_seed(self.train_seed, self._trainer, batch_idx)

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
        quartile = (t * NUM_QUARTILES) // self.diffusion.num_timesteps
        counts = torch.bincount(quartile, minlength=NUM_QUARTILES).to(loss.dtype)
        for name, values, metrics in (("loss", losses["loss"], self.quartile_loss),
                                      ("mse", losses["mse"], self.quartile_mse)):
            sums = torch.zeros(NUM_QUARTILES, device=x.device, dtype=loss.dtype).index_add_(
                0, quartile, values.detach().to(loss.dtype))
            for q in range(NUM_QUARTILES):
                metrics[q].update(sums[q] / counts[q].clamp(min=1), weight=counts[q])
                self.log(f"train/{name}_q{q}", metrics[q], on_step=False, on_epoch=True)
        return loss

    @override
    def optimizer_step(self, *args, **kwargs) -> None:
        # EMA right after the step: checkpoints written at this batch's end already include it.
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.net)
        for power_ema in self.posthoc_ema:
            power_ema.update_parameters(self.net)

    # ------------------------------------------------------------------ validation
    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        """Unbiased single-step estimate of the EMA model's VLB in bits/dim: prior + K * L_t."""
        x, y = batch
        generator = torch.Generator(device=x.device).manual_seed(10_007 + batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        losses = self.diffusion.training_losses(self.ema_net, x, t, noise=noise,
                                                model_kwargs=self._model_kwargs(y, drop_labels=False))
        vlb = self.diffusion.prior_bpd(x) + self.diffusion.num_timesteps * losses["vb"]
        self.log("val/vlb_bpd", vlb.mean(), prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log("val/mse", losses["mse"].mean(), batch_size=x.shape[0], sync_dist=True)

    # ------------------------------------------------------------------ sampling
    def sampling_process(self, settings: SampleConfig) -> Any:
        """The respaced process ``settings`` walk (``sampling.sampling_process``), resolved once per method,
        steps and schedule and kept: a command's batches all walk the same one."""
        key = (settings.method, repr(settings.steps), settings.schedule)
        if key not in self._sampling_processes:
            self._sampling_processes[key] = sampling_process(self.diffusion, settings)
        return self._sampling_processes[key]

    def sample(self, num_samples: int, settings: SampleConfig | None = None, *, guidance: Guidance | None = None,
               use_ema: bool = True, y: Any = "random", seed: int | None = 0, first_index: int = 0,
               progress: bool = False) -> tuple[torch.Tensor, Any]:
        """Images in [-1, 1] (CPU) and their labels: ``sample_images`` with the EMA (or raw) network.

        ``settings``: the sampler settings, whole (None: this run's own ``sample_settings``; a command resolves
        its overrides once with ``sampling.resolve_sampler``); ``guidance``: ``sampling.Guidance`` (built by
        ``modules.guidance.load_guidance``). ``y``, ``seed``, ``first_index``, ``progress`` as ``sample_images``.
        """
        settings = settings or self.sample_settings
        net = self.ema_net if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            return sample_images(self._for_sampling(net), self.diffusion, num_samples, self.image_shape, settings,
                                 guidance=guidance, num_classes=self.num_classes, null_label=self.null_label, y=y,
                                 seed=seed, first_index=first_index, device=self.device, progress=progress,
                                 process=self.sampling_process(settings))
        finally:
            net.train(was_training)

    def _for_sampling(self, net: torch.nn.Module):
        """``net``, compiled once per network when ``model.compile`` is set (it is updated in place, so the
        compiled wrapper stays valid as training goes on)."""
        if not self.compile:
            return net
        if id(net) not in self._compiled_for_sampling:
            self._compiled_for_sampling[id(net)] = torch.compile(net)
        return self._compiled_for_sampling[id(net)]

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = self.run_config
        checkpoint["timestep_sampler"] = self.schedule_sampler.state_dict()
        checkpoint["rng_states"] = collect_rng_states()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("run_config", self.run_config)
        if "timestep_sampler" in checkpoint:
            self.schedule_sampler.load_state_dict(checkpoint["timestep_sampler"])
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_trains_variance(self.hparams.diffusion)
            self.train_seed = torch.initial_seed()  # pl.seed_everything ran in this process (every DDP rank)
        # ddp_spawn pickles the module through shared memory: give each process its own sampler history.
        self.schedule_sampler.load_state_dict(self.schedule_sampler.state_dict())

    @override
    def on_fit_start(self) -> None:
        params = sum(p.numel() for p in self.net.parameters())
        rank_zero_info(f"network: {params / 1e6:.2f}M parameters; diffusion: {self.diffusion.num_timesteps} steps, "
                       f"{self.diffusion.mean_type}/{self.diffusion.var_type}/{self.diffusion.loss_type}")
