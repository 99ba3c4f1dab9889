"""The layer map, enforced: every package has a rank, imports only go down, no module import circle, and the
diagram in docs/architecture.md is this table's rendering (``python tests/test_layering.py`` prints it).

Imports are read from the sources (top level and inside functions, relative imports resolved), so a lazy import
inside a function counts like any other. The pure-torch packages are also imported in a fresh interpreter to
check that the training stack (Lightning, Hydra, OmegaConf, wandb) stays out of them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ddpm_lightning"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# rank: (packages and top-level modules, what they are). A package may import from a lower rank only.
LAYERS = (
    (6, ("train",), "python -m ddpm_lightning.train (the ddpm-train entry point)"),
    (5, ("cli",), "@hydra.main / argparse, one line per error: ddpm-train, -sample, -eval, -report, -convert-adm"),
    (4, ("callbacks",), "Lightning callbacks: grids, in-loop metrics, preemption, health, post-hoc EMA"),
    (3, ("modules", "loggers", "reporting"), "thin LightningModules, checkpoints; loggers; sweep tables"),
    (2, ("sampling", "metrics"), "pure torch: sample_images, guidance; FID/KID/PR/IS"),
    (1, ("diffusion", "models", "data", "provenance"),
     "pure torch: the math, the networks; the data sets; what made a number (code, machine, precision)"),
    (0, ("config", "adm_flags", "artifacts", "pixels", "precision", "security", "seeding", "sweeps"),
     "schemas + choices (no torch), run files, pixel range, seeds, sweep expansion, config safety"),
)
RANK = {name: rank for rank, names, _ in LAYERS for name in names}
FORBIDDEN = ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "omegaconf", "wandb")
PURE_PACKAGES = ("ddpm_lightning.diffusion", "ddpm_lightning.models", "ddpm_lightning.sampling",
                 "ddpm_lightning.metrics", "ddpm_lightning.config.choices")
# the CLIs take shared helpers from their owners, never from callbacks/; only the Trainer's wiring imports them
CALLBACK_USERS = {"training.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every ddpm_lightning module a file imports; ``from pkg import name`` gives
    ``pkg.name`` where that is a module, else ``pkg``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            for alias in node.names:
                child = f"{module}.{alias.name}"
                found.append((child if _is_module(child) else module, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "ddpm_lightning"]


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def source_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "conf" not in p.relative_to(ROOT).parts)


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(files: list[Path]) -> list[str]:
    wrong = []
    for path in files:
        source = module_name(path)
        for target, line in imported_modules(path):
            a, b = top(source), top(target)
            if a and b and a != b and RANK[b] >= RANK[a]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} "
                             f"({a} is rank {RANK[a]}, {b} rank {RANK[b]})")
    return wrong


def import_cycles(files: list[Path]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan) of the module import graph; importing a
    package runs its ``__init__``, so an import of a package is an edge to it."""
    graph = {module_name(p): sorted({t for t, _ in imported_modules(p)} - {module_name(p)}) for p in files}
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def diagram() -> str:
    """Top to bottom: a line of each rank's packages (``name/``) and modules, then what they are."""
    lines = []
    for rank, names, what in LAYERS:
        lines += [f"{rank}  {'  '.join(f'{n}/' if (ROOT / n).is_dir() else n for n in names)}", f"     {what}"]
    return "```\n" + "\n".join(lines) + "\n```"


# ------------------------------------------------------------------------------------------------------ tests
def test_every_package_has_a_rank():
    tops = {top(module_name(p)) for p in source_files()} - {""}
    assert tops == set(RANK), f"unranked: {sorted(tops - set(RANK))}, stale: {sorted(set(RANK) - tops)}"


def test_imports_only_go_down():
    assert upward_imports(source_files()) == []


def test_no_module_import_circle():
    assert import_cycles(source_files()) == []


def test_the_architecture_diagram_is_the_table():
    assert diagram() in DOC.read_text(), f"docs/architecture.md must hold the layer diagram:\n{diagram()}"


def test_the_clis_import_no_helpers_from_callbacks():
    offenders = {p.name: [m for m, _ in imported_modules(p) if m.startswith("ddpm_lightning.callbacks")]
                 for p in sorted((ROOT / "cli").glob("*.py")) if p.name not in CALLBACK_USERS}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_checks_see_violations(tmp_path, monkeypatch):
    """A fake package tree with an upward import, a lazy one inside a function and a circle: all are found."""
    root = tmp_path / "ddpm_lightning"
    for folder in ("diffusion", "cli", "modules"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "diffusion" / "bad.py").write_text("def f():\n    from ..cli.x import main\n")
    (root / "cli" / "x.py").write_text("from ..diffusion import bad\n")
    (root / "modules" / "a.py").write_text("from .b import g\n")
    (root / "modules" / "b.py").write_text("def g():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    files = sorted(root.rglob("*.py"))
    assert upward_imports(files) == ["ddpm_lightning/diffusion/bad.py:2 imports ddpm_lightning.cli.x (diffusion is "
                                     "rank 1, cli rank 5)"]
    assert sorted(import_cycles(files)) == [["ddpm_lightning.cli.x", "ddpm_lightning.diffusion.bad"],
                                            ["ddpm_lightning.modules.a", "ddpm_lightning.modules.b"]]


# The pure packages, imported one after another in a fresh interpreter: after each, the training-stack modules
# loaded so far; the first with a non-empty list is the one that pulls them in.
SCRIPT = """
import importlib, json, sys
forbidden = json.loads(sys.argv[1])
leaks = {}
for name in sys.argv[2:]:
    importlib.import_module(name)
    leaks[name] = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps(leaks))
"""


def _leaks(*modules: str) -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(FORBIDDEN), *modules],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pure_packages_do_not_import_the_training_stack():
    leaks = _leaks(*PURE_PACKAGES)
    assert list(leaks) == list(PURE_PACKAGES)
    assert all(loaded == [] for loaded in leaks.values()), {name: loaded for name, loaded in leaks.items() if loaded}


@pytest.mark.parametrize("leaky", ["omegaconf"])
def test_the_stack_check_detects_a_leak(leaky):
    """A module that imports omegaconf is reported, and blamed, not its predecessor."""
    leaks = _leaks("ddpm_lightning.diffusion", leaky)
    assert leaks["ddpm_lightning.diffusion"] == [] and leaky in leaks[leaky]


if __name__ == "__main__":
    print(diagram())
