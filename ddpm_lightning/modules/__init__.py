"""Thin LightningModules: they wire math, network, optimiser, EMA and logging.

Names load on first use, so ``modules.builders`` (plain torch) is importable without Lightning.
"""

from importlib import import_module
from typing import Any

_NAMES = {"build_diffusion": "builders", "build_unet": "builders", "learns_sigma": "builders",
          "DiffusionModule": "diffusion_module", "make_ema": "ema"}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
