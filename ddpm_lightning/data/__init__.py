"""Data: LightningDataModules over the embedded sets, image folders, ``.npz`` arrays and torchvision sets.

Hydra configs in ``conf/data/`` instantiate these classes through ``_target_``; nothing here imports
Hydra or OmegaConf.
"""

from ddpm_lightning.data.datamodule import (
    AnimalMNISTDataModule,
    DiffusionDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    LFWDataModule,
    NpzDataModule,
    TorchvisionDataModule,
)
from ddpm_lightning.data.transforms import to_model_range, to_uint8

__all__ = [
    "AnimalMNISTDataModule",
    "DiffusionDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "LFWDataModule",
    "NpzDataModule",
    "TorchvisionDataModule",
    "to_model_range",
    "to_uint8",
]
