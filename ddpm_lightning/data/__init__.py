"""Data: LightningDataModules over the embedded sets, image folders, ``.npz`` arrays and torchvision sets.

Hydra configs in ``conf/data/`` instantiate these classes through ``_target_``; nothing here imports
Hydra or OmegaConf. The data modules (and with them Lightning) load on first use, so that the pixel
transforms (``data.transforms``: the uint8 <-> [-1, 1] conversion) serve the pure layers (``metrics``).
"""

from __future__ import annotations

import importlib
from typing import Any

from ddpm_lightning.data.transforms import to_model_range, to_uint8

_DATAMODULES = ("AnimalMNISTDataModule", "DiffusionDataModule", "DigitsDataModule", "ImageFolderDataModule",
                "LFWDataModule", "NpzDataModule", "TorchvisionDataModule")

__all__ = [*_DATAMODULES, "to_model_range", "to_uint8"]


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        return getattr(importlib.import_module("ddpm_lightning.data.datamodule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
