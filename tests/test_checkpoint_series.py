"""ddpm-eval ckpts=<run>: every kept checkpoint in step order (last.ckpt once), resumable, seeds as a sweep axis;
ddpm-report draws every metric against the training step with the seed interval as a band."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_config import TINY, compose_run

from ddpm_lightning.cli.series import series_checkpoints
from ddpm_lightning.cli.train import train
from ddpm_lightning.reporting import write_report
from ddpm_lightning.reporting.curves import step_points

EVAL = ["num_samples=6", "steps=2", "feature=tiny", "reference_n=24", "metrics=[fid,kid]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("series") / "run"
    train(compose_run([*TINY, "trainer.val_check_interval=2", "callbacks.periodic_checkpoint.every_n_train_steps=2",
                       "callbacks.periodic_checkpoint.save_top_k=-1"], out))
    return out


def _eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "ddpm_lightning.cli.evaluate", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900, env=env)


def test_series_lists_each_step_once_in_order(run_dir):
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and "periodic-step0000002.ckpt" in names and "step0000004.ckpt" in names
    series = series_checkpoints(str(run_dir))
    assert [step for step, _ in series] == [2, 4]
    assert all(path.name != "last.ckpt" for _, path in series)  # last.ckpt equals step 4's file
    assert [s for s, _ in series_checkpoints(str(run_dir / "checkpoints" / "last.ckpt"))] == [4]  # a glob or a file
    assert series_checkpoints(str(run_dir), only_step=2) == series[:1]
    with pytest.raises(ValueError, match="ckpt_step=3: no checkpoint of that step.*allowed: 2, 4"):
        series_checkpoints(str(run_dir), only_step=3)
    with pytest.raises(ValueError, match="no .ckpt files"):
        series_checkpoints(str(run_dir / "csv"))


def test_series_sweep_over_seeds_is_resumable_and_reported_against_step(run_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", f"ckpts={run_dir}", *EVAL, "sample.seed=0,1", f"hydra.sweep.dir={sweep}"]
    first = _eval(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for job in ("0", "1"):
        record = json.loads((sweep / job / "series.json").read_text())
        assert [c["step"] for c in record["checkpoints"]] == [2, 4]
        for step in (2, 4):
            results = json.loads((sweep / job / f"step{step:07d}" / "results.json").read_text())
            assert results["ckpt_step"] == step and "fid@6" in results["metrics"]
    written = (sweep / "0" / "step0000004" / "results.json").stat().st_mtime_ns
    again = _eval(*args, cwd=tmp_path)  # the same command: every checkpoint is already scored
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint series: step" not in again.stdout and (sweep / "0" / "step0000004" / "results.json"
                                                               ).stat().st_mtime_ns == written
    report = write_report(sweep)
    table, rows = report["table"], report["aggregate"]
    assert [r.global_step for r in table.runs] == [2, 4, 2, 4]
    assert [g.values["ckpt_step"] for g in rows.groups] == ["2", "4"]  # rows in step order
    assert all(g.stats["eval/fid@6"].n == 2 for g in rows.groups)
    points = step_points(table, rows, "eval/fid@6")
    assert [p[0] for p in points] == [2, 4] and all(p[2] is not None and p[2] > 0 for p in points)
    assert report["paths"]["steps"].stat().st_size > 0 and report["missing"] == []


def test_series_refuses_other_settings_and_bad_combinations(run_dir, tmp_path):
    out = f"hydra.run.dir={tmp_path / 'one'}"
    first = _eval(f"ckpts={run_dir}", "ckpt_step=2", *EVAL, out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    other = _eval(f"ckpts={run_dir}", "ckpt_step=2", *EVAL[1:], "num_samples=8", out, cwd=tmp_path)
    assert other.returncode == 2 and "scored with other settings (num_samples)" in other.stderr.splitlines()[-1]
    both = _eval(f"ckpts={run_dir}", f"ckpt={run_dir}/checkpoints/last.ckpt", *EVAL, cwd=tmp_path)
    assert both.returncode == 2 and both.stderr.strip().splitlines()[-1].startswith("error: ckpts= scores every")
    alone = _eval("ckpt_step=2", f"ckpt={run_dir}/checkpoints/last.ckpt", *EVAL, cwd=tmp_path)
    assert alone.returncode == 2 and "ckpt_step= picks one checkpoint of a series" in alone.stderr
