"""One clear line for bad input instead of a traceback (set HYDRA_FULL_ERROR=1 or DDPM_DEBUG=1 to see it).

Exit codes: 2 bad input (also an unusable folder or a full disk: ``no space left on <path>``), 1 a diverged run,
130 Ctrl-C. Light imports only: the CLIs use this before Lightning is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from .. import artifacts

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               OmegaConfBaseException, InstantiationException, KeyError, artifacts.NoSpaceLeft)


def show_traceback() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1`` or ``DDPM_DEBUG=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DDPM_DEBUG", "") not in ("", "0")


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
    full = artifacts.no_space_error(error)
    if full is not None:  # a full disk, however deep in a library's write it surfaced
        return str(full) if isinstance(full, artifacts.NoSpaceLeft) else \
            str(artifacts.NoSpaceLeft(full.filename or "the output folder's disk"))
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
    """``error.txt`` and ``summary.json`` (``status: failed``, ``provenance`` once torch is loaded) in the Hydra run
    folder, for reports.

    An existing ``summary.json`` (e.g. of the run a failed resume continued) keeps its other fields.
    Nothing is written outside Hydra or when the folder cannot be written.
    """
    if not HydraConfig.initialized() or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
        if not folder.is_dir():
            return
        summary = artifacts.read_summary(folder) or {}
        if summary.get("status") == "completed" and kind == "bad input":
            return  # a run refused before any work (e.g. into a finished run's folder) leaves its files alone
        summary.update(status="failed", error=message, error_kind=kind)
        made_by = sys.modules.get("ddpm_lightning.provenance")  # loaded once the run got past its checks
        if made_by is not None and "provenance" not in summary:
            summary["provenance"] = made_by.provenance()
        artifacts.write_text(folder / artifacts.ERROR_FILE, message + "\n")
        artifacts.write_json(folder / artifacts.SUMMARY_FILE, summary)
    except (OSError, ValueError):
        pass


def _is_diverged(error: BaseException) -> bool:
    health = sys.modules.get("ddpm_lightning.callbacks.health")  # loaded once training started, never before
    return health is not None and isinstance(error, health.TrainingDiverged)


def run_cli(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn``; bad input ends in one ``error:`` line and exit code 2, a diverged run in exit code 1.

    Under multirun both become ``RunFailed`` so the sweep goes on. A full disk anywhere is bad input
    (``no space left on <path>``); Ctrl-C ends in ``error: interrupted`` and exit code 130. Every failure
    (unexpected ones too, which keep their traceback) is recorded in the run folder by ``record_failure``,
    except a refused run folder (it belongs to another run). Imports nothing heavy.
    """
    from .run_folder import RunFolderRefused

    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        if show_traceback():
            raise
        record_failure("interrupted (Ctrl-C)", "interrupted")
        training = HydraConfig.initialized() and HydraConfig.get().job.config_name == "train"
        print("error: interrupted (Ctrl-C)" + ("; resume=auto continues a training run from its last checkpoint"
                                                if training else ""), file=sys.stderr)  # advice only where it applies
        sys.exit(130)
    except Exception as error:
        diverged = _is_diverged(error)
        user = isinstance(error, USER_ERRORS) or artifacts.no_space_error(error) is not None
        if not (diverged or user):
            record_failure(f"{type(error).__name__}: {root_message(error)}", "crash")
            raise
        if show_traceback():
            raise
        message = root_message(error)
        if not isinstance(error, RunFolderRefused):
            record_failure(message, "diverged" if diverged else "bad input")
        if in_multirun():
            raise RunFailed(message) from None
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1 if diverged else 2)
