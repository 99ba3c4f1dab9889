"""``required_keys``: keys an eval experiment needs from the command line, checked before any work.

:class:`CheckRequiredKeys` runs as a Hydra callback, so a sweep (``-m``) missing one stops with one ``error:``
line before launching any job, instead of failing inside the first job after listing them all.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def missing_keys(cfg: DictConfig) -> list[str]:
    """The keys of ``cfg.required_keys`` that are unset (None or empty) in ``cfg``."""
    return [key for key in cfg.get("required_keys") or [] if OmegaConf.select(cfg, key) in (None, "")]


def missing_keys_message(missing: list[str]) -> str:
    return "this config needs " + " ".join(f"{key}=..." for key in missing)


class CheckRequiredKeys(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        missing = missing_keys(config)
        if missing:
            print(f"error: {missing_keys_message(missing)}", file=sys.stderr)
            sys.exit(2)
