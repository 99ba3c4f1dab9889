"""Run artifacts: the one owner of run-file names, atomic writes, the free-space check and reading them back.

Every file a run leaves for a later reader (``summary.json``, ``metrics.json``, ``results.json``,
``error.txt``, checkpoints, sample archives, reports, cached statistics) is written through :func:`atomic_write`
(or :func:`atomic_write_path` for writers that take a file name): the bytes go to a hidden
``.<name>.tmp-<pid>`` next to the target, are fsync'ed, then ``os.replace``d onto it (atomic within a folder
on POSIX), so a reader sees the old file or the complete new one, never half of either. A write that fails
(a full disk, a kill) leaves the previous file; a full disk becomes :class:`NoSpaceLeft`, whose message is
the one line the CLIs print: ``no space left on <path>``.

No torch (but inside :func:`atomic_torch_save`), Lightning or Hydra here: the CLIs import this before any heavy
import.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

SUMMARY_FILE = "summary.json"  # ddpm-train: status, steps, final metrics, outputs (ddpm-report reads it)
METRICS_FILE = "metrics.json"  # end-of-training scores (GenerativeMetricsCallback)
RESULTS_FILE = "results.json"  # ddpm-eval's scores
SAMPLE_FILE = "sample.json"  # ddpm-sample's settings and outputs
WANDB_RUN_FILE = "wandb_run.json"  # the W&B run of a run folder: id, name, group, tags, logged steps
ERROR_FILE = "error.txt"  # the one-line message of a failed run
SNAPSHOT_DIR = "posthoc_ema"  # post-hoc EMA snapshots of a run (``ema.posthoc_sigma_rels``)
LOCK_FILE = ".run.lock"  # held by the process that owns a run (or sweep) folder
TMP_PATTERN = re.compile(r"^\..+\.tmp-\d+$")  # what a write killed before its os.replace leaves behind


class NoSpaceLeft(OSError):
    """A write failed for lack of space; the previous file (if any) is unchanged. ``str()`` is one line."""

    def __init__(self, path: str | Path, detail: str = "") -> None:
        super().__init__(errno.ENOSPC, f"no space left on {path}{f' ({detail})' if detail else ''}; "
                                       f"free some space or choose another folder")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


def no_space_error(error: BaseException | None) -> OSError | None:
    """The ``ENOSPC`` (or ``EDQUOT``) ``OSError`` in ``error``'s cause/context chain, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary next to ``path``, then replace ``path`` with it atomically.

    Any failure removes the temporary and leaves ``path`` as it was; a full disk raises :class:`NoSpaceLeft`.
    """
    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return atomic_write_path(path, write_file)


def atomic_write_path(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """:func:`atomic_write` for writers that take a file name (``torch.save(obj, str(tmp))``, ``zipfile``):
    ``write(tmp)`` fills the temporary, which is then fsync'ed and renamed onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, "a file stands where its folder should be", str(path)) from None
    tmp = temporary_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if no_space_error(error) is not None and not isinstance(error, NoSpaceLeft):
            raise NoSpaceLeft(path) from error
        if isinstance(error, OSError) and error.filename == str(tmp):  # name the file asked for, not our temporary
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    fsync_folder(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints, EMA snapshots, classifiers); torch is imported here,
    on first use, so this module stays light."""
    import torch

    # a path, not a Python file object: torch writes the bytes itself, so a signal handler that raises (SIGTERM,
    # callbacks/preemption.py) runs between Python steps, never inside a write, and the exception stays intact
    return atomic_write_path(path, lambda tmp: torch.save(obj, str(tmp)))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """``obj`` as indented JSON; ``default`` as ``json.dumps``' (e.g. ``str`` for paths and devices)."""
    return write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not a JSON object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_summary(folder: str | Path) -> dict[str, Any] | None:
    """The ``summary.json`` of a run folder, or None."""
    return read_json(Path(folder) / SUMMARY_FILE)


def check_checkpoint_file(path: str | Path) -> Path:
    """A file that can be a torch checkpoint (torch's zip or legacy pickle), by its first bytes; missing, a
    folder, empty or text raise the one-line error ``load_checkpoint_dict`` gives (no torch needed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder; give the .ckpt file inside it")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head.startswith((b"PK", b"\x80")):  # neither torch's zip (maybe truncated) nor its legacy pickle
        kind = "an empty file" if not head else "a text file" if head.isascii() else "not a torch file"
        raise ValueError(f"checkpoint {path} is {kind}, not a torch checkpoint; give a .ckpt written by ddpm-train "
                         f"(or ddpm-convert-adm)")
    return path


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_space(path: str | Path, needed: int, what: str) -> None:
    """Raise :class:`NoSpaceLeft` before any work when ``what`` (about ``needed`` bytes) cannot fit at ``path``."""
    free = free_bytes(path)
    if needed > free:
        raise NoSpaceLeft(path, f"{what}: about {format_bytes(needed)} needed, {format_bytes(free)} free")
