"""The containers install what the test suite ran with: docker/*.lock against this environment and pyproject.toml,
and the Dockerfiles against the lock files. No Docker engine is needed: the files are read, not built."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _load_lock_module():
    spec = importlib.util.spec_from_file_location("docker_lock", DOCKER / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _load_lock_module()


def _pins() -> dict[str, dict[str, str]]:
    """{lock file: {canonical name: version}}"""
    return {f: {canonicalize_name(k): v for k, v in lock.read_pins(DOCKER / f).items()} for f in lock.FILES}


def _all_pins() -> dict[str, str]:
    merged: dict[str, str] = {}
    for pins in _pins().values():
        assert not set(pins) & set(merged), "a package is pinned in two lock files"
        merged |= pins
    return merged


def test_lock_files_are_this_environment():
    """Regenerated from the installed distributions, the files are unchanged (else: `make docker-lock`)."""
    wanted = lock.lock_files()
    assert set(wanted) == set(lock.FILES)
    for name, text in wanted.items():
        current = (DOCKER / name).read_text()
        if current != text:
            old, new = lock.read_pins_text(current), lock.read_pins_text(text)
            changed = sorted(f"{k}: {old.get(k)} -> {new.get(k)}" for k in old.keys() | new.keys()
                             if old.get(k) != new.get(k))
            pytest.fail(f"docker/{name} is stale ({changed[:8] or 'header'}): run `make docker-lock`")


def test_lock_files_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _all_pins()
    for text in project["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in docker/*.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} but the lock pins {pins[name]}"
    for line in (ROOT / "requirements-nodeps.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert req.specifier.contains(pins.get(canonicalize_name(req.name), "0"), prereleases=True), req
    assert _pins()["torch.lock"].keys() == {"torch", "torchvision"}


def test_no_development_tool_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = {canonicalize_name(Requirement(text).name) for text in project["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff", "diffusers", "hypothesis"} <= dev
    assert not dev & set(_all_pins()), sorted(dev & set(_all_pins()))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every ``pip install`` in the file's RUN instructions."""
    installs = []
    for word, rest in _instructions(path):
        if word == "RUN":
            for command in re.split(r"&&|;", rest):
                argv = shlex.split(command)
                if argv[:2] == ["pip", "install"] or argv[1:4] == ["-m", "pip", "install"]:
                    installs.append(argv[argv.index("install") + 1:])
    return installs


def _lock_python() -> str:
    headers = {re.search(r"Python (\d+\.\d+)", (DOCKER / f).read_text()).group(1) for f in lock.FILES}
    assert len(headers) == 1, headers
    return headers.pop()


@pytest.mark.parametrize("dockerfile, lock_files, index", [
    ("Dockerfile", ["torch.lock", "requirements.lock"], CPU_INDEX),
    ("Dockerfile.cuda", ["torch.lock", "torch-cuda.lock", "requirements.lock"], None),
])
def test_dockerfile_installs_only_the_lock_files(dockerfile, lock_files, index):
    path = DOCKER / dockerfile
    instructions = _instructions(path)
    bases = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert bases and all(b == f"python:{_lock_python()}-slim" for b in bases), bases  # no nvidia/cuda base too
    installed, copied = [], []
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            copied += rest.split()[:-1]
    for args in _pip_installs(path):
        assert "--no-deps" in args, f"{dockerfile}: pip install {' '.join(args)} without --no-deps"
        assert not any("==" in a or ">=" in a for a in args), f"{dockerfile}: a pin outside the lock files: {args}"
        files = [args[i + 1] for i, a in enumerate(args) if a == "-r"]
        installed += [Path(f).name for f in files]
        targets = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] not in ("-r", "--index-url")]
        assert targets in ([], ["/src"]), f"{dockerfile}: installs {targets} outside the lock files"
        if "torch.lock" in [Path(f).name for f in files]:
            got = args[args.index("--index-url") + 1] if "--index-url" in args else None
            assert got == index, f"{dockerfile}: torch from {got}, expected {index}"
        elif "--index-url" in args:
            pytest.fail(f"{dockerfile}: only torch may come from another index: {args}")
    assert sorted(installed) == sorted(lock_files)
    assert {f"docker/{f}" for f in lock_files} <= set(copied)
    assert "docker/torch-cuda.lock" not in copied or "torch-cuda.lock" in lock_files
    assert _pip_installs(path)[-1] == ["--no-deps", "/src"]  # the project itself, from the copied source


def test_dockerignore_sends_only_what_the_images_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    included = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        for word, rest in _instructions(DOCKER / dockerfile):
            if word == "COPY" and not rest.startswith("--from"):
                for source in rest.split()[:-1]:
                    assert any(fnmatch.fnmatch(source, p) or source == p for p in included), (dockerfile, source)
    assert not any(p.startswith((".venv", ".git", "outputs", "tests")) for p in included)


def test_check_mode_says_stale_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lock, "LOCK_DIR", tmp_path)
    assert lock.main(["--check"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: torch.lock, torch-cuda.lock, requirements.lock differ")
    assert lock.main([]) == 0 and lock.main(["--check"]) == 0
    assert (tmp_path / "torch.lock").read_text() == (DOCKER / "torch.lock").read_text()


def test_a_missing_distribution_is_one_error_line(monkeypatch, capsys):
    real = lock.project_requirements

    def with_unknown(root=lock.ROOT):
        runtime, nodeps = real(root)
        return [*runtime, Requirement("surely-not-installed-pkg==1.0")], nodeps

    monkeypatch.setattr(lock, "project_requirements", with_unknown)
    assert lock.main(["--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: surely-not-installed-pkg (required by pyproject.toml) is not "
                                               f"installed in {sys.prefix}")
