"""Structured config schemas registered in Hydra's ConfigStore (no logic), and where the yaml configs live."""

from pathlib import Path

from .schema import register_configs

#: The config folder inside the package (``ddpm_lightning/conf``); Hydra apps name it ``CONFIG_PATH``.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CONFIG_PATH = "pkg://ddpm_lightning.conf"

__all__ = ["CONFIG_DIR", "CONFIG_PATH", "register_configs"]
