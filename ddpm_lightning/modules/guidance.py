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


def load_classifier_guidance(classifier_ckpt: str | Path | None, scale: float, diffusion_hparams: Mapping[str, Any],
                             map_location: str | torch.device = "cpu"):
    """``(cond_fn, classifier class count)`` that guides a diffusion model with ``diffusion_hparams``.

    ``(None, None)`` without a checkpoint at scale 0; a scale > 0 without a checkpoint, or a classifier trained
    for another process (T, schedule, image size, channels, classes), is a ValueError before any sampling.
    """
    from .checkpoint import load_classifier_module  # ClassifierModule imports guidance_info from here

    if not classifier_ckpt:
        build_guidance(None, scale)  # scale 0: None; scale > 0: the clear "needs a classifier" error
        return None, None
    classifier = load_classifier_module(classifier_ckpt, map_location=map_location)
    info = classifier.guidance_info
    cond_fn = build_guidance(classifier.classifier_net, scale, classifier_info=info,
                             diffusion_info=guidance_info(diffusion_hparams))
    return cond_fn, int(info["num_classes"])
