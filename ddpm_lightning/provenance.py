"""What made a number: the ``provenance`` object every JSON output and W&B run records.

``provenance(precision=..., world_size=...)`` returns one flat dict (keys in ``PROVENANCE_KEYS`` at least)::

    {"version": "0.1.0", "git_commit": "537cfa7...", "git_dirty": true, "git_diff_sha256": "9f2c...",
     "git_note": null, "python": "3.11.7", "torch": "2.14.1", "lightning": "2.6.6", "hydra": "1.3.8",
     "cuda": null, "cudnn": null, "cpu": "AMD EPYC (family 25, model 17)", "cpu_bf16_fast": true, "gpu": null,
     "gpu_count": 0, "precision": "bf16-mixed", "threads": 2, "world_size": 1,
     "command": "ddpm-train experiment=default"}

* git: only when the package runs from a checkout (the package's parent folder is the top of a git work tree);
  installed from a wheel (or copied) ``git_commit``/``git_dirty`` are null and ``git_note`` says why. ``git_dirty``
  counts tracked files only (untracked outputs do not make a tree dirty); ``git_diff_sha256`` hashes
  ``git diff HEAD``. Each git call has a short timeout; the result is cached per process (read at the first call,
  i.e. when a command starts: the code that runs is the code at that moment).
* the CPU model from ``/proc/cpuinfo`` with its family and model numbers (else ``platform``); ``cpu_bf16_fast`` is
  ``precision.cpu_has_fast_bf16`` (AMX or AVX512-BF16, what ``precision=auto`` decides on); the GPU model without
  initialising CUDA in a process that has not (``nvidia-smi``, 3 s), so a later fork stays safe.
* ``precision``, ``world_size``: what the caller actually used (the trainer's, the evaluation's); ``threads``:
  torch's intra-op threads now; ``command``: this process's command line, secrets redacted.

``differing_fields(a, b)`` names the fields (``PAIRING_FIELDS``: code commit, dirty diff, CPU/GPU model,
precision) on which two records differ: jobs that differ there are not a fair pair (``ddpm-report``, which imports
this module without torch: torch is imported inside the functions that read it).
"""

from __future__ import annotations

import functools
import hashlib
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .security import redact_secrets

PROVENANCE_KEYS = ("version", "git_commit", "git_dirty", "python", "torch", "lightning", "cuda", "cpu", "gpu",
                   "precision", "threads", "world_size", "command")
# what two jobs must share to be paired (code, machine, precision); a dirty tree is its diff's hash
PAIRING_FIELDS = ("git_commit", "git_diff_sha256", "cpu", "gpu", "precision")
GIT_TIMEOUT_S = 3.0
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages, installed)


def provenance(precision: Any = None, world_size: int | None = None, command: list[str] | None = None) -> dict:
    """The provenance object (see the module docstring); cheap after the first call of a process."""
    import torch

    from .precision import cpu_has_fast_bf16

    git = git_state(str(PACKAGE_ROOT))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gpu, gpu_count = gpu_model()
    return {
        "version": __version__, **git,
        "python": platform.python_version(), "torch": torch.__version__, "lightning": _version("lightning"),
        "hydra": _version("hydra-core"), "cuda": torch.version.cuda, "cudnn": cudnn,
        "cpu": cpu_model(), "cpu_bf16_fast": cpu_has_fast_bf16(), "gpu": gpu, "gpu_count": gpu_count,
        "precision": normalized_precision(precision), "threads": torch.get_num_threads(),
        "world_size": int(world_size) if world_size is not None else 1,
        "command": command_line(command),
    }


PRECISION_NAMES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}  # Lightning's spelling


def normalized_precision(precision: Any) -> str | None:
    """Lightning's name of a precision (``ddpm-eval precision=bf16`` samples in ``bf16-mixed`` as training does), so
    that training and evaluation records compare."""
    return None if precision is None else PRECISION_NAMES.get(str(precision), str(precision))


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``ddpm-train experiment=default``), secrets redacted."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(redact_secrets(argv))


def differing_fields(a: dict | None, b: dict | None) -> list[str]:
    """The ``PAIRING_FIELDS`` on which two provenance records differ (a missing record differs on none: old jobs
    without one are not refused, only unknown)."""
    if not a or not b:
        return []
    return [key for key in PAIRING_FIELDS if a.get(key) != b.get(key)]


@functools.lru_cache(maxsize=4)
def git_state(root: str) -> dict[str, Any]:
    """``git_commit``, ``git_dirty``, ``git_diff_sha256`` and ``git_note`` (why they are null) of ``root``."""
    unknown = {"git_commit": None, "git_dirty": None, "git_diff_sha256": None}
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != Path(root).resolve():
        return {**unknown, "git_note": "not run from a git checkout (installed package)"}
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    diff = _git(root, "diff", "HEAD", "--no-ext-diff", "--binary")
    if commit is None or status is None or diff is None:
        return {**unknown, "git_note": f"git did not answer within {GIT_TIMEOUT_S:g} s"}
    dirty = bool(status.strip())
    return {"git_commit": commit.strip(), "git_dirty": dirty,
            "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if dirty else None, "git_note": None}


def _git(root: str, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """``/proc/cpuinfo``'s model name with its family and model numbers (a VM may name every AMD EPYC generation
    "AMD EPYC": Zen 3, 4 and 5 differ only there), else ``platform``'s processor."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
            if not line.strip() and fields:
                break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown"
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
               if fields.get(key)]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def gpu_model() -> tuple[str | None, int]:
    """(the first GPU's name, the number of GPUs torch sees); (None, 0) without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return None, 0
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name(0), count
    return _nvidia_smi_name(), count


@functools.lru_cache(maxsize=1)
def _nvidia_smi_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    name = done.stdout.strip().splitlines()
    return name[0].strip() if done.returncode == 0 and name else None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
