"""Guidance from checkpoints: what process a module was trained for, the classifier's ``cond_fn``, autoguidance's
guiding network (checked to be of the same task) and the schedule (guidance interval) they act on.

The math (``classifier_cond_fn``, ``check_classifier_compatible``, ``build_guidance``) is pure torch in
``diffusion/guidance.py`` and takes plain info dicts; this module knows the LightningModules' hyperparameter
layout and turns it into those dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..diffusion import build_guidance
from .builders import guidance_info


def load_classifier_guidance(classifier_ckpt: str | Path | None, scale: float, diffusion_hparams: Mapping[str, Any],
                             map_location: str | torch.device = "cpu"):
    """``(cond_fn, classifier class count)`` that guides a diffusion model with ``diffusion_hparams``.

    ``(None, None)`` without a checkpoint at scale 0; a scale > 0 without a checkpoint, or a classifier trained
    for another process (T, schedule, image size, channels, classes), is a ValueError before any sampling.
    """
    from .checkpoint import load_classifier_module  # Lightning, on first use

    if not classifier_ckpt:
        build_guidance(None, scale)  # scale 0: None; scale > 0: the clear "needs a classifier" error
        return None, None
    classifier = load_classifier_module(classifier_ckpt, map_location=map_location)
    info = classifier.guidance_info
    cond_fn = build_guidance(classifier.classifier_net, scale, classifier_info=info,
                             diffusion_info=guidance_info(diffusion_hparams))
    return cond_fn, int(info["num_classes"])


def guidance_config(value: Any = None) -> Any:
    """``value`` (a ``GuidanceConfig``, the mapping a config node holds, or None: no guidance) as a
    ``GuidanceConfig``; a key that is no guidance setting is a ValueError naming the allowed ones."""
    import dataclasses

    from ..config.schema import GuidanceConfig

    if isinstance(value, GuidanceConfig):
        return value
    values = dict(value or {})
    fields = [f.name for f in dataclasses.fields(GuidanceConfig)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{unknown[0]} is not a guidance setting; allowed: {', '.join(fields)}")
    return GuidanceConfig(**values)


def load_guidance(config: Any, module: Any, map_location: str | torch.device | None = None,
                  model_name: str = "the model") -> Any:
    """The sampler's ``sampling.Guidance`` for ``module`` (a DiffusionModule) from a ``GuidanceConfig`` (or its
    mapping): the one place guidance settings become a ``cond_fn``, a classifier-free scale, autoguidance's guiding
    network and the schedule they act on, for the CLIs and the metric callback alike. ``classifier_ckpt`` may be a
    ``ddpm-train`` classifier or converted ADM weights; a classifier trained for another process, ``cfg_scale > 0``
    for a model trained without label dropout, an interval outside the model's steps or a guiding model of another
    task is a ValueError before any sampling."""
    from ..sampling import Guidance
    from .checkpoint import classifier_guidance_from_adm, is_converted_adm, load_checkpoint_dict

    config = guidance_config(config)
    map_location = module.device if map_location is None else map_location
    if config.cfg_scale and module.null_label is None:
        raise ValueError(f"guidance.cfg_scale={config.cfg_scale} needs a model trained with label dropout "
                         f"(train.p_uncond > 0); {model_name} was not")
    schedule = guidance_schedule(config, module.diffusion)
    path, scale = config.classifier_ckpt, float(config.scale)
    classifier = load_checkpoint_dict(path, map_location="cpu") if path else None
    if classifier is not None and is_converted_adm(classifier):
        cond_fn, classes = classifier_guidance_from_adm(classifier, scale, dict(module.hparams), path,
                                                        map_location=map_location)
    else:
        del classifier  # a ddpm-train classifier: rebuilt as its module
        cond_fn, classes = load_classifier_guidance(path, scale, module.hparams, map_location=map_location)
    return Guidance(cond_fn=cond_fn, classifier_classes=classes, cfg_scale=float(config.cfg_scale),
                    guiding_net=load_guiding_net(config.autoguidance_ckpt, module, map_location),
                    autoguidance_scale=float(config.autoguidance_scale), schedule=schedule)


def guidance_schedule(config: Any, diffusion: Any) -> Any:
    """The ``GuidanceSchedule`` of a ``GuidanceConfig`` on ``diffusion``'s original T-step process (``interval`` in
    its steps, ``interval_sigma`` turned into the steps whose sigma lies in it), or None for a constant scale at
    every step (today's guidance, with no per-step check). An interval beyond step T-1 is a ValueError."""
    from ..diffusion.guidance_schedule import GuidanceSchedule, interval_from_sigma

    total = int(diffusion.original_num_timesteps)
    interval = config.interval
    if config.interval_sigma is not None:
        alphas_cumprod = torch.cumprod(1.0 - diffusion.original_betas.double(), dim=0)
        interval = interval_from_sigma(alphas_cumprod, *config.interval_sigma)
    if interval is None and config.scale_schedule == "constant":
        return None
    return GuidanceSchedule(total, config.scale_schedule, None if interval is None else tuple(interval))


def autoguidance_info(module: Any) -> dict[str, Any]:
    """What a model and the model that guides it must share (``diffusion.guidance_schedule.AUTOGUIDANCE_INFO_KEYS``):
    image size, channels, T and beta schedule (``guidance_info``), parameterisation, variance, class count."""
    return {**guidance_info(module.hparams), "num_classes": module.num_classes,
            "mean_type": module.diffusion.mean_type, "var_type": module.diffusion.var_type}


def load_guiding_net(path: str | Path | None, module: Any, map_location: str | torch.device) -> Any:
    """Autoguidance's guiding network: the EMA network of ``path`` (a ``ddpm-train`` checkpoint or converted ADM
    weights: an earlier checkpoint of the same run, a smaller model), checked against ``module`` (one line naming
    every differing field); None without a path."""
    from ..diffusion.guidance_schedule import check_autoguidance_compatible
    from .checkpoint import load_diffusion_checkpoint

    if not path:
        return None
    guiding = load_diffusion_checkpoint(path, map_location=map_location)
    check_autoguidance_compatible(autoguidance_info(module), autoguidance_info(guiding),
                                  f"guidance.autoguidance_ckpt={path}")
    return guiding.ema_net.eval()
