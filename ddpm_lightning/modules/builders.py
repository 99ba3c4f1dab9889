"""Build the network and the diffusion process from plain config values (dicts of primitives)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..diffusion import GaussianDiffusion, make_beta_schedule, space_timesteps

DIFFUSION_KEYS = ("schedule", "num_timesteps", "mean_type", "var_type", "loss_type", "hybrid_lambda",
                  "rescale_vlb", "timestep_respacing")
MODEL_EXTRA_KEYS = ("class_cond", "compile", "channels_last")


def learns_sigma(diffusion_cfg: Mapping[str, Any]) -> bool:
    return diffusion_cfg.get("var_type", "fixed_small") in ("learned", "learned_range")


def build_diffusion(cfg: Mapping[str, Any]) -> GaussianDiffusion:
    unknown = set(cfg) - set(DIFFUSION_KEYS)
    if unknown:
        raise ValueError(f"unknown diffusion keys {sorted(unknown)}; allowed: {', '.join(DIFFUSION_KEYS)}")
    num_timesteps = int(cfg.get("num_timesteps", 1000))
    respacing = cfg.get("timestep_respacing")
    return GaussianDiffusion(
        make_beta_schedule(cfg.get("schedule", "linear"), num_timesteps),
        mean_type=cfg.get("mean_type", "eps"),
        var_type=cfg.get("var_type", "fixed_small"),
        loss_type=cfg.get("loss_type", "simple"),
        hybrid_lambda=float(cfg.get("hybrid_lambda", 0.001)),
        rescale_vlb=bool(cfg.get("rescale_vlb", False)),
        use_timesteps=space_timesteps(num_timesteps, respacing) if respacing else None,
    )


def build_unet(model_cfg: Mapping[str, Any], *, image_size: int, channels: int, num_classes: int | None,
               learn_sigma: bool, p_uncond: float = 0.0):
    """The ADM UNet; with label dropout (p_uncond > 0) one extra class index is the null label."""
    from ..models import UNet

    kwargs = {k: (tuple(v) if isinstance(v, list | tuple) else v)
              for k, v in model_cfg.items() if k not in MODEL_EXTRA_KEYS}
    class_cond = bool(model_cfg.get("class_cond", False))
    if class_cond and not num_classes:
        raise ValueError("model.class_cond=true but the data set has no labels; set model.class_cond=false")
    if p_uncond and not class_cond:
        raise ValueError("train.p_uncond > 0 (label dropout) needs model.class_cond=true")
    return UNet(image_size=image_size, in_channels=channels, out_channels=channels * (2 if learn_sigma else 1),
                num_classes=(num_classes + (1 if p_uncond > 0 else 0)) if class_cond else None, **kwargs)


def build_optimizer(parameters, optim: Mapping[str, Any]) -> dict[str, Any]:
    """AdamW with a linear warm-up over ``optim.warmup_steps`` (then constant, as ADM), stepped per batch."""
    import torch

    fused = optim.get("fused")
    optimizer = torch.optim.AdamW(
        parameters, lr=float(optim.get("lr", 1e-4)), betas=tuple(optim.get("betas", (0.9, 0.999))),
        eps=float(optim.get("eps", 1e-8)), weight_decay=float(optim.get("weight_decay", 0.0)),
        **({"fused": bool(fused)} if fused is not None else {}))
    warmup = int(optim.get("warmup_steps", 0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _Warmup:
    """Picklable LR factor (DDP spawn pickles the trainer state)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps) if self.steps > 0 else 1.0
