"""Logger factories. W&B runs offline unless an API key is configured, so a run never hangs without network."""

from __future__ import annotations

import os
from pathlib import Path

WANDB_MODES = ("online", "offline", "disabled")


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
