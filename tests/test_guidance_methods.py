"""Guidance after ADM through the commands: the guidance interval and autoguidance in ddpm-eval / ddpm-sample (one
``error:`` line for bad input, before any sampling), network calls per image in results.json, the method sweeps and
``ddpm-report --select-per guidance`` choosing each method's best setting on held-out seeds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from run_config import TINY, compose_run

from ddpm_lightning.reporting import write_report
from ddpm_lightning.reporting.select import guidance_method

EVAL_TINY = ["num_samples=6", "steps=3", "feature=tiny", "reference_n=24", "classifier_epochs=1", "batch_size=6",
             "metrics=[fid,pr]"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny class-conditional model with label dropout (cosine, T=50) and the same checkpoint relabelled as another
    task (linear schedule, v-prediction)."""
    from ddpm_lightning.cli.train import train

    folder = tmp_path_factory.mktemp("model")
    train(compose_run([*TINY, "model.class_cond=true", "diffusion.schedule=cosine", "train.p_uncond=0.2"], folder))
    model = folder / "checkpoints" / "last.ckpt"
    other = folder / "other_task.ckpt"
    checkpoint = torch.load(model, map_location="cpu", weights_only=True)
    diffusion = checkpoint["hyper_parameters"]["diffusion"]
    checkpoint["hyper_parameters"]["diffusion"] = {**diffusion, "schedule": "linear", "mean_type": "v"}
    torch.save(checkpoint, other)
    return {"model": model, "other": other}


def _run(program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cwd / "cache")}
    code = f"from ddpm_lightning.cli.{program} import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


