"""ddpm-train (python -m ddpm_lightning.train): compose a run with Hydra, train it with Lightning.

``train(cfg)`` is a plain function returning the final metrics; ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ..callbacks.checkpointing import check_checkpoint_fits, find_resume_checkpoint
from ..callbacks.health import TrainingHealth
from ..callbacks.preemption import Preemption
from ..config import CONFIG_PATH, register_configs
from ..modules import DiffusionModule
from ..modules.checkpoint import load_checkpoint_dict
from ..modules.classifier_module import build_classifier_module
from ..precision import check_accelerator, resolve_precision
from ..security import check_targets, redact_secrets
from .errors import in_multirun, run_cli


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build_module(cfg: DictConfig, datamodule) -> DiffusionModule:
    """The DiffusionModule for this config and data set (sizes and classes come from the data)."""
    if cfg.get("objective", "diffusion") not in ("diffusion", "classifier"):
        raise ValueError(f"objective={cfg.objective!r}; allowed: diffusion, classifier")
    run_config = redact_secrets(_container(cfg))  # stored in checkpoints: no API keys or tokens
    if cfg.get("objective") == "classifier":
        return build_classifier_module(run_config, datamodule)
    return DiffusionModule(
        model=_container(cfg.model), diffusion=_container(cfg.diffusion), optim=_container(cfg.optim),
        ema=_container(cfg.ema), image_size=int(datamodule.image_size), channels=int(datamodule.channels),
        num_classes=datamodule.num_classes, p_uncond=float(cfg.train.p_uncond),
        timestep_sampler=cfg.train.timestep_sampler, sample=_container(cfg.sample),
        run_config=run_config)


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[pl.Callback]:
    """The configured callbacks plus, always on, ``Preemption`` (SIGTERM / requeue signals, exact-resume
    checkpoints) and ``TrainingHealth`` (grad norm, non-finite step guard)."""
    nodes = cfg.get("callbacks") or {}
    callbacks = [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]
    if not has_logger:  # LearningRateMonitor refuses a logger-less trainer
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    health = TrainingHealth(max_nonfinite_steps=cfg.get("train", {}).get("max_nonfinite_steps", 5))
    return [Preemption(), *callbacks, health]


def build_loggers(cfg: DictConfig) -> list:
    nodes = cfg.get("logger") or {}
    loggers = []
    for name, node in nodes.items():
        if node is None or "_target_" not in node:
            continue
        if name == "wandb":
            node = _wandb_defaults(node, cfg)
        loggers.append(instantiate(redact_secrets(_container(node))))  # loggers upload their arguments
    return loggers


def _wandb_defaults(node: DictConfig, cfg: DictConfig) -> DictConfig:
    """Name W&B runs by their overrides and group them by sweep, when Hydra is running."""
    node = node.copy()
    if not HydraConfig.initialized():
        return node
    hydra_cfg = HydraConfig.get()
    overrides = hydra_cfg.job.override_dirname
    with_flag = OmegaConf.to_container(node, resolve=True)
    if with_flag.get("name") is None:
        node.name = overrides or cfg.task_name
    multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
    if with_flag.get("group") is None and multirun:  # e.g. ablate_arch-2026-11-25_09-00-00
        sweep = Path(hydra_cfg.sweep.dir).name
        node.group = sweep if str(cfg.task_name) in sweep else f"{cfg.task_name}-{sweep}"
    # the config's tags plus the overrides (W&B allows 64 characters per tag)
    node.tags = list(dict.fromkeys(str(t)[:64] for t in [*(with_flag.get("tags") or []),
                                                          *hydra_cfg.overrides.task]))[:64]
    if with_flag.get("config") is None:  # filter / group runs by override in the W&B UI: overrides.<key>
        with open_dict(node):
            node.config = {"overrides": {k.lstrip("+~"): v for k, _, v in
                                         (o.partition("=") for o in hydra_cfg.overrides.task)}}
            node._convert_ = "all"  # wandb.init needs a plain dict
    return node


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its content (loaded with ``weights_only=True``), or (None, None).

    ``ckpt_path`` if given (a corrupt file is an error naming it); else with ``resume=auto`` the newest
    checkpoint of this run folder that loads (``last.ckpt`` first among equally new ones), skipping
    truncated or corrupt files with a warning.
    """
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist; give the path of a .ckpt file")
        return str(path), load_checkpoint_dict(path)
    if cfg.get("resume") not in (None, "auto"):
        raise ValueError(f"resume={cfg.resume!r}; allowed: auto, null (use ckpt_path=... for a specific file)")
    if cfg.get("resume") == "auto":
        folder = Path(cfg.paths.output_dir) / "checkpoints"
        found = find_resume_checkpoint(folder)
        if found is not None:
            rank_zero_info(f"resume=auto: resuming from {found[0]} (step {found[1].get('global_step')})")
            return str(found[0]), found[1]
        rank_zero_info(f"resume=auto: no checkpoint in {folder}, starting from scratch")
    return None, None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The path part of ``resolve_checkpoint``."""
    return resolve_checkpoint(cfg)[0]


def train(cfg: DictConfig) -> dict[str, float]:
    """Train the configured run; returns the final logged metrics as floats."""
    check_targets(cfg, allow_any=bool(cfg.get("allow_any_target", False)))
    check_accelerator(cfg.trainer.get("accelerator"))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the run folder {output_dir} ({error.strerror or error}); "
                         f"set hydra.run.dir to a writable folder") from None
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    ckpt_path, checkpoint = resolve_checkpoint(cfg)
    if checkpoint is not None:  # a different architecture fails here in one line, before anything is written
        check_checkpoint_fits(module, checkpoint, ckpt_path)
        del checkpoint
    loggers = build_loggers(cfg)
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg, has_logger=bool(loggers)),
                                      logger=loggers or False, precision=precision)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # our sampler resumes mid-epoch exactly (data/sampler.py): not a concern
            warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        _finish_wandb(failed=sys.exc_info()[0] is not None)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    for callback in trainer.callbacks:  # end-of-training scores (FID@n, ...) are not in callback_metrics
        metrics.update(getattr(callback, "last_results", None) or {})
    _write_summary(trainer, output_dir, metrics, train_seconds=round(fit_seconds, 2),
                   num_parameters=sum(p.numel() for p in getattr(module, "net", module).parameters()))
    return metrics


def _finish_wandb(failed: bool = False) -> None:
    """End the W&B run: the next job of a sweep in this process starts its own (Lightning would reuse it)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


