"""Guidance as the sampler applies it: ``Guidance`` (built once per command from a ``GuidanceConfig`` by
``modules.guidance.load_guidance``) turns a network into the guided model the loop calls, plus the classifier's
``cond_fn``; ``ClassifierFreeGuidance`` is the classifier-free wrapper it uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion import IgnoreLabels

CondFn = Callable[..., torch.Tensor]


class ClassifierFreeGuidance(nn.Module):
    """eps = (1 + w) * eps(x, y) - w * eps(x, null): one batched call with the null label appended.

    ``null_label`` is the extra class index the network was trained with under label dropout. Only the
    prediction channels are guided; a learned-variance half is taken from the conditional pass.
    """

    def __init__(self, net: Callable[..., torch.Tensor], scale: float, null_label: int, channels: int) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.channels = int(channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        null = torch.full_like(y, self.null_label)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        c = self.channels
        guided = (1.0 + self.scale) * cond[:, :c] - self.scale * uncond[:, :c]
        return torch.cat([guided, cond[:, c:]], dim=1) if cond.shape[1] > c else guided


@dataclass(frozen=True)
class Guidance:
    """Everything that guides a sampling call, loaded and checked: no guidance by default.

    ``cond_fn``: classifier guidance, the gradient of log p(y | x_t) already multiplied by the scale s
    (``diffusion.build_guidance``); ``classifier_classes``: that classifier's class count (the labels an
    unconditional network is guided towards); ``cfg_scale``: classifier-free guidance w. ``guided_model``
    builds the network the loop calls; a new kind of guidance is one more field here and one more step there.
    """

    cond_fn: CondFn | None = None
    classifier_classes: int | None = None
    cfg_scale: float = 0.0

    def __post_init__(self) -> None:
        if not float(self.cfg_scale) >= 0.0:  # also rejects NaN
            raise ValueError(f"guidance.cfg_scale must be >= 0, got {self.cfg_scale}")

    def guided_model(self, net: Callable[..., torch.Tensor], num_classes: int | None, null_label: int | None,
                     channels: int) -> tuple[Callable[..., torch.Tensor], int | None]:
        """``(model, num_classes)``: the network the sampler calls and the class count its labels are drawn over.

        Classifier guidance of an unconditional network (``num_classes`` None) draws labels over the classifier's
        classes (``classifier_classes``) and hides them from the network (``IgnoreLabels``); classifier-free
        guidance needs a class-conditional network trained with label dropout (its ``null_label``)."""
        model = net
        if self.cond_fn is not None and num_classes is None and self.classifier_classes:
            model, num_classes = IgnoreLabels(net), int(self.classifier_classes)
        if self.cfg_scale:
            if num_classes is None or null_label is None:
                raise ValueError("cfg_scale > 0 needs a class-conditional model trained with label dropout "
                                 "(p_uncond > 0)")
            model = ClassifierFreeGuidance(model, self.cfg_scale, null_label, channels)
        return model, num_classes
