"""Thin LightningModules: they wire math, network, optimiser, EMA and logging."""

from .builders import build_diffusion, build_unet, learns_sigma
from .diffusion_module import DiffusionModule
from .ema import make_ema

__all__ = ["DiffusionModule", "build_diffusion", "build_unet", "learns_sigma", "make_ema"]