@rank_zero_only
def _write_summary(trainer: pl.Trainer, output_dir: Path, metrics: dict[str, float], **extra: Any) -> None:
    """``summary.json``: status, steps, ``extra`` (num_parameters, train_seconds = trainer.fit wall time),
    final metrics and output paths; ``ddpm-report`` reads it."""
    summary = {"status": "completed", "global_step": trainer.global_step, **extra, "metrics": metrics,
               "outputs": {}}
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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    key = cfg.get("optimized_metric") or "val/vlb_bpd"  # the value an Optuna sweep (hparams_search) optimizes
    if metrics is not None and key not in metrics and in_multirun():  # only a sweeper reads the return value
        rank_zero_info(missing_objective_message(key, metrics, cfg))
    return None if metrics is None else metrics.get(key)


def missing_objective_message(key: str, metrics: dict[str, float], cfg: DictConfig) -> str:
    """Why a sweep job returns nothing for ``optimized_metric``, and what to change."""
    message = f"optimized_metric={key!r} was not logged, so this job has no objective value; "
    if key.startswith("val/") and not any(k.startswith("val/") for k in metrics):
        return message + (f"no validation ran before training stopped (trainer.max_steps="
                          f"{cfg.trainer.get('max_steps')}, trainer.val_check_interval="
                          f"{cfg.trainer.get('val_check_interval')}): lower trainer.val_check_interval")
    return message + f"set optimized_metric to one of: {', '.join(sorted(metrics))}"


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
