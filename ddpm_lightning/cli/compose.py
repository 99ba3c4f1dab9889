"""Compose a run config in-process (notebooks, benchmarks): Hydra's compose API with this project's config
folder and a fixed output folder, resolved exactly as ``ddpm-train`` would."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ..config import CONFIG_DIR, register_configs


def compose_run(overrides: list[str], output_dir: str | Path, config_name: str = "train",
                cache_dir: str | Path | None = None) -> DictConfig:
    """The run config for ``overrides`` with ``paths.output_dir`` = ``output_dir`` (no Hydra app needed)."""
    output_dir = Path(output_dir)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if "paths" in cfg:
            cfg.paths.output_dir = str(output_dir)
            if cache_dir is not None:
                cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra
    return cfg
