"""ddpm-train (python -m ddpm_lightning.train): compose a run with Hydra, train it with Lightning.

``train(cfg)`` is a plain function returning the final metrics; ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ..config import register_configs
from ..modules import DiffusionModule
from ..modules.classifier_module import build_classifier_module
from .errors import run_cli

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build_module(cfg: DictConfig, datamodule) -> DiffusionModule:
    """The DiffusionModule for this config and data set (sizes and classes come from the data)."""
    if cfg.get("objective", "diffusion") not in ("diffusion", "classifier"):
        raise ValueError(f"objective={cfg.objective!r}; allowed: diffusion, classifier")
    if cfg.get("objective") == "classifier":
        return build_classifier_module(cfg, datamodule)
    return DiffusionModule(
        model=_container(cfg.model), diffusion=_container(cfg.diffusion), optim=_container(cfg.optim),
        ema=_container(cfg.ema), image_size=int(datamodule.image_size), channels=int(datamodule.channels),
        num_classes=datamodule.num_classes, p_uncond=float(cfg.train.p_uncond),
        timestep_sampler=cfg.train.timestep_sampler, sample=_container(cfg.sample),
        run_config=_container(cfg))


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    nodes = cfg.get("callbacks") or {}
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def build_loggers(cfg: DictConfig) -> list:
    nodes = cfg.get("logger") or {}
    loggers = []
    for name, node in nodes.items():
        if node is None or "_target_" not in node:
            continue
        if name == "wandb":
            node = _wandb_defaults(node, cfg)
        loggers.append(instantiate(node))
    return loggers


def _wandb_defaults(node: DictConfig, cfg: DictConfig) -> DictConfig:
    """Name W&B runs by their overrides and group them by sweep, when Hydra is running."""
    node = node.copy()
    if not HydraConfig.initialized():
        return node
    hydra_cfg = HydraConfig.get()
    overrides = hydra_cfg.job.override_dirname
    with_flag = OmegaConf.to_container(node)
    if with_flag.get("name") is None:
        node.name = overrides or cfg.task_name
    if with_flag.get("group") is None and hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        node.group = Path(hydra_cfg.sweep.dir).name
    if not with_flag.get("tags"):
        node.tags = list(hydra_cfg.overrides.task)[:64]
    return node


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if given, else with ``resume=auto`` this run's last one."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist; give the path of a .ckpt file")
        return str(path)
    if cfg.get("resume") not in (None, "auto"):
        raise ValueError(f"resume={cfg.resume!r}; allowed: auto, null (use ckpt_path=... for a specific file)")
    if cfg.get("resume") == "auto":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        rank_zero_info(f"resume=auto: no checkpoint in {last.parent}, starting from scratch")
    return None


def train(cfg: DictConfig) -> dict[str, float]:
    """Train the configured run; returns the final logged metrics as floats."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg),
                                      logger=build_loggers(cfg) or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    for callback in trainer.callbacks:  # end-of-training scores (FID@n, ...) are not in callback_metrics
        metrics.update(getattr(callback, "last_results", None) or {})
    _write_summary(trainer, output_dir, metrics)
    return metrics


@rank_zero_only
def _write_summary(trainer: pl.Trainer, output_dir: Path, metrics: dict[str, float]) -> None:
    summary = {"global_step": trainer.global_step, "metrics": metrics, "outputs": {}}
    if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "dirpath", None):
        summary["outputs"]["checkpoints"] = str(trainer.checkpoint_callback.dirpath)
        if trainer.checkpoint_callback.last_model_path:
            summary["outputs"]["last_checkpoint"] = trainer.checkpoint_callback.last_model_path
    for callback in trainer.callbacks:
        if getattr(callback, "last_path", None):
            summary["outputs"]["sample_grid"] = str(callback.last_path)
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            summary["outputs"].setdefault("logs", []).append(str(logger.log_dir))
    tmp = output_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, output_dir / "summary.json")
    print(f"\nrun folder: {output_dir}")
    for key, value in summary["outputs"].items():
        print(f"  {key}: {value}")
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
    print(f"  metrics: {shown}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    return None if metrics is None else metrics.get("val/vlb_bpd")


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
