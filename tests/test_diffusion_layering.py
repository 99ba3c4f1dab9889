"""Layering: the pure-torch packages must not pull in the training stack (Lightning, Hydra, OmegaConf, wandb)."""

import json
import subprocess
import sys

FORBIDDEN = ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "omegaconf", "wandb")

# The packages that promise to stay free of the training stack (STYLE.md: cli -> modules/callbacks/data ->
# sampling/metrics -> diffusion, models).
PURE_MODULES = ["ddpm_lightning.diffusion", "ddpm_lightning.models", "ddpm_lightning.sampling",
                "ddpm_lightning.metrics"]

# One fresh interpreter imports the modules one after another and lists, after each, the forbidden packages
# loaded so far: the first module with a non-empty list is the one that pulls them in.
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
    leaks = _leaks(*PURE_MODULES)
    assert list(leaks) == PURE_MODULES
    assert all(loaded == [] for loaded in leaks.values()), {name: loaded for name, loaded in leaks.items() if loaded}


def test_layering_check_detects_a_leak():
    """The check itself works: a module that imports omegaconf is reported, and blamed, not its predecessor."""
    leaks = _leaks("ddpm_lightning.diffusion", "omegaconf")
    assert leaks["ddpm_lightning.diffusion"] == [] and "omegaconf" in leaks["omegaconf"]


# The CLIs take shared helpers from their owners (checkpoints: modules/checkpoint.py, grids: sampling/, scoring:
# metrics/, run files: artifacts.py), never from callbacks/; only the Trainer's own wiring imports callbacks.
CALLBACK_USERS = {"training.py"}  # builds the Trainer: Preemption, TrainingHealth, the configured callbacks


def _imported_modules(path):
    """Every module a file imports (top level or inside functions), relative imports resolved in the package."""
    import ast
    from pathlib import Path

    package = "ddpm_lightning." + ".".join(Path(path).parent.relative_to(Path(path).parents[1]).parts)
    names = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_the_clis_import_no_helpers_from_callbacks():
    from pathlib import Path

    import ddpm_lightning.cli

    cli_dir = Path(ddpm_lightning.cli.__file__).parent
    offenders = {path.name: [m for m in _imported_modules(path) if m.startswith("ddpm_lightning.callbacks")]
                 for path in sorted(cli_dir.glob("*.py")) if path.name not in CALLBACK_USERS}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert "ddpm_lightning.callbacks" in _imported_modules(cli_dir / "training.py")  # the check sees imports


def test_import_check_resolves_relative_imports(tmp_path):
    package = tmp_path / "ddpm_lightning" / "cli"
    package.mkdir(parents=True)
    (package / "x.py").write_text("def f():\n    from ..callbacks.sample_grid import save_grid\n")
    assert "ddpm_lightning.callbacks.sample_grid.save_grid" in _imported_modules(package / "x.py")
