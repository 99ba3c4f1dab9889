"""Generate images from a trained network: ancestral DDPM or DDIM over any respacing, with optional
classifier guidance (``cond_fn``) and classifier-free guidance, in batches, reproducibly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from ..diffusion import GaussianDiffusion

SAMPLE_METHODS = ("ddpm", "ddim")


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


def sampling_process(diffusion: GaussianDiffusion, method: str, steps: int | str | None) -> GaussianDiffusion:
    """The respaced process a sampler walks: ``steps`` kept steps (DDIM: 'ddimN' stride when it exists)."""
    if method not in SAMPLE_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(SAMPLE_METHODS)}")
    total = diffusion.original_num_timesteps
    if steps in (None, 0, "", total, str(total)):
        return diffusion.respace(None)
    if isinstance(steps, int) and method == "ddim":
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
    *,
    method: Literal["ddpm", "ddim"] = "ddim",
    steps: int | str | None = 25,
    eta: float = 0.0,
    clip_denoised: bool = True,
    num_classes: int | None = None,
    y: torch.Tensor | int | str | None = "random",
    cfg_scale: float = 0.0,
    null_label: int | None = None,
    cond_fn: Callable[..., torch.Tensor] | None = None,
    batch_size: int = 64,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw ``num_samples`` images in [-1, 1] of ``shape`` (C, H, W); returns (images on CPU, labels or None).

    ``y``: for a class-conditional network, "random" (uniform labels), "balanced" (round-robin), an
    int class, or a tensor of labels; ignored (must be None/"random") when ``num_classes`` is None.
    ``cond_fn`` is a classifier-guidance gradient function (already scaled); it runs with autograd.
    Batch ``i`` draws from its own generator derived from (``seed``, ``i``), so a run is reproducible.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if cfg_scale and (num_classes is None or null_label is None):
        raise ValueError("cfg_scale > 0 needs a class-conditional model trained with label dropout (p_uncond > 0)")
    if device is None:
        device = next(net.parameters()).device if isinstance(net, nn.Module) else torch.device("cpu")
    device = torch.device(device)
    labels = _labels(y, num_samples, num_classes, seed)
    process = sampling_process(diffusion, method, steps)
    model = ClassifierFreeGuidance(net, cfg_scale, null_label, shape[0]) if cfg_scale else net
    if cond_fn is not None and labels is None:
        raise ValueError("classifier guidance needs class labels: pass y='random', a class index or labels")

    chunks = []
    for index, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        generator = torch.Generator(device=device)
        generator.manual_seed((0 if seed is None else seed) * 1_000_003 + index)
        kwargs = {} if labels is None else {"y": labels[start:start + n].to(device)}
        noise = torch.randn((n, *shape), generator=generator, device=device)
        with torch.no_grad():  # cond_fn enables grad itself for the classifier's input gradient
            loop = process.ddim_sample_loop if method == "ddim" else process.p_sample_loop
            extra = {"eta": eta} if method == "ddim" else {}
            x = loop(model, (n, *shape), noise=noise, clip_denoised=clip_denoised, cond_fn=cond_fn,
                     model_kwargs=kwargs, device=device, progress=progress, generator=generator, **extra)
        chunks.append(x.detach().float().cpu())
    return torch.cat(chunks), labels


def _labels(y, num_samples: int, num_classes: int | None, seed: int | None) -> torch.Tensor | None:
    if num_classes is None:
        if y not in (None, "random"):
            raise ValueError("y was given but the model is not class-conditional")
        return None
    if y is None or y == "random":
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        return torch.randint(0, num_classes, (num_samples,), generator=generator)
    if y == "balanced":
        return torch.arange(num_samples) % num_classes
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
