"""Layering: the pure-torch packages must not pull in the training stack (Lightning, Hydra, wandb)."""

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb")

# Extend this list as more packages promise to stay free of the training stack.
PURE_MODULES = [
    "ddpm_lightning.diffusion",
]

SCRIPT = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
forbidden = json.loads(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in forbidden)))
"""


@pytest.mark.parametrize("module", PURE_MODULES)
def test_module_does_not_import_training_stack(module):
    result = subprocess.run([sys.executable, "-c", SCRIPT, module, json.dumps(FORBIDDEN)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    leaked = json.loads(result.stdout.strip().splitlines()[-1])
    assert leaked == [], f"importing {module} imported {leaked}"


def test_layering_check_detects_a_leak():
    """The check itself works: importing omegaconf directly is reported."""
    result = subprocess.run([sys.executable, "-c", SCRIPT, "omegaconf", json.dumps(FORBIDDEN)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "omegaconf" in json.loads(result.stdout.strip().splitlines()[-1])
