"""One clear line for bad input instead of a traceback (set DDPM_DEBUG=1 to see the traceback)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               OmegaConfBaseException, InstantiationException, KeyError)


class RunFailed(RuntimeError):
    """A job of a sweep failed on bad input; Hydra records it and the report lists the message."""


def root_message(error: BaseException) -> str:
    """The innermost cause's message on one line (Hydra wraps errors raised while instantiating)."""
    while error.__cause__ is not None:
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


def run_cli(fn: Callable[..., Any], *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as error:
        if os.environ.get("DDPM_DEBUG"):
            raise
        message = root_message(error)
        if HydraConfig.initialized() and HydraConfig.get().mode is not None \
                and HydraConfig.get().mode.name == "MULTIRUN":
            raise RunFailed(message) from None
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
