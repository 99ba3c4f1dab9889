"""Run-folder ownership: one run per folder, and a finished run's files are never overwritten.

* :func:`claim` takes an exclusive ``flock`` on ``<folder>/.run.lock`` for the life of the process (the kernel
  drops it when the process ends, ``kill -9`` included). A second run into a folder that is in use stops with
  one line naming it.
* :func:`check_ownership`: a folder that holds a finished run (``summary.json`` with ``status: completed``) or
  the checkpoints of an unfinished one is refused unless the run continues it (``resume=auto``, or a
  ``ckpt_path`` inside that folder). Inside a sweep (``-m``) the training entry point skips finished jobs
  and resumes unfinished ones instead (``ddpm_lightning.cli.train``).
* :class:`CheckRunFolder`, a Hydra callback wired in ``conf/hydra/default.yaml``, does both (and creates the
  folder) in ``on_run_start`` / ``on_multirun_start``: before Hydra writes ``.hydra/`` into the folder, so a
  refused run changes nothing. Errors are the CLI's one ``error:`` line and exit code 2.

Only the launching process claims: DDP ranks > 0 (``LOCAL_RANK``/``RANK``/``SLURM_PROCID`` != 0) share the
folder of their rank 0.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..artifacts import LOCK_FILE, read_summary

_HELD: dict[str, int] = {}  # resolved folder -> the open lock file descriptor of this process


class RunFolderRefused(ValueError):
    """The run folder belongs to another run (in use, finished, or unfinished): nothing is written there."""


class RunFolderInUse(RunFolderRefused):
    """Another process owns the run folder."""


def is_secondary_rank() -> bool:
    """Whether this process is a DDP rank > 0 (launched by Lightning or SLURM next to rank 0)."""
    return any(os.environ.get(key, "0") not in ("", "0") for key in ("LOCAL_RANK", "RANK", "SLURM_PROCID",
                                                                        "NODE_RANK"))


def check_folder(path: str | Path, key: str) -> None:
    """Create ``path`` (parents included) or exit with one ``error:`` line naming it and ``key``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _exit(f"cannot create the run folder {path} ({error.strerror or error}); set {key} to a writable folder")
    if not os.access(path, os.W_OK | os.X_OK):
        _exit(f"cannot write into the run folder {path} (read-only); set {key} to a writable folder")


def claim(folder: str | Path, key: str = "hydra.run.dir") -> bool:
    """Own ``folder`` until this process ends (or :func:`release`); False when this process already did.

    Raises :class:`RunFolderInUse` naming the folder and the owner's pid when another process holds it.
    """
    import fcntl

    folder = Path(folder).resolve()
    if str(folder) in _HELD:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunFolderRefused(f"cannot write into the run folder {folder} ({error.strerror or error}); "
                               f"set {key} to a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunFolderInUse(f"run folder {folder} is in use by another run (pid {owner}); choose another "
                             f"{key}, or once that run has stopped continue it with resume=auto") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[str(folder)] = fd
    return True


def release(folder: str | Path) -> None:
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def checkpoints_in(folder: str | Path) -> list[Path]:
    checkpoints = Path(folder) / "checkpoints"
    return sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []


def folder_state(folder: str | Path) -> tuple[str, str]:
    """``("finished" | "unfinished" | "new", what is there)`` for a run folder."""
    summary = read_summary(folder) or {}
    if summary.get("status") == "completed":
        return "finished", f"a finished run (step {summary.get('global_step')}, summary.json)"
    found = checkpoints_in(folder)
    if found:
        return "unfinished", f"{len(found)} checkpoint(s) of an unfinished run ({', '.join(p.name for p in found[:3])})"
    return "new", ""


def continues_this_folder(folder: str | Path, resume: Any, ckpt_path: Any) -> bool:
    if resume == "auto":
        return True
    if ckpt_path:
        return Path(folder).resolve() in Path(str(ckpt_path)).resolve().parents
    return False


def check_ownership(folder: str | Path, resume: Any, ckpt_path: Any, key: str = "hydra.run.dir") -> None:
    """RunFolderRefused when a new run would overwrite a finished or unfinished run's files in ``folder``."""
    state, what = folder_state(folder)
    if state == "new" or continues_this_folder(folder, resume, ckpt_path):
        return
    raise RunFolderRefused(f"run folder {folder} holds {what}; a new run would overwrite it: choose another {key}, "
                     f"or continue it with resume=auto")


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class CheckRunFolder(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = config.hydra.run.dir
        check_folder(folder, "hydra.run.dir")
        if is_secondary_rank():
            return
        try:
            claim(folder, "hydra.run.dir")
            check_ownership(folder, config.get("resume"), config.get("ckpt_path"))
        except ValueError as error:
            _exit(str(error))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
        if is_secondary_rank():
            return
        try:
            claim(config.hydra.sweep.dir, "hydra.sweep.dir")
        except ValueError as error:
            _exit(str(error))