# bad input before torch is imported: the checks of the composed config (cli/validate.py)
@pytest.mark.parametrize("overrides,expected", [
    (["guidance.interval=[800,200]"], r"guidance\.interval=\[800, 200\] is reversed: give \[lo, hi\] with lo <= hi"),
    (["guidance.interval=[-3,200]"], r"guidance\.interval=\[-3, 200\] starts below 0"),
    (["guidance.interval=middle"], r"guidance\.interval must be \[lo, hi\], two integer timesteps .*got 'middle'"),
    (["guidance.cfg_scale=abc"], r"guidance\.cfg_scale must be a number >= 0, got 'abc'"),
    (["guidance.autoguidance_ckpt={tmp}/fake.ckpt", "guidance.autoguidance_scale=strong"],
     r"guidance\.autoguidance_scale must be a number >= 0, got 'strong'"),
    (["guidance.autoguidance_ckpt={tmp}/fake.ckpt", "guidance.autoguidance_scale=2", "guidance.cfg_scale=1"],
     r"guidance\.cfg_scale=1 and guidance\.autoguidance_scale=2 both guide, and their combination is not defined"),
    (["guidance.autoguidance_scale=2"], r"needs the guiding model: give guidance\.autoguidance_ckpt="),
    (["guidance.autoguidance_ckpt={tmp}/fake.ckpt"], r"autoguidance_scale=1: the guiding model would guide nothing"),
    (["guidance.autoguidance_ckpt={tmp}/missing.ckpt", "guidance.autoguidance_scale=2"], r"missing\.ckpt"),
    (["guidance.scale_schedule=cosine"], r"guidance\.scale_schedule.*'cosine'.*allowed: constant, linear"),
])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_bad_guidance_is_one_line_before_any_work(command, overrides, expected, tmp_path, capsys):
    from ddpm_lightning.cli.validate import CheckConfig

    (tmp_path / "fake.ckpt").write_bytes(b"PK\x03\x04")
    cfg = compose_run([f"ckpt={tmp_path}/fake.ckpt", *(o.format(tmp=tmp_path) for o in overrides)],
                      tmp_path / "run", config_name=command)
    with pytest.raises(SystemExit) as exit_info:
        CheckConfig().on_run_start(cfg, config_name=command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(expected, err[0]), err


def test_a_guiding_model_no_sweep_job_guides_with_is_refused(tmp_path):
    from ddpm_lightning.cli.validate import check_sweep_guidance

    jobs = [compose_run(["ckpt=m.ckpt", "guidance.autoguidance_ckpt=early.ckpt", f"sample.seed={seed}"],
                        tmp_path / str(seed), config_name="eval") for seed in (0, 1)]
    with pytest.raises(ValueError, match=r"no job of the sweep has guidance\.autoguidance_scale != 1 \(scales: 1\)"):
        check_sweep_guidance(jobs)
    jobs[1].guidance.autoguidance_scale = 2.0
    check_sweep_guidance(jobs)  # a w = 1 baseline row next to a guided one is fine


# bad input found once the model is loaded, still before any sampling
@pytest.mark.parametrize("overrides,expected", [
    (["guidance.cfg_scale=1", "guidance.interval=[0,50]"],
     r"^error: guidance\.interval=\[0, 50\] must lie within the model's steps 0\.\.49 \(T=50\)"),
    (["guidance.autoguidance_ckpt={other}", "guidance.autoguidance_scale=2"],
     r"^error: guidance\.autoguidance_ckpt=.*other_task\.ckpt is a model of another task: schedule='linear' \(the "
     r"model: 'cosine'\), mean_type='v' \(the model: 'eps'\)"),
    (["guidance.interval_sigma=[10000,20000]", "guidance.autoguidance_ckpt={model}", "guidance.autoguidance_scale=2"],
     r"^error: guidance\.interval_sigma=\[10000, 20000\] holds no step of the model's 50-step process"),
])
def test_guidance_that_does_not_fit_the_model_is_one_line_before_sampling(models, overrides, expected, tmp_path):
    out = tmp_path / "out"
    args = [o.format(**{k: str(v) for k, v in models.items()}) for o in overrides]
    result = _run("sample", f"ckpt={models['model']}", "num_samples=2", "steps=2", *args, f"hydra.run.dir={out}",
                  cwd=tmp_path)
    assert re.search(expected, _one_error_line(result)), result.stderr[-2000:]
    assert not (out / "shards").exists() or not any((out / "shards").glob("*.npz"))  # nothing was sampled


def _samples(job: Path) -> np.ndarray:
    with np.load(job / "samples.npz") as data:
        return data["arr_0"]


def test_autoguidance_sweep_by_the_model_itself_is_unguided_and_reports_per_method(models, tmp_path):
    """The guiding model equal to the model: every w and interval gives the unguided samples (the sampler's
    invariant, through the command); the calls per image count the guiding model's where it acts; then
    ``--select-per guidance`` chooses each method's best row on one seed and reports it on the other."""
    sweep = tmp_path / "methods"
    common = [f"ckpt={models['model']}", *EVAL_TINY, "sample.seed=0,1"]
    result = _run("evaluate", "-m", "experiment=guidance_sweep_autoguidance",
                  f"guidance.autoguidance_ckpt={models['model']}", "guidance.autoguidance_scale=1,3",
                  "guidance.interval=null,[10,30]", *common, f"hydra.sweep.dir={sweep}/autoguidance", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((sweep / "autoguidance").glob("[0-9]*"), key=lambda p: int(p.name))
    assert len(jobs) == 8
    results = [json.loads((job / "results.json").read_text()) for job in jobs]
    assert {r["sampling"]["steps"] for r in results} == {3}
    by_seed: dict[int, list[np.ndarray]] = {}
    for job, saved in zip(jobs, results, strict=True):
        by_seed.setdefault(int(re.search(r"sample.seed=(\d)", str(job.joinpath(".hydra", "overrides.yaml")
                                                                       .read_text())).group(1)), []).append(
            _samples(job))
        w, interval = saved["guidance"]["autoguidance_scale"], saved["guidance"]["interval"]
        calls = saved["generation"]["network_calls_per_image"]
        # 3 kept steps of the 50-step process (DDIM's stride: 0, 17, 34): the guiding model adds one call per step
        # it acts at; [10, 30] holds one of them
        assert calls == (3 if w == 1 else 6 if interval is None else 4), (w, interval, calls)
        assert saved["generation"]["classifier_gradients_per_image"] == 0
    for seed, arrays in by_seed.items():
        assert all(np.array_equal(arrays[0], a) for a in arrays[1:]), seed  # byte-equal at every w and interval
    assert not np.array_equal(by_seed[0][0], by_seed[1][0])  # the seeds differ, so the equality above can fail

    # the CFG sweep into the same folder: one study (the method sweeps share the task guidance_sweep)
    result = _run("evaluate", "-m", "experiment=guidance_sweep_cfg", "guidance.cfg_scale=0,2", "guidance.interval=null",
                  *common, f"hydra.sweep.dir={sweep}/cfg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # four groups of rows: w = 1 and cfg 0 (unguided), w = 3 at every step, w = 3 inside [10, 30], cfg 2
    report = write_report(sweep, make_plot=False, metric="eval/fid@6", select_per="guidance",
                          select_seeds="0", report_seeds="1")
    groups = [selection.group for selection in report["selections"]]
    assert sorted(groups) == ["autoguidance", "autoguidance+interval", "cfg", "unguided"]
    unguided = report["selections"][groups.index("unguided")]
    assert len(unguided.candidates) == 3  # w = 1 at either interval, and cfg 0
    # the cost of an image beside each chosen row: 3 calls unguided, 6 with CFG's doubled batch
    cfg = report["selections"][groups.index("cfg")]
    assert cfg.reported_values["eval/network_calls_per_image"] == {"1": 6.0}
    assert unguided.reported_values["eval/network_calls_per_image"] == {"1": 3.0}
    assert "| network calls per image | 6 |" in report["markdown"]
    # one summary table: a row per method with its chosen row's held-out values and the calls per image
    summary = report["markdown"].split("## Held-out selection per group:")[1].split("\n## ")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    assert sorted(row.split(" | ")[0][2:] for row in rows) == sorted(groups)
    cfg_row = next(row for row in rows if row.startswith("| cfg |"))
    fid = cfg.reported["eval/fid@6"].mean
    assert f"{fid:.4g}"[:4] in cfg_row and cfg_row.rstrip(" |").endswith("| 1 | 6 | 0")  # n, calls, gradients
    for selection in report["selections"]:
        assert selection.selection_seeds == ["0"] and selection.report_seeds == ["1"]
        assert all(stats.n == 1 for stats in selection.reported.values())
    saved = json.loads(report["paths"]["selection"].read_text())
    assert saved["per"] == ["guidance"] and list(saved["groups"]) == groups
    assert "## Held-out selection of autoguidance+interval: chosen on `sample.seed` = 0" in report["markdown"]
    from ddpm_lightning.cli.report import main

    main([str(sweep), "--select-per", "guidance", "--select-seeds", "0", "--report-seeds", "1", "--no-plot",
          "--out", str(tmp_path / "report")])
    assert list(json.loads((tmp_path / "report" / "selection.json").read_text())["groups"]) == groups


def test_guidance_method_names_rows_by_what_guides_them():
    assert guidance_method({}) == "unguided"
    assert guidance_method({"guidance.scale": "0", "guidance.interval": "[1,5]"}) == "unguided"
    assert guidance_method({"guidance.scale": "2"}) == "classifier"
    assert guidance_method({"guidance.cfg_scale": "1.5", "guidance.interval": "[167,881]"}) == "cfg+interval"
    assert guidance_method({"guidance.autoguidance_scale": "1"}) == "unguided"
    assert guidance_method({"guidance.autoguidance_scale": "2", "guidance.interval_sigma": "null"}) == "autoguidance"
    assert guidance_method({"guidance.scale": "1", "guidance.cfg_scale": "2"}) == "classifier+cfg"


def test_the_runs_of_several_training_seeds_are_evaluated_and_paired_by_train_seed(tmp_path):
    """``ddpm-eval -m train_seed=0,1 'ckpt=runs/s${train_seed}/...'``: each job scores its own seed's run (the
    interpolation resolved per job, also in the checks before the sweep, which read the sweep config's null
    train_seed before), and ``ddpm-report`` takes ``train_seed`` as the training seed: rows (the evaluation
    settings) over training seeds, paired by them; the sampling seed averaged inside."""
    from ddpm_lightning.cli.train import train

    for seed in (0, 1):
        train(compose_run([*TINY, "model.class_cond=true", f"seed={seed}", "logger=none"], tmp_path / f"s{seed}"))
    evaluation = [arg for arg in EVAL_TINY if not arg.startswith("steps=")]
    sweep = tmp_path / "sweep"
    result = _run("evaluate", "-m", "train_seed=0,1", f"ckpt={tmp_path}/s${{train_seed}}/checkpoints/last.ckpt",
                  "steps=2,3", "sample.seed=0,1", *evaluation, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(sweep.glob("[0-9]*"), key=lambda p: int(p.name))
    assert len(jobs) == 8
    fids: dict[tuple[str, str, str], float] = {}
    for job in jobs:
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        saved = json.loads((job / "results.json").read_text())
        assert saved["ckpt"] == f"{tmp_path}/s{overrides['train_seed']}/checkpoints/last.ckpt"
        fids[overrides["train_seed"], overrides["steps"], overrides["sample.seed"]] = saved["metrics"]["fid@6"]
    assert fids["0", "2", "0"] != fids["1", "2", "0"]  # two models: the pairing below has something to pair
    rows = write_report(sweep, make_plot=False)["aggregate"]
    assert (rows.unit_axes, rows.inner_axes, rows.unit_kind) == (["train_seed"], ["sample.seed"], "training seed")
    assert [group.label for group in rows.groups] == ["steps=2", "steps=3"]
    for group in rows.groups:
        steps = group.values["steps"]
        assert group.units["eval/fid@6"] == {f"train_seed={t}": pytest.approx((fids[t, steps, "0"]
                                                                               + fids[t, steps, "1"]) / 2)
                                             for t in ("0", "1")}
