"""Pin the containers to the versions the test suite runs with: ``python docker/lock.py`` (``make docker-lock``).

The one source is the environment ``make install`` builds from ``pyproject.toml`` and ``requirements-nodeps.txt``
(the venv the suite runs in). This script walks the runtime requirements of the project (``[project]
dependencies``, not the ``dev`` extra) through the installed distributions' own metadata (markers evaluated for
this interpreter and platform, extras followed), adds the ``--no-deps`` packages of requirements-nodeps.txt, and
writes every distribution it reaches, pinned to its installed version, into three files:

- ``docker/torch.lock``: torch and torchvision;
- ``docker/torch-cuda.lock``: the CUDA libraries of that torch build (``nvidia-*``, ``cuda-*``, ``triton``), for the
  CUDA image only;
- ``docker/requirements.lock``: everything else the package needs at run time.

The images install them with ``pip install --no-deps`` (nothing unpinned can come in); development tools
(pytest, ruff, diffusers, hypothesis, ...) are not reached from the runtime requirements, so they are not in any
file. ``python docker/lock.py --check`` exits 1 with one line when the files are stale; ``tests/test_docker.py``
checks the same, plus the Dockerfiles against the files.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "docker"
TORCH = frozenset({"torch", "torchvision"})
CUDA_LIBRARY = re.compile(r"^(nvidia-|cuda-)|^triton$")
FILES = {
    "torch.lock": "torch and torchvision (the CPU image installs them from PyTorch's CPU index)",
    "torch-cuda.lock": "the CUDA libraries of that torch build (CUDA image only)",
    "requirements.lock": "every other runtime package",
}
EXCLUDED = frozenset({"pip", "ddpm-lightning"})  # the installer; the project itself (installed from the source)


class LockError(Exception):
    pass


def _canonical(name: str) -> str:
    return canonicalize_name(name)


def project_requirements(root: Path = ROOT) -> tuple[list[Requirement], list[Requirement]]:
    """The project's runtime requirements (pyproject ``[project] dependencies``) and its ``--no-deps`` ones."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(text) for text in project["dependencies"]]
    nodeps = []
    for line in (root / "requirements-nodeps.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            nodeps.append(Requirement(line))
    return runtime, nodeps


def _installed(name: str, required_by: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise LockError(f"{name} (required by {required_by}) is not installed in {sys.prefix}: run `make install` "
                        f"first; the pins come from the environment the test suite runs in") from None


def resolve(runtime: list[Requirement], nodeps: list[Requirement]) -> dict[str, str]:
    """{distribution name: installed version} of everything the runtime requirements reach, plus ``nodeps``."""
    pins: dict[str, str] = {}
    names: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue: list[tuple[Requirement, str]] = [(r, "pyproject.toml") for r in runtime]
    while queue:
        req, parent = queue.pop(0)
        key = (_canonical(req.name), frozenset(req.extras))
        if key in seen or key[0] in EXCLUDED:
            continue
        seen.add(key)
        dist = _installed(req.name, parent)
        version = dist.version
        if not req.specifier.contains(version, prereleases=True):
            raise LockError(f"{dist.metadata['Name']} {version} is installed but {parent} requires {req}: "
                            f"run `make install`")
        pins[key[0]], names[key[0]] = version, dist.metadata["Name"]
        for text in dist.requires or []:
            sub = Requirement(text)
            wanted = {"", *req.extras}
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in wanted):
                queue.append((sub, f"{dist.metadata['Name']} {version}"))
    for req in nodeps:
        dist = _installed(req.name, "requirements-nodeps.txt")
        if not req.specifier.contains(dist.version, prereleases=True):
            raise LockError(f"{dist.metadata['Name']} {dist.version} is installed but requirements-nodeps.txt "
                            f"pins {req}: run `make install`")
        pins[_canonical(req.name)], names[_canonical(req.name)] = dist.version, dist.metadata["Name"]
    return {names[k]: v for k, v in pins.items()}


def split(pins: dict[str, str]) -> dict[str, dict[str, str]]:
    """The pins cut into the three files."""
    files: dict[str, dict[str, str]] = {name: {} for name in FILES}
    for name, version in pins.items():
        canonical = _canonical(name)
        target = ("torch.lock" if canonical in TORCH else
                  "torch-cuda.lock" if CUDA_LIBRARY.search(canonical) else "requirements.lock")
        files[target][name] = version
    return files


def render(file: str, pins: dict[str, str]) -> str:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    header = [f"# {FILES[file]}: pinned to the versions the test suite ran with.",
              "# Generated by `python docker/lock.py` (make docker-lock) from the environment of `make install`;",
              f"# Python {python}, {sys.platform} {platform.machine()}. Do not edit: tests/test_docker.py compares."]
    lines = [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: _canonical(kv[0]))]
    return "\n".join(header + lines) + "\n"


def lock_files(root: Path = ROOT) -> dict[str, str]:
    """{file name: its content} for this environment."""
    runtime, nodeps = project_requirements(root)
    return {file: render(file, pins) for file, pins in split(resolve(runtime, nodeps)).items()}


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a lock file (comments skipped)."""
    return read_pins_text(path.read_text())


def read_pins_text(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a lock file differs from this environment")
    args = parser.parse_args(argv)
    try:
        wanted = lock_files()
    except LockError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stale = [f for f, text in wanted.items() if not (LOCK_DIR / f).is_file() or (LOCK_DIR / f).read_text() != text]
    if args.check:
        if stale:
            print(f"error: {', '.join(stale)} differ(s) from this environment: run `make docker-lock`",
                  file=sys.stderr)
            return 1
        return 0
    for file, text in wanted.items():
        (LOCK_DIR / file).write_text(text)
    print(f"wrote {', '.join(f'docker/{f} ({len(read_pins_text(text))} pins)' for f, text in wanted.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
