"""In-loop equals offline: the metric callback's end-of-training scores come with a ``reproduce`` command in
``metrics.json``; running that ``ddpm-eval`` command gives every score again, to 1e-4 relative."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from run_config import TINY, compose_run

from ddpm_lightning.callbacks.reproduce import eval_command, hydra_value
from ddpm_lightning.cli.train import train
from ddpm_lightning.config.choices import SAMPLE_METHODS
from ddpm_lightning.config.schema import GuidanceConfig, SampleConfig

CASES = {
    # class-conditional (balanced labels) under bf16 autocast; the final score on a checkpoint Lightning saved
    "bf16-class-cond": ["model.class_cond=true", "trainer.precision=bf16-mixed"],
    # unconditional in fp32 with no ModelCheckpoint: the callback saves the scored weights itself
    "fp32-no-checkpoints": ["trainer.precision=32-true", "callbacks.model_checkpoint=null",
                            "callbacks.periodic_checkpoint=null", "++trainer.enable_checkpointing=false",
                            "callbacks.generative_metrics.seed=7"],
}


def _run_reproduce(command: str, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    assert args[0] == "ddpm-eval"
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "ddpm_lightning.cli.evaluate", *args[1:], f"hydra.run.dir={out}"],
                          capture_output=True, text=True, cwd=cwd, timeout=900, env=env)


@pytest.mark.parametrize("case", list(CASES))
def test_in_loop_scores_are_reproduced_by_the_written_command(tmp_path, case):
    run = tmp_path / "run"
    train(compose_run([*TINY, "callbacks=metrics", "++callbacks.generative_metrics.metrics=[fid,kid,pr]",
                       *CASES[case]], run))
    saved = json.loads((run / "metrics.json").read_text())
    command = saved["reproduce"]
    ckpt = Path(saved["ckpt"])
    assert f"ckpt={ckpt}" in command and ckpt.is_file()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == saved["global_step"] == 4
    if case == "fp32-no-checkpoints":
        assert ckpt.name == "scored-step0000004.ckpt"
        assert "seed=7" in command and "y=random" in command and "precision=32" in command
    else:
        assert "y=balanced" in command and "precision=bf16" in command and "seed=1234" in command
    for key in ("num_samples=6", "feature=tiny", "reference_n=24", "steps=2", "batch_size=8"):
        assert key in command.split(), (key, command)
    result = _run_reproduce(command, tmp_path / "eval", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    offline = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    in_loop = {key.removeprefix("val/"): value for key, value in saved.items() if key.startswith("val/")}
    assert set(in_loop) == {"fid@6", "kid_mean@6", "kid_std@6", "precision@6", "recall@6"}, in_loop
    for key, value in in_loop.items():
        assert offline[key] == pytest.approx(value, rel=1e-4, abs=1e-9), (key, value, offline[key])
    print(command, {key: (value, offline[key]) for key, value in in_loop.items()})


def test_eval_command_pins_guidance_and_refuses_unknown_precision():
    settings = SampleConfig(method="ddim", steps=None, eta=0.5, batch_size=16)
    scorer = {"metrics": ["fid"], "feature": "tiny", "weights_path": None, "reference_split": "train",
              "reference_n": 24, "pr_reference_n": 100, "reference": None, "cache_dir": None,
              "classifier_epochs": 1}
    command = eval_command(Path("/r u n/last.ckpt"), num_samples=6, seed=3, labels="balanced", precision="32-true",
                           settings=settings, guidance=GuidanceConfig(cfg_scale=1.5), scorer=scorer, device="cpu")
    args = shlex.split(command)
    assert args[:2] == ["ddpm-eval", "ckpt=/r u n/last.ckpt"]
    assert {"steps=all", "eta=0.5", "guidance.cfg_scale=1.5", "metrics=[fid]", "weights_path=null"} <= set(args)
    assert not any(arg.startswith(("cache_dir=", "guidance.scale=")) for arg in args)  # defaults left out
    assert eval_command(Path("x.ckpt"), num_samples=6, seed=3, labels="random", precision="16-mixed",
                        settings=settings, guidance=GuidanceConfig(), scorer=scorer, device="cpu") is None
    assert hydra_value([0.5, None, True]) == "[0.5,null,true]"


@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_eval_command_passes_ddpm_eval_checks_for_every_method(method):
    """The written command for each sampler passes ddpm-eval's checks of the generation settings (eta is DDIM's:
    written for method=ddim only; the default experiment's DDPM-15 with eta once broke the command)."""
    from omegaconf import OmegaConf

    from ddpm_lightning.cli.validate import _check_generation_choices

    settings = SampleConfig(method=method, steps=15, eta=0.0, batch_size=100)
    scorer = {"metrics": ["fid"], "feature": "tiny", "weights_path": None, "reference_split": "train",
              "reference_n": 24, "pr_reference_n": 100, "reference": None, "cache_dir": None, "classifier_epochs": 1}
    command = eval_command(Path("last.ckpt"), num_samples=6, seed=3, labels="balanced", precision="bf16-mixed",
                           settings=settings, guidance=GuidanceConfig(), scorer=scorer, device="cpu")
    pairs = dict(arg.split("=", 1) for arg in shlex.split(command)[1:])
    cfg = OmegaConf.create({key: yaml.safe_load(value) for key, value in pairs.items()})
    _check_generation_choices(cfg)
    assert ("eta" in pairs) == (method == "ddim") and pairs["method"] == method and pairs["precision"] == "bf16"
