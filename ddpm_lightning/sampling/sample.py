"""Generate images from a trained network: ancestral DDPM, DDIM, DPM-Solver++ (2M, 3M, SDE-2M) or UniPC over
any step schedule, with optional classifier guidance (``cond_fn``), classifier-free guidance and autoguidance
(within a guidance interval), in batches, with per-sample seeds (image i depends on (seed, i) only).

The sampler settings travel as one object, ``SampleConfig``: ``resolve_sampler`` builds it once per command
(a run's own ``sample:`` settings + the command's overrides), ``sampling_process`` resolves the respaced
process it walks, ``sample_images`` takes both whole."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..config.choices import ETA_METHODS, SAMPLE_METHODS, SAMPLE_SCHEDULES
from ..config.schema import SampleConfig
from ..diffusion import GaussianDiffusion
from ..diffusion.noise import LABEL_STREAM, PerSampleNoise
from ..diffusion.samplers import solver_timesteps
from .guidance import Guidance

__all__ = ["SAMPLE_METHODS", "SAMPLE_SCHEDULES", "resolve_sampler", "sampling_process", "sample_images"]

LABEL_CHUNK = 4096
ALL_STEPS = "all"  # steps=all: every one of the T steps
SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig))


def resolve_sampler(base: SampleConfig | Mapping[str, Any] | None = None,
                    overrides: Mapping[str, Any] | None = None) -> SampleConfig:
    """The sampler settings a command samples with, resolved once: ``base`` (a run's own ``sample:`` settings,
    as a ``SampleConfig`` or the dict a checkpoint stores, keys that are no field dropped; None: the defaults)
    with ``overrides`` (``SampleConfig`` fields) on top.

    An override of None keeps the base's value; ``steps="all"`` runs every one of the T steps. An ``eta`` for
    a method other than DDIM is refused rather than ignored. The result checks its own values (``SampleConfig``).
    """
    if isinstance(base, SampleConfig):
        values = dataclasses.asdict(base)
    else:
        values = {key: value for key, value in (base or {}).items() if key in SAMPLER_FIELDS}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - set(SAMPLER_FIELDS))
    if unknown:
        raise ValueError(f"unknown sampler setting {unknown[0]!r}; allowed: {', '.join(SAMPLER_FIELDS)}")
    if str(given.get("steps")) == ALL_STEPS:
        given["steps"] = None
    settings = SampleConfig(**{**values, **given})
    if "eta" in given and settings.method not in ETA_METHODS:
        method = f"method={settings.method}" if "method" in given else \
            f"the sampler {settings.method} (the run's own sample.method)"
        raise ValueError(f"eta={given['eta']} is DDIM's; {method} does not use it: drop eta, or give method=ddim")
    return settings


def sampling_process(diffusion: GaussianDiffusion, settings: SampleConfig) -> GaussianDiffusion:
    """The respaced process ``settings`` walk: its K kept steps are the network calls.

    ``schedule="adm"``: ADM's ``space_timesteps`` (DDIM: the 'ddimN' stride when it exists, else evenly spaced
    sections; ``steps`` may be a section string such as "ddim25" or "10,15,20"; None: all T steps). Other
    schedules (``uniform``, ``logsnr``, ``karras``, ``trailing``; see ``solver_timesteps``) take an int
    ``steps``, 2 <= steps <= T, and apply to every method.
    """
    steps, total = settings.steps, diffusion.original_num_timesteps
    if settings.schedule != "adm":
        base = diffusion.respace(None)
        return diffusion.respace(None, timesteps=solver_timesteps(base.alphas_cumprod, steps, settings.schedule))
    if steps in (None, 0, "", total, str(total)):
        return diffusion.respace(None)
    if isinstance(steps, int) and settings.method == "ddim":
        try:
            return diffusion.respace(f"ddim{steps}")
        except ValueError:  # no exact stride: fall back to evenly spaced steps
            return diffusion.respace(str(steps))
    return diffusion.respace(str(steps) if isinstance(steps, int) else steps)


@torch.inference_mode(False)  # Lightning validation runs in inference mode; guidance needs autograd
def sample_images(
    net: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    num_samples: int,
    shape: tuple[int, int, int],
    settings: SampleConfig | None = None,
    *,
    guidance: Guidance | None = None,
    num_classes: int | None = None,
    null_label: int | None = None,
    y: torch.Tensor | int | str | None = "random",
    seed: int | None = 0,
    first_index: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    process: GaussianDiffusion | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw ``num_samples`` images in [-1, 1] of ``shape`` (C, H, W); returns (images on CPU, labels or None).

    The images are global samples ``first_index .. first_index + num_samples - 1``: image i, its initial
    noise, every later noise draw and its label (``y="random"``) come from (``seed``, i) alone (see
    ``diffusion.noise``), so the result does not depend on ``settings.batch_size`` or on how indices are split
    over calls or devices. ``settings``: the sampler (``SampleConfig``; None: its defaults), whole; ``process``:
    its ``sampling_process`` when the caller keeps it (None: resolved here). ``guidance``: classifier
    (``cond_fn``, run with autograd), classifier-free (``cfg_scale``, with the network's ``null_label``) and
    autoguidance (``guiding_net``), each only where its ``schedule`` (the guidance interval) acts, see
    ``Guidance``. ``y``: for a class-conditional network (``num_classes``), "random"
    (uniform labels), "balanced" (class i mod num_classes), an int class, or a tensor of labels; ignored (must
    be None/"random") when ``num_classes`` is None.
    """
    settings = settings or SampleConfig()
    guidance = guidance or Guidance()
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
        raise ValueError(f"first_index must be an int >= 0, got {first_index!r}")
    if device is None:
        device = next(net.parameters()).device if isinstance(net, nn.Module) else torch.device("cpu")
    device = torch.device(device)
    model, num_classes = guidance.guided_model(net, num_classes, null_label, shape[0])
    seed = 0 if seed is None else int(seed)
    labels = _labels(y, num_samples, num_classes, seed, first_index)
    process = process or sampling_process(diffusion, settings)
    if guidance.cond_fn is not None and labels is None:
        raise ValueError("classifier guidance needs class labels: pass y='random', a class index or labels")
    cond_fn = guidance.step_cond_fn  # the classifier's gradient where the guidance schedule has it act

    chunks = []
    for start in range(0, num_samples, settings.batch_size):
        n = min(settings.batch_size, num_samples - start)
        rng = PerSampleNoise(seed, range(first_index + start, first_index + start + n), device=device)
        kwargs = {} if labels is None else {"y": labels[start:start + n].to(device)}
        step = process.step_fn(settings.method, model, eta=settings.eta, lower_order_final=settings.lower_order_final,
                               clip_denoised=settings.clip_denoised, cond_fn=cond_fn, model_kwargs=kwargs)
        with torch.no_grad():  # cond_fn enables grad itself for the classifier's input gradient
            x = process.sample_loop(step, (n, *shape), noise=rng.randn((n, *shape)), device=device,
                                    progress=progress, noise_sampler=rng)
        chunks.append(x.detach().float().cpu())
    return torch.cat(chunks), labels


def _labels(y, num_samples: int, num_classes: int | None, seed: int, first_index: int) -> torch.Tensor | None:
    if num_classes is None:
        if y not in (None, "random"):
            raise ValueError("y was given but the model is not class-conditional")
        return None
    if y is None or y == "random":  # sample i's label from its own (CPU) label stream
        return torch.cat([PerSampleNoise(seed, range(start, min(start + LABEL_CHUNK, first_index + num_samples)),
                                         stream=LABEL_STREAM).randint(num_classes)
                          for start in range(first_index, first_index + num_samples, LABEL_CHUNK)])
    if y == "balanced":
        return (first_index + torch.arange(num_samples)) % num_classes
    if isinstance(y, int):
        if not 0 <= y < num_classes:
            raise ValueError(f"class {y} out of range: the model has classes 0..{num_classes - 1}")
        return torch.full((num_samples,), y, dtype=torch.long)
    labels = torch.as_tensor(y, dtype=torch.long).flatten()
    if labels.numel() != num_samples:
        raise ValueError(f"got {labels.numel()} labels for {num_samples} samples")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return labels
