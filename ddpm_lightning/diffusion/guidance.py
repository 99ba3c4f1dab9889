"""Classifier guidance (Dhariwal & Nichol 2021): the ``cond_fn`` that GaussianDiffusion's samplers take.

``cond_fn(x_t, t, y)`` returns ``s * grad_x log p_phi(y | x_t, t)``; ``GaussianDiffusion.condition_mean``
adds ``Sigma *`` it to the DDPM mean (Algorithm 1) and ``condition_score`` subtracts
``sqrt(1 - alpha_bar) *`` it from eps for DDIM (Algorithm 2). Under respacing the classifier receives the
original-process timesteps, so it must have been trained on the same T and beta schedule as the diffusion
model: ``check_classifier_compatible`` compares the two.

Compatibility info dicts hold plain values (``modules.guidance.guidance_info`` reads them from a checkpoint's
hyperparameters):

* ``num_timesteps`` (int): T of the original process,
* ``schedule`` (str): the beta schedule name (``linear``, ``cosine``),
* ``image_size`` (int), ``channels`` (int): the image shape,
* ``num_classes`` (int | None): classes of the data set (None: unlabelled).

Pure torch: no Lightning, Hydra or OmegaConf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CondFn = Callable[..., torch.Tensor]

GUIDANCE_INFO_KEYS = ("num_timesteps", "schedule", "image_size", "channels", "num_classes")


def drop_labels_to_null(y: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance's label dropout (Ho & Salimans 2022): each label becomes ``null_label`` with
    probability ``p_uncond`` (drawn from the global torch RNG, which the training step seeds per rank and step)."""
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def noisy_classifier_losses(diffusion, classifier: Classifier, x_start: torch.Tensor, y: torch.Tensor,
                            t: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The noisy classifier's training objective (ADM): per-example cross-entropy of ``classifier(x_t, t)`` for
    ``x_t = diffusion.q_sample(x_start, t, noise)`` and whether its argmax is ``y`` (``loss``, ``correct``)."""
    logits = classifier(diffusion.q_sample(x_start, t, noise=noise), t)
    return {"loss": F.cross_entropy(logits.float(), y, reduction="none"),
            "correct": (logits.argmax(dim=-1) == y).float()}


def classifier_cond_fn(classifier: Classifier, scale: float) -> CondFn:
    """``cond_fn(x, t, y, **kw) = scale * grad_x log softmax(classifier(x, t))[y]`` (per example).

    The log-probabilities of the batch are summed before differentiating: examples are independent, so
    each row of the gradient is that example's own. Works inside ``torch.no_grad()`` and
    ``torch.inference_mode()`` (the gradient is taken on a fresh copy of ``x``); other keyword arguments
    (the diffusion model's kwargs) are ignored.
    """
    scale = float(scale)

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels y (model_kwargs={'y': labels})")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape [{x.shape[0]}], got {tuple(y.shape)}")
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t.clone()), dim=-1)
            selected = log_probs.gather(1, y.clone().long().view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return grad * scale

    return cond_fn


def check_classifier_compatible(classifier_info: Mapping[str, Any],
                                diffusion_info: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first mismatch (T, schedule, image size, channels, classes).

    Both dicts hold ``GUIDANCE_INFO_KEYS`` (see the module docstring). Classes are compared only when the
    diffusion model's data set has labels (``num_classes`` not None).
    """
    for name, info in (("classifier", classifier_info), ("diffusion", diffusion_info)):
        missing = [key for key in GUIDANCE_INFO_KEYS if key not in info]
        if missing:
            raise ValueError(f"{name} info lacks {missing}; needed: {', '.join(GUIDANCE_INFO_KEYS)}")
    c, d = classifier_info, diffusion_info
    fix = "train a classifier for this diffusion model"
    if int(c["num_timesteps"]) != int(d["num_timesteps"]) or c["schedule"] != d["schedule"]:
        raise ValueError(f"classifier was trained for T={c['num_timesteps']} {c['schedule']}, the diffusion "
                         f"model uses T={d['num_timesteps']} {d['schedule']}: {fix}")
    if int(c["image_size"]) != int(d["image_size"]):
        raise ValueError(f"classifier was trained on {c['image_size']}x{c['image_size']} images, the "
                         f"diffusion model generates {d['image_size']}x{d['image_size']}: {fix}")
    if int(c["channels"]) != int(d["channels"]):
        raise ValueError(f"classifier was trained on {c['channels']}-channel images, the diffusion model "
                         f"generates {d['channels']} channels: {fix}")
    if d["num_classes"] is not None and c["num_classes"] != d["num_classes"]:
        raise ValueError(f"classifier has {c['num_classes']} classes, the diffusion model's data set has "
                         f"{d['num_classes']}: {fix}")


def build_guidance(classifier: Classifier | None, scale: float, *,
                   classifier_info: Mapping[str, Any] | None = None,
                   diffusion_info: Mapping[str, Any] | None = None) -> CondFn | None:
    """The classifier-guidance ``cond_fn`` for ``sample_images``, or None when ``scale`` is 0.

    Validates the scale (>= 0; > 0 needs a classifier) and, when both info dicts are given, that the
    classifier was trained for the diffusion model's process. An ``nn.Module`` classifier is put in eval
    mode (no dropout while guiding).
    """
    scale = float(scale)
    if not scale >= 0.0:  # also rejects NaN
        raise ValueError(f"classifier guidance scale must be >= 0, got {scale}")
    if scale == 0.0:
        return None
    if classifier is None:
        raise ValueError(f"classifier guidance scale {scale} > 0 needs a noisy classifier checkpoint; "
                         "train one with `ddpm-train experiment=classifier_default` or set the scale to 0")
    if (classifier_info is None) != (diffusion_info is None):
        raise ValueError("give both classifier_info and diffusion_info (or neither) to check compatibility")
    if classifier_info is not None:
        check_classifier_compatible(classifier_info, diffusion_info)
    if isinstance(classifier, nn.Module):
        classifier.eval()
    return classifier_cond_fn(classifier, scale)


class IgnoreLabels(nn.Module):
    """Wrap an unconditional network so that samplers may pass ``y`` (for the classifier) to it.

    Classifier guidance of an unconditional model (ADM's unconditional ImageNet results) needs labels in
    ``model_kwargs`` for ``cond_fn``; the network itself must not see them.
    """

    def __init__(self, net: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        return self.net(x, t, **kwargs)
