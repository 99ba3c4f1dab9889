"""The package as users install it: a wheel built from the sources, installed outside the checkout, runs
``ddpm-train --cfg job`` and a 2-step training from another directory (the configs travel as package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from run_config import TINY

ROOT = Path(__file__).resolve().parents[1]

# Not marked slow: ~30 s in all on a loaded 2-core machine (wheel + install ~4 s, two runs), and the only test of
# the installed package (conf/ as package data, pkg://ddpm_lightning.conf, the console script).


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """``pip wheel --no-deps`` of a copy of the sources, ``pip install --no-deps --target`` of that wheel."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ddpm_lightning", src / "ddpm_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("ddpm_lightning-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    elsewhere = tmp / "elsewhere"  # neither the checkout nor the install folder
    elsewhere.mkdir()
    return {"site": site, "cwd": elsewhere}


def _run(installed: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(installed["site"]), WANDB_MODE="offline", OMP_NUM_THREADS="1",
               DDPM_CACHE_DIR=str(installed["cwd"] / "cache"))
    return subprocess.run(list(args), capture_output=True, text=True, cwd=installed["cwd"], env=env, timeout=300)


def test_the_installed_package_is_the_one_imported(installed):
    where = _run(installed, sys.executable, "-c", "import ddpm_lightning; print(ddpm_lightning.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(installed["site"])
    configs = list((installed["site"] / "ddpm_lightning" / "conf").rglob("*.yaml"))
    assert len(configs) == len(list((ROOT / "ddpm_lightning" / "conf").rglob("*.yaml")))


def test_installed_ddpm_train_prints_its_config(installed):
    script = installed["site"] / "bin" / "ddpm-train"  # the console script pip wrote for the wheel
    done = _run(installed, str(script), "--cfg", "job", "experiment=ablate_loss", "diffusion=improved")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loss_type: hybrid" in done.stdout and "task_name: ablate_loss" in done.stdout


def test_installed_package_trains_two_steps(installed):
    run_dir = installed["cwd"] / "run"
    done = _run(installed, sys.executable, "-m", "ddpm_lightning.train", *TINY, "trainer.max_steps=2",
                "trainer.val_check_interval=2", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "summary.json").is_file()
