"""ddpm-train (python -m ddpm_lightning.train): compose a run with Hydra, check it, then train it.

This module only composes and validates (Hydra, OmegaConf, no torch or Lightning at import), so ``--help``
and a config error answer in about a second; the work is ``ddpm_lightning.cli.training.train``, imported once
the config is known to be good. ``train``, ``build_module``, ... are re-exported from there on first use.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from ..config import CONFIG_PATH, register_configs
from .errors import in_multirun, run_cli
from .validate import check_command_line, check_run

_TRAINING_NAMES = ("train", "build_module", "build_callbacks", "resolve_checkpoint", "_write_summary")


def __getattr__(name: str) -> Any:
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _checked_train(cfg: DictConfig) -> dict[str, float] | None:
    check_run(cfg)  # before Lightning is imported: a bad number or key answers in about a second
    from .training import train

    return train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = run_cli(_checked_train, cfg)
    key = cfg.get("optimized_metric") or "val/vlb_bpd"  # the value an Optuna sweep (hparams_search) optimizes
    if metrics is not None and key not in metrics and in_multirun():  # only a sweeper reads the return value
        from lightning.pytorch.utilities import rank_zero_info

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
    check_command_line()  # before Hydra: one line naming the allowed options instead of its config search path
    _hydra_main()


if __name__ == "__main__":
    main()
