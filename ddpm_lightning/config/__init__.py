"""Structured config schemas registered in Hydra's ConfigStore (no logic)."""

from .schema import register_configs

__all__ = ["register_configs"]
