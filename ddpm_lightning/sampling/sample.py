"""Generate images from a trained network: ancestral DDPM, DDIM, DPM-Solver++ (2M, 3M, SDE-2M) or UniPC over
any step schedule, with optional classifier guidance (``cond_fn``) and classifier-free guidance, in batches,
with per-sample seeds (image i depends on (seed, i) only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ..config.schema import SampleConfig
from ..diffusion import GaussianDiffusion
from ..diffusion.noise import LABEL_STREAM, PerSampleNoise
from ..diffusion.samplers import SOLVER_SCHEDULES, solver_timesteps

SAMPLE_METHODS = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc")
SAMPLE_SCHEDULES = ("adm",) + SOLVER_SCHEDULES
# method -> (order, sde, corrector) of the multistep solver; unipc = DPM-Solver++(2M) (= UniP-2) + UniC(bh2)
SOLVERS = {"dpm++2m": (2, False, "none"), "dpm++3m": (3, False, "none"), "dpm++2m-sde": (2, True, "none"),
           "unipc": (2, False, "unipc")}
LABEL_CHUNK = 4096


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


def check_sampling_options(method: str | None = None, schedule: str | None = None) -> None:
    """Raise ValueError naming the allowed values for an unknown ``method`` or ``schedule`` (None: unchecked)."""
    if method is not None and method not in SAMPLE_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(SAMPLE_METHODS)}")
    if schedule is not None and schedule not in SAMPLE_SCHEDULES:
        raise ValueError(f"unknown sampling schedule {schedule!r}; allowed: {', '.join(SAMPLE_SCHEDULES)}")


def sampling_overrides(method: str | None = None, steps: Any = None, eta: float | None = None,
                       schedule: str | None = None) -> dict[str, Any]:
    """Sampler settings that replace a run's own (``SampleConfig``), checked: None keeps the run's,
    ``steps="all"`` runs every one of the T steps."""
    check_sampling_options(method, schedule)
    overrides: dict[str, Any] = {}
    if method is not None:
        overrides["method"] = str(method)
    if schedule is not None:
        overrides["schedule"] = str(schedule)
    if steps is not None:
        overrides["steps"] = None if str(steps) == "all" else steps
    if eta is not None:
        overrides["eta"] = float(eta)
    return overrides


def sampling_process(diffusion: GaussianDiffusion, method: str, steps: int | str | None,
                     schedule: str = "adm") -> GaussianDiffusion:
    """The respaced process a sampler walks: its K kept steps are the network calls.

    ``schedule="adm"``: ADM's ``space_timesteps`` (DDIM: the 'ddimN' stride when it exists, else evenly spaced
    sections; ``steps`` may be a section string such as "ddim25" or "10,15,20"; None: all T steps). Other
    schedules (``uniform``, ``logsnr``, ``karras``, ``trailing``; see ``solver_timesteps``) need an int
    ``steps`` >= 2 and apply to every method.
    """
    check_sampling_options(method, schedule)
    total = diffusion.original_num_timesteps
    if schedule != "adm":
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"schedule={schedule} needs an integer number of steps, got {steps!r}; section "
                             "strings such as 'ddim25' need schedule=adm")
        base = diffusion.respace(None)
        return diffusion.respace(None, timesteps=solver_timesteps(base.alphas_cumprod, steps, schedule))
    if steps in (None, 0, "", total, str(total)):
        return diffusion.respace(None)
    if isinstance(steps, int) and method == "ddim":
        try:
            return diffusion.respace(f"ddim{steps}")
        except ValueError:  # no exact stride: fall back to evenly spaced steps
            return diffusion.respace(str(steps))
    return diffusion.respace(str(steps) if isinstance(steps, int) else steps)


def sample_loop(process: GaussianDiffusion, method: str, model, shape, *, eta: float = SampleConfig.eta,
                lower_order_final: bool = SampleConfig.lower_order_final, **kwargs) -> torch.Tensor:
    """Run ``method``'s loop on ``process`` (kwargs: noise, clip_denoised, cond_fn, model_kwargs, device,
    progress, noise_sampler); returns x_0."""
    if method == "ddpm":
        return process.p_sample_loop(model, shape, **kwargs)
    if method == "ddim":
        return process.ddim_sample_loop(model, shape, eta=eta, **kwargs)
    if method not in SOLVERS:
        raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(SAMPLE_METHODS)}")
    order, sde, corrector = SOLVERS[method]
    return process.dpm_solver_sample_loop(model, shape, order=order, sde=sde, corrector=corrector,
                                          lower_order_final=lower_order_final, **kwargs)


@torch.inference_mode(False)  # Lightning validation runs in inference mode; guidance needs autograd
def sample_images(
    net: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    num_samples: int,
    shape: tuple[int, int, int],
    *,
    method: Literal["ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc"] = SampleConfig.method,
    steps: int | str | None = SampleConfig.steps,
    eta: float = SampleConfig.eta,
    schedule: Literal["adm", "uniform", "logsnr", "karras", "trailing"] = SampleConfig.schedule,
    lower_order_final: bool = SampleConfig.lower_order_final,
    clip_denoised: bool = SampleConfig.clip_denoised,
    num_classes: int | None = None,
    y: torch.Tensor | int | str | None = "random",
    cfg_scale: float = 0.0,
    null_label: int | None = None,
    cond_fn: Callable[..., torch.Tensor] | None = None,
    batch_size: int = SampleConfig.batch_size,
    seed: int | None = 0,
    first_index: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw ``num_samples`` images in [-1, 1] of ``shape`` (C, H, W); returns (images on CPU, labels or None).

    The images are global samples ``first_index .. first_index + num_samples - 1``: image i, its initial
    noise, every later noise draw and its label (``y="random"``) come from (``seed``, i) alone (see
    ``diffusion.noise``), so the result does not depend on ``batch_size`` or on how indices are split
    over calls or devices. ``method``/``steps``/``schedule``: see ``SAMPLE_METHODS`` and ``sampling_process``
    (``steps`` is the number of network calls); ``eta`` is DDIM's; ``lower_order_final`` the solvers'.
    ``y``: for a class-conditional network, "random" (uniform labels), "balanced" (class i mod num_classes),
    an int class, or a tensor of labels; ignored (must be None/"random") when ``num_classes`` is None.
    ``cond_fn`` is a classifier-guidance gradient function (already scaled); it runs with autograd.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
        raise ValueError(f"first_index must be an int >= 0, got {first_index!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cfg_scale and (num_classes is None or null_label is None):
        raise ValueError("cfg_scale > 0 needs a class-conditional model trained with label dropout (p_uncond > 0)")
    if device is None:
        device = next(net.parameters()).device if isinstance(net, nn.Module) else torch.device("cpu")
    device = torch.device(device)
    seed = 0 if seed is None else int(seed)
    labels = _labels(y, num_samples, num_classes, seed, first_index)
    process = sampling_process(diffusion, method, steps, schedule)
    model = ClassifierFreeGuidance(net, cfg_scale, null_label, shape[0]) if cfg_scale else net
    if cond_fn is not None and labels is None:
        raise ValueError("classifier guidance needs class labels: pass y='random', a class index or labels")

    chunks = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        rng = PerSampleNoise(seed, range(first_index + start, first_index + start + n), device=device)
        kwargs = {} if labels is None else {"y": labels[start:start + n].to(device)}
        with torch.no_grad():  # cond_fn enables grad itself for the classifier's input gradient
            x = sample_loop(process, method, model, (n, *shape), eta=eta, lower_order_final=lower_order_final,
                            noise=rng.randn((n, *shape)), clip_denoised=clip_denoised, cond_fn=cond_fn,
                            model_kwargs=kwargs, device=device, progress=progress, noise_sampler=rng)
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
