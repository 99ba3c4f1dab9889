"""Load checkpoints safely (``weights_only=True``) with one clear error for every way a file can be wrong."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..artifacts import check_checkpoint_file
from ..models.state_dict import state_dict_mismatch


def load_checkpoint_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; missing, truncated or pickle-requiring files raise ValueError."""
    path = check_checkpoint_file(path)  # missing, a folder, empty or text: one line
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message is a paragraph; the line after "WeightsUnpickler error:" says what was refused
        # torch 2.14 says "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        first = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        if "unsupported global" in str(error).lower():
            raise ValueError(f"checkpoint {path} needs arbitrary pickled objects, which are refused for safety "
                             f"(weights_only=True): {first[:200]}") from None
        raise ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint ({first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({first[:200]}); "
                         f"use another checkpoint (e.g. the previous one in the same folder)") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def load_diffusion_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """A DiffusionModule (EMA weights included) rebuilt from a Lightning checkpoint alone."""
    from .diffusion_module import DiffusionModule

    checkpoint = load_checkpoint_dict(path, map_location)
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a ddpm_lightning diffusion checkpoint "
                         f"(no hyper_parameters/state_dict); for official ADM weights use ddpm-convert-adm")
    if "diffusion" not in hparams or "model" not in hparams:
        raise ValueError(f"checkpoint {path} is not a diffusion model checkpoint (is it a classifier?)")
    module = DiffusionModule(**hparams)
    problem = state_dict_mismatch(module.state_dict(), checkpoint["state_dict"])
    if problem:
        raise ValueError(f"checkpoint {path} does not fit the architecture in its own config: {problem}")
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module.to(map_location).eval()
