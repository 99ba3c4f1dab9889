"""A Hydra callback that checks the run (or sweep) folder can be created before Hydra creates it.

Hydra makes ``hydra.run.dir`` itself, before the task function runs, and reports a failure there with a
traceback and exit code 1. This callback runs first (``on_run_start`` / ``on_multirun_start``) and turns an
unusable folder into the CLI's one ``error:`` line and exit code 2. Wired in ``conf/hydra/default.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def check_folder(path: str | Path, key: str) -> None:
    """Create ``path`` (parents included) or exit with one ``error:`` line naming it and ``key``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: cannot create the run folder {path} ({error.strerror or error}); "
              f"set {key} to a writable folder", file=sys.stderr)
        sys.exit(2)


class CheckRunFolder(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
