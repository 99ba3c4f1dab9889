"""Compose run configs in-process for tests (tiny overrides keep every run to seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ddpm_lightning.cli.compose import compose_run as _compose_run
from ddpm_lightning.config import CONFIG_DIR, register_configs

# 16 px digits, a 2-level UNet with 32 channels, 4 steps, no progress bar, CSV logging only.
TINY = [
    "data=digits", "data.image_size=16", "data.batch_size=8", "data.limit=96",
    "model.model_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
    "model.attention_resolutions=[8]", "model.num_head_channels=-1", "model.num_heads=1",
    "diffusion.num_timesteps=50", "trainer.max_steps=4", "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null", "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.per_class=1",
    "callbacks.sample_grid.num_samples=2", "callbacks.sample_grid.steps=2",
    # where an experiment scores samples: a tiny stand-in extractor, a handful of samples
    "++callbacks.generative_metrics.feature=tiny", "++callbacks.generative_metrics.num_samples=6",
    "++callbacks.generative_metrics.reference_n=24", "++callbacks.generative_metrics.metrics=[fid,kid,pr]",
    "++callbacks.generative_metrics.steps=2", "++callbacks.generative_metrics.batch_size=8",
]


def compose_run(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """The library's ``compose_run`` with the run's cache inside its output folder."""
    return _compose_run(overrides, output_dir, config_name=config_name, cache_dir=Path(output_dir) / "cache")


def compose_hydra(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Hydra's own composition, ``hydra`` node included (sweeper params, launcher, the task's overrides): what
    ``--cfg all`` prints. Sets no run state (``${hydra:...}`` keys are not for reading from it)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)
