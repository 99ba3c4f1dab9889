"""Crash-safe checkpoints: atomic writes, and resuming from the newest checkpoint that loads.

Why a CheckpointIO of our own: Lightning 2.6's ``TorchCheckpointIO`` saves through
``lightning.fabric.utilities.cloud_io._atomic_save``, an fsspec transaction whose local implementation writes
a temporary file from ``tempfile.mkstemp()`` (the system temp folder) and commits it with ``shutil.move``.
That is only atomic when the temp folder and the run folder share a file system; otherwise ``shutil.move``
copies into the final name and a kill during the copy leaves a truncated checkpoint. Killed runs also leave
checkpoint-sized files in ``/tmp``, and nothing is fsync'ed. ``AtomicCheckpointIO`` writes
``.<name>.tmp-<pid>`` next to the target, fsyncs it, ``os.replace``s it onto the target (atomic on POSIX
within a folder) and fsyncs the folder. Remote paths (``s3://``, ...) keep Lightning's behaviour.

Resuming (``resume=auto``): ``find_resume_checkpoint`` tries the checkpoints of a run folder newest first
(``last.ckpt`` first among equally new files), loads each with ``weights_only=True`` and returns the first
that loads, logging every file it skipped and why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from ..artifacts import TMP_PATTERN, NoSpaceLeft, fsync_folder, no_space_error, temporary_path
from ..models.state_dict import state_dict_mismatch
from ..modules.checkpoint import load_checkpoint_dict

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is either its old content or the complete new file
    (``artifacts``' temporary name, fsync, rename; a full disk is ``NoSpaceLeft`` naming ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        # a path, not a Python file object: torch writes the bytes itself, so a signal handler that raises (SIGTERM,
        # callbacks/preemption.py) runs between Python steps, never inside a write, and the exception stays intact
        torch.save(obj, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if no_space_error(error) is not None:
            raise NoSpaceLeft(path) from None
        raise
    fsync_folder(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through ``atomic_torch_save`` (see the module docstring).

    Wired as a trainer plugin (``conf/trainer/default.yaml``: ``plugins``); loading is Lightning's.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or type(get_filesystem(path)).__name__ != "LocalFileSystem":
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)


def checkpoint_candidates(folder: str | Path) -> list[Path]:
    """The ``*.ckpt`` files of ``folder``, newest first (``last.ckpt`` first among equally new files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == LAST_NAME), reverse=True)


@rank_zero_only
def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the half-written ``.<name>.tmp-<pid>`` files a killed save left in ``folder``."""
    folder = Path(folder)
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if TMP_PATTERN.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d half-written checkpoint file(s) left by a killed run: %s",
                 len(removed), ", ".join(p.name for p in removed))
    return removed


def find_resume_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``folder`` that loads (``weights_only=True``) and its content.

    None when the folder holds no checkpoint; ValueError naming every file when none of them loads.
    """
    folder = Path(folder)
    remove_stale_temporaries(folder)
    skipped = []
    for path in checkpoint_candidates(folder):
        try:
            checkpoint = load_checkpoint_dict(path)
            if "state_dict" not in checkpoint or "global_step" not in checkpoint:
                raise ValueError(f"checkpoint {path} is not a Lightning training checkpoint "
                                 f"(no state_dict/global_step)")
        except (ValueError, OSError) as error:
            log.warning("resume=auto: skipping %s: %s", path, error)
            skipped.append(f"{path.name}: {error}")
            continue
        if skipped:
            log.warning("resume=auto: resuming from %s (step %s) instead of the newer unreadable %s",
                        path, checkpoint.get("global_step"), ", ".join(s.split(":")[0] for s in skipped))
        return path, checkpoint
    if skipped:
        raise ValueError(f"resume=auto: none of the {len(skipped)} checkpoint(s) in {folder} loads "
                         f"({'; '.join(skipped)[:600]}); move them away to start from scratch, or give ckpt_path")
    return None


HPARAM_GROUPS = ("model", "diffusion", "classifier")
HPARAM_SIZES = ("image_size", "channels", "num_classes", "max_t")


def _hparam_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``group.key=<saved> in the checkpoint, <current> in this run`` for every differing flag."""
    out = []
    for group in HPARAM_GROUPS:
        old, new = saved.get(group) or {}, current.get(group) or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(f"{group}.{key}={old.get(key)!r} in the checkpoint, {new.get(key)!r} in this run")
    for key in HPARAM_SIZES:
        if key in saved and key in current and saved[key] != current[key]:
            out.append(f"{key}={saved[key]!r} in the checkpoint, {current[key]!r} in this run")
    return out


def check_checkpoint_fits(module: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise ValueError when ``checkpoint``'s tensors do not fit ``module`` (a different architecture).

    The message names the file, the differing config flags (from the saved hyperparameters) and the first
    tensor that does not fit, instead of Lightning's multi-line ``load_state_dict`` error.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} has no state_dict: it is not a training checkpoint of this framework")
    detail = state_dict_mismatch(module.state_dict(), state)
    if detail is None:
        return
    saved = checkpoint.get("hyper_parameters") or {}
    current = dict(getattr(module, "hparams", {}) or {})
    flags = _hparam_differences(saved, current) if isinstance(saved, dict) else []
    kind = ""
    if isinstance(saved, dict) and ("classifier" in saved) != ("classifier" in current):
        kind = " (a classifier checkpoint for a diffusion run, or the reverse)"
    reason = "; ".join(flags[:3]) if flags else detail
    raise ValueError(f"checkpoint {path} was trained with a different architecture{kind}: {reason} "
                     f"({detail}); resume with the same model, diffusion and "
                     f"data settings, or start a new run folder")
