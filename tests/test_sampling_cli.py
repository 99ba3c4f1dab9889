"""ddpm-sample / ddpm-eval with every sampling method: per-sample seeds (byte-equal samples.npz at batch sizes 3
and 8), the new sample.method / schedule keys through the checkpoint's config and the command line, errors."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_config import TINY, compose_run

from ddpm_lightning.cli.generation import Generation, generate
from ddpm_lightning.cli.train import train
from ddpm_lightning.config.choices import ETA_METHODS
from ddpm_lightning.modules.checkpoint import load_diffusion_module
from ddpm_lightning.sampling import SAMPLE_METHODS, Guidance, resolve_sampler


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    train(compose_run([*TINY, "model.class_cond=true", "train.p_uncond=0.2", "sample.method=dpm++2m",
                       "sample.schedule=trailing", "sample.steps=3"], out))
    return out / "checkpoints" / "last.ckpt"


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cwd / "cache")}
    code = f"from ddpm_lightning.cli.{tool} import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args, f"hydra.run.dir={cwd}/out"], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=env)


def test_samples_npz_is_byte_equal_at_batch_sizes_3_and_8(tiny_ckpt, tmp_path):
    arrays = []
    for batch_size in (3, 8):
        cwd = tmp_path / f"b{batch_size}"
        cwd.mkdir()
        result = _run("sample", f"ckpt={tiny_ckpt}", "num_samples=8", f"batch_size={batch_size}", "y=random",
                      "method=ddpm", "steps=3", "guidance.cfg_scale=1.0", cwd=cwd)
        assert result.returncode == 0, result.stderr[-2000:]
        with np.load(cwd / "out" / "samples.npz", allow_pickle=False) as data:
            arrays.append((data["arr_0"].copy(), data["arr_1"].copy()))
    assert np.array_equal(arrays[0][0], arrays[1][0]) and np.array_equal(arrays[0][1], arrays[1][1])
    assert len(set(arrays[0][1].tolist())) > 1


def test_checkpoint_sampling_defaults_and_cli_overrides(tiny_ckpt, tmp_path):
    own = _run("sample", f"ckpt={tiny_ckpt}", "num_samples=2", cwd=tmp_path)
    assert own.returncode == 0, own.stderr[-2000:]
    used = json.loads((tmp_path / "out" / "sample.json").read_text())["sampling"]
    assert used == {"method": "dpm++2m", "steps": 3, "eta": 0.0, "schedule": "trailing"}
    (tmp_path / "told").mkdir()
    told = _run("sample", f"ckpt={tiny_ckpt}", "num_samples=2", "method=unipc", "schedule=karras", "steps=4",
                cwd=tmp_path / "told")
    assert told.returncode == 0, told.stderr[-2000:]
    used = json.loads((tmp_path / "told" / "out" / "sample.json").read_text())["sampling"]
    assert used == {"method": "unipc", "steps": 4, "eta": 0.0, "schedule": "karras"}


@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_every_method_samples_from_a_checkpoint(tiny_ckpt, method, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    module = load_diffusion_module(tiny_ckpt)
    sampler = resolve_sampler(module.sample_settings, {"method": method, "steps": 3, "schedule": "uniform",
                                                       "clip_denoised": True, "batch_size": 2})
    result = generate(module, Generation(out_dir=tmp_path, num_samples=3, sampler=sampler,
                                         guidance=Guidance(cfg_scale=1.0), y="balanced", seed=0))
    used = result["sampling"]
    with np.load(tmp_path / "samples.npz", allow_pickle=False) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (3, 16, 16, 3) and images.std() > 0  # uint8 NHWC, the 1 channel repeated
    assert labels.tolist() == [0, 1, 2] and used["method"] == method and used["schedule"] == "uniform"
    eta = "eta=0.0, " if method in ETA_METHODS else ""  # the log names eta only where the sampler uses it
    assert any(r.getMessage().startswith(f"sampled 3 images ({method}, steps=3, {eta}schedule=uniform) in ")
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("args,message", [
    (["schedule=cosine"], "unknown sampling schedule 'cosine'; allowed: adm, uniform, logsnr, karras, trailing"),
    (["schedule=karras", "steps=ddim25"], "schedule=karras needs an integer number of steps"),
])
def test_bad_sampler_settings_are_one_line(tiny_ckpt, tmp_path, args, message):
    result = _run("sample", f"ckpt={tiny_ckpt}", "num_samples=2", *args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, last


@pytest.mark.parametrize("overrides,message", [
    (["sample.method=dpm"], "sample.method='dpm' is not an option; allowed: ddpm, ddim, dpm"),  # before torch
    (["sample.schedule=karras", "sample.steps=ddim25"], "schedule=karras needs an integer number of steps"),
    (["sample.schedule=logsnr", "sample.steps=51"], "2 <= steps <= T = 50"),
])
def test_bad_train_sample_settings_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(compose_run([*TINY, *overrides], tmp_path))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_deprecated_sampler_key_is_renamed_with_one_warning(capsys):
    from ddpm_lightning.cli.deprecated import rename_deprecated_keys

    args = rename_deprecated_keys(["ckpt=x.ckpt", "sampler=ddpm,ddim", "steps=3", "sampler=unipc", "-m"])
    assert args == ["ckpt=x.ckpt", "method=ddpm,ddim", "steps=3", "method=unipc", "-m"]
    assert capsys.readouterr().err == "warning: sampler= is deprecated; use method=\n"
    assert rename_deprecated_keys(["method=ddpm", "sample.method=ddim"]) == ["method=ddpm", "sample.method=ddim"]
    assert capsys.readouterr().err == ""
