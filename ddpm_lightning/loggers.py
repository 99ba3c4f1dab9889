"""The logging owner: the loggers of a training run, built from ``cfg.logger``, and everything W&B.

* W&B runs offline unless an API key is configured (``resolve_wandb_mode``), so a run never hangs without network;
  the key itself is never passed to a logger or logged.
* ``build_loggers``: every configured logger, its arguments redacted first (``security.redact_secrets``: loggers
  upload their arguments); W&B runs named by their overrides, grouped by sweep, tagged (``wandb_defaults``).
* ``finish_wandb``: end the W&B run after ``trainer.fit``, so the next job of a sweep in this process starts its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from .config.choices import WANDB_MODES
from .security import redact_secrets


def wandb_key_configured() -> bool:
    """True when W&B has a key: WANDB_API_KEY, or a netrc entry for its host (where `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("WANDB_MODE") or None
    if mode is None:
        return "online" if wandb_key_configured() else "offline"
    if mode == "dryrun":
        return "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown W&B mode {mode!r}; allowed: {', '.join(WANDB_MODES)}")
    if mode == "online" and not wandb_key_configured():
        raise ValueError("logger.wandb.mode=online but no W&B API key is configured: run `wandb login` "
                         "or set WANDB_API_KEY, or use mode=offline and `wandb sync` later")
    return mode


def wandb_logger(project: str = "ddpm_lightning", save_dir: str = ".", name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 log_model: bool = False, **kwargs):
    """Lightning's WandbLogger with the mode resolved as above. The key itself is never passed or logged."""
    from lightning.pytorch.loggers import WandbLogger

    resolved = resolve_wandb_mode(mode)
    os.environ["WANDB_MODE"] = resolved  # wandb reads it in service processes too
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=str(save_dir), name=name, group=group,
                       tags=list(tags or []) or None, mode=resolved, log_model=log_model, **kwargs)


def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers (``cfg.logger``), their arguments redacted (loggers upload them); W&B named, grouped
    and tagged by ``wandb_defaults``."""
    nodes = cfg.get("logger") or {}
    loggers = []
    for name, node in nodes.items():
        if node is None or "_target_" not in node:
            continue
        if name == "wandb":
            node = wandb_defaults(node, cfg)
        plain = OmegaConf.to_container(node, resolve=True)
        loggers.append(instantiate(redact_secrets(plain)))  # loggers upload their arguments
    return loggers


def wandb_defaults(node: DictConfig, cfg: DictConfig) -> DictConfig:
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


def finish_wandb(failed: bool = False) -> None:
    """End the W&B run: the next job of a sweep in this process starts its own (Lightning would reuse it)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
