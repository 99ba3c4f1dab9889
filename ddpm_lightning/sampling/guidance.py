"""Guidance as the sampler applies it: ``Guidance`` (built once per command from a ``GuidanceConfig`` by
``modules.guidance.load_guidance``) turns a network into the guided model the loop calls, plus the classifier's
``cond_fn``; ``ClassifierFreeGuidance`` and ``AutoGuidance`` are the model wrappers it uses. Where along the
trajectory each acts, and how strongly, is a ``diffusion.guidance_schedule.GuidanceSchedule`` (the guidance
interval, scale schedules): outside the interval every wrapper runs the unguided network call itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion import IgnoreLabels
from ..diffusion.guidance_schedule import GuidanceSchedule, scheduled_cond_fn, scheduled_strength

CondFn = Callable[..., torch.Tensor]


def _guided_channels(guided: torch.Tensor, rest: torch.Tensor, channels: int) -> torch.Tensor:
    """The guided prediction channels, followed by a learned-variance half taken from ``rest``."""
    return torch.cat([guided, rest[:, channels:]], dim=1) if rest.shape[1] > channels else guided


class ClassifierFreeGuidance(nn.Module):
    """eps = (1 + w) * eps(x, y) - w * eps(x, null): one batched call with the null label appended.

    ``null_label`` is the extra class index the network was trained with under label dropout. Only the
    prediction channels are guided; a learned-variance half is taken from the conditional pass. ``schedule``: w
    at each original step t (None: w everywhere); where it is 0 for the batch, the conditional call alone.
    """

    def __init__(self, net: Callable[..., torch.Tensor], scale: float, null_label: int, channels: int,
                 schedule: GuidanceSchedule | None = None) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.channels = int(channels)
        self.schedule = schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        scale = scheduled_strength(self.schedule, t, self.scale, x)
        if scale is None:  # outside the guidance interval: the unguided (conditional) call
            return self.net(x, t, y=y)
        null = torch.full_like(y, self.null_label)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        c = self.channels
        guided = (1.0 + scale) * cond[:, :c] - scale * uncond[:, :c]
        return _guided_channels(guided, cond, c)


class AutoGuidance(nn.Module):
    """eps = eps_bad + w (eps_good - eps_bad) (Karras et al. 2024): ``net`` is the good model, ``guiding_net`` a worse
    model of the same task (an earlier checkpoint, a smaller model), both called with the same inputs and labels.

    Computed as written: with ``guiding_net`` equal to ``net`` both predictions are equal and the result is eps_good
    bit for bit (eps_bad + w * 0). w = 1 is the good model alone (``Guidance`` builds no wrapper then). Only the
    prediction channels are guided; a learned-variance half is the good model's. ``schedule`` shapes the strength
    w - 1 along t; where it is 0 for the batch, the good model's call alone (the guiding model is not called).
    """

    def __init__(self, net: Callable[..., torch.Tensor], guiding_net: Callable[..., torch.Tensor], scale: float,
                 channels: int, schedule: GuidanceSchedule | None = None) -> None:
        super().__init__()
        self.net = net
        self.guiding_net = guiding_net
        self.scale = float(scale)
        self.channels = int(channels)
        self.schedule = schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        strength = scheduled_strength(self.schedule, t, self.scale - 1.0, x)
        good = self.net(x, t, **kwargs)
        if strength is None:  # outside the guidance interval: the model alone
            return good
        scale = self.scale if isinstance(strength, float) else 1.0 + strength
        bad = self.guiding_net(x, t, **kwargs).to(good.dtype)
        c = self.channels
        guided = bad[:, :c] + scale * (good[:, :c] - bad[:, :c])
        return _guided_channels(guided, good, c)


@dataclass(frozen=True)
class Guidance:
    """Everything that guides a sampling call, loaded and checked: no guidance by default.

    ``cond_fn``: classifier guidance, the gradient of log p(y | x_t) already multiplied by the scale s
    (``diffusion.build_guidance``); ``classifier_classes``: that classifier's class count (the labels an
    unconditional network is guided towards); ``cfg_scale``: classifier-free guidance w; ``guiding_net`` and
    ``autoguidance_scale``: autoguidance's worse model and its w (1: off); ``schedule``: where along the original
    steps, and how strongly, all of them act (``GuidanceSchedule``: the guidance interval, a scale schedule; None:
    everywhere at full strength). ``guided_model`` builds the network the loop calls and ``step_cond_fn`` the
    classifier's scheduled ``cond_fn``; a new kind of guidance is one more field here and one more step there.
    """

    cond_fn: CondFn | None = None
    classifier_classes: int | None = None
    cfg_scale: float = 0.0
    guiding_net: Callable[..., torch.Tensor] | None = None
    autoguidance_scale: float = 1.0
    schedule: GuidanceSchedule | None = None

    def __post_init__(self) -> None:
        for key in ("cfg_scale", "autoguidance_scale"):
            if not float(getattr(self, key)) >= 0.0:  # also rejects NaN
                raise ValueError(f"guidance.{key} must be >= 0, got {getattr(self, key)}")
        if self.autoguidance and self.cfg_scale:
            raise ValueError("classifier-free guidance and autoguidance at once are not defined: give one of them")

    @property
    def autoguidance(self) -> bool:
        """Whether a guiding model acts (w != 1)."""
        return self.guiding_net is not None and float(self.autoguidance_scale) != 1.0

    @property
    def step_cond_fn(self) -> CondFn | None:
        """The classifier's ``cond_fn`` under the schedule: None at a step it does not guide (the sampler then takes
        the unguided step and the classifier is not called)."""
        return scheduled_cond_fn(self.cond_fn, self.schedule)

    def guided_model(self, net: Callable[..., torch.Tensor], num_classes: int | None, null_label: int | None,
                     channels: int) -> tuple[Callable[..., torch.Tensor], int | None]:
        """``(model, num_classes)``: the network the sampler calls and the class count its labels are drawn over.

        Classifier guidance of an unconditional network (``num_classes`` None) draws labels over the classifier's
        classes (``classifier_classes``) and hides them from the networks (``IgnoreLabels``); classifier-free
        guidance needs a class-conditional network trained with label dropout (its ``null_label``); autoguidance
        calls the guiding network with the same inputs and labels."""
        model = net
        if self.autoguidance:
            model = AutoGuidance(model, self.guiding_net, self.autoguidance_scale, channels, self.schedule)
        if self.cond_fn is not None and num_classes is None and self.classifier_classes:
            model, num_classes = IgnoreLabels(model), int(self.classifier_classes)
        if self.cfg_scale:
            if num_classes is None or null_label is None:
                raise ValueError("cfg_scale > 0 needs a class-conditional model trained with label dropout "
                                 "(p_uncond > 0)")
            model = ClassifierFreeGuidance(model, self.cfg_scale, null_label, channels, self.schedule)
        return model, num_classes

    def network_calls(self, timesteps: Sequence[int]) -> dict[str, int]:
        """The work of one image over a sampler's kept original steps ``timesteps``: ``network_calls`` (evaluations
        of the diffusion networks: one per step, two where classifier-free guidance runs its doubled batch or the
        autoguidance model is called too) and ``classifier_gradients`` (the classifier's forward + backward passes
        of classifier guidance); a step outside the guidance interval counts as unguided."""
        steps = list(timesteps)
        active = self.schedule.active_steps(steps) if self.schedule is not None else [True] * len(steps)
        guided = sum(active)
        extra = guided if (self.cfg_scale or self.autoguidance) else 0
        return {"network_calls": len(steps) + extra, "classifier_gradients": guided if self.cond_fn else 0}
