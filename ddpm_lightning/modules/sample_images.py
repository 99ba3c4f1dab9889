"""Sampling from a trained DiffusionModule: its sampler settings, the respaced processes they walk (kept per
settings) and ``sample()`` over the EMA (or raw) network. The loop and the guidance are ``ddpm_lightning.sampling``."""

from __future__ import annotations

from typing import Any

import torch

from ..config.schema import SampleConfig
from ..sampling import Guidance, sample_images, sampling_process


class SamplesImages:
    """Mixed into ``DiffusionModule``: needs ``diffusion``, ``net``, ``ema_net``, ``num_classes``, ``null_label``,
    ``compile``, ``device`` and ``hparams.channels`` / ``hparams.image_size``."""

    sample_settings: SampleConfig

    def init_sampling(self, settings: SampleConfig) -> None:
        """The run's own sampler settings (``sample:``), checked against the process now (before training)."""
        self.sample_settings = settings
        self._sampling_processes: dict[tuple[str, str, str], Any] = {}
        self._compiled_for_sampling: dict[int, Any] = {}
        self.sampling_process(settings)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

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
