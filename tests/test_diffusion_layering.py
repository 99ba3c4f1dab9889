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
