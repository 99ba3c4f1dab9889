"""ddpm-eval and ddpm-sample on a checkpoint from a tiny training run: every output written, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from run_config import TINY, compose_run

from ddpm_lightning.cli.train import train


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    train(compose_run([*TINY, "model.class_cond=true", "train.p_uncond=0.2"], out))
    return out / "checkpoints" / "last.ckpt"


def _run(tool: str, *args: str, cwd: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cache or cwd / "cache")}
    code = f"from ddpm_lightning.cli.{tool} import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args, f"hydra.run.dir={cwd}/out"], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=env)


def test_eval_writes_json_grid_and_adm_npz(tiny_ckpt, tmp_path):
    result = _run("evaluate", f"ckpt={tiny_ckpt}", "num_samples=12", "steps=2", "feature=tiny", "reference_n=40",
                  "metrics=[fid,kid,pr,is_clf,nll]", "nll_images=4", "classifier_epochs=1", "y=balanced",
                  "guidance.cfg_scale=1.0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())["metrics"]
    for key in ("fid@12", "kid_mean@12", "precision@12", "recall@12", "is_clf_mean@12", "class_accuracy",
                "nll_bpd", "nll_prior_bpd", "nll_decoder_bpd", "nll_vb_q0_bpd"):
        assert key in results, key
    total_parts = results["nll_prior_bpd"] + sum(results[f"nll_vb_q{q}_bpd"] for q in range(4))
    assert results["nll_bpd"] == pytest.approx(total_parts, rel=1e-5)
    with np.load(out / "samples.npz", allow_pickle=False) as data:
        # RGB: the ADM evaluator reads 3 channels
        assert data["arr_0"].shape == (12, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].tolist() == [i % 10 for i in range(12)]
    assert (out / "grid.png").stat().st_size > 0
    # the same samples scored without a model give the same FID (same features, same reference)
    again = _run("evaluate", f"samples={out / 'samples.npz'}", "data=digits", "data.image_size=16", "data.limit=96",
                 "feature=tiny", "reference_n=40", "metrics=[fid]", cwd=_mkdir(tmp_path / "again"),
                 cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-2000:]
    rescored = json.loads((tmp_path / "again" / "out" / "results.json").read_text())["metrics"]
    assert rescored["fid@12"] == pytest.approx(results["fid@12"], rel=1e-6)


def test_sample_cli_class_and_outputs(tiny_ckpt, tmp_path):
    # sampler= is the deprecated spelling of method=: it still works, with one warning line
    result = _run("sample", f"ckpt={tiny_ckpt}", "num_samples=5", "steps=2", "y=3", "sampler=ddpm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("warning: sampler= is deprecated; use method=\n") == 1, result.stderr[-2000:]
    with np.load(tmp_path / "out" / "samples.npz", allow_pickle=False) as data:
        assert data["arr_1"].tolist() == [3] * 5
    meta = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert meta["samples_per_second"] > 0
    assert meta["sampling"]["method"] == "ddpm" and meta["sampling"]["steps"] == 2
    # the work before it starts, then the time it will take, timed on the first batch
    assert "generating 5 samples (0 kept from an earlier run): 1 batch of <= 64 x 2 network calls = 2 network " \
           "calls" in result.stderr
    assert re.search(r"estimated time: ~\d+\.\d min for 5 samples \(2 network calls; the first 5 took "
                     r"\d+\.\d s\)", result.stderr), result.stderr[-2000:]


def test_eval_samples_with_the_checkpoints_own_sampler_unless_told(tiny_ckpt, tmp_path):
    stored = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["run_config"]["sample"]
    own = _run("evaluate", f"ckpt={tiny_ckpt}", "num_samples=2", "metrics=[]", cwd=_mkdir(tmp_path / "own"))
    assert own.returncode == 0, own.stderr[-2000:]
    used = json.loads((tmp_path / "own" / "out" / "results.json").read_text())["sampling"]
    assert used == {"method": stored["method"], "steps": stored["steps"], "eta": stored["eta"],
                    "schedule": stored["schedule"]}
    told = _run("evaluate", f"ckpt={tiny_ckpt}", "num_samples=2", "metrics=[]", "method=ddpm", "steps=all",
                cwd=_mkdir(tmp_path / "told"))
    assert told.returncode == 0, told.stderr[-2000:]
    assert json.loads((tmp_path / "told" / "out" / "results.json").read_text())["sampling"] == {
        "method": "ddpm", "steps": None, "eta": stored["eta"], "schedule": stored["schedule"]}
    assert "ddpm, steps=None" in told.stderr + told.stdout


@pytest.mark.parametrize("args,message", [
    (["ckpt=/no/such/file.ckpt"], "does not exist"),
    (["guidance.scale=2"], "needs a noisy classifier checkpoint"),
    (["weights_path=/no/such/inception.pth", "metrics=[fid]"], "Inception weights file not found"),
    (["y=dog"], "allowed: random, balanced, or a class index"),
    (["method=euler"], "allowed: ddpm, ddim"),
])
def test_eval_bad_input_is_one_line(tiny_ckpt, tmp_path, args, message):
    args = [f"ckpt={tiny_ckpt}", "num_samples=2", "steps=2", *args] if not args[0].startswith("ckpt=") else args
    result = _run("evaluate", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, last


def test_corrupt_checkpoint_is_named(tmp_path, tiny_ckpt):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:5000])
    result = _run("sample", f"ckpt={truncated}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(truncated) in result.stderr and "corrupt" in result.stderr
    assert torch.load(tiny_ckpt, weights_only=True)["global_step"] == 4  # the original is untouched


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
