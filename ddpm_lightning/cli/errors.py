"""One clear line for bad input instead of a traceback (set DDPM_DEBUG=1 to see the traceback)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from ..callbacks.health import TrainingDiverged

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               OmegaConfBaseException, InstantiationException, KeyError)


class RunFailed(CompactHydraException, RuntimeError):
    """A job of a sweep failed on bad input; Hydra records it and the report lists the message.

    Hydra's basic launcher runs the remaining jobs, then re-raises the first failure; as a
    ``CompactHydraException`` it is printed as its message alone, without a traceback.
    """


def root_message(error: BaseException) -> str:
    """The error's message on one line; errors Hydra wrapped while instantiating are unwrapped to their cause.

    Only Hydra's wrapper is unwrapped: our own messages (``raise ValueError("cannot read image X ...") from
    err``) say more than the library error they chain.
    """
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    if isinstance(error, OmegaConfBaseException):
        # OmegaConf appends "full_key: ..." lines: keep the key, it says where the problem is.
        key = next((line.strip() for line in text if line.strip().startswith("full_key:")), "")
        message = f"{message} ({key})" if key else message
    if isinstance(error, KeyError):
        message = f"missing key {message}"
    return message


def in_multirun() -> bool:
    """Whether this process is a job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode is not None \
        and HydraConfig.get().mode.name == "MULTIRUN"


def record_failure(message: str, kind: str) -> None:
    """``error.txt`` and ``summary.json`` (``status: failed``) in the Hydra run folder, for reports.

    An existing ``summary.json`` (e.g. of the run a failed resume continued) keeps its other fields.
    Nothing is written outside Hydra or when the folder cannot be written.
    """
    if not HydraConfig.initialized() or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
        if not folder.is_dir():
            return
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary.update(status="failed", error=message, error_kind=kind)
        (folder / "error.txt").write_text(message + "\n")
        tmp = folder / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, summary_path)
    except (OSError, ValueError):
        pass


def run_cli(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn``; bad input ends in one ``error:`` line and exit code 2, a diverged run in exit code 1.

    Under multirun both become ``RunFailed`` so the sweep goes on. Every failure (unexpected ones too, which
    keep their traceback) is recorded in the run folder by ``record_failure``.
    """
    try:
        return fn(*args, **kwargs)
    except (*USER_ERRORS, TrainingDiverged) as error:
        if os.environ.get("DDPM_DEBUG"):
            raise
        message = root_message(error)
        record_failure(message, "diverged" if isinstance(error, TrainingDiverged) else "bad input")
        if in_multirun():
            raise RunFailed(message) from None
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1 if isinstance(error, TrainingDiverged) else 2)
    except Exception as error:
        record_failure(f"{type(error).__name__}: {root_message(error)}", "crash")
        raise
