"""Classifier guidance from checkpoints: what process a module was trained for, and the ``cond_fn`` that guides.

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
    mapping): the one place guidance settings become a ``cond_fn`` and a classifier-free scale, for the CLIs and
    the metric callback alike. ``classifier_ckpt`` may be a ``ddpm-train`` classifier or converted ADM weights;
    a classifier trained for another process, or ``cfg_scale > 0`` for a model trained without label dropout,
    is a ValueError before any sampling."""
    from ..sampling import Guidance
    from .checkpoint import classifier_guidance_from_adm, is_converted_adm, load_checkpoint_dict

    config = guidance_config(config)
    map_location = module.device if map_location is None else map_location
    if config.cfg_scale and module.null_label is None:
        raise ValueError(f"guidance.cfg_scale={config.cfg_scale} needs a model trained with label dropout "
                         f"(train.p_uncond > 0); {model_name} was not")
    path, scale = config.classifier_ckpt, float(config.scale)
    classifier = load_checkpoint_dict(path, map_location="cpu") if path else None
    if classifier is not None and is_converted_adm(classifier):
        cond_fn, classes = classifier_guidance_from_adm(classifier, scale, dict(module.hparams), path,
                                                        map_location=map_location)
    else:
        del classifier  # a ddpm-train classifier: rebuilt as its module
        cond_fn, classes = load_classifier_guidance(path, scale, module.hparams, map_location=map_location)
    return Guidance(cond_fn=cond_fn, classifier_classes=classes, cfg_scale=float(config.cfg_scale))
